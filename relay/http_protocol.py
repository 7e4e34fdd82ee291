"""uvicorn's httptools protocol with what the relay needs and uvicorn lacks.

- A cap on the request head. httptools buffers a header line of any length (uvicorn has a limit for
  h11 only), so one client could make the relay hold megabytes per connection; past `MAX_HEAD_BYTES`
  the request gets a JSON 431 and the connection is closed.
- The `relay.connection` scope extension (`connection_of(scope)`): `abort()`, since ASGI can only end
  a response and uvicorn's close then waits for the unsent bytes, so a cut client that keeps its
  socket and never reads would keep the connection forever (abort drops the unsent bytes); a
  `listener` told when the client goes, so a stream learns it without a task parked in `receive()`
  for it; and the transport's `write`, with the listener told when the transport pauses, so the
  fan-out writes each event's bytes into a socket with no ASGI message, no flow check and no call
  of the relay's per client.
- The response head and the first body part leave in one write. uvicorn writes each ASGI message
  at once: for an event stream that is two packets and two wake-ups of the client per connection.
- No asyncio.Event per connection until something waits on it. uvicorn keeps two (the write
  flow's and the request body's), 760 bytes each with their deques, for as long as a connection
  lasts; an event stream's is rarely paused and never reads a body. Likewise its queue of
  pipelined requests is a list (56 bytes) rather than a deque (760).
"""

from __future__ import annotations

import asyncio
import json
import logging
import weakref
from collections.abc import Callable, Coroutine
from typing import Any, Literal, NamedTuple, Protocol, cast, runtime_checkable

import httptools
from starlette.types import Receive, Scope, Send
from uvicorn._types import ASGI3Application
from uvicorn.config import Config
from uvicorn.logging import TRACE_LOG_LEVEL
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)
from uvicorn.protocols.utils import get_local_addr, get_remote_addr, is_ssl
from uvicorn.server import ServerState

MAX_HEAD_BYTES = (
    64 * 1024
)  # request line and headers; a token is < 1 KiB, browsers cap cookies near 8 KiB
CONNECTION_EXTENSION = "relay.connection"

_431_BODY = json.dumps(
    {"error": f"the request head is larger than {MAX_HEAD_BYTES} bytes; send smaller headers"}
).encode()
_431 = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"content-type: application/json\r\n"
    b"content-length: " + str(len(_431_BODY)).encode() + b"\r\n"
    b"connection: close\r\n\r\n" + _431_BODY
)


def http_chunk(body: bytes) -> bytes:
    """`body` framed as one chunk of a chunked HTTP/1.1 response."""
    return b"%x\r\n%b\r\n" % (len(body), body)


class Listener(Protocol):
    """What a request that holds its connection open is told (a subscriber, relay/subscriber.py)."""

    def closed(self) -> None:
        """The client has gone."""

    def paused(self) -> None:
        """The transport paused writing (its buffer passed the high-water mark); called from
        inside the write that filled it."""


class Stream(Protocol):
    """An event stream as the app hands it to this protocol to serve (relay/stream.py)."""

    headers: list[tuple[bytes, bytes]]  # beyond the server's own (`date`, `server`)

    def opening(self) -> bytes:
        """The first body bytes, handed over once."""

    def serve(
        self, send: Send, connection: Connection | None, receive: Receive | None = None
    ) -> Coroutine[Any, Any, None]:
        """The rest of the response, once its head and opening bytes are out (`receive` None)."""


@runtime_checkable
class StreamOpener(Protocol):
    """An app that can open some requests' streams itself, without being called through ASGI."""

    def open_stream(self, scope: Scope) -> Stream | None:
        """The request's stream, admitted, if it opens at once; None: call the app as usual."""


