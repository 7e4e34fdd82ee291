"""A test-side SSE client over real HTTP: opens a stream, parses it with the WHATWG parser, waits with deadlines."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import httpx

from relay.sse import Event, SSEParser

_HEARTBEAT = re.compile(rb"^: heartbeat(?:\r\n|\r|\n)", re.M)


@dataclass
class Stream:
    response: httpx.Response
    events: list[Event] = field(default_factory=list)
    received_at: list[float] = field(default_factory=list)  # time.perf_counter() of each event
    raw: bytearray = field(default_factory=bytearray)  # every byte received, for wire-level checks
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def status_code(self) -> int:
        return self.response.status_code

    @property
    def heartbeats(self) -> int:
        # Any of the three SSE line endings; sse-starlette ends its pings with CRLF.
        return len(_HEARTBEAT.findall(self.raw))

    def of_type(self, *types: str) -> list[Event]:
        return [e for e in self.events if e.type in types]

    async def wait_for(
        self, predicate: Callable[[list[Event]], bool], timeout: float = 5.0
    ) -> None:
        """Until `predicate(events)` holds; raises TimeoutError with what arrived otherwise."""
        try:
            async with asyncio.timeout(timeout):
                while not predicate(self.events):
                    if self.closed.is_set():
                        raise ConnectionError(f"stream closed; got {[e.type for e in self.events]}")
                    self._arrived.clear()
                    await self._arrived.wait()
        except TimeoutError:
            raise TimeoutError(
                f"gave up after {timeout}s; got {[(e.type, e.data[:60]) for e in self.events]}"
            ) from None

    async def wait_count(self, event_type: str, count: int, timeout: float = 5.0) -> list[Event]:
        await self.wait_for(
            lambda events: sum(e.type == event_type for e in events) >= count, timeout
        )
        return self.of_type(event_type)

    async def _pump(self) -> None:
        parser = SSEParser()
        try:
            async for chunk in self.response.aiter_raw():
                self.raw += chunk
                parsed = parser.feed(chunk)
                self.events.extend(parsed)
                self.received_at.extend([time.perf_counter()] * len(parsed))
                self._arrived.set()
        except (httpx.HTTPError, asyncio.CancelledError):
            pass
        finally:
            self.closed.set()
            self._arrived.set()


def upstream_connected(events: list[Event]) -> bool:
    """A `wait_for` predicate: the relay told this client its account's upstream is connected."""
    return any(
        e.type == "relay.upstream" and json.loads(e.data)["state"] == "connected" for e in events
    )


@contextlib.asynccontextmanager
async def open_stream(
    client: httpx.AsyncClient,
    url: str,
    *,
    token: str | None = None,
    headers: dict[str, str] | None = None,
    params: dict[str, str] | None = None,
) -> AsyncIterator[Stream]:
    """GET an SSE stream; the body is parsed in the background until the block exits."""
    all_headers = {"Accept": "text/event-stream", **(headers or {})}
    if token is not None:
        all_headers["Authorization"] = f"Bearer {token}"
    request = client.build_request("GET", url, headers=all_headers, params=params)
    response = await client.send(request, stream=True)
    stream = Stream(response)
    pump = asyncio.create_task(stream._pump()) if response.status_code == 200 else None
    if pump is None:
        await response.aread()
        stream.closed.set()
    try:
        yield stream
    finally:
        if pump is not None:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump
        await response.aclose()
