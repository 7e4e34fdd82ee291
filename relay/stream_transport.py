"""An httpx transport for the upstream's requests: one request per connection, read by callbacks.

httpx's own transport reads a response body through httpcore, h11 and anyio: an anyio cancel scope,
a pause and a resume of the socket's reading, an h11 state-machine step and five nested async
generators for every chunk. An upstream event is one chunk, so that stack cost about 150 µs of CPU
per event here, more than every other step of relaying it together. This transport parses the
response with httptools (llhttp, C; uvicorn[standard] already brings it) as the bytes arrive, and
`read_body` hands each body chunk to its receiver from that same callback. Everything above it
stays httpx: the client, its requests and responses, event hooks, timeouts and content decoding.

It serves the upstream's `GET /v1/events` and session requests (relay/upstream.py, runtime.py):
no pooling, no keep-alive, no HTTP/2, no proxy. A stream holds its connection for an hour and a
session is fetched once an hour per account, so a pool would save little; httpcore's costs more
than it saves, since it scans every pooled connection on every request (quadratic in the size of
the pool when 1,000 accounts start at once). When the environment names a proxy (HTTP_PROXY,
HTTPS_PROXY, ALL_PROXY), `for_upstream` returns None and httpx's own transport, which honours it,
is used instead.
"""

from __future__ import annotations

import asyncio
import ssl
import urllib.request
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import cast

import httptools
import httpx

# A consumer this far behind stops the socket being read, so TCP pushes back on the upstream.
_PAUSE_ABOVE_BYTES = 1024 * 1024
_RESUME_BELOW_BYTES = 256 * 1024
_BODY = "relay.body"  # the response extension that holds this transport's body

# Takes one body chunk; returns False when its consumer is full (see read_body).
Receive = Callable[[bytes], bool]
Room = Callable[[], Awaitable[None]]


async def read_body(response: httpx.Response, receive: Receive, room: Room) -> None:
    """Hand each chunk of a streamed `response` to `receive`, in order, until the body ends
    (returns) or fails (raises what httpx would, or what `receive` raised).

    When `receive` returns False its consumer is full: no chunk is handed over again until
    `room()` has returned, and meanwhile the socket is not read, so TCP pushes back upstream.

    When this transport served the response and nothing needs decoding, `receive` is called from
    the socket's callback as the bytes arrive: a steady stream costs no task wake-up, future or
    async generator step per chunk, which saved 8% of the CPU that relaying an upstream event
    costs (bench, 1,000 accounts, alternating runs); httpx's `aiter_bytes` would add four async
    generators more (decoding, chunking, counting, the client's binding), another 7%. A compressed
    body, or one served by httpx's own transport (a proxy is configured), is read through
    `aiter_bytes`.
    """
    body = response.extensions.get(_BODY)
    if isinstance(body, _Body) and "content-encoding" not in response.headers:
        await body.push_to(receive, room)
        return
    async for chunk in response.aiter_bytes():
        if not receive(chunk):
            await room()


def for_upstream(tls: ssl.SSLContext) -> StreamTransport | None:
    """The transport for upstream requests, or None when the environment configures a proxy."""
    proxies = urllib.request.getproxies()
    if any(proxies.get(scheme) for scheme in ("http", "https", "all")):
        return None
    return StreamTransport(tls)


