"""Issue 8, the fault campaign: a misbehaving upstream and misbehaving clients, against real servers.

Upstream faults: a raw-socket DialStack (`RawUpstream`) writes exactly the bytes each test asks for,
and a client reading the relay must see every whole event once, in order. Client faults run the relay
as a child process (`bench.soak.relay_process`) so its memory, descriptors and tasks are its own, and
check that they return to their baseline once the misbehaving clients are gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from streams import Stream, open_stream, upstream_connected

from bench.soak import (
    ProcSample,
    RawClient,
    RelayProcess,
    free_port,
    relay_process,
    sample,
    toml,
)
from relay.app import create_app
from relay.auth import TokenIssuer
from relay.config import Settings
from relay.serving import running_server
from relay.simulator import DEFAULT_SECRET_KEY, Simulator
from relay.sse import SSEParser

ACCT = "acct_faults"
AUTH_SECRET = "auth-secret-for-the-fault-campaign-0123456789"
ADMIN_KEY = "admin-key-for-the-fault-campaign-0123456789"
CLIENT_SECRET = "cs_static_client_secret_for_the_fault_campaign"
DEADLINE = 10.0
EVENT_STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Connection: close\r\n\r\n"
)
CONNECTED = b'event: connected\ndata: {"message": "Connected to event stream"}\n\n'
issuer = TokenIssuer(AUTH_SECRET, 86_400)


def frame(n: int, *, pad: str = "") -> bytes:
    data = json.dumps({"n": n, "pad": pad} if pad else {"n": n})
    return f"id: {n}\nevent: call.incoming\ndata: {data}\n\n".encode()


def frames(numbers: Iterable[int]) -> bytes:
    return b"".join(frame(n) for n in numbers)


def numbers(stream: Stream) -> list[int]:
    return [json.loads(e.data)["n"] for e in stream.of_type("call.incoming")]


# -- a DialStack that misbehaves on request --------------------------------------------------------


@dataclass(eq=False)
class UpstreamConnection:
    """One `/v1/events` request the relay made; the test writes the answer byte by byte."""

    number: int
    headers: dict[str, str]  # lower-cased names
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    opened_at: float = field(default_factory=time.monotonic)
    finished: asyncio.Event = field(default_factory=asyncio.Event)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def stream(self, *chunks: bytes) -> None:
        """Answer as an event stream that says `connected`, then write `chunks`."""
        await self.send(EVENT_STREAM_HEAD + CONNECTED)
        for chunk in chunks:
            await self.send(chunk)

    async def refuse(self, status: int, reason: str, headers: str = "", body: bytes = b"") -> None:
        body = body or json.dumps({"error": reason}).encode()
        await self.send(
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n{headers}"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        self.close()

    def close(self) -> None:
        self.writer.close()
        self.finished.set()

    def reset(self) -> None:
        """A TCP reset, no FIN: the connection is gone mid-whatever."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()
        self.finished.set()

    async def closed_by_relay(self, timeout: float = DEADLINE) -> None:
        """Returns once the relay has closed its end (EOF or reset)."""
        async with asyncio.timeout(timeout):
            with contextlib.suppress(ConnectionError):
                while await self.reader.read(65536):
                    pass
        self.finished.set()


class RawUpstream:
    """A fake `GET /v1/events` over bare sockets: each request is handed to the test as it comes."""

    def __init__(self) -> None:
        self._arrived: asyncio.Queue[UpstreamConnection] = asyncio.Queue()
        self.connections: list[UpstreamConnection] = []

    async def next(self, timeout: float = DEADLINE) -> UpstreamConnection:
        async with asyncio.timeout(timeout):
            return await self._arrived.get()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return
        lines = head.decode("latin-1").split("\r\n")[1:]
        headers = {}
        for line in lines:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        connection = UpstreamConnection(len(self.connections) + 1, headers, reader, writer)
        self.connections.append(connection)
        await self._arrived.put(connection)
        await connection.finished.wait()

    @contextlib.asynccontextmanager
    async def serve(self) -> AsyncIterator[str]:
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.close()
            for connection in self.connections:
                connection.writer.transport.abort()
                connection.finished.set()
            await server.wait_closed()


