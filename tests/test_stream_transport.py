"""relay/stream_transport.py against servers that answer byte by byte over real sockets, TLS too."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import pytest

from relay.stream_transport import StreamTransport, for_upstream, read_body

Answer = Callable[[bytes, asyncio.StreamWriter], Awaitable[None]]
HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"


@contextlib.asynccontextmanager
async def server(
    answer: Answer,
    tls: ssl.SSLContext | None = None,
    readers: dict[asyncio.StreamWriter, asyncio.StreamReader] | None = None,
) -> AsyncIterator[tuple[str, list[bytes]]]:
    """A server that hands each request head to `answer`; yields its base URL and the heads."""
    heads: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if readers is not None:
            readers[writer] = reader  # for an answer that reads the request body
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            heads.append(head)
            await answer(head, writer)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    listener = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=tls)
    port = listener.sockets[0].getsockname()[1]
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{port}", heads
    finally:
        listener.close()
        await listener.wait_closed()


def client(tls: ssl.SSLContext | None = None, **timeouts: float | None) -> httpx.AsyncClient:
    timeout = httpx.Timeout(5.0, **timeouts)
    return httpx.AsyncClient(
        transport=StreamTransport(tls or ssl.create_default_context()), timeout=timeout
    )


class Receiver:
    """What read_body handed over, and from where: a task, or the socket's callback (None)."""

    def __init__(self, room_after: int | None = None) -> None:
        self.chunks: list[bytes] = []
        self.origins: list[asyncio.Task[object] | None] = []  # for each chunk
        self.room_after = room_after  # bytes after which it says it is full, each time
        self.taken_since_room = 0
        self.room = asyncio.Event()  # set by the test to let a full receiver go on
        self.full = asyncio.Event()  # set when it said so
        self.grew = asyncio.Event()  # set on every chunk

    def receive(self, chunk: bytes) -> bool:
        self.chunks.append(chunk)
        self.origins.append(asyncio.current_task())
        self.taken_since_room += len(chunk)
        self.grew.set()
        if self.room_after is not None and self.taken_since_room >= self.room_after:
            self.full.set()
            return False
        return True

    async def wait_for_room(self) -> None:
        await self.room.wait()
        self.room.clear()
        self.full.clear()
        self.taken_since_room = 0

    async def until(self, size: int) -> None:
        """Return once chunks of `size` bytes in all have been handed over."""
        while sum(map(len, self.chunks)) < size:
            self.grew.clear()
            await self.grew.wait()

    async def read(self, response: httpx.Response) -> bytes:
        await read_body(response, self.receive, self.wait_for_room)
        return b"".join(self.chunks)


async def body(url: str, tls: ssl.SSLContext | None = None, **timeouts: float | None) -> bytes:
    async with client(tls, **timeouts) as http, http.stream("GET", url) as response:
        assert response.status_code == 200
        return await Receiver().read(response)


def chunked(*parts: bytes) -> bytes:
    return b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


