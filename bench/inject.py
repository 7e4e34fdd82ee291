"""Publishing the bench's events through the DialStack simulator, each stamped with its send time.

A few keep-alive HTTP/1.1 connections written by hand: a thousand injections a second through
httpx would cost the machine more CPU than some of the servers under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

EVENT_TYPE = "call.incoming"
CONNECTIONS = 8


class _Connection:
    """One keep-alive connection, opened again when the server has closed it while idle."""

    def __init__(self, host: str, port: int) -> None:
        self._host = host
        self._port = port
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def request(self, method: str, path: str, body: bytes) -> tuple[int, bytes]:
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {self._host}:{self._port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        if self._streams is not None:
            try:
                return await self._exchange(head + body)
            except (ConnectionError, asyncio.IncompleteReadError):
                # uvicorn closes a connection idle for 5 s; the request never reached it.
                await self.close()
        self._streams = await asyncio.open_connection(self._host, self._port)
        return await self._exchange(head + body)

    async def _exchange(self, request: bytes) -> tuple[int, bytes]:
        assert self._streams is not None
        reader, writer = self._streams
        writer.write(request)
        status_line = await reader.readline()
        if not status_line:
            raise ConnectionResetError("closed by the server")
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        answer = await reader.readexactly(length)
        return int(status_line.split()[1]), answer

    async def close(self) -> None:
        if self._streams is not None:
            _, writer = self._streams
            self._streams = None
            writer.close()
            with contextlib.suppress(OSError):  # the simulator may already be gone
                await writer.wait_closed()


def event_data(seq: int, account_id: str) -> dict[str, Any]:
    """A call event of realistic size whose first fields are what bench.client.EVENT matches."""
    return {
        "seq": seq,
        "sent": time.time(),
        "account_id": account_id,
        "call_id": f"call_01hzbench{seq:016d}",
        "direction": "inbound",
        "from_number": "+14155550123",
        "from_name": "John Smith",
        "to_number": "+14155550187",
        "user_id": None,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


class SimulatorClient:
    def __init__(self, host: str, port: int) -> None:
        self._host = host
        self._port = port
        self._idle: asyncio.Queue[_Connection] = asyncio.Queue()
        self._all: list[_Connection] = []

    async def __aenter__(self) -> SimulatorClient:
        for _ in range(CONNECTIONS):
            connection = _Connection(self._host, self._port)
            self._all.append(connection)
            self._idle.put_nowait(connection)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for connection in self._all:
            await connection.close()

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[_Connection]:
        connection = await self._idle.get()
        try:
            yield connection
        finally:
            self._idle.put_nowait(connection)

    async def inject(self, account_id: str, seq: int) -> None:
        async with self._connection() as connection:
            # Stamped once a connection is free: waiting for one is the bench's delay, not
            # the server's.
            data = event_data(seq, account_id)
            body = json.dumps({"account_id": account_id, "type": EVENT_TYPE, "data": data})
            status, answer = await connection.request("POST", "/v1/simulator/inject", body.encode())
        if status != 200:
            raise RuntimeError(f"the simulator refused an injection: {status} {answer[:200]!r}")

    async def open_streams(self) -> dict[str, int]:
        """Open `/v1/events` streams per account, as the simulator counts them."""
        async with self._connection() as connection:
            status, answer = await connection.request("GET", "/v1/simulator/stats", b"")
        if status != 200:
            raise RuntimeError(f"simulator stats answered {status}")
        accounts: dict[str, dict[str, int]] = json.loads(answer)["accounts"]
        return {account: stats["open_streams"] for account, stats in accounts.items()}

    async def publish(self, accounts: list[str], first: int, count: int, rate: float) -> float:
        """Events `first` .. `first + count - 1` into every account, `rate` a second each.

        The accounts' events are spread evenly over each period rather than sent in one burst.
        Returns the rate achieved, in events a second over all accounts: below the one asked
        for when the simulator cannot keep up.
        """
        loop = asyncio.get_running_loop()
        start = loop.time()
        sends: list[asyncio.Task[None]] = []
        for k in range(count):
            for index, account in enumerate(accounts):
                delay = start + (k + index / len(accounts)) / rate - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)  # pacing, not synchronisation
                sends.append(asyncio.create_task(self.inject(account, first + k)))
        await asyncio.gather(*sends)
        return len(sends) / max(loop.time() - start, count / rate)