def relay_settings(upstream_url: str, **upstream: float) -> Settings:
    return Settings(
        auth={"secret": AUTH_SECRET, "admin_key": ADMIN_KEY},  # type: ignore[arg-type]
        upstream={  # type: ignore[arg-type]
            "base_url": upstream_url,
            "backoff_initial_seconds": 0.05,
            "backoff_max_seconds": 0.3,
            "connect_timeout_seconds": 2.0,
            "linger_seconds": 1.0,
            **upstream,
        },
        accounts=[{"id": ACCT, "client_secret": CLIENT_SECRET}],  # type: ignore[list-item]
        replay={"max_events": 20_000},  # type: ignore[arg-type]
    )


@contextlib.asynccontextmanager
async def relay_against(upstream_url: str, **upstream: float) -> AsyncIterator[str]:
    """The relay in this process, its one account's upstream at `upstream_url`."""
    async with running_server(create_app(relay_settings(upstream_url, **upstream))) as url:
        yield url


@contextlib.asynccontextmanager
async def faulty_upstream(
    http: httpx.AsyncClient, **upstream: float
) -> AsyncIterator[tuple[RawUpstream, Stream, str]]:
    """A raw upstream, the relay, and one client subscribed (which makes the relay connect)."""
    upstream_server = RawUpstream()
    async with (
        upstream_server.serve() as upstream_url,
        relay_against(upstream_url, **upstream) as relay_url,
        open_stream(http, f"{relay_url}/v1/events", token=issuer.issue(ACCT, 600)[0]) as client,
    ):
        assert client.status_code == 200
        yield upstream_server, client, relay_url


# -- upstream faults -------------------------------------------------------------------------------


async def test_reset_mid_event_resumes_after_the_last_whole_event(http: httpx.AsyncClient) -> None:
    async with faulty_upstream(http) as (upstream, client, _):
        first = await upstream.next()
        assert first.headers["authorization"] == f"Bearer {CLIENT_SECRET}"
        await first.stream(frames(range(1, 6)), frame(6)[:20])
        await client.wait_count("call.incoming", 5)
        first.reset()
        second = await upstream.next()
        assert second.headers["last-event-id"] == "5"
        await second.stream(frames(range(6, 11)))
        await client.wait_count("call.incoming", 10)
        assert numbers(client) == list(range(1, 11))


async def test_half_a_frame_then_silence_is_dropped_at_the_idle_timeout(
    http: httpx.AsyncClient,
) -> None:
    async with faulty_upstream(http, idle_timeout_seconds=0.5) as (upstream, client, _):
        first = await upstream.next()
        await first.stream(frames(range(1, 4)), frame(4)[:-2])  # all but the dispatching blank line
        await client.wait_count("call.incoming", 3)
        silent_since = time.monotonic()
        await first.closed_by_relay()
        second = await upstream.next()
        assert time.monotonic() - silent_since >= 0.45
        assert second.headers["last-event-id"] == "3"
        await second.stream(frames(range(4, 7)))
        await client.wait_count("call.incoming", 6)
        assert numbers(client) == list(range(1, 7))


async def test_stalls_before_the_headers_and_before_the_first_event_hit_the_connect_timeout(
    http: httpx.AsyncClient,
) -> None:
    async with faulty_upstream(http, connect_timeout_seconds=0.5) as (upstream, client, _):
        mute = await upstream.next()  # never answers
        await mute.closed_by_relay()
        headers_only = await upstream.next()
        await headers_only.send(EVENT_STREAM_HEAD)
        await headers_only.closed_by_relay()
        healthy = await upstream.next()
        await healthy.stream(frames(range(1, 4)))
        await client.wait_for(upstream_connected)
        await client.wait_count("call.incoming", 3)
        assert numbers(client) == [1, 2, 3]
        for stalled in (mute, headers_only):
            held = healthy.opened_at - stalled.opened_at
            assert held >= 0.45, f"connection {stalled.number} dropped after {held:.2f}s"


