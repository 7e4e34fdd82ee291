"""Issue 5 acceptance: relay processes sharing a real Redis, one upstream per account among them.

The relays are real `python -m relay serve` processes; the DialStack simulator runs in the test's
event loop and is driven with `inject`; Redis is a throwaway redis-server the tests stop and start.
The relays run with a 3 s lease, so that a takeover is quick and the simulator's replay history
(100 events) covers what it sends meanwhile. The lease itself is tested in-process in test_lease.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from redis_server import RedisServer, free_port, redis_server
from streams import Stream, open_stream

from relay.auth import TokenIssuer
from relay.brokers.redis import connect
from relay.lease import lease_key
from relay.simulator import SentEvent, Simulator
from relay.sse import Event

ACCT = "acct_scale"
SECRET = secrets.token_urlsafe(48)
ADMIN_KEY = secrets.token_urlsafe(32)
LEASE_SECONDS = 3.0
START_SECONDS = 20.0  # a relay process answers /readyz within this
DEADLINE = 10.0


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    with redis_server(tmp_path) as running:
        yield running


@pytest.fixture
async def simulator(redis: RedisServer) -> AsyncIterator[tuple[Simulator, str]]:
    sim = Simulator(accounts=(ACCT,), call_interval_seconds=None)
    async with sim.serve() as url:
        yield sim, url


# -- relay processes -------------------------------------------------------------------------------


@dataclass
class RelayProcess:
    port: int
    process: asyncio.subprocess.Process
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.process.returncode is None

    async def stop(self) -> None:
        if self.alive:
            self.process.terminate()
            try:
                async with asyncio.timeout(10):
                    await self.process.wait()
            except TimeoutError:
                self.process.kill()
        await self.process.wait()


def write_config(path: Path, simulator_url: str) -> None:
    path.write_text(
        f"""
[server]
host = "127.0.0.1"
heartbeat_seconds = 5

[upstream]
base_url = "{simulator_url}"
linger_seconds = 1
backoff_initial_seconds = 0.2
backoff_max_seconds = 1

[replay]
max_events = 1000
max_age_seconds = 600

[broker]
lease_seconds = {LEASE_SECONDS}
"""
    )


@contextlib.asynccontextmanager
async def relay_processes(
    count: int, tmp_path: Path, redis: RedisServer, simulator_url: str, http: httpx.AsyncClient
) -> AsyncIterator[list[RelayProcess]]:
    """`count` relays on one Redis, each answering /readyz; all stopped (or killed) on exit."""
    config = tmp_path / "relay.toml"
    write_config(config, simulator_url)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("RELAY_")},
        "RELAY_AUTH__SECRET": SECRET,
        "RELAY_AUTH__ADMIN_KEY": ADMIN_KEY,
        "RELAY_UPSTREAM__SECRET_KEY": "sk_test_simulator",
        "RELAY_BROKER__URL": redis.url,
    }
    relays: list[RelayProcess] = []
    try:
        for index in range(count):
            port = free_port()
            log = tmp_path / f"relay{index}.log"
            with log.open("wb") as out:
                process = await asyncio.create_subprocess_exec(
                    *(sys.executable, "-m", "relay", "serve", "--config", str(config)),
                    *("--port", str(port)),
                    cwd=tmp_path,
                    env=env,
                    stdout=out,
                    stderr=asyncio.subprocess.STDOUT,
                )
            relays.append(RelayProcess(port, process, log))
        await asyncio.gather(*(ready(relay, http) for relay in relays))
        yield relays
    finally:
        await asyncio.gather(*(relay.stop() for relay in relays))


async def ready(relay: RelayProcess, http: httpx.AsyncClient) -> None:
    try:
        async with asyncio.timeout(START_SECONDS):
            while True:
                assert relay.alive, relay.log.read_text()[-3000:]
                with contextlib.suppress(httpx.TransportError):
                    if (await http.get(f"{relay.url}/readyz")).status_code == 200:
                        return
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"relay not ready:\n{relay.log.read_text()[-3000:]}") from None


def token(account_id: str) -> str:
    return TokenIssuer(SECRET, 86_400).issue(account_id, 3600)[0]


# -- what clients got ------------------------------------------------------------------------------


def calls(stream: Stream) -> list[Event]:
    return [e for e in stream.events if e.type.startswith("call.")]


def numbers(events: list[Event]) -> list[int]:
    return [json.loads(e.data)["n"] for e in events]


Predicate = Callable[[list[Event]], bool]


def told_states(events: list[Event]) -> list[str]:
    """The upstream states the relay told the client, in order."""
    return [json.loads(e.data)["state"] for e in events if e.type == "relay.upstream"]


def got_a_call(events: list[Event]) -> bool:
    return any(e.type.startswith("call.") for e in events)


def saw(n: int) -> Predicate:
    return lambda events: any(
        e.type.startswith("call.") and json.loads(e.data)["n"] == n for e in events
    )


def is_suffix_of_what_was_sent(stream: Stream, sent: list[SentEvent]) -> bool:
    """The client got every event the upstream sent from its first one on: in order, each once."""
    got = [(e.type, e.data) for e in calls(stream)]
    expected = [(e.type, e.data) for e in sent]
    return bool(got) and got[0] in expected and got == expected[expected.index(got[0]) :]


@dataclass
class Injector:
    """Publishes `{"n": 0}`, `{"n": 1}`, ... to the simulator's account every `interval` seconds."""

    simulator: Simulator
    account_id: str
    interval: float = 0.03
    sent: int = 0
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _progressed: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while not self._stop.is_set():
            await self.simulator.inject(self.account_id, "call.incoming", {"n": self.sent})
            self.sent += 1
            self._progressed.set()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await self._stop.wait()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> int:
        """Stops and returns the last n injected."""
        self._stop.set()
        if self._task is not None:
            await self._task
        return self.sent - 1

    async def wait_sent(self, count: int) -> None:
        async with asyncio.timeout(DEADLINE):
            while self.sent < count:
                self._progressed.clear()
                await self._progressed.wait()


