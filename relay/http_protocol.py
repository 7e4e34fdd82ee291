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
from collections.abc import Callable
from typing import Any, Literal, NamedTuple, Protocol, cast

import httptools
from starlette.types import Scope
from uvicorn.config import Config
from uvicorn.logging import TRACE_LOG_LEVEL
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
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


_PER_SERVER = "relay_per_server"  # the attribute of uvicorn's ServerState that holds _PerServer


def _per_server(config: Config, server_state: ServerState) -> _PerServer:
    shared: _PerServer | None = getattr(server_state, _PER_SERVER, None)
    if shared is None:
        access_logger = logging.getLogger("uvicorn.access")
        shared = _PerServer(
            asyncio.get_running_loop(),
            logging.getLogger("uvicorn.error"),
            access_logger,
            access_logger.hasHandlers(),
            config.asgi_version,
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
            cycle.transport = _HeadWithFirstBody(cycle, self.transport)  # type: ignore[assignment]
            cycle.message_event = _MessageEvent()  # type: ignore[assignment]
            if connection is not None:
                connection.bind(cycle)

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
