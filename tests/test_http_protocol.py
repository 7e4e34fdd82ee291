"""relay/http_protocol.py: the head cap, the connection extension, and the head sent with the body."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from relay.http_protocol import (
    Connection,
    RelayHttpProtocol,
    _HeadWithFirstBody,
    connection_of,
    http_chunk,
)
from relay.serving import running_server, uvicorn_config

START = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"text/plain")],
}


@dataclass
class Recorded:
    writes: list[bytes] = field(default_factory=list)
    closing: bool = False

    def is_closing(self) -> bool:
        return self.closing

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def close(self) -> None:
        self.writes.append(b"<closed>")


@dataclass
class Cycle:
    response_started: bool = False
    transport: object = None


async def test_the_head_waits_for_the_first_body_and_leaves_with_it() -> None:
    transport, cycle = Recorded(), Cycle()
    cycle.transport = stand_in = _HeadWithFirstBody(cycle, transport)  # type: ignore[arg-type]
    stand_in.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # before the response: not held
    cycle.response_started = True
    stand_in.write(b"HEAD")
    assert transport.writes == [b"HTTP/1.1 100 Continue\r\n\r\n"]
    stand_in.write(b"BODY")
    assert transport.writes[1:] == [b"HEADBODY"]
    restored: object = cycle.transport
    assert restored is transport  # out of the way for every later write
    await asyncio.sleep(0)  # the scheduled release finds nothing left to send
    assert transport.writes[1:] == [b"HEADBODY"]


async def test_a_held_head_leaves_at_the_end_of_the_loop_turn_or_on_close() -> None:
    transport, cycle = Recorded(), Cycle(response_started=True)
    stand_in = _HeadWithFirstBody(cycle, transport)  # type: ignore[arg-type]
    stand_in.write(b"HEAD")
    await asyncio.sleep(0)
    assert transport.writes == [b"HEAD"]
    transport, cycle = Recorded(), Cycle(response_started=True)
    stand_in = _HeadWithFirstBody(cycle, transport)  # type: ignore[arg-type]
    stand_in.write(b"HEAD")
    stand_in.close()
    assert transport.writes == [b"HEAD", b"<closed>"]


@contextlib.asynccontextmanager
async def serving(app: ASGIApp) -> AsyncIterator[tuple[str, int]]:
    async def with_lifespan(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            return await app(scope, receive, send)
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})

    async with running_server(with_lifespan) as url:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        yield host, int(port)


async def read_to_end(reader: asyncio.StreamReader) -> None:
    while await reader.read(65536):
        pass


async def test_a_response_whose_body_comes_later_sends_its_head_at_once() -> None:
    release = asyncio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send(START | {"headers": [(b"content-length", b"4")]})
        await release.wait()
        await send({"type": "http.response.body", "body": b"done"})

    async with serving(app) as (host, port):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK")
        release.set()
        async with asyncio.timeout(5):
            assert await reader.readexactly(4) == b"done"
        writer.close()


async def test_expect_100_continue_is_answered_before_the_body_is_sent() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        body = await receive()
        await send(START)
        await send({"type": "http.response.body", "body": body["body"]})

    async with serving(app) as (host, port):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
        )
        async with asyncio.timeout(5):
            assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"hello")
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 OK")
            assert b"hello" in await reader.readuntil(b"0\r\n\r\n")
        writer.close()


async def test_the_connection_extension_reports_the_client_leaving_and_can_abort() -> None:
    connections: asyncio.Queue[Connection] = asyncio.Queue()
    gone = asyncio.Event()

    class Told:
        def closed(self) -> None:
            gone.set()

        def paused(self) -> None:
            pass

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        connection = connection_of(scope)
        assert connection is not None
        connection.listener = Told()
        await connections.put(connection)
        await send(START)
        await send({"type": "http.response.body", "body": b"x" * 10, "more_body": True})
        await gone.wait()

    async with serving(app) as (host, port):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(5):
            connection = await connections.get()
            await reader.readuntil(b"\r\n\r\n")
        writer.close()  # the client goes: the callback runs, no task had to wait for it
        async with asyncio.timeout(5):
            await gone.wait()
        assert connection.is_lost

        gone.clear()
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(5):
            connection = await connections.get()
            await reader.readuntil(b"\r\n\r\n")
        connection.abort()  # the socket is closed at once: the client sees the end
        with contextlib.suppress(ConnectionResetError):
            await asyncio.wait_for(read_to_end(reader), 5)
        async with asyncio.timeout(5):
            await gone.wait()
        writer.close()


@dataclass
class StreamingCycle:
    chunked_encoding: bool | None = True
    response_complete: bool = False


async def test_the_writer_is_the_transports_own_while_a_chunked_body_is_under_way() -> None:
    transport = Recorded()
    flow = FlowControl(transport)  # type: ignore[arg-type]
    connection = Connection(transport, flow)  # type: ignore[arg-type]
    assert connection.writer() is None  # no request yet
    cycle = StreamingCycle()
    connection.bind(cycle)  # type: ignore[arg-type]
    assert connection.writer() == transport.write
    flow.pause_writing()
    waiting = asyncio.ensure_future(connection.writable())
    await asyncio.sleep(0)
    assert not waiting.done()  # paused: direct writers wait for the drain
    flow.resume_writing()
    async with asyncio.timeout(1):
        await waiting
    cycle.response_complete = True
    assert connection.writer() is None
    cycle.response_complete = False
    del cycle
    assert connection.writer() is None  # the cycle is gone: no writer for it


async def test_a_socket_that_stops_being_read_pauses_its_stream_and_resumes_it_once_drained() -> (
    None
):
    pauses: asyncio.Queue[Connection] = asyncio.Queue()
    done = asyncio.Event()

    class Told:
        def __init__(self, connection: Connection) -> None:
            self.connection = connection

        def closed(self) -> None:
            pass

        def paused(self) -> None:
            pauses.put_nowait(self.connection)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        connection = connection_of(scope)
        assert connection is not None
        await send(START)
        await send({"type": "http.response.body", "body": b"x", "more_body": True})
        write = connection.writer()
        assert write is not None
        connection.listener = Told(connection)
        for _ in range(10_000):  # far past the socket buffers, the client not reading
            write(http_chunk(b"y" * 1024))
            if not pauses.empty():
                break
        await connection.writable()
        done.set()
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async with serving(app) as (host, port):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(5):
            await pauses.get()  # called back from inside the write that filled the buffer
        assert not done.is_set()
        async with asyncio.timeout(10):
            while not done.is_set():  # reading drains it, and the stream goes on
                await reader.read(1 << 20)
        writer.close()


async def serve_one_request(protocol: HttpToolsProtocol) -> None:
    ours, theirs = socket.socketpair()
    await asyncio.get_running_loop().connect_accepted_socket(lambda: protocol, ours)
    reader, writer = await asyncio.open_connection(sock=theirs)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    async with asyncio.timeout(5):
        assert (await reader.readuntil(b"ok")).startswith(b"HTTP/1.1 200 OK")
    writer.close()
    await writer.wait_closed()


async def served_protocol(protocol_class: type[HttpToolsProtocol]) -> HttpToolsProtocol:
    """The last of three connections of `protocol_class`, each having served one request."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send(START)
        await send({"type": "http.response.body", "body": b"ok"})

    config = uvicorn_config(app, lifespan="off")
    config.load()
    protocol = None
    for _ in range(3):  # the class's shared attribute layout is settled by its first instances
        protocol = protocol_class(config=config, server_state=ServerState(), app_state={})
        await serve_one_request(protocol)
    assert protocol is not None
    return protocol


