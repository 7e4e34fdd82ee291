"""One measurement: a scenario against one server, from a cold start to a Result.

Phases: the clients connect (CPU per connection, memory per client), every account's upstream
is confirmed open at the simulator, then the events are published at the scenario's rate and
collected (CPU per delivery, latency, lost and duplicated events). The server's CPU time and
memory are read from /proc between phases, so the load generator's own work never counts.
"""

from __future__ import annotations

import asyncio
import os
from array import array
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from bench import servers
from bench.fleet import Delivery, Fleet
from bench.inject import SimulatorClient
from bench.procstats import Sample, sample
from bench.scenarios import Scenario
from bench.worker import WorkerPlan

HOST = "127.0.0.1"
DELIVERY_GRACE_SECONDS = 30.0  # after the last event is published
UPSTREAM_TIMEOUT_SECONDS = 60.0
# Handshakes in flight across all workers; below uvicorn's listen backlog (2048), so a
# burst of connects is queued by the bench rather than dropped by the kernel and retried.
CONNECT_CONCURRENCY = 1024


@dataclass(frozen=True, slots=True)
class Latency:
    p50: float
    p90: float
    p99: float
    max: float


@dataclass(frozen=True, slots=True)
class Result:
    scenario: str
    server: str
    clients: int
    accounts: int
    expected: int  # events, summed over clients
    delivered: int  # distinct events received
    lost: int
    duplicates: int
    foreign: int  # events of another account or never sent: must be 0
    failures: dict[str, int]  # clients not open at the end, and why; other problems
    latency_ms: Latency | None
    connect_seconds: float
    cpu_seconds: float
    cpu_per_delivery_us: float | None
    cpu_per_connection_us: float
    rss_per_client_kb: float
    rss_per_upstream_kb: float | None  # its clients' memory taken out; None with one account
    peak_rss_mb: float
    asked_rate: float  # events a second into all accounts together
    publish_rate: float | None  # achieved (the slowest publishing); lower if the simulator lagged
    loadgen_cpu_seconds: float  # the bench's processes: they share the machine with the server
    simulator_cpu_seconds: float


def account_ids(count: int) -> list[str]:
    return [f"acct_bench{index:04d}" for index in range(count)]


