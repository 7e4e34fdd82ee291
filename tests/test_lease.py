"""The per-account upstream lease, in-process, against a real redis-server and a short lease time.

Each `process()` is what one relay process runs of the leases (`UpstreamStates`, `UpstreamLeases`
and a hub on the Redis broker), with `FakeUpstreams` in place of the `UpstreamManager` so the tests
see what the leases ask of it. The kill -9 takeover of real relay processes is in test_scaleout.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis_server import RedisServer, redis_server

from relay import lease
from relay.brokers.redis import RedisBroker, connect
from relay.channel import Incoming, UpstreamState, UpstreamStatus
from relay.config import ReplaySettings, Settings
from relay.hub import Hub, Limits
from relay.lease import (
    UpstreamLeases,
    UpstreamStates,
    held_elsewhere,
    lease_key,
    process_token,
    upstream_key,
)
from relay.metrics import Metrics

ACCT = "acct_lease"
DEADLINE = 5.0


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    with redis_server(tmp_path) as running:
        yield running


@dataclass
class FakeUpstreams:
    """Records what the leases acquire, release and drop of the UpstreamManager."""

    counts: dict[str, int] = field(default_factory=dict)
    resumed_from: list[str] = field(default_factory=list)  # last_event_id of each acquire
    drops: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def acquire(self, account_id: str, *, last_event_id: str = "") -> None:
        self.counts[account_id] = self.counts.get(account_id, 0) + 1
        self.resumed_from.append(last_event_id)
        self.changed.set()

    def release(self, account_id: str) -> None:
        self.counts[account_id] -= 1
        self.changed.set()

    def drop(self, account_id: str) -> None:
        self.counts[account_id] = 0
        self.drops += 1
        self.changed.set()

    def status_of(self, account_id: str) -> UpstreamStatus | None:
        return UpstreamStatus(account_id, UpstreamState.CONNECTED, time.time(), 0, 0)

    def open(self, account_id: str) -> bool:
        return self.counts.get(account_id, 0) > 0

    async def wait_open(self, account_id: str, open: bool = True) -> None:
        async with asyncio.timeout(DEADLINE):
            while self.open(account_id) is not open:
                self.changed.clear()
                await self.changed.wait()


@dataclass
class Process:
    leases: UpstreamLeases
    upstreams: FakeUpstreams
    states: UpstreamStates
    hub: Hub


@contextlib.asynccontextmanager
async def process(
    redis: RedisServer, lease_seconds: float = 0.6, linger_seconds: float = 0.0
) -> AsyncIterator[Process]:
    broker = RedisBroker(redis.url, ReplaySettings())
    hub = Hub(broker, Limits(10, 10, 10, 10), Metrics())
    token = process_token()
    states = UpstreamStates(broker.redis, hub, token)
    upstreams = FakeUpstreams()
    settings = Settings.model_validate(
        {"upstream": {"linger_seconds": linger_seconds}, "broker": {"lease_seconds": lease_seconds}}
    )
    leases = UpstreamLeases(broker.redis, upstreams, states, settings, token)
    states.start()
    try:
        yield Process(leases, upstreams, states, hub)
    finally:
        await leases.aclose()
        await states.aclose()
        await broker.aclose()


async def upstream_event(one: Process, upstream_id: str) -> None:
    """An event from the upstream the process holds, as the UpstreamManager would hand it over."""
    incoming = Incoming("call.incoming", json.dumps({"id": upstream_id}), upstream_id=upstream_id)
    assert await one.states.publish(ACCT, incoming)


async def stored_resume_id(client: Redis, expected: str) -> None:
    async with asyncio.timeout(DEADLINE):
        while await client.hget(upstream_key(ACCT), "last_event_id") != expected:  # noqa: ASYNC110 - Redis has no change notification here
            await asyncio.sleep(0.01)


async def test_one_process_holds_the_lease_and_the_next_resumes_where_it_stopped(
    redis: RedisServer,
) -> None:
    async with process(redis) as one, process(redis) as two:
        one.leases.acquire(ACCT)
        await one.upstreams.wait_open(ACCT)
        two.leases.acquire(ACCT)
        await upstream_event(one, "u1")
        await upstream_event(one, "u2")
        await asyncio.sleep(1.5)  # more than two lease times: renewals keep it where it is
        assert one.leases.held() == [ACCT]
        assert two.leases.held() == []
        assert not two.upstreams.open(ACCT)

        one.leases.release(ACCT)  # linger 0: the lease is let go at once
        await two.upstreams.wait_open(ACCT)
        assert not one.upstreams.open(ACCT)
        assert one.leases.held() == []
        assert one.upstreams.resumed_from == [""]
        assert two.upstreams.resumed_from == ["u2"]


async def test_the_newest_upstream_id_is_stored_as_events_arrive_not_at_renewals(
    redis: RedisServer,
) -> None:
    client = connect(redis.url)
    async with process(redis, lease_seconds=60.0) as one:  # renewed every 20 s
        one.leases.acquire(ACCT)
        await one.upstreams.wait_open(ACCT)
        for upstream_id in ("u1", "u2", "u3"):
            await upstream_event(one, upstream_id)
            await stored_resume_id(client, upstream_id)
    await client.aclose()


async def test_a_lease_found_taken_by_another_process_closes_the_upstream_at_once(
    redis: RedisServer,
) -> None:
    client = connect(redis.url)
    # A linger longer than the test: a release instead of a drop would keep the upstream open.
    async with process(redis, linger_seconds=60.0) as one:
        one.leases.acquire(ACCT)
        await one.upstreams.wait_open(ACCT)
        await client.set(lease_key(ACCT), "another:1:process", px=60_000)
        await one.upstreams.wait_open(ACCT, open=False)
        assert one.upstreams.drops == 1
        assert one.leases.held() == []
    await client.aclose()


def shown_state(one: Process) -> UpstreamState | None:
    shown = one.hub.upstream_status(ACCT)
    return shown.state if shown is not None else None


async def test_a_process_without_the_upstream_shows_the_holders_state(
    redis: RedisServer,
) -> None:
    async with process(redis) as one, process(redis) as two:
        one.leases.acquire(ACCT)
        await one.upstreams.wait_open(ACCT)
        two.leases.acquire(ACCT)
        async with asyncio.timeout(DEADLINE):
            while shown_state(two) is not UpstreamState.CONNECTED:  # noqa: ASYNC110 - the hub has no change notification
                await asyncio.sleep(0.01)
        assert held_elsewhere(None, two.hub.upstream_status(ACCT))
        assert not held_elsewhere(one.upstreams.status_of(ACCT), one.hub.upstream_status(ACCT))

        two.leases.release(ACCT)  # no longer followed there: nothing stale is shown
        assert not held_elsewhere(None, two.hub.upstream_status(ACCT))


async def test_a_quiet_link_to_redis_is_not_taken_for_an_outage(
    redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The state subscription pings Redis; a link answering only those pings is alive."""
    monkeypatch.setattr(lease, "PING_SECONDS", 0.05)
    monkeypatch.setattr(lease, "SILENT_SECONDS", 0.2)
    async with process(redis) as one, process(redis) as two:
        told: list[UpstreamState] = []
        show = two.hub.upstream_changed

        def record(status: UpstreamStatus) -> None:
            told.append(status.state)
            show(status)

        monkeypatch.setattr(two.hub, "upstream_changed", record)
        one.leases.acquire(ACCT)
        await one.upstreams.wait_open(ACCT)  # `one` holds; `two` follows
        two.leases.acquire(ACCT)
        await asyncio.sleep(1.0)  # five silences long, with no state published meanwhile
        assert UpstreamState.DEGRADED not in told
        assert told[-1] is UpstreamState.CONNECTED