class Connection:
    """One request's view of its connection, beyond ASGI."""

    __slots__ = ("_cycle", "_flow", "_transport", "head_bytes", "is_lost", "listener")

    def __init__(self, transport: asyncio.Transport, flow: FlowControl) -> None:
        self._transport = transport
        self._flow = flow
        # The protocol's: the bytes of the request head received so far; None once it is complete.
        self.head_bytes: int | None = 0
        # Once the request's headers are in. Weak: the cycle's scope holds this connection, and a
        # strong reference back would leave every finished request to the cycle collector.
        self._cycle: weakref.ref[RequestResponseCycle] | None = None
        self.is_lost = False
        # One object rather than two callbacks: each open stream keeps it (relay/serve.py says
        # why the objects a client keeps matter).
        self.listener: Listener | None = None

    def bind(self, cycle: RequestResponseCycle) -> None:
        """The protocol's: the request/response cycle this connection now serves."""
        self._cycle = weakref.ref(cycle)

    def abort(self) -> None:
        """Close the socket now, dropping what is still unsent."""
        self._transport.abort()

    def writer(self) -> Callable[[bytes], object] | None:
        """The transport's own `write`, for body parts framed once for every client (see
        `http_chunk`), while the response is a chunked body under way (an event stream, once its
        first part is out).

        It is what uvicorn's `send` of a body part calls when it need not wait. The caller must
        not write while the transport is paused (`Listener.paused`, `writable`); a write to a
        transport that the client reset before its loss was reported raises, as uvicorn's would.
        """
        cycle = self._cycle() if self._cycle is not None else None
        if cycle is None or not cycle.chunked_encoding or cycle.response_complete:
            return None
        return self._transport.write

    @property
    def write_paused(self) -> bool:
        """Whether the transport has paused writing: its buffer is past the high-water mark."""
        return self._flow.write_paused

    async def writable(self) -> None:
        """Returns once the transport takes writes again (at once if it is not paused); also
        when the client has gone."""
        await self._flow.drain()


def connection_of(scope: Scope) -> Connection | None:
    """The request's connection, when the server is this protocol."""
    extension = scope.get("extensions", {}).get(CONNECTION_EXTENSION)
    return cast(Connection, extension["connection"]) if extension else None


class _FlowControl(FlowControl):
    """uvicorn's, with the asyncio.Event that `drain` waits on made when writing pauses, and
    let go when it resumes."""

    def __init__(self, transport: asyncio.Transport) -> None:  # uvicorn's would make the Event
        self._transport = transport  # what FlowControl's pause_reading and resume_reading use
        self.read_paused = False
        self.write_paused = False
        self._writable: asyncio.Event | None = None  # while writing is paused

    async def drain(self) -> None:
        if self._writable is not None:
            await self._writable.wait()

    def pause_writing(self) -> None:
        if not self.write_paused:
            self.write_paused = True
            self._writable = asyncio.Event()

    def resume_writing(self) -> None:
        if self.write_paused:
            self.write_paused = False
            writable, self._writable = self._writable, None
            if writable is not None:
                writable.set()


class _MessageEvent:
    """What uvicorn's request cycle uses of the asyncio.Event that tells `receive` of request body
    and disconnection, with the Event made only when `receive` has to wait."""

    __slots__ = ("_event", "_set")

    def __init__(self) -> None:
        self._set = False
        self._event: asyncio.Event | None = None

    def set(self) -> None:
        self._set = True
        if self._event is not None:
            self._event.set()

    def clear(self) -> None:
        self._set = False
        if self._event is not None:
            self._event.clear()

    async def wait(self) -> bool:
        if self._set:
            return True
        if self._event is None:
            self._event = asyncio.Event()
        return await self._event.wait()


class _Pipeline(list[Any]):
    """The queue of pipelined requests, as uvicorn uses it (`appendleft`, `pop`, truth): a client
    rarely pipelines, and never more than a few requests."""

    def appendleft(self, item: Any) -> None:
        self.insert(0, item)


class _HeadWithFirstBody:
    """Stands in for the transport of one request/response cycle until its head has left.

    uvicorn marks the response started just before writing the head, which is how the head is told
    from a `100 Continue`. The head is held until the next write joins it, or until the end of the
    loop iteration (a response that sends nothing more yet), and any other use lets it go first.
    """

    def __init__(self, cycle: RequestResponseCycle, transport: asyncio.Transport) -> None:
        self._cycle = weakref.ref(cycle)  # the cycle holds this: no strong reference back
        self._transport = transport
        self._head: bytes | None = None

    def write(self, data: bytes) -> None:
        cycle = self._cycle()
        if self._head is not None:
            data = self._head + data
        elif cycle is not None and cycle.response_started:
            self._head = data
            asyncio.get_running_loop().call_soon(self._release)
            return
        self._done()
        self._transport.write(data)

    def _release(self) -> None:
        head = self._head
        if head is not None:
            self._done()
            self._transport.write(head)

    def _done(self) -> None:
        self._head = None
        if (cycle := self._cycle()) is not None:
            cycle.transport = self._transport

    def close(self) -> None:
        self._release()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _PerServer(NamedTuple):
    """What uvicorn's protocol looks up again for every connection, though it is the same for every
    connection of a server: looked up at its first connection, kept on its ServerState."""

    loop: asyncio.AbstractEventLoop
    logger: logging.Logger
    access_logger: logging.Logger
    access_log: bool
    asgi_version: Literal["2.0", "3.0"]
    opener: StreamOpener | None  # the app, if it opens streams itself
    # The proxies whose X-Forwarded-* headers the app's ProxyHeadersMiddleware honours, if any.
    proxies: Any