async def test_server_errors_are_retried_until_the_stream_comes_back(
    http: httpx.AsyncClient,
) -> None:
    async with faulty_upstream(http) as (upstream, client, relay_url):
        for code, reason in ((500, "Internal Server Error"), (502, "Bad Gateway"), (503, "x")):
            await (await upstream.next()).refuse(code, reason)
        healthy = await upstream.next()
        await healthy.stream(frames(range(1, 4)))
        await client.wait_count("call.incoming", 3)
        assert numbers(client) == [1, 2, 3]
        status = await http.get(
            f"{relay_url}/v1/status", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
        )
        [account] = status.json()["accounts"]
        assert account["upstream"] == "connected"
        assert account["reconnects"] == 3


async def test_a_401_storm_turns_unauthorized_backs_off_and_recovers(
    http: httpx.AsyncClient,
) -> None:
    backoff_max = 0.3
    async with faulty_upstream(http, backoff_max_seconds=backoff_max) as (upstream, client, _):
        refused = []
        for _ in range(6):
            attempt = await upstream.next()
            refused.append(attempt)
            await attempt.refuse(401, "Unauthorized")
        healthy = await upstream.next()
        await healthy.stream(frames(range(1, 4)))
        await client.wait_count("call.incoming", 3)
    states = [json.loads(e.data) for e in client.of_type("relay.upstream")]
    assert [s["state"] for s in states][-2:] == ["unauthorized", "connected"]
    assert "client_secret" in states[-2]["detail"]  # it tells the operator what to check
    assert numbers(client) == [1, 2, 3]
    # Once unauthorized, attempts are at least backoff_max_seconds apart: no hammering.
    later = [c.opened_at for c in [*refused[2:], healthy]]
    assert min(b - a for a, b in itertools.pairwise(later)) >= backoff_max * 0.95
    assert CLIENT_SECRET.encode() not in client.raw


async def test_429_retry_after_is_waited_out(http: httpx.AsyncClient) -> None:
    async with faulty_upstream(http) as (upstream, client, _):
        limited = await upstream.next()
        await limited.refuse(429, "Too Many Requests", headers="Retry-After: 1\r\n")
        healthy = await upstream.next()
        assert healthy.opened_at - limited.opened_at >= 0.95
        await healthy.stream(frames(range(1, 3)))
        await client.wait_count("call.incoming", 2)
        assert numbers(client) == [1, 2]


async def test_a_burst_of_10000_events_reaches_a_reading_client_whole(
    http: httpx.AsyncClient,
) -> None:
    async with faulty_upstream(http) as (upstream, client, _):
        first = await upstream.next()
        await first.stream(frames(range(10_000)))
        await client.wait_count("call.incoming", 10_000, timeout=30)
        assert numbers(client) == list(range(10_000))
        assert not client.closed.is_set()


async def test_one_megabyte_events_arrive_intact(http: httpx.AsyncClient) -> None:
    pad = "x" * 1_000_000
    async with faulty_upstream(http) as (upstream, client, _):
        first = await upstream.next()
        await first.stream(*(frame(n, pad=pad) for n in range(3)), frame(3))
        await client.wait_count("call.incoming", 4)
    assert numbers(client) == [0, 1, 2, 3]
    assert all(json.loads(e.data).get("pad", pad) == pad for e in client.of_type("call.incoming"))