async def test_each_connection_keeps_its_state_compactly() -> None:
    plain = await served_protocol(HttpToolsProtocol)
    relay = await served_protocol(RelayHttpProtocol)
    # relay/http_protocol.py sets uvicorn's attributes itself: none missing, none added but one.
    assert set(vars(relay)) == set(vars(plain)) | {"_connection"}
    assert [
        vars(relay)[name] for name in ("logger", "access_logger", "access_log", "asgi_version")
    ] == [vars(plain)[name] for name in ("logger", "access_logger", "access_log", "asgi_version")]
    # Each attribute more, or one set outside __init__, would give each protocol its own dict.
    assert sys.getsizeof(vars(relay)) < sys.getsizeof(vars(plain)) + 64
    # Nothing waited on either: no asyncio.Event kept (uvicorn's own keeps two).
    kept = [*vars(relay.flow).values(), relay.cycle.message_event]
    assert not [value for value in kept if isinstance(value, asyncio.Event)]
    assert [value for value in vars(plain.flow).values() if isinstance(value, asyncio.Event)]
    assert sys.getsizeof(relay.pipeline) < sys.getsizeof(plain.pipeline) / 4


async def test_a_body_that_arrives_while_the_app_waits_is_received_and_then_the_disconnect() -> (
    None
):
    waiting = asyncio.Event()
    received: asyncio.Queue[Message] = asyncio.Queue()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        waiting.set()
        received.put_nowait(await receive())  # nothing of the body has arrived yet
        await send(START)
        await send({"type": "http.response.body", "body": b"ok", "more_body": True})
        received.put_nowait(await receive())  # until the client goes

    async with serving(app) as (host, port):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\n")
        async with asyncio.timeout(5):
            await waiting.wait()
        assert received.empty()
        writer.write(b"data")
        async with asyncio.timeout(5):
            assert await received.get() == {
                "type": "http.request",
                "body": b"data",
                "more_body": False,
            }
            await reader.readuntil(b"ok")
        assert received.empty()
        writer.close()
        async with asyncio.timeout(5):
            assert (await received.get())["type"] == "http.disconnect"