class _Response(asyncio.Protocol):
    """One connection: the response head, then its body chunks as they arrive."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.head: asyncio.Future[int] = self._loop.create_future()
        self.chunks: deque[bytes] = deque()  # arrived, not yet taken or pushed
        self._buffered = 0
        self._reading_paused = False
        # While the body is pushed (read_body), each chunk goes straight to the receiver, unless it
        # said it is full: then chunks wait in `chunks`, the socket unread, until `release()`.
        self._receive: Receive | None = None
        self.held = False
        self.receive_error: Exception | None = None  # what the receiver raised; ends the body
        self.complete = False  # the whole body arrived
        self._interim = False  # parsing a 1xx answer, which has no body and is not the response
        self.error: httpx.TransportError | None = None
        self._waiter: asyncio.Future[None] | None = None
        # The read timeout: one timer for the whole body, re-armed when it finds the consumer was
        # not waiting all along, rather than a timer set and cancelled around every wait.
        self._read_timeout = 0.0
        self._waiting_since = 0.0
        self._watchdog: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            # Its message can quote the bytes on the wire: only the kind is kept.
            self._fail(httpx.RemoteProtocolError(f"malformed HTTP response ({type(exc).__name__})"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.complete and self.error is None:
            if self.head.done() and self._delimited_by_close():
                self.complete = True  # an HTTP/1.0-style body ends with the connection
            else:
                self._fail(httpx.ReadError("the server closed the connection mid-response"))
        self._wake()

    # -- httptools callbacks -------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        self._interim = 100 <= status < 200  # 103 Early Hints: the response proper follows
        if self._interim:
            self.headers.clear()
        elif not self.head.done():
            self.head.set_result(status)

    def on_body(self, body: bytes) -> None:
        if self._receive is not None and not self.held:
            self._waiting_since = self._loop.time()  # for the read timeout: the silence is over
            self._push(body)
            return
        self.chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _PAUSE_ABOVE_BYTES:
            self._pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self.complete = True
        self._wake()
        self.close()  # one request per connection

    # -- for the body iterator -----------------------------------------------------------------

    def take(self) -> bytes:
        chunk = self._pop()
        if self._buffered < _RESUME_BELOW_BYTES:
            self._resume_reading()
        return chunk

    # -- for read_body -------------------------------------------------------------------------

    def start_pushing(self, receive: Receive) -> None:
        """From now on hand each chunk to `receive`, starting with those already buffered."""
        self._receive = receive
        self.release()

    def stop_pushing(self) -> None:
        self._receive = None

    def release(self) -> None:
        """The receiver has room again: hand it what was held back, then read the socket again."""
        self.held = False
        while self.chunks and not self.held and self._receive is not None:
            self._push(self._pop())
        if not self.held:
            self._resume_reading()

    def _push(self, chunk: bytes) -> None:
        assert self._receive is not None
        try:
            more = self._receive(chunk)
        except Exception as exc:  # the receiver's own verdict on the bytes (a line too long, say)
            self.receive_error = exc
            self._receive = None
            self.close()
            self._wake()
            return
        if not more:
            self.held = True
            self._pause_reading()
            self._wake()

    async def arrival(self) -> None:
        """Returns once there is a chunk, the end, or an error (a read timeout, see `watch`)."""
        self._waiting_since = self._loop.time()
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def watch(self, read_timeout: float) -> None:
        """Fail the body with ReadTimeout once one wait in `arrival` lasts `read_timeout` seconds."""
        self._read_timeout = read_timeout
        self._watchdog = self._loop.call_later(read_timeout, self._check_wait)

    def unwatch(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def _check_wait(self) -> None:
        self._watchdog = None
        if self.complete or self.error is not None:
            return
        now = self._loop.time()
        if self._waiter is None:  # busy, not waiting: no wait can time out before now + timeout
            self._watchdog = self._loop.call_at(now + self._read_timeout, self._check_wait)
        elif now - self._waiting_since < self._read_timeout:  # a later wait than the one timed
            self._watchdog = self._loop.call_at(
                self._waiting_since + self._read_timeout, self._check_wait
            )
        else:
            self._fail(httpx.ReadTimeout(f"no data for {self._read_timeout} s"))

    def _pop(self) -> bytes:
        chunk = self.chunks.popleft()
        self._buffered -= len(chunk)
        return chunk

    def _pause_reading(self) -> None:
        if not self._reading_paused and self._transport is not None:
            self._reading_paused = True
            self._transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            if self._transport is not None and not self._transport.is_closing():
                self._transport.resume_reading()

    def send(self, data: bytes) -> None:
        assert self._transport is not None
        self._transport.write(data)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _delimited_by_close(self) -> bool:
        names = {name.lower() for name, _ in self.headers}
        return b"content-length" not in names and b"transfer-encoding" not in names

    def _fail(self, error: httpx.TransportError) -> None:
        if self.error is None:
            self.error = error
        if not self.head.done():
            self.head.set_exception(error)
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class _Body(httpx.AsyncByteStream):
    def __init__(self, response: _Response, read_timeout: float | None) -> None:
        self._response = response
        self._read_timeout = read_timeout

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self.chunks()

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        response = self._response
        if self._read_timeout is not None:
            response.watch(self._read_timeout)
        try:
            while True:
                while response.chunks:
                    yield response.take()
                if response.error is not None:
                    raise response.error
                if response.complete:
                    return
                await response.arrival()
        finally:
            response.unwatch()

    async def push_to(self, receive: Receive, room: Room) -> None:
        """read_body for this transport: `receive` is called from the socket's callback, and this
        task only wakes when the receiver is full, the body is over, or the read timed out."""
        response = self._response
        if self._read_timeout is not None:
            response.watch(self._read_timeout)  # a wait for room is busy, not silent: _check_wait
        try:
            response.start_pushing(receive)
            while True:
                if response.receive_error is not None:
                    raise response.receive_error
                if response.held:
                    await room()
                    response.release()
                elif response.error is not None:
                    raise response.error
                elif response.complete:
                    return
                else:
                    await response.arrival()
        finally:
            response.stop_pushing()
            response.unwatch()

    async def aclose(self) -> None:
        self._response.close()


class StreamTransport(httpx.AsyncBaseTransport):
    def __init__(self, tls: ssl.SSLContext) -> None:
        self._tls = tls

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts = request.extensions.get("timeout", {})
        url = request.url
        if url.scheme not in ("http", "https"):
            raise httpx.UnsupportedProtocol(f"{url.scheme!r} is not http or https")
        tls = self._tls if url.scheme == "https" else None
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeouts.get("connect")):
                _, response = await loop.create_connection(
                    _Response,
                    url.host,
                    url.port or (443 if tls else 80),
                    ssl=tls,
                    server_hostname=url.host if tls else None,
                )
        except TimeoutError:
            raise httpx.ConnectTimeout("connecting timed out") from None
        except OSError as exc:  # ssl.SSLError too
            raise httpx.ConnectError(f"{type(exc).__name__}: {exc}") from None
        try:
            head = [b"%s %s HTTP/1.1" % (request.method.encode(), url.raw_path)]
            head += [b"%s: %s" % pair for pair in request.headers.raw]
            response.send(b"\r\n".join(head) + b"\r\n\r\n" + await request.aread())
            try:
                async with asyncio.timeout(timeouts.get("read")):
                    status = await response.head
            except TimeoutError:
                raise httpx.ReadTimeout("no response head in time") from None
        except BaseException:
            response.close()
            raise
        body = _Body(response, timeouts.get("read"))
        return httpx.Response(
            status,
            headers=response.headers,
            stream=body,
            extensions={"http_version": b"HTTP/1.1", _BODY: body},
        )