async def test_invalid_utf8_reaches_clients_as_a_browser_would_decode_it(
    http: httpx.AsyncClient,
) -> None:
    broken = [
        b"\xff\xfe",  # never valid
        b"\xc3",  # a truncated two-byte sequence
        b"\xc0\xaf",  # an overlong '/'
        b"\xed\xa0\x80",  # a UTF-16 surrogate
        b"\xf4\x90\x80\x80",  # past U+10FFFF
        "é✓😀".encode()[:-1],  # fine characters, then a cut one
    ]
    wire = b"".join(
        b'id: %d\nevent: call.incoming\ndata: {"n": %d, "s": "' % (n, n) + bad + b'"}\n\n'
        for n, bad in enumerate(broken)
    )
    direct = SSEParser().feed(wire)  # what an EventSource connected straight upstream sees
    async with faulty_upstream(http) as (upstream, client, _):
        first = await upstream.next()
        await first.stream(wire, frame(len(broken)))
        await client.wait_count("call.incoming", len(broken) + 1)
        assert len(upstream.connections) == 1  # not a reason to drop the stream
    relayed = client.of_type("call.incoming")
    assert [e.data for e in relayed[:-1]] == [e.data for e in direct]
    assert all("\ufffd" in e.data for e in relayed[:-1])
    assert json.loads(relayed[-1].data) == {"n": len(broken)}


# -- upstream faults against the relay as a process: memory and logs --------------------------------


@contextlib.asynccontextmanager
async def relay_child(
    tmp_path: Path, upstream_url: str, client_secret: str = CLIENT_SECRET
) -> AsyncIterator[RelayProcess]:
    """The relay in a process of its own, its one account's upstream at `upstream_url`."""
    config = tmp_path / "relay.toml"
    config.write_text(
        toml(
            {
                "server": {"port": free_port()},
                "auth": {"secret": AUTH_SECRET, "admin_key": ADMIN_KEY},
                "upstream": {
                    "base_url": upstream_url,
                    "backoff_initial_seconds": 0.05,
                    "backoff_max_seconds": 0.3,
                    "connect_timeout_seconds": 2.0,
                },
            },
            [{"id": ACCT, "client_secret": client_secret}],
        )
    )
    async with relay_process(config, tmp_path / "relay.log", log_level="INFO") as relay:
        yield relay