def worker_plans(scenario: Scenario, port: int, secret: str) -> list[WorkerPlan]:
    """Clients dealt round-robin over one worker per core, each from its own loopback address.

    Client n belongs to account n mod accounts, so clients 0 .. accounts-1 cover every account.
    """
    accounts = account_ids(scenario.accounts)
    count = max(1, min(os.cpu_count() or 1, scenario.clients))
    return [
        WorkerPlan(
            host=HOST,
            port=port,
            source_ip=f"127.0.0.{index + 2}",
            secret=secret,
            clients=[
                (n, accounts[n % len(accounts)]) for n in range(index, scenario.clients, count)
            ],
            events_per_account=scenario.events_per_account,
            connect_concurrency=max(1, CONNECT_CONCURRENCY // count),
        )
        for index in range(count)
    ]


def percentiles(latencies: array[float]) -> Latency | None:
    if not latencies:
        return None
    ordered = sorted(latencies)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return Latency(at(0.5), at(0.9), at(0.99), ordered[-1] * 1000)


async def upstreams_open(simulator: SimulatorClient, accounts: list[str]) -> int:
    """Waits (bounded) until every account has an upstream stream; returns how many do."""
    wanted = set(accounts)
    opened = 0
    try:
        async with asyncio.timeout(UPSTREAM_TIMEOUT_SECONDS):
            while True:
                streams = await simulator.open_streams()
                opened = sum(1 for a in wanted if streams.get(a, 0) > 0)
                if opened == len(wanted):
                    return opened
                await asyncio.sleep(0.05)
    except TimeoutError:
        return opened


@dataclass(slots=True)
class _Phases:
    """What a measurement observed, before it is reduced to a Result."""

    before: Sample  # the server at rest, before any client
    upstreams: Sample  # with one client per account and every upstream open
    connected: Sample  # once every client saw its `connected` event
    end: Sample  # once the events were collected
    connect_seconds: float
    connect_cpu: float  # CPU seconds of the measured connections (the storm's: reconnections)
    event_cpu: float  # CPU seconds while events were published and delivered to open clients
    live_deliveries: int  # the deliveries event_cpu paid for (the storm's replays are not)
    delivery: Delivery
    publish_rates: list[float]  # events a second achieved by each publishing
    loadgen_cpu: float  # the bench's own processes
    simulator_cpu: float


def _cpu(pids: list[int]) -> float:
    return sum(sample(pid).cpu_seconds for pid in pids)


async def measure(scenario: Scenario, server_name: str, workdir: Path, secret: str) -> Result:
    await asyncio.to_thread(workdir.mkdir, parents=True, exist_ok=True)
    accounts = account_ids(scenario.accounts)
    problems: Counter[str] = Counter()
    async with (
        servers.simulator(workdir, HOST) as simulator_process,
        servers.server(server_name, workdir, HOST, simulator_process.url, secret) as server,
        SimulatorClient(HOST, simulator_process.port) as simulator,
        Fleet.started(worker_plans(scenario, server.port, secret)) as fleet,
    ):
        loadgen = [os.getpid(), *fleet.pids]
        loadgen_cpu, simulator_cpu = _cpu(loadgen), _cpu([simulator_process.pid])
        before = sample(server.pid)
        # One client per account first: every upstream opens, and what they take in memory is
        # told apart from what the clients take.
        first = await fleet.connect(below=len(accounts))
        opened = await upstreams_open(simulator, accounts)
        if opened < len(accounts):
            problems[f"upstreams open at the simulator: {opened}/{len(accounts)}"] += 1
        upstreams = sample(server.pid)
        rest = await fleet.connect(below=scenario.clients)
        connected = sample(server.pid)
        connect_seconds = first.seconds + rest.seconds
        connect_cpu = connected.cpu_seconds - before.cpu_seconds
        events = _Events(scenario, accounts, simulator, fleet)
        if scenario.storm:
            storm = await events.storm(server.pid)
            delivery, connect_seconds, connect_cpu, event_cpu, live_deliveries = storm
            end = sample(server.pid)
        else:
            delivery = await events.live()
            end = sample(server.pid)
            event_cpu = end.cpu_seconds - connected.cpu_seconds
            live_deliveries = delivery.delivered
        loadgen_cpu = _cpu(loadgen) - loadgen_cpu
        simulator_cpu = _cpu([simulator_process.pid]) - simulator_cpu
        if server.exit_code() is not None:
            problems[f"{server_name} exited with {server.exit_code()}"] += 1
    phases = _Phases(
        before,
        upstreams,
        connected,
        end,
        connect_seconds,
        connect_cpu,
        event_cpu,
        live_deliveries,
        delivery,
        events.rates,
        loadgen_cpu,
        simulator_cpu,
    )
    return _result(scenario, server_name, phases, problems)


class _Events:
    """The event phase of a measurement: publishing at the scenario's rate, and collecting."""

    def __init__(
        self, scenario: Scenario, accounts: list[str], simulator: SimulatorClient, fleet: Fleet
    ) -> None:
        self._scenario = scenario
        self._accounts = accounts
        self._simulator = simulator
        self._fleet = fleet
        self.rates: list[float] = []

    async def _publish(self, first: int, count: int) -> None:
        rate = self._scenario.rate_per_account
        self.rates.append(await self._simulator.publish(self._accounts, first, count, rate))

    async def live(self) -> Delivery:
        events = self._scenario.events_per_account
        if events:
            await self._publish(0, events)
        return await self._fleet.collect(events, DELIVERY_GRACE_SECONDS if events else 0)

    async def storm(self, pid: int) -> tuple[Delivery, float, float, float, int]:
        """Live, everyone away, everyone back at once with Last-Event-ID, live again.

        Returns the delivery over all phases; the seconds and server CPU seconds that the
        reconnection (replays included) took; and the server CPU seconds of the two live
        phases with the deliveries they made.
        """
        events = self._scenario.events_per_account
        live, away = events // 2, events // 4
        started = sample(pid)
        await self._publish(0, live)
        first = await self._fleet.collect(live, DELIVERY_GRACE_SECONDS)
        left = sample(pid)
        await self._fleet.disconnect()
        await self._publish(live, away)
        before = sample(pid)
        reconnect = await self._fleet.connect(below=self._scenario.clients)
        back = sample(pid)
        replayed = await self._fleet.collect(0, 0)  # what the clients had once back
        await self._publish(live + away, events - live - away)
        delivery = await self._fleet.collect(events, DELIVERY_GRACE_SECONDS)
        end = sample(pid)
        delivery.latencies = first.latencies + replayed.latencies + delivery.latencies
        reconnect_cpu = back.cpu_seconds - before.cpu_seconds
        live_cpu = left.cpu_seconds - started.cpu_seconds + end.cpu_seconds - back.cpu_seconds
        live_deliveries = first.delivered + delivery.delivered - replayed.delivered
        return delivery, reconnect.seconds, reconnect_cpu, live_cpu, live_deliveries


def _result(
    scenario: Scenario, server_name: str, phases: _Phases, problems: Counter[str]
) -> Result:
    clients, accounts = scenario.clients, scenario.accounts
    before, upstreams, end, delivery = phases.before, phases.upstreams, phases.end, phases.delivery
    if clients > accounts:
        rss_per_client = (phases.connected.rss_bytes - upstreams.rss_bytes) / (clients - accounts)
    else:
        rss_per_client = (phases.connected.rss_bytes - before.rss_bytes) / clients
    rss_per_upstream = (upstreams.rss_bytes - before.rss_bytes) / accounts - rss_per_client
    deliveries = phases.live_deliveries
    per_delivery = phases.event_cpu / deliveries if deliveries else None
    return Result(
        scenario=scenario.name,
        server=server_name,
        clients=clients,
        accounts=accounts,
        expected=clients * scenario.events_per_account,
        delivered=delivery.delivered,
        lost=delivery.lost,
        duplicates=delivery.duplicates,
        foreign=delivery.foreign,
        failures=dict(delivery.failures + problems),
        latency_ms=percentiles(delivery.latencies),
        connect_seconds=phases.connect_seconds,
        cpu_seconds=end.cpu_seconds - before.cpu_seconds,
        cpu_per_delivery_us=per_delivery * 1e6 if per_delivery is not None else None,
        cpu_per_connection_us=phases.connect_cpu / clients * 1e6,
        rss_per_client_kb=rss_per_client / 1024,
        # One upstream's share is lost in the noise of thousands of clients.
        rss_per_upstream_kb=rss_per_upstream / 1024 if accounts > 1 else None,
        peak_rss_mb=end.peak_rss_bytes / 2**20,
        asked_rate=accounts * scenario.rate_per_account,
        publish_rate=min(phases.publish_rates, default=None),
        loadgen_cpu_seconds=phases.loadgen_cpu,
        simulator_cpu_seconds=phases.simulator_cpu,
    )
