"""The Redis broker against a real, throwaway redis-server: ids, de-duplication, replay, live reading,
the replay/live handover, an outage with events queued and appended on recovery, and the upstream
lease across a restart that empties Redis."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from redis_server import RedisServer, redis_server

from relay.brokers.redis import UNNUMBERED, RedisBroker, connect
from relay.channel import Incoming, UpstreamState, UpstreamStatus
from relay.config import ReplaySettings, Settings
from relay.hub import Hub, Limits
from relay.lease import UpstreamLeases, UpstreamStates, lease_key, process_token, upstream_key
from relay.metrics import Metrics
from relay.stored import Stored, id_key

ACCT = "acct_alpha"
DEADLINE = 5.0


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    with redis_server(tmp_path) as running:
        yield running


class Received:
    """What a broker delivered live, per account, with a way to wait for it."""

    def __init__(self) -> None:
        self.events: dict[str, list[Stored]] = {}
        self._arrived = asyncio.Event()

    def __call__(self, account_id: str, event: Stored) -> None:
        self.events.setdefault(account_id, []).append(event)
        self._arrived.set()

    def of(self, account_id: str) -> list[Stored]:
        return self.events.get(account_id, [])

    async def wait_for(self, account_id: str, count: int) -> list[Stored]:
        async with asyncio.timeout(DEADLINE):
            while len(self.of(account_id)) < count:
                self._arrived.clear()
                await self._arrived.wait()
        return self.of(account_id)


@contextlib.asynccontextmanager
async def broker(
    server: RedisServer, max_events: int = 100, max_age_seconds: float = 3600.0
) -> AsyncIterator[RedisBroker]:
    opened = RedisBroker(
        server.url, ReplaySettings(max_events=max_events, max_age_seconds=max_age_seconds)
    )
    try:
        yield opened
    finally:
        await opened.aclose()


def call(n: int, upstream_id: str | None = None) -> Incoming:
    return Incoming("call.incoming", json.dumps({"n": n}), upstream_id=upstream_id)


def numbers(events: list[Stored]) -> list[int]:
    return [json.loads(e.data)["n"] for e in events]


async def publish_all(into: RedisBroker, count: int, start: int = 0) -> list[Stored]:
    stored = []
    for n in range(start, start + count):
        event = await into.publish(ACCT, call(n, upstream_id=f"u{n}"))
        assert event is not None
        stored.append(event)
    return stored


async def test_relay_ids_are_stream_ids_in_order_and_a_repeated_upstream_id_is_dropped(
    server: RedisServer,
) -> None:
    async with broker(server) as one:
        first = await one.publish(ACCT, call(1, upstream_id="evt_1"))
        again = await one.publish(ACCT, call(1, upstream_id="evt_1"))
        second = await one.publish(ACCT, call(2))
        third = await one.publish(ACCT, call(3))
        assert first is not None
        assert second is not None
        assert third is not None
        assert again is None
        assert first.key < second.key < third.key
        assert await one.last_id(ACCT) == third.id
        assert await one.last_id("acct_never") is None
        # The dedup keys are per account: the same upstream id elsewhere is a different event.
        assert await one.publish("acct_beta", call(1, upstream_id="evt_1")) is not None


async def test_replay_gives_what_follows_an_id_inside_the_window_and_resets_outside_it(
    server: RedisServer,
) -> None:
    async with broker(server, max_events=5) as one:
        stored = await publish_all(one, 8)  # 0..2 were trimmed away, 3..7 are kept
        after_4 = await one.replay(ACCT, stored[4].id)
        assert after_4 is not None
        assert numbers(after_4) == [5, 6, 7]
        # The client holds the last trimmed event: it missed nothing.
        after_2 = await one.replay(ACCT, stored[2].id)
        assert after_2 is not None
        assert numbers(after_2) == [3, 4, 5, 6, 7]
        assert await one.replay(ACCT, stored[7].id) == []
        # Event 2 is gone, so a client at 1 missed it.
        assert await one.replay(ACCT, stored[1].id) is None
        last = id_key(stored[7].id)
        assert await one.replay(ACCT, f"{last[0] + 1}-0") is None  # from the future
        assert await one.replay(ACCT, "not-an-id") is None
        assert await one.replay(ACCT, f"{2**64}-0") is None
        assert await one.replay("acct_never", stored[4].id) is None


async def test_an_id_from_before_the_stream_existed_is_a_reset(server: RedisServer) -> None:
    async with broker(server) as one:
        before = await one.publish(ACCT, call(0))
        assert before is not None
        server.stop()  # no persistence: Redis comes back empty
        server.start()
        after = await one.publish(ACCT, call(1))
        assert after is not None
        assert after.key > before.key
        assert await one.replay(ACCT, before.id) is None
        assert await one.replay(ACCT, after.id) == []


async def test_events_older_than_max_age_leave_the_window(server: RedisServer) -> None:
    async with broker(server, max_age_seconds=0.2) as one:
        stored = await publish_all(one, 2)
        assert await one.replay(ACCT, stored[0].id) is not None
        await asyncio.sleep(0.3)  # time itself is what is tested: both events age out
        assert await one.replay(ACCT, stored[0].id) is None
        # Holding the newest (now expired) event is still "nothing missed".
        assert await one.replay(ACCT, stored[1].id) == []


async def test_with_no_replay_window_ids_still_advance_and_nothing_is_missed(
    server: RedisServer,
) -> None:
    async with broker(server, max_events=0) as one:
        stored = await publish_all(one, 3)
        assert stored[0].key < stored[1].key < stored[2].key
        assert await one.replay(ACCT, stored[2].id) == []
        assert await one.replay(ACCT, stored[1].id) is None


async def test_every_process_reads_the_live_events_of_the_accounts_it_watches(
    server: RedisServer,
) -> None:
    async with broker(server) as writer, broker(server) as reader:
        received = Received()
        reader.attach(received)
        reader.watch(ACCT)
        reader.watch("acct_beta")
        await reader.replay(ACCT, "0-0")  # returns once the reader is in place
        await reader.replay("acct_beta", "0-0")
        stored = await publish_all(writer, 20)
        await writer.publish("acct_gamma", call(99))  # not watched there
        await writer.publish("acct_beta", call(100))
        got = await received.wait_for(ACCT, 20)
        assert [e.id for e in got] == [e.id for e in stored]
        assert numbers(got) == list(range(20))
        assert numbers(await received.wait_for("acct_beta", 1)) == [100]
        assert received.of("acct_gamma") == []

        # A newly watched account joins the running read; an unwatched one leaves it.
        reader.unwatch("acct_beta")
        reader.watch("acct_gamma")
        await reader.replay("acct_gamma", "0-0")
        await writer.publish("acct_beta", call(101))
        await writer.publish("acct_gamma", call(102))
        assert numbers(await received.wait_for("acct_gamma", 1)) == [102]
        assert numbers(received.of("acct_beta")) == [100]


async def test_a_resuming_subscriber_gets_replay_then_live_without_gap_or_repeat(
    server: RedisServer,
) -> None:
    """Events keep arriving from another process while the subscriber's replay is fetched."""
    async with broker(server) as writer, broker(server) as local:
        hub = Hub(local, Limits(100, 100, 100, 10_000), Metrics())
        before = await publish_all(writer, 10)
        publishing = asyncio.create_task(publish_all(writer, 200, start=10))
        await asyncio.sleep(0)
        opened = await hub.subscribe(ACCT, events=None, user_id=None, last_event_id=before[4].id)
        await publishing
        subscriber = opened.subscriber
        async with asyncio.timeout(DEADLINE):
            while b'"n": 209' not in b"".join(subscriber.frames):
                subscriber.has_work = False
                await subscriber.work()
        frames = [event.frame for event in opened.replay] + list(subscriber.frames)
        ns = [
            json.loads(line[6:])["n"]
            for f in frames
            for line in f.split(b"\n")
            if line.startswith(b"data: ")
        ]
        assert ns == list(range(5, 210))
        hub.unsubscribe(subscriber)