async def write_until_dropped(connection: UpstreamConnection, pattern: bytes) -> int:
    """Write `pattern` over and over until the relay hangs up; returns the bytes it took."""
    chunk = pattern * (65536 // len(pattern))
    written = 0
    with contextlib.suppress(ConnectionError):
        async with asyncio.timeout(DEADLINE):
            while written < 512 * 2**20:
                await connection.send(chunk)
                written += len(chunk)
    connection.finished.set()
    return written


async def test_endless_lines_are_capped_in_bounded_memory_and_the_relay_recovers(
    http: httpx.AsyncClient, tmp_path: Path
) -> None:
    endless = {
        "a data line": (b"data: ", b"x"),
        "an event type": (b"event: ", b"call."),
        "a line without a colon": (b"", b"y"),
        "data lines without a blank line": (b"", b"data: xxxxxxxxxxxxxxx\n"),
    }
    upstream = RawUpstream()
    async with upstream.serve() as upstream_url, relay_child(tmp_path, upstream_url) as relay:
        url = f"{relay.url}/v1/events"
        async with open_stream(http, url, token=issuer.issue(ACCT, 600)[0]) as client:
            first = await upstream.next()
            await first.stream(frames(range(1, 4)))
            await client.wait_count("call.incoming", 3)
            before = sample(relay.pid)
            taken = {}
            connection = first
            for n, (name, (start, pattern)) in enumerate(endless.items()):
                if n:
                    connection = await upstream.next()
                    assert connection.headers["last-event-id"] == "3"
                    await connection.stream()
                await connection.send(start)
                taken[name] = await write_until_dropped(connection, pattern)
            healthy = await upstream.next()
            await healthy.stream(frames(range(4, 7)))
            await client.wait_count("call.incoming", 6)
            after = sample(relay.pid)
        assert numbers(client) == list(range(1, 7))
    # 1 MiB lines and events, plus what the sockets buffer; never the 512 MiB on offer.
    assert max(taken.values()) < 32 * 2**20, taken
    grown = (after.peak_rss_bytes - before.rss_bytes) / 2**20
    assert grown < 24, f"peak RSS grew {grown:.1f} MiB"
    print(f"endless lines: taken {taken}, peak RSS +{grown:.1f} MiB")


async def test_refusals_that_echo_the_client_secret_keep_it_out_of_the_logs(
    http: httpx.AsyncClient, tmp_path: Path
) -> None:
    """Each answer echoes the client secret back, as a broken proxy or upstream might."""
    echo = CLIENT_SECRET
    token = issuer.issue(ACCT, 600)[0]
    failures: list[Callable[[UpstreamConnection], Awaitable[None]]] = [
        lambda c: c.refuse(401, "Unauthorized", body=f"bad secret {echo}".encode()),
        lambda c: c.refuse(403, "Forbidden", body=f"bad secret {echo}".encode()),
        lambda c: c.refuse(500, "Oops", body=f"Traceback: Bearer {echo}".encode()),
        lambda c: c.refuse(429, "Slow down", headers=f"Retry-After: 0\r\nX-Echo: {echo}\r\n"),
        lambda c: c.send(f"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\n{echo}".encode()),
        lambda c: c.stream(frame(1)[:12] + echo.encode()),
    ]
    upstream = RawUpstream()
    async with upstream.serve() as upstream_url, relay_child(tmp_path, upstream_url) as relay:
        url = f"{relay.url}/v1/events"
        async with open_stream(http, url, params={"token": token}) as client:
            for fail in failures:
                connection = await upstream.next()
                await fail(connection)
                connection.close()
            healthy = await upstream.next()
            await healthy.stream(frames(range(1, 3)))
            await client.wait_count("call.incoming", 2)
        logs = relay.logs()
    assert logs.count("upstream disconnected") == len(failures)  # logged, but not the secrets
    for secret in (CLIENT_SECRET, AUTH_SECRET, ADMIN_KEY, token):
        assert secret not in logs
    assert CLIENT_SECRET.encode() not in client.raw


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def test_protocol_errors_quoting_upstream_bytes_keep_the_secret_out_of_logs_and_streams(
    http: httpx.AsyncClient, tmp_path: Path
) -> None:
    echo = CLIENT_SECRET.encode()
    chunked_head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    upstream = RawUpstream()
    async with upstream.serve() as upstream_url, relay_child(tmp_path, upstream_url) as relay:
        url = f"{relay.url}/v1/events"
        async with open_stream(http, url, token=issuer.issue(ACCT, 600)[0]) as client:
            bad_header = await upstream.next()
            await bad_header.send(b"HTTP/1.1 200 OK\r\nBad Header " + echo + b": x\r\n\r\n")
            bad_header.close()
            # Connected and streaming, then a broken chunk: the drop's reason goes to the clients.
            bad_chunk = await upstream.next()
            await bad_chunk.send(chunked_head + chunk(CONNECTED + frame(1)))
            await client.wait_count("call.incoming", 1)
            await bad_chunk.send(b"zz" + echo + b"\r\n")
            bad_chunk.close()
            healthy = await upstream.next()
            await healthy.stream(frame(2))
            await client.wait_count("call.incoming", 2)
        logs = relay.logs()
    assert logs.count("upstream disconnected") == 2
    assert CLIENT_SECRET not in logs
    assert echo not in client.raw


# -- an upstream trying to write the client stream ------------------------------------------------


async def test_upstream_line_breaks_and_fields_cannot_add_fields_to_the_client_stream(
    http: httpx.AsyncClient,
) -> None:
    wire = (
        b"retry: 1\n"
        b'id: evil\rretry: 2\revent: call.incoming\rdata: {"n": 1}\r\r'
        b'event: call.incoming\r\ndata: {"n": 2}\r\nid: 7\r\n\r\n'
        b'event: call.odd\x00type \xe2\x9c\x93\ndata: {"n": 3}\n\n'
        b"event: call.multi\ndata: line\ndata: id: 1-1\ndata: event: relay.reset\ndata: retry: 0\n\n"
        b"event:  call.spaced\ndata:  two spaces\n\n"
        b": a comment\nid\nevent\ndata\n\n"
    )
    direct = SSEParser().feed(wire)
    async with faulty_upstream(http) as (upstream, client, _):
        first = await upstream.next()
        await first.stream(wire, frame(99))
        await client.wait_for(
            lambda events: events[-1].type == "call.incoming" and "99" in events[-1].data
        )
    relayed = [e for e in client.events if e.type not in ("connected", "relay.upstream")][:-1]
    assert [(e.type, e.data) for e in relayed] == [(e.type, e.data) for e in direct]
    for line in bytes(client.raw).splitlines():
        field_name = line.partition(b":")[0]
        if field_name == b"id":
            assert re.fullmatch(rb"id: \d+-\d+", line), line
        elif field_name == b"retry":
            assert line == b"retry: 3000", line  # the relay's own hint, never the upstream's
        elif field_name == b"event":
            assert line[7:].decode() in {e.type for e in client.events}, line


async def test_an_upstream_cannot_pose_as_the_relay(http: httpx.AsyncClient) -> None:
    spoofed = b"".join(
        b'event: %s\ndata: {"spoofed": true, "state": "connected"}\n\n' % name
        for name in (b"connected", b"relay.reset", b"relay.upstream")
    )
    async with faulty_upstream(http) as (upstream, client, _):
        first = await upstream.next()
        await first.stream(frame(1), spoofed, frame(2))
        await client.wait_count("call.incoming", 2)
    assert not [e for e in client.events if "spoofed" in e.data]


# -- client faults, against one relay process shared by this section ------------------------------


@dataclass(frozen=True, slots=True)
class Footprint:
    rss_mb: float
    fds: int
    tasks: int

    def __str__(self) -> str:
        return f"RSS {self.rss_mb:.1f} MiB, {self.fds} fds, {self.tasks} tasks"


@dataclass(frozen=True, slots=True)
class Fleet:
    """The relay process, its simulated upstream, and an HTTP client for both."""

    relay: RelayProcess
    simulator: Simulator
    http: httpx.AsyncClient

    async def footprint(self) -> Footprint:
        tasks = await self.relay.fresh_tasks()
        proc: ProcSample = sample(self.relay.pid)
        return Footprint(proc.rss_bytes / 2**20, proc.fds, tasks)

    async def clients(self) -> int:
        status = await self.http.get(
            f"{self.relay.url}/v1/status", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
        )
        clients: int = status.json()["clients"]
        return clients

    async def slow_cuts(self) -> int:
        metrics = (await self.http.get(f"{self.relay.url}/metrics")).text
        [line] = [
            m for m in metrics.splitlines() if m.startswith("relay_slow_client_disconnects_total")
        ]
        return int(float(line.split()[1]))

    async def settled(self, *, clients: int = 0, within: float = DEADLINE) -> Footprint:
        """The footprint once `clients` are left and descriptors and tasks stopped falling."""
        now = await self.footprint()
        try:
            async with asyncio.timeout(within):
                while True:
                    later = await self.footprint()
                    falling = later.fds < now.fds or later.tasks < now.tasks
                    if await self.clients() == clients and not falling:
                        return later
                    now = later
        except TimeoutError:
            raise AssertionError(f"still {await self.clients()} clients, {now}") from None

    async def back_to(
        self,
        baseline: Footprint,
        rss_margin_mb: float,
        *,
        clients: int = 0,
        within: float = DEADLINE,
    ) -> Footprint:
        """Waits until `clients` are left and descriptors and tasks are back at `baseline`; then
        resident memory must be within `rss_margin_mb` of it."""
        now = await self.footprint()
        try:
            async with asyncio.timeout(within):
                while not (
                    await self.clients() == clients
                    and now.fds <= baseline.fds
                    and now.tasks <= baseline.tasks
                ):
                    now = await self.footprint()
        except TimeoutError:
            raise AssertionError(f"not back to the baseline ({baseline}): {now}") from None
        assert now.rss_mb - baseline.rss_mb < rss_margin_mb, f"baseline {baseline}, now {now}"
        return now

    async def client(self, last_event_id: str | None = None) -> RawClient:
        client = await RawClient.connect(self.relay.url, TOKEN, last_event_id=last_event_id)
        assert client.status == 200, client.head
        await client.read_until(1, "connected")
        return client

    async def churn(self, clients: int) -> None:
        """`clients` connect, get `connected` and leave, CHURN_BATCH at a time; every other one by
        a reset."""

        async def one(n: int) -> None:
            client = await self.client()
            if n % 2:
                client.reset()
            else:
                client.close()

        for start in range(0, clients, CHURN_BATCH):
            batch = range(start, min(start + CHURN_BATCH, clients))
            await asyncio.gather(*(one(n) for n in batch))


TOKEN = issuer.issue(ACCT, 3600)[0]
CHURN_BATCH = 250
BIG_PAD = "x" * 64 * 1024
in_fleet_loop = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fleet(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Fleet]:
    workdir = tmp_path_factory.mktemp("client-faults")
    simulator = Simulator(accounts=(ACCT,), call_interval_seconds=None)
    async with simulator.serve() as simulator_url:
        config = workdir / "relay.toml"
        config.write_text(
            toml(
                {
                    # Buffers and replay kept short: the 64 KiB events of the stalled clients'
                    # test are not what the memory checks measure.
                    "server": {
                        "port": free_port(),
                        "max_clients_per_account": 10_000,
                        "client_buffer_events": 32,
                    },
                    "auth": {"secret": AUTH_SECRET, "admin_key": ADMIN_KEY},
                    "upstream": {"base_url": simulator_url, "secret_key": DEFAULT_SECRET_KEY},
                    "replay": {"max_events": 64},
                },
                [{"id": ACCT, "always_on": True}],
            )
        )
        async with (
            relay_process(config, workdir / "relay.log") as relay,
            httpx.AsyncClient(
                timeout=httpx.Timeout(10.0, read=None),
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=0),
            ) as http,
        ):
            yield Fleet(relay, simulator, http)