async def open_clients(
    stack: contextlib.AsyncExitStack,
    http: httpx.AsyncClient,
    relays: list[RelayProcess],
    account_id: str,
    per_relay: int,
) -> list[list[Stream]]:
    """`per_relay` clients of the account on each relay, grouped by relay."""
    return [
        [
            await stack.enter_async_context(
                open_stream(http, f"{relay.url}/v1/events", token=token(account_id))
            )
            for _ in range(per_relay)
        ]
        for relay in relays
    ]


async def wait_all(streams: list[Stream], predicate: Predicate, timeout: float = DEADLINE) -> None:
    await asyncio.gather(*(s.wait_for(predicate, timeout) for s in streams))


async def upstream_shown(
    http: httpx.AsyncClient, relays: list[RelayProcess], account_id: str
) -> list[str]:
    """What each relay's /v1/status says of the account's upstream, once each knows it is up."""
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}

    async def shown(relay: RelayProcess) -> str:
        async with asyncio.timeout(DEADLINE):
            while True:
                status = (await http.get(f"{relay.url}/v1/status", headers=headers)).json()
                (entry,) = [a for a in status["accounts"] if a["account_id"] == account_id]
                if "connected" in (entry["upstream"], entry.get("holder_state")):
                    return ":".join(filter(None, (entry["upstream"], entry.get("holder_state"))))
                await asyncio.sleep(0.05)

    return list(await asyncio.gather(*(shown(relay) for relay in relays)))


def upstreams_metric(text: str, state: str) -> float:
    prefix = f'relay_upstreams{{state="{state}"}} '
    return sum(
        float(line.removeprefix(prefix)) for line in text.splitlines() if line.startswith(prefix)
    )


# -- acceptance ------------------------------------------------------------------------------------


async def test_three_relays_thirty_clients_five_accounts_five_upstreams_every_event_once_in_order(
    redis: RedisServer, simulator: tuple[Simulator, str], tmp_path: Path, http: httpx.AsyncClient
) -> None:
    sim, sim_url = simulator
    accounts = [f"acct_scale{i}" for i in range(5)]
    async with (
        relay_processes(3, tmp_path, redis, sim_url, http) as relays,
        contextlib.AsyncExitStack() as stack,
    ):
        clients = {
            a: [s for group in await open_clients(stack, http, relays, a, 10) for s in group]
            for a in accounts
        }
        everyone = [s for streams in clients.values() for s in streams]
        # Warm-up events until every client gets its account's events (its relay reads them).
        async with asyncio.timeout(DEADLINE):
            warmup = 0
            while not all(calls(s) for s in everyone):
                for account_id in accounts:
                    await sim.inject(account_id, "call.warmup", {"n": -1 - warmup})
                warmup += 1
                await asyncio.sleep(0.05)
        rounds = 20
        for n in range(rounds):
            for account_id in accounts:
                await sim.inject(account_id, "call.incoming", {"account": account_id, "n": n})
        await wait_all(everyone, saw(rounds - 1))

        assert [sim.open_streams(a) for a in accounts] == [1] * 5
        assert [sim.streams_opened(a) for a in accounts] == [1] * 5
        # Each account's upstream runs in one relay; the others show the state it reports.
        for account_id in accounts:
            shown = await upstream_shown(http, relays, account_id)
            assert sorted(shown) == ["connected", "remote:connected", "remote:connected"]
        for relay in relays:
            metrics = (await http.get(f"{relay.url}/metrics")).text
            assert upstreams_metric(metrics, "connected") + upstreams_metric(metrics, "remote") == 5
        for account_id, streams in clients.items():
            sent = sim.sent_log(account_id)
            for stream in streams:
                assert is_suffix_of_what_was_sent(stream, sent), numbers(calls(stream))
                assert all(
                    json.loads(e.data).get("account", account_id) == account_id
                    for e in calls(stream)
                )
                assert numbers(calls(stream))[-rounds:] == list(range(rounds))