async def test_an_outage_queues_events_and_appends_them_in_order_once_redis_answers(
    server: RedisServer,
) -> None:
    async with broker(server) as one, broker(server) as other:
        received = Received()
        other.attach(received)
        other.watch(ACCT)
        await other.replay(ACCT, "0-0")
        before = await publish_all(one, 3)
        await received.wait_for(ACCT, 3)

        server.stop()
        assert not await one.ready()
        queued = [await one.publish(ACCT, call(n, upstream_id=f"u{n}")) for n in range(3, 8)]
        assert all(e is not None and e.id == UNNUMBERED for e in queued)
        # A repeated upstream id is dropped when the queue is appended.
        await one.publish(ACCT, call(5, upstream_id="u5"))
        # Without Redis a replay cannot be answered: the client is told to refetch its state.
        assert await other.replay(ACCT, before[0].id) is None

        server.start()
        got = await received.wait_for(ACCT, 8)
        assert numbers(got) == list(range(8))
        assert await one.ready()
        after = await one.publish(ACCT, call(8))
        assert after is not None
        assert after.id != UNNUMBERED
        assert numbers(await received.wait_for(ACCT, 9)) == list(range(9))


class OpenedUpstreams:
    """The leases' UpstreamManager: notes when the upstream is opened."""

    def __init__(self) -> None:
        self.opened = asyncio.Event()

    def acquire(self, account_id: str, *, last_event_id: str = "") -> None:
        self.opened.set()

    def release(self, account_id: str) -> None: ...

    def drop(self, account_id: str) -> None: ...

    def status_of(self, account_id: str) -> UpstreamStatus | None:
        return UpstreamStatus(account_id, UpstreamState.CONNECTED, time.time(), 0, 0)