async def test_pipelined_requests_are_answered_in_order() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        body = scope["path"].encode()
        await send(START | {"headers": [(b"content-length", str(len(body)).encode())]})
        await asyncio.sleep(0)  # the next request is queued meanwhile
        await send({"type": "http.response.body", "body": body})

    async with serving(app) as (host, port):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"".join(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % n for n in range(4)))
        bodies = []
        async with asyncio.timeout(5):
            for _ in range(4):
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200 OK")
                bodies.append(await reader.readexactly(2))
        assert bodies == [b"/0", b"/1", b"/2", b"/3"]
        writer.close()


class OneStream:
    """What the protocol serves for an app that opens `/stream` itself (relay/stream.py's part)."""

    def __init__(self, release: asyncio.Event, fail: bool) -> None:
        self.headers = [(b"content-type", b"text/event-stream")]
        self._release = release
        self._fail = fail

    def opening(self) -> bytes:
        return b"opened\n"

    async def serve(
        self, send: Send, connection: Connection | None, receive: Receive | None = None
    ) -> None:
        assert receive is None  # the protocol wrote the head and the opening bytes
        assert connection is not None
        await self._release.wait()
        if self._fail:
            raise RuntimeError("the stream broke")
        await send({"type": "http.response.body", "body": b"more\n", "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class OpensStreams:
    """An ASGI app that opens `/stream` itself when asked (relay/app.py's RelayApp does so for
    /v1/events); it answers every request it is called for, `/stream` included, with `asgi`."""

    def __init__(self, fail: bool = False) -> None:
        self.called: list[str] = []  # the paths it was called for through ASGI
        self.release = asyncio.Event()
        self._fail = fail

    def open_stream(self, scope: Scope) -> OneStream | None:
        return OneStream(self.release, self._fail) if scope["path"] == "/stream" else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        self.called.append(scope["path"])
        await send(START | {"headers": [(b"content-length", b"4")]})
        await send({"type": "http.response.body", "body": b"asgi"})


@contextlib.asynccontextmanager
async def connected(
    app: OpensStreams, trusted_proxies: list[str] | None = None
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    async with running_server(app, trusted_proxies=trusted_proxies) as url:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            yield reader, writer
        finally:
            writer.close()


async def test_a_stream_the_app_opens_is_served_without_an_asgi_call() -> None:
    app = OpensStreams()
    async with connected(app) as (reader, writer):
        writer.write(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
            assert await reader.readuntil(b"opened\n\r\n") == b"7\r\nopened\n\r\n"
        lines = head.split(b"\r\n")
        assert lines[0] == b"HTTP/1.1 200 OK"
        assert {line.split(b":")[0] for line in lines[1:] if line} == {
            b"date",
            b"server",
            b"content-type",
            b"transfer-encoding",
        }
        assert b"transfer-encoding: chunked" in lines
        app.release.set()  # the rest goes through the cycle's send, as for any response
        async with asyncio.timeout(5):
            assert await reader.readuntil(b"0\r\n\r\n") == b"5\r\nmore\n\r\n0\r\n\r\n"
        # The connection is kept alive for the next request, which the app is called for.
        writer.write(b"GET /other HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(5):
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 OK")
            assert await reader.readexactly(4) == b"asgi"
    assert app.called == ["/other"]


@pytest.mark.parametrize(
    "request_head",
    [
        b"GET /stream HTTP/1.0\r\n",  # its head would say connection: close
        b"GET /stream HTTP/1.1\r\nConnection: close\r\n",
        b"GET /stream HTTP/1.1\r\nX-Forwarded-For: 192.0.2.7\r\n",  # the proxy middleware's
        b"GET /stream HTTP/1.1\r\nX-Forwarded-Proto: https\r\n",
    ],
    ids=["http-1.0", "connection-close", "forwarded-for", "forwarded-proto"],
)
async def test_a_stream_the_protocol_cannot_open_as_asgi_would_goes_to_the_app(
    request_head: bytes,
) -> None:
    app = OpensStreams()
    async with connected(app, trusted_proxies=["127.0.0.1"]) as (reader, writer):
        writer.write(request_head + b"Host: x\r\n\r\n")
        async with asyncio.timeout(5):
            await reader.readuntil(b"\r\n\r\n")
            assert await reader.readexactly(4) == b"asgi"
    assert app.called == ["/stream"]


async def test_forwarded_headers_from_an_untrusted_peer_do_not_stop_the_protocol_opening() -> None:
    app = OpensStreams()
    async with connected(app, trusted_proxies=["192.0.2.1"]) as (reader, writer):
        writer.write(b"GET /stream HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 192.0.2.7\r\n\r\n")
        async with asyncio.timeout(5):
            await reader.readuntil(b"opened\n\r\n")
    assert app.called == []


async def test_a_stream_that_fails_is_logged_and_its_connection_closed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = OpensStreams(fail=True)
    async with connected(app) as (reader, writer):
        writer.write(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(5):
            await reader.readuntil(b"opened\n\r\n")
        app.release.set()
        async with asyncio.timeout(5):
            await read_to_end(reader)  # closed, without the last chunk
    assert "Exception in ASGI application" in caplog.text
    assert "the stream broke" in caplog.text
