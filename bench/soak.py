"""Soak: the relay as a process under client churn plus event traffic; what it holds must stay flat.

    uv run python -m bench.soak --minutes 30                  # the full soak; prints the series
    uv run python -m bench.soak --minutes 1 --output s.json   # a minute, as tests/test_soak.py

The relay runs alone in a child process (`serve-relay`: the relay's app under uvicorn with uvloop,
as `relay serve` runs it, plus a line on stdout five times a second with its count of asyncio
tasks), so
/proc tells its resident memory and open file descriptors apart from the load's. The simulated
DialStack runs here and says how many upstream streams are open. Long-lived readers check that
every event arrives once and in order while churning clients connect, resume with Last-Event-ID,
and leave with a FIN or a reset.

The building blocks (`relay_process`, `sample`, `RawClient`) serve the hardening tests too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import socket
import struct
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import uvloop

from bench.servers import stop
from relay.app import create_app
from relay.auth import TokenIssuer
from relay.config import load_settings, require_serving
from relay.logs import configure_logging
from relay.serve import tune_garbage_collector
from relay.serving import running_server, until_stop_signal
from relay.simulator import DEFAULT_SECRET_KEY, Simulator
from relay.sse import Event, SSEParser

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 15.0
TOKEN_TTL_SECONDS = 3 * 3600
CHURN_CLIENT_TIMEOUT_SECONDS = 10.0
TASK_REPORT_SECONDS = 0.2
LAST_EVENTS_TIMEOUT_SECONDS = 10.0

# -- the relay as a measured process -----------------------------------------------------------------

TomlValue = str | int | float | bool | list[str]


def toml(
    sections: Mapping[str, Mapping[str, TomlValue]], accounts: Sequence[Mapping[str, TomlValue]]
) -> str:
    """A config file from plain values (JSON strings and arrays are valid TOML)."""
    lines: list[str] = []

    def table(header: str, values: Mapping[str, TomlValue]) -> None:
        lines.append(header)
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in values.items())

    for name, values in sections.items():
        table(f"[{name}]", values)
    for account in accounts:
        table("[[accounts]]", account)
    return "\n".join(lines) + "\n"


@dataclass
class RelayProcess:
    process: asyncio.subprocess.Process
    url: str
    log: Path
    tasks: int | None = None  # asyncio tasks in the relay, as last reported
    reported: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def pid(self) -> int:
        return self.process.pid

    def logs(self) -> str:
        return self.log.read_text(errors="replace")

    async def fresh_tasks(self) -> int:
        """The relay's task count from a report made after this call."""
        self.reported.clear()
        async with asyncio.timeout(5):
            await self.reported.wait()
        assert self.tasks is not None
        return self.tasks


@dataclass(frozen=True, slots=True)
class ProcSample:
    rss_bytes: int
    peak_rss_bytes: int
    fds: int