async def evalsha_ran(server: RedisServer) -> None:
    """Until Redis has run a script (loading it first is a failed call): here, a lease claim."""
    client = connect(server.url)
    try:
        async with asyncio.timeout(DEADLINE):
            while True:
                stats = (await client.info("commandstats")).get("cmdstat_evalsha", {})
                if stats.get("calls", 0) - stats.get("failed_calls", 0) >= 1:
                    return
                await asyncio.sleep(0.01)
    finally:
        await client.aclose()


async def test_a_lease_lost_in_a_redis_restart_is_left_to_its_holder_for_a_lease_time(
    server: RedisServer,
) -> None:
    """Redis restarted empty forgets the lease. A process that saw it held but slept through the
    outage (none of its lease steps failed) used to claim it at once and open a second upstream
    without a Last-Event-ID, and the holder, finding its lease taken, closed its own: the events
    DialStack sent in between were lost. The holder's next renewal takes the lease back first."""
    lease_seconds = 1.5  # another process's claims are retried every 0.5 s
    holder = connect(server.url)
    await holder.set(lease_key(ACCT), "holder:1:abcd", px=60_000)
    await holder.hset(upstream_key(ACCT), "holder", "holder:1:abcd")
    settings = Settings.model_validate({"broker": {"lease_seconds": lease_seconds}})
    async with broker(server) as other:
        hub = Hub(other, Limits(10, 10, 10, 10), Metrics())
        token = process_token()
        states = UpstreamStates(other.redis, hub, token)
        upstreams = OpenedUpstreams()
        leases = UpstreamLeases(other.redis, upstreams, states, settings, token)
        states.start()
        try:
            leases.acquire(ACCT)
            await evalsha_ran(server)  # its claim found the lease held
            # Stopped and started with the loop blocked: no lease step sees the outage.
            server.stop()
            server.start()
            restarted = asyncio.get_running_loop().time()
            # The holder is gone for good here: the lease is taken, but only a lease time later.
            async with asyncio.timeout(DEADLINE):
                await upstreams.opened.wait()
            assert asyncio.get_running_loop().time() - restarted >= lease_seconds
            assert await holder.get(lease_key(ACCT)) == token
        finally:
            await leases.aclose()
            await states.aclose()
            await holder.aclose()