@in_fleet_loop
async def test_5000_clients_churning_leave_no_memory_descriptors_or_tasks_behind(
    fleet: Fleet,
) -> None:
    await fleet.churn(250)  # warm-up: allocator arenas, caches
    baseline = await fleet.settled()
    started = time.monotonic()
    async with asyncio.timeout(60):
        await fleet.churn(5000)
    took = time.monotonic() - started
    after = await fleet.back_to(baseline, rss_margin_mb=4)
    print(f"5000 churned in {took:.1f}s: {baseline} -> {after}")


async def stall_clients(fleet: Fleet, count: int, first: int) -> tuple[list[RawClient], int]:
    """`count` clients that read nothing after `connected`, fed 64 KiB events numbered from
    `first` until each is cut; returns them (still open) and the next event number."""
    stalled = await asyncio.gather(*(fleet.client() for _ in range(count)))
    cuts, n = await fleet.slow_cuts(), first
    async with asyncio.timeout(30):
        while await fleet.slow_cuts() < cuts + count:
            await fleet.simulator.inject(ACCT, "call.incoming", {"n": n, "pad": BIG_PAD})
            n += 1
    return stalled, n


@in_fleet_loop
async def test_clients_that_never_read_are_cut_without_costing_the_reader_anything(
    fleet: Fleet,
) -> None:
    async with open_stream(fleet.http, f"{fleet.relay.url}/v1/events", token=TOKEN) as reader:
        await reader.wait_for(upstream_connected)
        empty = await fleet.settled(clients=1)
        sent, rounds = 0, []
        for _ in range(3):
            stalled, sent = await stall_clients(fleet, 50, sent)
            await reader.wait_count("call.incoming", sent)
            assert await fleet.clients() == 1
            for client in stalled:
                client.close()
            rounds.append(await fleet.back_to(empty, rss_margin_mb=24, clients=1))
        assert numbers(reader) == list(range(sent))
        assert not reader.closed.is_set()
    # The allocator keeps the high-water mark of the first rounds (and malloc's threshold for
    # returning big blocks adapts); the last adds nothing, where a leak of one 64 KiB frame per
    # stalled client would add 3 MiB.
    assert rounds[2].rss_mb - rounds[1].rss_mb < 2.5, rounds
    print(f"{sent} events of 64 KiB, 150 stalled clients: {empty} -> {rounds}")


