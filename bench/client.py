"""One benchmark subscriber: a raw HTTP/1.1 SSE connection, read just enough to count events.

Ten thousand of these share two cores with the server under test, so each is an asyncio
Protocol (no task, no StreamReader) and a received chunk is scanned with C-level bytes
operations: the events are the bench's own, whose data starts with
`{"seq": N, "sent": T, "account_id": "acct_..."`, so one regex pass over the complete blocks
finds them all. Blocks may end with LF LF (the relay) or CRLF CRLF (sse-starlette's default).
"""

from __future__ import annotations

import asyncio
import re
import time
from array import array
from typing import cast

EVENT = re.compile(rb'"seq": (\d+), "sent": ([0-9.]+), "account_id": "([^"]+)"')
_CONNECTED = b"event: connected"
_MAX_HEAD_BYTES = 16 * 1024


class ConnectFailed(Exception):
    """The server answered with an error or closed before the `connected` event."""


class Dechunker:
    """Undoes HTTP/1.1 chunked transfer coding, fed in pieces of any size."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._left = 0  # bytes of chunk data still to come
        self._trailing = 0  # bytes of the CRLF after chunk data still to skip

    def feed(self, data: bytes) -> bytes:
        if not self._buffer and not self._left and not self._trailing:
            # The common case: one write of the server is one read here, a whole chunk.
            eol = data.find(b"\r\n")
            if 0 < eol < 8 and data[:eol].isalnum() and data.endswith(b"\r\n"):
                start = eol + 2
                if int(data[:eol], 16) == len(data) - start - 2:
                    return data[start:-2]
        buffer = self._buffer
        buffer += data
        out = bytearray()
        at = 0
        while at < len(buffer):
            if self._left:
                take = min(self._left, len(buffer) - at)
                out += buffer[at : at + take]
                at += take
                self._left -= take
                if not self._left:
                    self._trailing = 2
            elif self._trailing:
                take = min(self._trailing, len(buffer) - at)
                at += take
                self._trailing -= take
            else:
                end = buffer.find(b"\r\n", at)
                if end < 0:
                    break
                # The last chunk (size 0) ends the body; the server then closes, which is seen
                # as connection_lost.
                self._left = int(bytes(buffer[at:end]).split(b";", 1)[0], 16)
                at = end + 2
        del buffer[:at]
        return bytes(out)


class Recorder:
    """What all the clients of one worker process received, and who is still waiting."""

    def __init__(self) -> None:
        self.latencies = array("d")  # seconds from injection to receipt, live events only
        self.foreign = 0  # events of another account, or with a sequence number never sent
        self.target = -1  # distinct events a client needs to be complete; -1 while not collecting
        self.waiting = 0
        self.all_complete = asyncio.Event()
        self.connections = 0
        self.all_closed = asyncio.Event()
        self.all_closed.set()

    def expect(self, target: int, clients: list[BenchClient]) -> None:
        self.target = target
        self.waiting = sum(1 for c in clients if c.is_open and c.distinct < target)
        self.all_complete.clear()
        if not self.waiting:
            self.all_complete.set()

    def stop_expecting(self) -> None:
        self.target = -1

    def one_done(self) -> None:
        self.waiting -= 1
        if self.waiting <= 0:
            self.all_complete.set()

    def connection_made(self) -> None:
        self.connections += 1
        self.all_closed.clear()

    def connection_lost(self) -> None:
        self.connections -= 1
        if not self.connections:
            self.all_closed.set()


class BenchClient:
    """One simulated EventSource: its token, what it received over all its connections."""

    __slots__ = (
        "account_id",
        "connection",
        "distinct",
        "duplicates",
        "failure",
        "is_open",
        "last_event_id",
        "number",
        "opened",
        "recorder",
        "seen",
        "token",
    )

    def __init__(
        self, number: int, account_id: str, token: str, events: int, recorder: Recorder
    ) -> None:
        self.number = number
        self.account_id = account_id.encode()
        self.token = token
        self.recorder = recorder
        self.seen = bytearray(events)
        self.distinct = 0
        self.duplicates = 0
        self.last_event_id: bytes | None = None
        self.failure: str | None = None  # why the latest connection failed or ended early
        self.is_open = False
        self.opened: asyncio.Future[None] | None = None
        self.connection: SSEConnection | None = None

    def request(self, host: str, port: int) -> bytes:
        lines = [
            "GET /v1/events HTTP/1.1",
            f"Host: {host}:{port}",
            "Accept: text/event-stream",
            "Cache-Control: no-cache",
            f"Authorization: Bearer {self.token}",
        ]
        if self.last_event_id is not None:
            lines.append(f"Last-Event-ID: {self.last_event_id.decode()}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def receive(self, blocks: bytes, now: float, since: float) -> None:
        """Complete SSE blocks; events sent before `since` (replayed ones) get no latency."""
        if not self.is_open:
            if _CONNECTED not in blocks:
                return
            self.is_open = True
            if self.opened is not None and not self.opened.done():
                self.opened.set_result(None)
        recorder = self.recorder
        seen = self.seen
        for match in EVENT.finditer(blocks):
            seq = int(match[1])
            if match[3] != self.account_id or seq >= len(seen):
                recorder.foreign += 1
                continue
            if seen[seq]:
                self.duplicates += 1
                continue
            seen[seq] = 1
            self.distinct += 1
            sent = float(match[2])
            if sent >= since:
                recorder.latencies.append(now - sent)
            if self.distinct == recorder.target:
                recorder.one_done()
        at = blocks.rfind(b"\nid: ")
        start = at + 5 if at >= 0 else 4 if blocks.startswith(b"id: ") else -1
        if start >= 0:
            # Every line of a complete block ends with LF, CRLF included.
            self.last_event_id = blocks[start : blocks.find(b"\n", start)].rstrip(b"\r")

    def fail(self, reason: str) -> None:
        self.failure = reason
        if self.opened is not None and not self.opened.done():
            self.opened.set_exception(ConnectFailed(reason))

    def ended(self, closing: bool) -> None:
        """The connection is gone; `closing` when the bench itself closed it."""
        if self.is_open and not closing:
            self.failure = "dropped by the server"
            if self.distinct < self.recorder.target:
                self.recorder.one_done()
        elif not self.is_open and self.failure is None:
            self.fail("closed before the connected event")
        self.is_open = False
        self.connection = None


class SSEConnection(asyncio.Protocol):
    def __init__(self, client: BenchClient, request: bytes) -> None:
        self._client = client
        self._request = request
        self._head: bytearray | None = bytearray()
        self._chunks: Dechunker | None = None
        self._sse = bytearray()
        self._started = time.time()
        self._transport: asyncio.Transport | None = None
        self._closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not derive from asyncio.Transport, but have its methods.
        self._transport = cast(asyncio.Transport, transport)
        self._client.connection = self
        self._client.recorder.connection_made()
        self._transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        now = time.time()
        if self._head is not None:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                if len(self._head) > _MAX_HEAD_BYTES:
                    self._refuse("response head too large")
                return
            head = bytes(self._head[:end]).lower()
            data = bytes(self._head[end + 4 :])
            self._head = None
            status = head.split(b" ", 2)[1]
            if status != b"200":
                self._refuse(f"HTTP {status.decode(errors='replace')}")
                return
            if b"\r\ntransfer-encoding: chunked" in head:
                self._chunks = Dechunker()
        if self._chunks is not None:
            data = self._chunks.feed(data)
        sse = self._sse
        if not sse and data.endswith((b"\n\n", b"\r\n\r\n")):
            self._client.receive(data, now, self._started)  # whole blocks: no copy
            return
        sse += data
        lf, crlf = sse.rfind(b"\n\n"), sse.rfind(b"\r\n\r\n")
        end = max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)
        if not end:
            return
        blocks = bytes(sse[:end])
        del sse[:end]
        self._client.receive(blocks, now, self._started)

    def connection_lost(self, exc: Exception | None) -> None:
        self._client.ended(self._closing)
        self._client.recorder.connection_lost()

    def close(self) -> None:
        self._closing = True
        if self._transport is not None:
            self._transport.close()

    def _refuse(self, reason: str) -> None:
        self._client.fail(reason)
        self.close()