_PER_SERVER = "relay_per_server"  # the attribute of uvicorn's ServerState that holds _PerServer


def _per_server(config: Config, server_state: ServerState) -> _PerServer:
    shared: _PerServer | None = getattr(server_state, _PER_SERVER, None)
    if shared is None:
        access_logger = logging.getLogger("uvicorn.access")
        app: object = config.loaded_app
        proxies = None
        if isinstance(app, ProxyHeadersMiddleware):
            proxies = app.trusted_hosts
            app = app.app
        shared = _PerServer(
            asyncio.get_running_loop(),
            logging.getLogger("uvicorn.error"),
            access_logger,
            access_logger.hasHandlers(),
            config.asgi_version,
            app if isinstance(app, StreamOpener) else None,
            proxies,
        )
        setattr(server_state, _PER_SERVER, shared)
    return shared


class RelayHttpProtocol(HttpToolsProtocol):
    # One instance attribute beyond uvicorn's 28, and set in __init__: CPython 3.11 keeps up to 29
    # attributes of an instance in a compact layout shared by its class when all but one are set
    # in __init__ (uvicorn sets `url` later); past that each connection gets its own 1.5 KB dict
    # (tests/test_http_protocol.py checks). Per-request state lives on Connection.
    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        # uvicorn's HttpToolsProtocol.__init__, the same attributes in the same order
        # (tests/test_http_protocol.py compares them), without its two logger look-ups (each
        # under logging's lock), the walk of the access logger's handlers and the config's
        # properties on every connection: a connection's CPU is what a reconnecting fleet pays.
        shared = _per_server(config, server_state)
        self.config = config
        self.app = config.loaded_app
        self.loop = _loop or shared.loop
        self.logger = shared.logger
        self.access_logger = shared.access_logger
        self.access_log = shared.access_log
        self.parser = httptools.HttpRequestParser(self)
        self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
        self.ws_protocol_class = config.ws_protocol_class
        self.root_path = config.root_path
        self.asgi_version = shared.asgi_version
        self.limit_concurrency = config.limit_concurrency
        self.app_state = app_state
        self.timeout_keep_alive_task = None
        self.timeout_keep_alive = config.timeout_keep_alive
        self.server_state = server_state
        self.connections = server_state.connections
        self.tasks = server_state.tasks
        self.transport = None  # type: ignore[assignment]
        self.flow = None  # type: ignore[assignment]
        self.server = None
        self.client = None
        self.scheme = None
        self.pipeline = _Pipeline()  # type: ignore[assignment]
        self.scope = None  # type: ignore[assignment]
        self.headers = None  # type: ignore[assignment]
        self.expect_100_continue = False
        self.cycle = None  # type: ignore[assignment]
        self._connection: Connection | None = None  # the current request's, from its first byte

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        # uvicorn's, with the relay's flow control in place of one made to be thrown away.
        self.connections.add(self)
        self.transport = transport
        self.flow = _FlowControl(transport)
        self.server = get_local_addr(transport)
        self.client = get_remote_addr(transport)
        self.scheme = "https" if is_ssl(transport) else "http"
        if self.logger.level <= TRACE_LOG_LEVEL:
            prefix = f"{self.client[0]}:{self.client[1]} - " if self.client else ""
            self.logger.log(TRACE_LOG_LEVEL, "%sHTTP connection made", prefix)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        connection = self._connection = Connection(self.transport, self.flow)
        self.scope["extensions"] = {CONNECTION_EXTENSION: {"connection": connection}}

    def on_headers_complete(self) -> None:
        connection = self._connection
        if connection is not None:
            connection.head_bytes = None
        previous = self.cycle
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not previous and cycle is not None:
            if not cycle.response_started:  # else the protocol opened its stream and wrote its head
                cycle.transport = _HeadWithFirstBody(cycle, self.transport)  # type: ignore[assignment]
            cycle.message_event = _MessageEvent()  # type: ignore[assignment]
            if connection is not None:
                connection.bind(cycle)

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        """The app's stream opened here when it can be, served by a task of its own with no ASGI
        call; else uvicorn's task, which calls the app."""
        scope = cast(Scope, cycle.scope)
        connection = connection_of(scope)
        stream = None if connection is None else self._open_stream(scope, cycle, app)
        if stream is None or connection is None:
            super()._start_asgi_task(cycle, app)
            return
        connection.bind(cycle)
        # What uvicorn's send would write for the head of a chunked 200 and its first body part,
        # in one write; from here the cycle's send frames the body parts as for any response.
        cycle.response_started = True
        cycle.chunked_encoding = True
        self.transport.write(
            _stream_head(self.server_state.default_headers, stream.headers)
            + http_chunk(stream.opening())
        )
        task = self.loop.create_task(_serve(stream, cycle, connection, self.logger))
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    def _open_stream(
        self, scope: Scope, cycle: RequestResponseCycle, app: ASGI3Application
    ) -> Stream | None:
        shared = _per_server(self.config, self.server_state)
        if (
            shared.opener is None
            or app is not self.app  # uvicorn answers it (over limit_concurrency)
            or cycle.transport is not self.transport  # a pipelined request, started late
            or not cycle.keep_alive  # HTTP/1.0 or Connection: close: uvicorn's head says so
            or _forwarded(scope, shared.proxies)
        ):
            return None
        return shared.opener.open_stream(scope)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        connection = self._connection
        if connection is None or connection.head_bytes is None or self.transport.is_closing():
            return
        connection.head_bytes += len(data)
        if connection.head_bytes > MAX_HEAD_BYTES:
            self.logger.warning("request head over %d bytes refused", MAX_HEAD_BYTES)
            self.transport.write(_431)
            self.transport.close()

    def pause_writing(self) -> None:
        super().pause_writing()
        connection = self._connection
        if connection is not None and connection.listener is not None:
            connection.listener.paused()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        connection = self._connection
        if connection is not None and not connection.is_lost:
            connection.is_lost = True
            if connection.listener is not None:
                connection.listener.closed()