@in_fleet_loop
async def test_a_cut_client_that_keeps_its_socket_open_does_not_keep_a_connection(
    fleet: Fleet,
) -> None:
    empty = await fleet.settled()
    stalled, _ = await stall_clients(fleet, 20, 0)
    assert await fleet.clients() == 0
    try:
        await fleet.back_to(empty, rss_margin_mb=24, within=1.5)
    finally:
        for client in stalled:
            client.close()


@in_fleet_loop
async def test_clients_that_vanish_with_a_reset_are_let_go_at_once(fleet: Fleet) -> None:
    empty = await fleet.settled()
    rounds = []
    for _ in range(2):
        clients = await asyncio.gather(*(fleet.client() for _ in range(500)))
        assert await fleet.clients() == 500
        for client in clients:
            client.reset()
        # No event and no heartbeat is due: the resets alone tell the relay.
        rounds.append(await fleet.back_to(empty, rss_margin_mb=16, within=3.0))
    assert rounds[1].rss_mb - rounds[0].rss_mb < 2, rounds
    print(f"500 vanished, twice: {empty} -> {rounds}")


async def read_through(client: RawClient, last: int) -> None:
    """Until the event numbered `last` has arrived."""
    while not (calls := client.of_type("call.incoming")) or json.loads(calls[-1].data)["n"] < last:
        if not await client.read_some():
            raise EOFError(f"stream ended after {[e.type for e in client.events]}")