def sample(pid: int) -> ProcSample:
    """Resident memory, its high-water mark and open file descriptors, from /proc."""
    status: dict[str, str] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        status[key] = value.strip()
    return ProcSample(
        rss_bytes=int(status["VmRSS"].split()[0]) * 1024,
        peak_rss_bytes=int(status["VmHWM"].split()[0]) * 1024,
        fds=len(os.listdir(f"/proc/{pid}/fd")),
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def _read_task_counts(relay: RelayProcess) -> None:
    assert relay.process.stdout is not None
    async for line in relay.process.stdout:
        with contextlib.suppress(ValueError, KeyError):
            relay.tasks = int(json.loads(line)["tasks"])
            relay.reported.set()


@contextlib.asynccontextmanager
async def relay_process(
    config: Path, log: Path, *, log_level: str = "WARNING"
) -> AsyncIterator[RelayProcess]:
    """The relay serving `config` (whose [server] port must be set) in a child process, until the
    block exits: then SIGTERM (its graceful drain), and SIGKILL if it overstays."""
    settings = load_settings(config)
    url = f"http://{settings.server.host}:{settings.server.port}"
    output = await asyncio.to_thread(log.open, "wb")
    with output:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.soak",
            "serve-relay",
            "--config",
            str(config),
            "--log-level",
            log_level,
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=output,
        )
    relay = RelayProcess(process, url, log)
    reader = asyncio.create_task(_read_task_counts(relay))
    try:
        async with httpx.AsyncClient(timeout=2) as client, asyncio.timeout(START_TIMEOUT_SECONDS):
            while True:
                if process.returncode is not None:
                    raise RuntimeError(f"the relay exited at start-up:\n{relay.logs()[-2000:]}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(f"{url}/readyz")).status_code == 200:
                        break
                await asyncio.sleep(0.05)
        yield relay
    finally:
        await stop(process, STOP_TIMEOUT_SECONDS)
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader


async def _serve_relay(config: Path) -> None:
    settings = load_settings(config)
    require_serving(settings)
    tune_garbage_collector()  # as `relay serve` does
    async with running_server(create_app(settings), settings.server.host, settings.server.port):

        async def report_tasks() -> None:
            while True:
                print(json.dumps({"tasks": len(asyncio.all_tasks())}), flush=True)
                await asyncio.sleep(TASK_REPORT_SECONDS)

        reporting = asyncio.create_task(report_tasks())
        await until_stop_signal()
        reporting.cancel()


# -- raw SSE clients ---------------------------------------------------------------------------------


class Dechunker:
    """The payload of an HTTP/1.1 chunked body, fed in arbitrary pieces."""

    def __init__(self) -> None:
        self._buffer = b""
        self._left = 0  # bytes of the current chunk still to come, then its CRLF
        self.ended = False

    def feed(self, data: bytes) -> bytes:
        self._buffer += data
        out = bytearray()
        while not self.ended:
            if self._left:
                take = self._buffer[: self._left]
                out += take
                self._buffer = self._buffer[len(take) :]
                self._left -= len(take)
                if self._left:
                    break
                self._buffer = self._buffer.removeprefix(b"\r\n")  # mostly here already
                continue
            line, sep, rest = self._buffer.partition(b"\r\n")
            if not sep:
                break
            if not line:  # the CRLF of a chunk whose data ended the previous piece
                self._buffer = rest
                continue
            size = int(line.split(b";")[0], 16)
            self._buffer, self._left = rest, size
            self.ended = size == 0
        return bytes(out)


@dataclass(eq=False)
class RawClient:
    """One `GET /v1/events` over a bare socket: as cheap as a client gets, and able to misbehave."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    status: int = 0
    head: bytes = b""
    events: list[Event] = field(default_factory=list)
    _parser: SSEParser = field(default_factory=SSEParser)
    _body: Dechunker = field(default_factory=Dechunker)

    @classmethod
    async def connect(
        cls,
        url: str,
        token: str,
        *,
        last_event_id: str | None = None,
        source: str | None = None,
        forwarded_for: str | None = None,
    ) -> RawClient:
        """Sends the request and reads the response head; `source` binds another loopback address,
        `forwarded_for` sends it as X-Forwarded-For."""
        host, port = url.removeprefix("http://").rsplit(":", 1)
        local = (source, 0) if source is not None else None
        reader, writer = await asyncio.open_connection(host, int(port), local_addr=local)
        extra = f"Last-Event-ID: {last_event_id}\r\n" if last_event_id else ""
        if forwarded_for is not None:
            extra += f"X-Forwarded-For: {forwarded_for}\r\n"
        writer.write(
            f"GET /v1/events HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
            f"Accept: text/event-stream\r\n{extra}\r\n".encode()
        )
        client = cls(reader, writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            head = exc.partial
        client.head = head
        client.status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else 0
        return client

    async def read_some(self) -> bool:
        """Read what arrives next; False once the stream has ended."""
        data = await self.reader.read(65536)
        if not data:
            return False
        self.events.extend(self._parser.feed(self._body.feed(data)))
        return not self._body.ended

    async def read_until(self, count: int, event_type: str | None = None) -> None:
        """Until `count` events (of `event_type`, if given) have arrived; raises EOFError at the end."""
        while sum(event_type in (None, e.type) for e in self.events) < count:
            if not await self.read_some():
                raise EOFError(f"stream ended after {[e.type for e in self.events]}")

    async def read_until_connected_upstream(self) -> None:
        """Until the relay says the account's upstream is connected: events sent from then on arrive."""
        while not any(
            e.type == "relay.upstream" and json.loads(e.data)["state"] == "connected"
            for e in self.events
        ):
            if not await self.read_some():
                raise EOFError(f"stream ended after {[e.type for e in self.events]}")

    def of_type(self, event_type: str) -> list[Event]:
        return [e for e in self.events if e.type == event_type]

    @property
    def last_event_id(self) -> str:
        return self._parser.last_event_id

    def close(self) -> None:
        """Leave with a FIN."""
        self.writer.close()

    def reset(self) -> None:
        """Vanish without a FIN: SO_LINGER 0 makes the close a TCP reset."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


# -- the soak ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Point:
    seconds: float
    rss_mb: float
    fds: int
    tasks: int
    upstreams: int  # open /v1/events streams at the simulator
    clients: int  # SSE clients connected to the relay
    events: int  # events sent so far


@dataclass
class SoakResult:
    series: list[Point]
    events_sent: int = 0
    deliveries: int = 0  # events received by the long-lived readers
    lost: int = 0
    duplicates: int = 0  # events at or below one the reader already had: repeated or out of order
    missing: dict[str, list[int]] = field(default_factory=dict)  # per account, the first few
    churned: int = 0  # short-lived clients that connected and left
    resumed: int = 0  # of which resumed with Last-Event-ID
    errors: dict[str, int] = field(default_factory=dict)
    baseline: Point | None = None  # before any client
    after: Point | None = None  # once every client had left


@dataclass
class Tally:
    """One reader's view of its account's events, numbered 0, 1, 2, ... as they were sent."""

    next: int = 0  # the number it expects
    received: int = 0
    missed: list[int] = field(default_factory=list)  # the first few it never got
    skipped: int = 0
    repeated: int = 0

    def add(self, n: int) -> None:
        self.received += 1
        if n < self.next:
            self.repeated += 1
            return
        self.skipped += n - self.next
        self.missed.extend(range(self.next, min(n, self.next + 10 - len(self.missed))))
        self.next = n + 1


@dataclass(frozen=True, slots=True)
class SoakPlan:
    seconds: float
    accounts: int = 5
    readers_per_account: int = 4
    # Fast enough that the relay's bounded windows (replay, de-duplication ids) fill within
    # minutes: memory growing after that is a leak, not a window filling.
    events_per_second: float = 100.0
    churn_per_second: float = 40.0
    sample_seconds: float = 2.0


class Soak:
    def __init__(
        self,
        plan: SoakPlan,
        relay: RelayProcess,
        simulator: Simulator,
        issuer: TokenIssuer,
        admin_key: str,
    ) -> None:
        self._plan = plan
        self._relay = relay
        self._simulator = simulator
        self._issuer = issuer
        self._admin_key = admin_key
        self._accounts = [f"acct_soak_{i}" for i in range(plan.accounts)]
        self._sent: dict[str, int] = dict.fromkeys(self._accounts, 0)
        self._rng = random.Random(8)
        self._tallies: list[tuple[str, Tally]] = []  # each reader's account and count
        # Clients keep their token across reconnections, as a page or an agent would.
        self._tokens = {
            account: [
                issuer.issue(account, TOKEN_TTL_SECONDS, subject=f"user_{n}")[0] for n in range(20)
            ]
            for account in self._accounts
        }
        self._started = time.monotonic()
        self.result = SoakResult([])

    def _error(self, kind: str) -> None:
        self.result.errors[kind] = self.result.errors.get(kind, 0) + 1

    async def _clients(self, http: httpx.AsyncClient) -> int:
        response = await http.get(
            f"{self._relay.url}/v1/status", headers={"Authorization": f"Bearer {self._admin_key}"}
        )
        clients: int = response.json()["clients"]
        return clients

    async def _point(self, http: httpx.AsyncClient) -> Point:
        proc = sample(self._relay.pid)
        return Point(
            seconds=round(time.monotonic() - self._started, 1),
            rss_mb=round(proc.rss_bytes / 2**20, 1),
            fds=proc.fds,
            tasks=await self._relay.fresh_tasks(),
            upstreams=self._simulator.open_streams(),
            clients=await self._clients(http),
            events=sum(self._sent.values()),
        )

    async def _traffic(self, stop: asyncio.Event) -> None:
        interval = 1 / self._plan.events_per_second
        while not stop.is_set():
            account = self._accounts[sum(self._sent.values()) % len(self._accounts)]
            await self._simulator.inject(account, "call.incoming", {"n": self._sent[account]})
            self._sent[account] += 1
            await asyncio.sleep(interval)

    async def _reader(self, account: str, ready: asyncio.Event, quiet: asyncio.Event) -> None:
        """Reads until the traffic is over and the account's last event has arrived."""
        client = await RawClient.connect(self._relay.url, self._token(account))
        tally = Tally()
        self._tallies.append((account, tally))
        try:
            await client.read_until_connected_upstream()
            ready.set()
            while not (quiet.is_set() and tally.next == self._sent[account]):
                # At the end, heartbeats wake it up to see that it is done.
                if not await client.read_some():
                    self._error("reader stream ended")
                    return
                for event in client.of_type("call.incoming"):
                    tally.add(json.loads(event.data)["n"])
                client.events.clear()  # a long soak would hold every event otherwise
        finally:
            client.close()

    def _token(self, account: str) -> str:
        return self._rng.choice(self._tokens[account])

    async def _one_churn(self, last_ids: dict[str, str]) -> None:
        account = self._rng.choice(self._accounts)
        resume = last_ids.get(account) if self._rng.random() < 0.3 else None
        try:
            client = await RawClient.connect(
                self._relay.url, self._token(account), last_event_id=resume
            )
        except OSError as exc:
            self._error(type(exc).__name__)
            return
        try:
            if client.status != 200:
                self._error(f"status {client.status}")
                return
            async with asyncio.timeout(CHURN_CLIENT_TIMEOUT_SECONDS):
                await client.read_until(1, "connected")
                if self._rng.random() < 0.5:
                    await client.read_until(1, "call.incoming")
                    last_ids[account] = client.last_event_id
        except (OSError, EOFError, TimeoutError) as exc:
            self._error(type(exc).__name__)
            return
        finally:
            if self._rng.random() < 0.3:
                client.reset()
            else:
                client.close()
        self.result.churned += 1
        self.result.resumed += resume is not None

    async def _churn(self, stop: asyncio.Event) -> None:
        last_ids: dict[str, str] = {}
        running: set[asyncio.Task[None]] = set()
        interval = 1 / self._plan.churn_per_second
        while not stop.is_set():
            task = asyncio.create_task(self._one_churn(last_ids))
            running.add(task)
            task.add_done_callback(running.discard)
            await asyncio.sleep(interval)
        if running:
            await asyncio.wait(running)

    async def run(self) -> SoakResult:
        plan = self._plan
        async with httpx.AsyncClient(timeout=10) as http:
            self.result.baseline = await self._point(http)
            stop, quiet = asyncio.Event(), asyncio.Event()
            readies = [asyncio.Event() for _ in range(plan.accounts * plan.readers_per_account)]
            readers = [
                asyncio.create_task(self._reader(self._accounts[i % plan.accounts], ready, quiet))
                for i, ready in enumerate(readies)
            ]
            async with asyncio.timeout(30):
                await asyncio.gather(*(ready.wait() for ready in readies))
            traffic = asyncio.create_task(self._traffic(quiet))
            churn = asyncio.create_task(self._churn(stop))
            deadline = self._started + plan.seconds
            while (left := deadline - time.monotonic()) > 0:
                self.result.series.append(await self._point(http))
                await asyncio.sleep(min(plan.sample_seconds, left))
            stop.set()
            await churn  # some churning clients wait for one more event
            quiet.set()
            await traffic
            # The readers take the last events in flight, then leave; what is not there by the
            # deadline is lost.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(LAST_EVENTS_TIMEOUT_SECONDS):
                    await asyncio.gather(*readers)
            self.result.events_sent = sum(self._sent.values())
            for account, tally in self._tallies:
                self.result.deliveries += tally.received
                self.result.duplicates += tally.repeated
                self.result.lost += tally.skipped + self._sent[account] - tally.next
                missed = tally.missed + list(range(tally.next, self._sent[account]))[:10]
                if missed:
                    self.result.missing[account] = sorted(
                        set(missed) | set(self.result.missing.get(account, []))
                    )
            async with asyncio.timeout(15):
                while True:  # the relay notices the last departures, upstreams stop lingering
                    if not await self._clients(http) and not self._simulator.open_streams():
                        break
                    await asyncio.sleep(0.1)
            self.result.after = await self._point(http)
        return self.result


async def soak(plan: SoakPlan, workdir: Path) -> SoakResult:
    """Run `plan` against a fresh relay process and simulator; the relay's log goes to `workdir`."""
    secret, admin_key = secrets.token_urlsafe(48), secrets.token_urlsafe(32)
    simulator = Simulator(accounts=(), call_interval_seconds=None)
    async with simulator.serve() as simulator_url:
        config = workdir / "soak-relay.toml"
        config.write_text(
            toml(
                {
                    "server": {"port": free_port(), "heartbeat_seconds": 1.0},
                    "auth": {"secret": secret, "admin_key": admin_key},
                    "upstream": {
                        "base_url": simulator_url,
                        "secret_key": DEFAULT_SECRET_KEY,
                        "linger_seconds": 1.0,
                    },
                    # Full within seconds, so that memory growing past the warm-up is a leak,
                    # not the window filling.
                    "replay": {"max_events": 100},
                },
                [],
            )
        )
        async with relay_process(config, workdir / "soak-relay.log") as relay:
            issuer = TokenIssuer(secret, TOKEN_TTL_SECONDS)
            return await Soak(plan, relay, simulator, issuer, admin_key).run()


def render(result: SoakResult) -> str:
    lines = [
        "| t (s) | RSS (MB) | fds | tasks | upstreams | clients | events sent |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    labelled = [
        ("before", result.baseline),
        *((None, p) for p in result.series),
        ("after", result.after),
    ]
    for label, point in labelled:
        if point is not None:
            lines.append(
                f"| {label or point.seconds} | {point.rss_mb} | {point.fds} | {point.tasks} | "
                f"{point.upstreams} | {point.clients} | {point.events} |"
            )
    lines.append("")
    lines.append(
        f"events sent {result.events_sent}, delivered to readers {result.deliveries}, "
        f"lost {result.lost} {result.missing or ''}, repeated or out of order "
        f"{result.duplicates}, churned clients {result.churned} "
        f"({result.resumed} resumed with Last-Event-ID), errors {result.errors or 'none'}"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--output", type=Path, help="also write the result as JSON here")
    commands = parser.add_subparsers(dest="command")
    serve = commands.add_parser("serve-relay", help="(internal) the relay process under test")
    serve.add_argument("--config", type=Path, required=True)
    serve.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    if args.command == "serve-relay":
        configure_logging(args.log_level)
        uvloop.run(_serve_relay(args.config))
        return 0
    configure_logging("WARNING")
    seconds = args.minutes * 60
    plan = SoakPlan(seconds=seconds, sample_seconds=max(2.0, seconds / 60))
    output: Path | None = args.output
    workdir = output.parent if output is not None else ROOT / "bench" / "results"
    workdir.mkdir(parents=True, exist_ok=True)
    result = uvloop.run(soak(plan, workdir))
    print(render(result))
    if output is not None:
        output.write_text(json.dumps(asdict(result), indent=2))
    clean = result.lost == result.duplicates == 0 and not result.errors
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