_HEADS: list[Any] = [None, None, b""]  # the last head built: its server headers, stream headers


def _stream_head(
    server_headers: list[tuple[bytes, bytes]], headers: list[tuple[bytes, bytes]]
) -> bytes:
    """A chunked 200's head as uvicorn's send writes it, built again only when uvicorn's own
    headers change (its `date`, once a second)."""
    if _HEADS[0] is not server_headers or _HEADS[1] is not headers:
        lines = [STATUS_LINE[200]]
        for name, value in [*server_headers, *headers]:
            lines += [name.lower(), b": ", value, b"\r\n"]
        lines.append(b"transfer-encoding: chunked\r\n\r\n")
        _HEADS[:] = [server_headers, headers, b"".join(lines)]
    head: bytes = _HEADS[2]
    return head


def _forwarded(scope: Scope, proxies: Any) -> bool:
    """Whether ProxyHeadersMiddleware would take the client or scheme from X-Forwarded-* headers:
    then the request goes through it, the ASGI way."""
    client = scope["client"]
    if proxies is None or not client or client[0] not in proxies:
        return False
    return any(name in (b"x-forwarded-for", b"x-forwarded-proto") for name, _ in scope["headers"])


async def _serve(
    stream: Stream, cycle: RequestResponseCycle, connection: Connection, logger: logging.Logger
) -> None:
    """A stream the protocol opened, with what uvicorn's run_asgi does around an app."""
    try:
        await stream.serve(cast(Send, cycle.send), connection)
    except BaseException as exc:
        logger.error("Exception in ASGI application\n", exc_info=exc)
        cycle.transport.close()
    else:
        if not cycle.response_complete and not cycle.disconnected:
            logger.error("ASGI callable returned without completing response.")
            cycle.transport.close()
    finally:
        cycle.on_response = lambda: None