@in_fleet_loop
async def test_a_reconnect_storm_with_last_event_id_misses_and_repeats_nothing(
    fleet: Fleet,
) -> None:
    storm, sent = 300, 0
    await fleet.churn(storm)  # warm-up: the allocator's high-water mark for this many
    warm = await fleet.settled()
    sending = asyncio.Event()

    async def traffic() -> None:
        nonlocal sent
        while sending.is_set():
            await fleet.simulator.inject(ACCT, "call.incoming", {"n": sent})
            sent += 1
            await asyncio.sleep(0.02)

    first = await asyncio.gather(*(fleet.client() for _ in range(storm)))
    sending.set()
    injecting = asyncio.create_task(traffic())
    async with asyncio.timeout(DEADLINE):
        await asyncio.gather(*(c.read_until(3, "call.incoming") for c in first))
    # Everyone drops at once (no FIN) and comes back at once where it left off.
    for client in first:
        client.reset()
    second = await asyncio.gather(*(fleet.client(c.last_event_id) for c in first))
    await asyncio.sleep(0.2)  # live events after the storm too
    sending.clear()
    await injecting
    async with asyncio.timeout(DEADLINE):
        await asyncio.gather(*(read_through(c, sent - 1) for c in second))
    for before, after in zip(first, second, strict=True):
        got = [json.loads(e.data)["n"] for c in (before, after) for e in c.of_type("call.incoming")]
        assert got == list(range(got[0], sent))
        assert not after.of_type("relay.reset")
        after.close()
    back = await fleet.back_to(warm, rss_margin_mb=4)
    print(f"storm of {storm} over {sent} events: {warm} -> {back}")
