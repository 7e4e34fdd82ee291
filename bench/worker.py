"""A load-generator process: holds its share of the subscribers and obeys the bench's commands.

The bench talks to each worker over a pipe, one command at a time, and every command gets one
reply. Workers run uvloop, mint their clients' tokens themselves and connect from their own
loopback address, so ten thousand connections never run out of ephemeral ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import socket
from collections import Counter
from dataclasses import dataclass
from multiprocessing.connection import Connection

import uvloop

from bench.client import BenchClient, ConnectFailed, Recorder, SSEConnection
from relay.auth import TokenIssuer

TOKEN_TTL_SECONDS = 3600
CONNECT_TIMEOUT_SECONDS = 60.0
CLOSE_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class WorkerPlan:
    host: str
    port: int
    source_ip: str  # loopback address the connections come from
    secret: str  # the servers' token key
    clients: list[tuple[int, str]]  # number (across workers) and account of each client
    events_per_account: int
    connect_concurrency: int  # handshakes in flight at once, kept below the server's backlog


# Commands, and the replies to them.


@dataclass(frozen=True, slots=True)
class Connect:
    """Open every client numbered below `below` that is not open (with its Last-Event-ID)."""

    below: int


@dataclass(frozen=True, slots=True)
class Collect:
    """Wait (bounded) until every open client has `expected` distinct events, then report."""

    expected: int
    timeout_seconds: float


@dataclass(frozen=True, slots=True)
class Disconnect:
    """Close every connection, as browsers leaving at once."""


@dataclass(frozen=True, slots=True)
class Stop:
    pass


Command = Connect | Collect | Disconnect | Stop


@dataclass(frozen=True, slots=True)
class Ready:
    pass


@dataclass(frozen=True, slots=True)
class Connected:
    opened: int  # why the others failed is reported by the next Collect


@dataclass(frozen=True, slots=True)
class Collected:
    delivered: int  # distinct events, over all clients
    duplicates: int
    lost: int  # expected events not (yet) received
    foreign: int
    latencies: bytes  # array("d") of seconds, live events since the previous Collect
    failures: dict[str, int]  # why the clients that are not open are not


@dataclass(frozen=True, slots=True)
class Done:
    pass


Reply = Ready | Connected | Collected | Done


# Linux's IP_BIND_ADDRESS_NO_PORT (not in Python's socket module before 3.12).
_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


async def connected_from(source_ip: str, host: str, port: int) -> socket.socket:
    """A TCP connection from `source_ip`. The local port is picked at connect time, not at bind
    time: bind() alone skips every port still in TIME_WAIT from the previous run's 10,000
    connections, and its search for a free one got slow enough to stretch a connect phase from
    3 s to 20 s (and the servers' CPU seconds with it)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_IP, _BIND_ADDRESS_NO_PORT, 1)
        sock.bind((source_ip, 0))
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def raise_file_limit() -> None:
    """Each connection is a file descriptor: allow as many as the hard limit does."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Worker:
    def __init__(self, plan: WorkerPlan, pipe: Connection) -> None:
        self._plan = plan
        self._pipe = pipe
        self._recorder = Recorder()
        issuer = TokenIssuer(plan.secret, TOKEN_TTL_SECONDS)
        self._clients: list[BenchClient] = []
        for number, account in plan.clients:
            token, _ = issuer.issue(account, TOKEN_TTL_SECONDS, subject=f"bench-{number}")
            self._clients.append(
                BenchClient(number, account, token, plan.events_per_account, self._recorder)
            )

    async def run(self) -> None:
        self._pipe.send(Ready())
        while True:
            command: Command = await asyncio.to_thread(self._pipe.recv)
            match command:
                case Connect(below):
                    reply: Reply = await self._connect(below)
                case Collect(expected, timeout_seconds):
                    reply = await self._collect(expected, timeout_seconds)
                case Disconnect():
                    await self._disconnect()
                    reply = Done()
                case Stop():
                    await self._disconnect()
                    self._pipe.send(Done())
                    return
            self._pipe.send(reply)

    async def _connect(self, below: int) -> Connected:
        handshakes = asyncio.Semaphore(self._plan.connect_concurrency)
        pending = [c for c in self._clients if c.number < below and not c.is_open]
        await asyncio.gather(*(self._open(client, handshakes) for client in pending))
        return Connected(opened=sum(1 for c in pending if c.is_open))

    async def _open(self, client: BenchClient, handshakes: asyncio.Semaphore) -> None:
        plan = self._plan
        loop = asyncio.get_running_loop()
        client.failure = None
        client.opened = loop.create_future()
        request = client.request(plan.host, plan.port)
        async with handshakes:
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT_SECONDS):
                    sock = await connected_from(plan.source_ip, plan.host, plan.port)
                    await loop.create_connection(lambda: SSEConnection(client, request), sock=sock)
                    await client.opened
            except ConnectFailed:
                pass  # the client recorded why (an HTTP error, a closed connection)
            except TimeoutError:
                client.failure = "connect timed out"
            except OSError as exc:
                client.failure = exc.strerror or type(exc).__name__
            if not client.is_open and client.connection is not None:
                client.connection.close()

    async def _collect(self, expected: int, timeout_seconds: float) -> Collected:
        recorder = self._recorder
        recorder.expect(expected, self._clients)
        try:
            async with asyncio.timeout(timeout_seconds):
                await recorder.all_complete.wait()
        except TimeoutError:
            pass  # what is missing is reported as lost
        recorder.stop_expecting()
        clients = self._clients
        latencies = recorder.latencies.tobytes()
        del recorder.latencies[:]
        return Collected(
            delivered=sum(c.distinct for c in clients),
            duplicates=sum(c.duplicates for c in clients),
            lost=sum(expected - c.distinct for c in clients if c.distinct < expected),
            foreign=recorder.foreign,
            latencies=latencies,
            failures=dict(
                Counter(c.failure for c in clients if not c.is_open and c.failure is not None)
            ),
        )

    async def _disconnect(self) -> None:
        for client in self._clients:
            if client.connection is not None:
                client.connection.close()
        # connection_lost runs on a later loop iteration.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_TIMEOUT_SECONDS):
                await self._recorder.all_closed.wait()


def worker_main(plan: WorkerPlan, pipe: Connection) -> None:
    """Entry point of a spawned worker process."""
    raise_file_limit()
    uvloop.run(Worker(plan, pipe).run())