async def test_kill_9_of_the_upstream_holder_hands_it_over_and_no_client_misses_an_event(
    redis: RedisServer, simulator: tuple[Simulator, str], tmp_path: Path, http: httpx.AsyncClient
) -> None:
    sim, sim_url = simulator
    injector = Injector(sim, ACCT, interval=0.05)
    async with (
        connect(redis.url) as lease_holder,
        relay_processes(3, tmp_path, redis, sim_url, http) as relays,
        contextlib.AsyncExitStack() as stack,
    ):
        groups = await open_clients(stack, http, relays, ACCT, 4)
        injector.start()
        await wait_all([s for group in groups for s in group], got_a_call)
        await injector.wait_sent(20)

        holder = await lease_holder.get(lease_key(ACCT))
        assert isinstance(holder, str)
        holder_pid = int(holder.split(":")[1])  # the token is host:pid:random
        killed = next(i for i, relay in enumerate(relays) if relay.process.pid == holder_pid)
        os.kill(holder_pid, signal.SIGKILL)
        killed_at = time.monotonic()
        sent_before_kill = injector.sent

        # Clients of the killed relay come back on the others with Last-Event-ID, while no
        # relay holds the upstream yet.
        orphans = groups[killed]
        survivors = [s for i, group in enumerate(groups) if i != killed for s in group]
        async with asyncio.timeout(DEADLINE):
            await asyncio.gather(*(s.closed.wait() for s in orphans))
        resumed = []
        for index, orphan in enumerate(orphans):
            last_id = [e.id for e in orphan.events if e.id][-1]
            relay = [r for i, r in enumerate(relays) if i != killed][index % 2]
            resumed.append(
                await stack.enter_async_context(
                    open_stream(
                        http,
                        f"{relay.url}/v1/events",
                        token=token(ACCT),
                        headers={"Last-Event-ID": last_id},
                    )
                )
            )

        async with asyncio.timeout(LEASE_SECONDS + 5):
            while sim.streams_opened(ACCT) < 2:  # noqa: ASYNC110 - the simulator has no change notification
                await asyncio.sleep(0.01)
        takeover = time.monotonic() - killed_at
        sent_before_takeover = injector.sent
        print(f"\nupstream taken over {takeover:.2f} s after kill -9 (lease {LEASE_SECONDS} s)")
        await injector.wait_sent(injector.sent + 20)  # and more through the new holder
        last = await injector.stop()
        await wait_all(survivors + resumed, saw(last))

        assert takeover <= LEASE_SECONDS + 1.0
        assert sim.streams_opened(ACCT) == 2
        assert sim.open_streams(ACCT) == 1
        # Sent while no relay held the upstream: the new holder asked for them with the
        # Last-Event-ID the dead one left beside the lease, and the simulator replayed them.
        unheld = set(range(sent_before_kill, sent_before_takeover))
        assert len(unheld) >= 10
        new_connection = max(e.connection or 0 for e in sim.sent_log(ACCT))
        assert unheld <= {
            json.loads(e.data)["n"] for e in sim.sent_log(ACCT) if e.connection == new_connection
        }
        for stream in survivors:
            got = numbers(calls(stream))
            assert got == list(range(got[0], last + 1)), "missed, repeated or out of order"
        for orphan, again in zip(orphans, resumed, strict=True):
            assert again.of_type("relay.reset") == []
            got = numbers(calls(orphan)) + numbers(calls(again))
            assert got == list(range(got[0], last + 1)), "missed, repeated or out of order"
        assert all(relay.alive for i, relay in enumerate(relays) if i != killed)


async def test_redis_stopped_and_restarted_mid_stream_degrades_then_resumes_without_loss(
    redis: RedisServer, simulator: tuple[Simulator, str], tmp_path: Path, http: httpx.AsyncClient
) -> None:
    sim, sim_url = simulator
    injector = Injector(sim, ACCT)
    async with (
        relay_processes(2, tmp_path, redis, sim_url, http) as relays,
        contextlib.AsyncExitStack() as stack,
    ):
        everyone = [s for group in await open_clients(stack, http, relays, ACCT, 3) for s in group]
        injector.start()
        await wait_all(everyone, got_a_call)

        redis.stop()
        await wait_all(everyone, lambda events: "degraded" in told_states(events))
        for relay in relays:
            assert (await http.get(f"{relay.url}/readyz")).status_code == 503
        await injector.wait_sent(injector.sent + 20)  # events while Redis is down
        redis.start()

        await wait_all(everyone, lambda events: told_states(events)[-1] == "connected")
        for relay in relays:
            assert (await http.get(f"{relay.url}/readyz")).status_code == 200
        last = await injector.stop()
        await wait_all(everyone, saw(last))

        for stream in everyone:
            got = numbers(calls(stream))
            assert got == list(range(got[0], last + 1))
        assert all(relay.alive for relay in relays)
        assert sim.streams_opened(ACCT) == 1  # the holder kept its upstream through the outage