async def test_the_request_goes_out_as_httpx_built_it_and_a_chunked_body_comes_back() -> None:
    async def answer(head: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(HEAD + b"Transfer-Encoding: chunked\r\n\r\n")
        for part in (b"data: 1\n\n", b"data: 2", b"\n\n"):
            writer.write(b"%x\r\n%b\r\n" % (len(part), part))
            await writer.drain()
            await asyncio.sleep(0.01)  # separate packets
        writer.write(b"0\r\n\r\n")

    async with server(answer) as (url, heads), client() as http:
        headers = {"Authorization": "Bearer secret_x", "Last-Event-ID": "41"}
        async with http.stream("GET", f"{url}/v1/events?a=b", headers=headers) as response:
            assert response.status_code == 200
            assert response.headers["content-type"] == "text/event-stream"
            assert b"".join([c async for c in response.aiter_bytes()]) == b"data: 1\n\ndata: 2\n\n"
    request_line, *lines = heads[0].decode().split("\r\n")
    assert request_line == "GET /v1/events?a=b HTTP/1.1"
    sent = dict(line.split(": ", 1) for line in lines if line)
    sent = {name.lower(): value for name, value in sent.items()}
    assert sent["authorization"] == "Bearer secret_x"
    assert sent["last-event-id"] == "41"
    assert sent["host"] == url.removeprefix("http://")


@pytest.mark.parametrize(
    ("framing", "wire"),
    [
        ("content-length", b"Content-Length: 9\r\n\r\ndata: x\n\n"),
        ("close-delimited", b"\r\ndata: x\n\n"),
        ("chunked after a 103", b"Transfer-Encoding: chunked\r\n\r\n" + chunked(b"data: x\n\n")),
    ],
)
async def test_every_http_1_1_body_framing_ends_cleanly(framing: str, wire: bytes) -> None:
    async def answer(head: bytes, writer: asyncio.StreamWriter) -> None:
        if framing.endswith("103"):
            writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n")
        writer.write(HEAD + wire)

    async with server(answer) as (url, _):
        assert await body(url) == b"data: x\n\n"


async def test_a_gzipped_stream_is_decoded_by_httpx_above_the_transport() -> None:
    async def answer(head: bytes, writer: asyncio.StreamWriter) -> None:
        packed = gzip.compress(b"data: compressed\n\n")
        writer.write(HEAD + b"Content-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(chunked(packed[:10], packed[10:]))

    async with server(answer) as (url, _):
        assert await body(url) == b"data: compressed\n\n"


async def test_read_body_hands_chunks_over_from_the_socket_unless_httpx_must_decode_them() -> None:
    """The relay reads upstream bodies with read_body: this transport's chunks as they came, from
    the socket's callback; httpx's iterator where it decodes (gzip above) or where another
    transport served them."""

    async def answer(head: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(HEAD + b"Transfer-Encoding: chunked\r\n\r\n")
        for part in (b"data: 1\n\n", b"data: 2\n\n"):
            writer.write(b"%x\r\n%b\r\n" % (len(part), part))
            await writer.drain()
            await asyncio.sleep(0.01)  # separate packets
        writer.write(b"0\r\n\r\n")

    pushed = Receiver()
    async with server(answer) as (url, _), client() as http, http.stream("GET", url) as response:
        await pushed.read(response)
    assert pushed.chunks == [b"data: 1\n\n", b"data: 2\n\n"]
    # The first may have come with the head, before read_body began; the next one was handed over
    # as it arrived, by the socket's callback: no task woke up for it.
    assert pushed.origins[-1] is None

    mocked = httpx.MockTransport(lambda request: httpx.Response(200, content=b"data: m\n\n"))
    pulled = Receiver()
    async with (
        httpx.AsyncClient(transport=mocked) as http,
        http.stream("GET", "http://upstream.test/") as response,
    ):
        assert await pulled.read(response) == b"data: m\n\n"
    assert pulled.origins == [asyncio.current_task()]


async def test_a_post_carries_its_body_and_reads_a_sized_answer() -> None:
    received: list[bytes] = []

    async def answer(head: bytes, writer: asyncio.StreamWriter) -> None:
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        received.append(await reader_of[writer].readexactly(length))
        body = b'{"client_secret": "cs_1", "expires_at": null}'
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))

    reader_of: dict[asyncio.StreamWriter, asyncio.StreamReader] = {}
    async with server(answer, readers=reader_of) as (url, heads), client() as http:
        response = await http.post(f"{url}/v1/account_sessions", json={"account": "acct_1"})
    assert response.json() == {"client_secret": "cs_1", "expires_at": None}
    assert received == [b'{"account":"acct_1"}']
    assert heads[0].startswith(b"POST /v1/account_sessions HTTP/1.1\r\n")


async def test_a_refusal_is_an_ordinary_response() -> None:
    async def answer(head: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 7\r\nContent-Length: 2\r\n\r\n{}"
        )

    async with server(answer) as (url, _), client() as http:
        response = await http.get(url)
    assert response.status_code == 429
    assert response.headers["retry-after"] == "7"
    assert response.content == b"{}"


async def test_a_body_cut_mid_chunk_is_a_read_error_and_garbage_a_protocol_error() -> None:
    async def cut(head: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + b"20\r\ndata: half")

    async def garbage(head: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: x\x00\r\n\r\n")

    receiver = Receiver()

    async def read_all(url: str) -> None:
        async with client() as http, http.stream("GET", url) as response:
            await receiver.read(response)

    async with server(cut) as (url, _):
        with pytest.raises(httpx.ReadError):
            await read_all(url)
        assert receiver.chunks == [b"data: half"]  # what came is delivered before the error
    async with server(garbage) as (url, _):
        with pytest.raises(httpx.RemoteProtocolError) as caught:
            await body(url)
        assert "\x00" not in str(caught.value)  # the bytes on the wire are not quoted


async def test_silence_past_the_read_timeout_and_a_refused_connect() -> None:
    async def silent(head: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + b"9\r\ndata: 1\n\n\r\n")
        await writer.drain()
        await asyncio.sleep(10)

    async with server(silent) as (url, _):
        with pytest.raises(httpx.ReadTimeout):
            await body(url, read=0.3)
    async with server(silent) as (url, _):
        pass  # closed: nothing listens on its port now
    with pytest.raises(httpx.ConnectError):
        await body(url)


async def test_the_read_timeout_times_each_wait_not_a_busy_consumer() -> None:
    """One timer serves the whole body: a consumer busy for longer than the timeout, and a body
    that takes many timeouts in all, end only when one wait for bytes lasts that long. (Pulled,
    as httpx pulls a compressed body from this transport.)"""
    timeout, gaps = 0.4, [0.25] * 6  # each gap under the timeout; 1.5 s in all

    async def steady(head: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(HEAD + b"Transfer-Encoding: chunked\r\n\r\n")
        for n, gap in enumerate(gaps):
            writer.write(b"1\r\n%d\r\n" % n)
            await writer.drain()
            await asyncio.sleep(gap)
        await asyncio.sleep(10)  # then silence

    loop = asyncio.get_running_loop()
    received = []
    last_wait = 0.0

    async def consume(chunks: AsyncIterator[bytes]) -> None:
        nonlocal last_wait
        async for chunk in chunks:
            received.append(chunk)
            last_wait = loop.time()

    async with (
        server(steady) as (url, _),
        client(read=timeout) as http,
        http.stream("GET", url) as response,
    ):
        chunks = response.aiter_raw()
        received.append(await anext(chunks))
        await asyncio.sleep(timeout * 1.5)  # busy, not waiting: no timeout is due
        with pytest.raises(httpx.ReadTimeout):
            await consume(chunks)
        timed_out = loop.time()
    assert b"".join(received) == b"012345"
    # The last wait began after the last chunk, and lasted the timeout (the timer's own lateness
    # aside), not less: the time since the body began or since the first bytes does not count.
    assert timeout * 0.9 <= timed_out - last_wait < timeout + 2


class Flood:
    """A server answer that writes 64 KiB chunks for 2 s, as fast as its socket takes them."""

    def __init__(self) -> None:
        self.sent = 0

    async def __call__(self, head: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(HEAD + b"Transfer-Encoding: chunked\r\n\r\n")
        part = b"x" * 65536
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                while self.sent < 64 * 2**20:
                    writer.write(b"%x\r\n%b\r\n" % (len(part), part))
                    await writer.drain()  # waits once the transport stops reading
                    self.sent += len(part)


async def test_a_consumer_that_falls_behind_stops_the_socket_being_read() -> None:
    """Pulled, as httpx pulls a compressed body from this transport."""
    flood = Flood()
    async with server(flood) as (url, _), client() as http, http.stream("GET", url) as response:
        chunks = response.aiter_raw()
        await anext(chunks)
        await asyncio.sleep(2.5)  # the consumer is busy; the server writes what it can
        # The transport buffers about a MiB, the kernel a few: never the 64 MiB on offer.
        assert flood.sent < 24 * 2**20, flood.sent
        taken = 0
        async with asyncio.timeout(10):
            async for chunk in chunks:
                taken += len(chunk)
                if taken >= flood.sent - 2**20:
                    break  # reading resumed: what was held back arrives


async def test_a_full_receiver_stops_the_socket_being_read_and_is_not_timed_out() -> None:
    """Pushed: a receiver that says it is full gets nothing more until its room() returns; the
    socket is not read meanwhile, and that wait is not silence for the read timeout."""
    flood = Flood()
    receiver = Receiver(room_after=1)
    async with (
        server(flood) as (url, _),
        client(read=1.0) as http,
        http.stream("GET", url) as response,
    ):
        reading = asyncio.create_task(receiver.read(response))
        async with asyncio.timeout(5):
            await receiver.full.wait()
        held = len(receiver.chunks)
        await asyncio.sleep(2.5)  # full for longer than the read timeout; the server floods
        assert not reading.done()  # no ReadTimeout
        assert len(receiver.chunks) == held  # nothing handed over while full
        assert flood.sent < 24 * 2**20, flood.sent  # never the 64 MiB on offer
        receiver.room_after = None
        receiver.room.set()
        async with asyncio.timeout(10):
            await receiver.until(flood.sent - 2**20)  # reading resumed: what was held back arrives
        reading.cancel()
        await asyncio.wait([reading])
    assert b"".join(receiver.chunks).strip(b"x") == b""  # in order, nothing but the payload


async def test_what_the_receiver_raises_ends_the_body_and_closes_the_connection() -> None:
    closed = asyncio.Event()
    readers: dict[asyncio.StreamWriter, asyncio.StreamReader] = {}

    async def answer(head: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + b"9\r\ndata: 1\n\n\r\n")
        await writer.drain()
        if await readers[writer].read() == b"":  # the client hung up
            closed.set()

    calls = 0

    def refuse(chunk: bytes) -> bool:
        nonlocal calls
        calls += 1
        raise ValueError("not an event stream")

    async def no_room() -> None:
        raise AssertionError("a receiver that raised is not asked again")

    async with (
        server(answer, readers=readers) as (url, _),
        client() as http,
        http.stream("GET", url) as response,
    ):
        with pytest.raises(ValueError, match="not an event stream"):
            await read_body(response, refuse, no_room)
        async with asyncio.timeout(5):
            await closed.wait()  # closed by the transport, before httpx's stream is left
    assert calls == 1


async def test_https_with_certificate_verification(tmp_path: Path) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    await asyncio.to_thread(
        subprocess.run,
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served.load_cert_chain(cert, key)

    async def answer(head: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(b"data: tls\n\n"))

    trusting = ssl.create_default_context(cafile=str(cert))
    async with server(answer, tls=served) as (url, _):
        assert await body(url, tls=trusting) == b"data: tls\n\n"
        with pytest.raises(httpx.ConnectError, match="SSL"):
            await body(url, tls=ssl.create_default_context())  # not a CA it trusts


def test_a_proxy_in_the_environment_leaves_the_streams_to_httpx(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in (
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ):
        monkeypatch.delenv(name, raising=False)
    assert isinstance(for_upstream(ssl.create_default_context()), StreamTransport)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    assert for_upstream(ssl.create_default_context()) is None
