"""The upstream manager against the DialStack simulator over real loopback HTTP.

Tests use short backoffs, lingers and session lifetimes, so each runs in one to four seconds.
Every wait for the relay is a poll or an event bounded by a deadline; the only sleeps pace the
upstream or let time pass where the point is that nothing happens meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import httpx
import pytest
import structlog
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from relay.backoff import MAX_RETRY_AFTER_SECONDS, Backoff, parse_retry_after
from relay.channel import Incoming, UpstreamState, UpstreamStatus
from relay.config import Settings
from relay.inbox import Inbox
from relay.serving import running_server
from relay.sessions import session_source_for
from relay.simulator import DEFAULT_SECRET_KEY, Faults, Simulator
from relay.simulator.faults import GARBLED_DATA
from relay.sse import Event
from relay.upstream import UpstreamManager, _Overlap, _receiver, _Stream

ACCOUNT = "acct_upstream"
TEST_EVENT = "call.test"


class RecordingSink:
    """A ChannelSink that keeps everything it is given and wakes up waiters."""

    def __init__(self) -> None:
        self.events: list[Incoming] = []
        self.states: list[UpstreamStatus] = []
        self._changed = asyncio.Event()

    async def publish(self, account_id: str, event: Incoming) -> bool:
        assert account_id == ACCOUNT
        self.events.append(event)
        self._changed.set()
        return True

    def upstream_changed(self, status: UpstreamStatus) -> None:
        self.states.append(status)
        self._changed.set()

    @property
    def state(self) -> UpstreamState | None:
        return self.states[-1].state if self.states else None

    def counters(self) -> list[int]:
        return [json.loads(e.data)["n"] for e in self.events if e.type == TEST_EVENT]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            states = [(s.state.value, s.detail) for s in self.states[-5:]]
            raise AssertionError(
                f"not within {timeout}s; {len(self.events)} events, last states {states}"
            ) from None


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll the simulator's counters (which have no change notification) until true."""
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - the simulator has no change notification
            await asyncio.sleep(0.005)


class Attempts:
    """Loop times at which the relay sent requests to `path` (an httpx request hook)."""

    def __init__(self, path: str = "/v1/events") -> None:
        self.path = path
        self.times: list[float] = []

    async def __call__(self, request: httpx.Request) -> None:
        if request.url.path == self.path:
            self.times.append(asyncio.get_running_loop().time())

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.times, self.times[1:], strict=False)]


def upstream_settings(
    base_url: str, accounts: list[dict[str, Any]] | None = None, **upstream: Any
) -> Settings:
    defaults = {
        "base_url": base_url,
        "secret_key": DEFAULT_SECRET_KEY,
        "linger_seconds": 0.2,
        "backoff_initial_seconds": 0.02,
        "backoff_max_seconds": 0.1,
        "connect_timeout_seconds": 2.0,
    }
    return Settings.model_validate({"upstream": defaults | upstream, "accounts": accounts or []})


@contextlib.asynccontextmanager
async def upstream_manager(
    settings: Settings,
    sink: RecordingSink,
    attempts: Attempts | None = None,
    rng: random.Random | None = None,
) -> AsyncIterator[UpstreamManager]:
    hooks: dict[str, list[Callable[..., Any]]] = {"request": [attempts]} if attempts else {}
    async with httpx.AsyncClient(event_hooks=hooks) as http:
        manager = UpstreamManager(settings, sink, session_source_for(settings, http), http, rng=rng)
        try:
            yield manager
        finally:
            await manager.aclose()


def simulator(**faults: Any) -> Simulator:
    return Simulator(
        accounts=[ACCOUNT], call_interval_seconds=None, faults=Faults(**faults), seed=7
    )


def connected(sink: RecordingSink) -> Callable[[], bool]:
    return lambda: sink.state is UpstreamState.CONNECTED


async def inject_series(sim: Simulator, start: int, count: int, every: float = 0.005) -> None:
    for n in range(start, start + count):
        await sim.inject(ACCOUNT, TEST_EVENT, {"n": n})
        await asyncio.sleep(every)  # pacing the upstream, not waiting for the relay


async def settle(sim: Simulator, sink: RecordingSink) -> None:
    """Once faults are off: a marker event that arrives proves everything sent before it did."""
    for attempt in range(20):
        await sink.wait_for(lambda: sink.state is UpstreamState.CONNECTED)
        await eventually(lambda: sim.open_streams(ACCOUNT) == 1)
        marker = json.dumps({"marker": attempt})
        await sim.inject(ACCOUNT, "call.marker", marker)
        with contextlib.suppress(AssertionError):
            await sink.wait_for(partial(delivered, sink, marker), timeout=1.0)
            return
    raise AssertionError("no marker event came through")


def delivered(sink: RecordingSink, data: str) -> bool:
    return any(e.data == data for e in sink.events)


def sent_counters(sim: Simulator) -> list[int]:
    """Distinct counters of the test events the simulator wrote in full on any connection."""
    return sorted({json.loads(e.data)["n"] for e in sim.sent_log(ACCOUNT) if e.type == TEST_EVENT})


# -- one connection per account -------------------------------------------------------------------


async def test_many_subscribers_share_one_connection_that_lingers() -> None:
    sim = simulator()
    sink = RecordingSink()
    async with sim.serve() as base_url:
        settings = upstream_settings(base_url, linger_seconds=0.3)
        async with upstream_manager(settings, sink) as manager:
            for _ in range(50):
                manager.acquire(ACCOUNT)
            await sink.wait_for(connected(sink))
            await sim.inject(ACCOUNT, TEST_EVENT, {"n": 1})
            await sink.wait_for(lambda: sink.counters() == [1])
            assert sim.open_streams(ACCOUNT) == 1
            assert sim.streams_opened(ACCOUNT) == 1

            for _ in range(50):
                manager.release(ACCOUNT)
            manager.acquire(ACCOUNT)  # back within the linger
            await asyncio.sleep(0.5)  # longer than the linger: nothing may happen meanwhile
            await sim.inject(ACCOUNT, TEST_EVENT, {"n": 2})
            await sink.wait_for(lambda: sink.counters() == [1, 2])
            assert sim.streams_opened(ACCOUNT) == 1
            assert sim.open_streams(ACCOUNT) == 1

            released_at = time.monotonic()
            manager.release(ACCOUNT)
            await eventually(lambda: sim.open_streams(ACCOUNT) == 0)
            assert time.monotonic() - released_at >= 0.3
            status = manager.status_of(ACCOUNT)
            assert status is not None
            assert status.state is UpstreamState.IDLE
            assert status.events == 2
            assert sink.state is UpstreamState.IDLE
            assert manager.status() == [status]


async def test_always_on_accounts_open_at_start() -> None:
    sim = simulator()
    sink = RecordingSink()
    async with sim.serve() as base_url:
        settings = upstream_settings(base_url, [{"id": ACCOUNT, "always_on": True}])
        async with upstream_manager(settings, sink) as manager:
            assert manager.status_of(ACCOUNT) is not None
            assert manager.status_of("acct_unknown") is None
            await manager.start()
            await sink.wait_for(connected(sink))
            assert sim.open_streams(ACCOUNT) == 1


# -- handing the upstream between processes ------------------------------------------------------


async def test_an_upstream_opened_from_idle_resumes_after_the_given_id() -> None:
    sim = simulator()
    sink = RecordingSink()
    async with sim.serve() as base_url:
        # Sent while no relay was connected: only DialStack's replay can bring them.
        sent = [await sim.inject(ACCOUNT, TEST_EVENT, {"n": n}) for n in range(5)]
        assert sent[1].id is not None
        async with upstream_manager(upstream_settings(base_url), sink) as manager:
            manager.acquire(ACCOUNT, last_event_id=sent[1].id)
            await sink.wait_for(lambda: sink.counters() == [2, 3, 4])

            manager.acquire(ACCOUNT, last_event_id="1")  # already open: changes nothing
            await sim.inject(ACCOUNT, TEST_EVENT, {"n": 5})
            await sink.wait_for(lambda: sink.counters() == [2, 3, 4, 5])
            assert sim.streams_opened(ACCOUNT) == 1


async def test_the_given_id_wins_over_the_upstream_own_one() -> None:
    """Taken back after another process held it, the upstream resumes where that one stopped."""
    sim = simulator()
    sink = RecordingSink()
    async with (
        sim.serve() as base_url,
        upstream_manager(upstream_settings(base_url), sink) as manager,
    ):
        manager.acquire(ACCOUNT)
        await sink.wait_for(connected(sink))
        sent = [await sim.inject(ACCOUNT, TEST_EVENT, {"n": n}) for n in range(3)]
        await sink.wait_for(lambda: sink.counters() == [0, 1, 2])
        assert sent[0].id is not None

        manager.drop(ACCOUNT)
        # At once, while the dropped connection is still closing and leaving its own id.
        manager.acquire(ACCOUNT, last_event_id=sent[0].id)
        await sink.wait_for(lambda: sink.counters() == [0, 1, 2, 1, 2])
        await sim.inject(ACCOUNT, TEST_EVENT, {"n": 3})
        await sink.wait_for(lambda: sink.counters() == [0, 1, 2, 1, 2, 3])
        assert sim.streams_opened(ACCOUNT) == 2
        assert sim.open_streams(ACCOUNT) == 1


async def test_drop_closes_the_upstream_at_once_and_forgets_its_subscribers() -> None:
    sim = simulator()
    sink = RecordingSink()
    async with sim.serve() as base_url:
        settings = upstream_settings(base_url, linger_seconds=1.0)
        async with upstream_manager(settings, sink) as manager:
            for _ in range(3):
                manager.acquire(ACCOUNT)
            manager.release(ACCOUNT)
            await sink.wait_for(connected(sink))

            dropped_at = time.monotonic()
            manager.drop(ACCOUNT)
            assert sink.state is UpstreamState.IDLE
            await eventually(lambda: sim.open_streams(ACCOUNT) == 0)
            assert time.monotonic() - dropped_at < 1.0  # sooner than the linger

            manager.acquire(ACCOUNT)
            await sink.wait_for(connected(sink))
            manager.release(ACCOUNT)  # the only subscriber: the two before were forgotten
            await eventually(lambda: sim.open_streams(ACCOUNT) == 0, timeout=3.0)
            assert sink.state is UpstreamState.IDLE


# -- transparency under faults --------------------------------------------------------------------

FAULTS: dict[str, dict[str, Any]] = {
    "drop-every": {"drop_every_seconds": 0.2},
    "drop-mid-event": {"drop_every_seconds": 0.2, "drop_mid_event": True},
    "split-writes": {"split_writes": True},
    "crlf": {"line_ending": "\r\n"},
    "cr": {"line_ending": "\r"},
    "garbage": {"garbage_lines": True},
}


@pytest.mark.parametrize("send_ids", [True, False], ids=["ids", "no-ids"])
@pytest.mark.parametrize("fault", list(FAULTS))
async def test_every_event_sent_arrives_once_in_order(fault: str, send_ids: bool) -> None:
    sim = simulator(send_ids=send_ids)
    sink = RecordingSink()
    async with (
        sim.serve() as base_url,
        upstream_manager(upstream_settings(base_url), sink) as manager,
    ):
        manager.acquire(ACCOUNT)
        await sink.wait_for(connected(sink))
        sim.faults = Faults(send_ids=send_ids, **FAULTS[fault])
        await inject_series(sim, 0, 120)
        sim.faults = Faults(send_ids=send_ids)
        await settle(sim, sink)

        assert sink.counters() == sent_counters(sim)
        assert len(sink.counters()) >= 30  # the faults did not starve the test
        if "drop_every_seconds" in FAULTS[fault]:
            assert sim.streams_opened(ACCOUNT) >= 3
        if fault == "garbage":
            garbled = [e for e in sink.events if e.type == "call.garbled"]
            assert garbled
            assert all(e.data in GARBLED_DATA for e in garbled)  # invalid JSON, as sent
        if send_ids:
            # Reconnecting with Last-Event-ID, the simulator replays what the drops cut off.
            assert sink.counters() == list(range(120))
            ids = [e.upstream_id for e in sink.events if e.type == TEST_EVENT]
            assert all(ids)
            assert len(set(ids)) == len(ids)


# -- session rotation -----------------------------------------------------------------------------


@pytest.mark.parametrize("send_ids", [True, False], ids=["ids", "no-ids"])
async def test_session_rotation_loses_and_repeats_nothing(send_ids: bool) -> None:
    sim = simulator(send_ids=send_ids, session_lifetime_seconds=2.0)
    sink = RecordingSink()
    most_streams = 0

    async def sample_streams() -> None:
        nonlocal most_streams
        while True:
            most_streams = max(most_streams, sim.open_streams(ACCOUNT))
            await asyncio.sleep(0.002)

    async with sim.serve() as base_url:
        settings = upstream_settings(base_url, refresh_before_expiry_seconds=1.0)
        async with upstream_manager(settings, sink) as manager:
            manager.acquire(ACCOUNT)
            await sink.wait_for(connected(sink))
            sampler = asyncio.create_task(sample_streams())
            try:
                await inject_series(sim, 0, 600)  # over 3 s: three rotations
                await settle(sim, sink)
            finally:
                sampler.cancel()
            status = manager.status_of(ACCOUNT)

    assert sim.sessions_created >= 4
    assert sim.streams_opened(ACCOUNT) == sim.sessions_created
    assert most_streams == 2
    assert status is not None
    assert status.reconnects == 0  # every switch was a rotation, never a drop
    assert sink.counters() == sent_counters(sim)
    assert sink.counters() == list(range(600))


async def test_failed_rotation_keeps_the_old_stream_and_tries_again() -> None:
    sim = simulator(session_lifetime_seconds=2.0)
    sink = RecordingSink()
    session_requests = Attempts("/v1/account_sessions")
    async with sim.serve() as base_url:
        settings = upstream_settings(base_url, refresh_before_expiry_seconds=1.0)
        async with upstream_manager(settings, sink, session_requests) as manager:
            manager.acquire(ACCOUNT)
            await sink.wait_for(connected(sink))
            sim.secret_key = "sk_test_rotated_away"  # new sessions are refused for a while
            await eventually(lambda: len(session_requests.times) >= 3)
            await sim.inject(ACCOUNT, TEST_EVENT, {"n": 1})  # the old stream still delivers
            await sink.wait_for(lambda: sink.counters() == [1])
            sim.secret_key = DEFAULT_SECRET_KEY
            await eventually(lambda: sim.sessions_created == 2 and sim.open_streams(ACCOUNT) == 1)
            await sim.inject(ACCOUNT, TEST_EVENT, {"n": 2})
            await sink.wait_for(lambda: sink.counters() == [1, 2])
    assert [s.state for s in sink.states] == [
        UpstreamState.CONNECTING,
        UpstreamState.CONNECTED,
        UpstreamState.IDLE,
    ]


# -- authentication -------------------------------------------------------------------------------


async def test_revoked_session_is_replaced() -> None:
    sim = simulator()
    sink = RecordingSink()
    async with (
        sim.serve() as base_url,
        upstream_manager(upstream_settings(base_url), sink) as manager,
    ):
        manager.acquire(ACCOUNT)
        await sink.wait_for(connected(sink))
        assert sim.sessions_created == 1
        sim.faults.expire_sessions_early = True  # revokes the session: its stream closes
        await sink.wait_for(lambda: sink.state is UpstreamState.RECONNECTING)
        await sink.wait_for(connected(sink))
        assert sim.sessions_created == 2
        await sim.inject(ACCOUNT, TEST_EVENT, {"n": 1})
        await sink.wait_for(lambda: sink.counters() == [1])


async def test_three_refusals_mean_unauthorized_until_it_works_again() -> None:
    sim = simulator(fail_status=401, fail_count=3)
    sink = RecordingSink()
    attempts = Attempts()
    async with sim.serve() as base_url:
        settings = upstream_settings(base_url, backoff_max_seconds=0.3)
        async with upstream_manager(settings, sink, attempts) as manager:
            manager.acquire(ACCOUNT)
            await sink.wait_for(connected(sink))
    states = [s.state for s in sink.states]
    assert states == [
        UpstreamState.CONNECTING,
        UpstreamState.RECONNECTING,
        UpstreamState.RECONNECTING,
        UpstreamState.UNAUTHORIZED,
        UpstreamState.CONNECTED,
        UpstreamState.IDLE,
    ]
    assert "check" in sink.states[3].detail
    assert sim.sessions_created == 4  # a fresh session after every refusal
    assert attempts.gaps()[-1] >= 0.3  # unauthorized: retries no faster than backoff_max


async def test_refused_secret_key_is_reported_and_recovers() -> None:
    sim = simulator()
    sim.secret_key = "sk_test_not_the_configured_one"
    sink = RecordingSink()
    async with (
        sim.serve() as base_url,
        upstream_manager(upstream_settings(base_url), sink) as manager,
    ):
        manager.acquire(ACCOUNT)
        await sink.wait_for(lambda: sink.state is UpstreamState.UNAUTHORIZED)
        detail = sink.states[-1].detail
        assert "upstream.secret_key" in detail
        assert DEFAULT_SECRET_KEY not in detail
        sim.secret_key = DEFAULT_SECRET_KEY
        await sink.wait_for(connected(sink))


# -- waits ----------------------------------------------------------------------------------------


async def test_retry_after_is_a_floor_on_the_next_attempt() -> None:
    sim = simulator(fail_status=429, fail_count=1, retry_after_seconds=1)
    sink = RecordingSink()
    attempts = Attempts()
    async with (
        sim.serve() as base_url,
        upstream_manager(upstream_settings(base_url), sink, attempts) as manager,
    ):
        manager.acquire(ACCOUNT)
        await sink.wait_for(connected(sink))
    assert len(attempts.times) == 2
    assert 0.99 <= attempts.gaps()[0] < 1.5


class Greedy(random.Random):
    """Full jitter always drawing its ceiling, so the waits are the ceilings themselves."""

    def uniform(self, a: float, b: float) -> float:
        return b


async def test_backoff_grows_then_is_capped() -> None:
    sim = simulator(fail_status=500, fail_count=5)
    sink = RecordingSink()
    attempts = Attempts()
    async with sim.serve() as base_url:
        settings = upstream_settings(
            base_url, backoff_initial_seconds=0.05, backoff_max_seconds=0.2
        )
        async with upstream_manager(settings, sink, attempts, Greedy()) as manager:
            manager.acquire(ACCOUNT)
            await sink.wait_for(connected(sink))
    gaps = attempts.gaps()
    assert len(gaps) == 5
    for gap, ceiling in zip(gaps, [0.05, 0.1, 0.2, 0.2, 0.2], strict=True):
        assert ceiling <= gap < ceiling + 0.15  # the next uncapped wait (0.4) is out of reach
    assert sink.states[-1].reconnects == 5


def test_full_jitter_backoff_with_a_seeded_random() -> None:
    backoff = Backoff(1.0, 30.0, random.Random(42))
    reference = random.Random(42)
    ceilings = [1, 2, 4, 8, 16, 30, 30, 30]
    for ceiling in ceilings:
        assert backoff.ceiling() == ceiling
        delay = backoff.next_delay()
        assert delay == reference.uniform(0, ceiling)
        assert 0 <= delay <= ceiling
    assert backoff.attempt == len(ceilings)
    for _ in range(2000):
        backoff.next_delay()  # no overflow however long the outage
    assert backoff.ceiling() == 30
    backoff.reset()
    assert backoff.ceiling() == 1


def test_retry_after_values() -> None:
    now = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("1") == 1.0
    assert parse_retry_after(" 120 ") == 120.0
    assert parse_retry_after("Tue, 01 Jan 2030 12:00:05 GMT", now) == 5.0
    assert parse_retry_after("Tue, 01 Jan 2030 11:00:00 GMT", now) == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("-3") is None
    later = (now + timedelta(seconds=30)).strftime("%a, %d %b %Y %H:%M:%S GMT")
    assert parse_retry_after(later, now) == 30.0


def test_retry_after_is_capped_so_an_upstream_cannot_park_an_account_for_days() -> None:
    now = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("300") == MAX_RETRY_AFTER_SECONDS == 300.0
    assert parse_retry_after("86400") == MAX_RETRY_AFTER_SECONDS
    assert parse_retry_after("9" * 400) == MAX_RETRY_AFTER_SECONDS  # no overflow either
    assert parse_retry_after("Fri, 01 Jan 2100 00:00:00 GMT", now) == MAX_RETRY_AFTER_SECONDS
    assert parse_retry_after("Tue, 01 Jan 99999 12:00:05 GMT", now) is None


# -- guard rails ----------------------------------------------------------------------------------


async def test_silent_stream_is_dropped_after_the_idle_timeout() -> None:
    sim = simulator(heartbeat_seconds=0.05)
    sink = RecordingSink()
    async with sim.serve() as base_url:
        settings = upstream_settings(base_url, idle_timeout_seconds=0.3)
        async with upstream_manager(settings, sink) as manager:
            manager.acquire(ACCOUNT)
            await sink.wait_for(connected(sink))
            await asyncio.sleep(0.6)  # heartbeats keep it alive meanwhile
            assert sim.streams_opened(ACCOUNT) == 1
            sim.faults.heartbeat_seconds = None
            await sink.wait_for(lambda: sink.state is UpstreamState.RECONNECTING)
            assert "idle_timeout_seconds" in sink.states[-1].detail
            await sink.wait_for(connected(sink))
            assert sim.streams_opened(ACCOUNT) == 2


async def test_server_that_does_not_start_streaming_in_time_is_retried() -> None:
    sim = simulator(first_byte_delay_seconds=0.5)
    sink = RecordingSink()
    async with sim.serve() as base_url:
        settings = upstream_settings(base_url, connect_timeout_seconds=0.2)
        async with upstream_manager(settings, sink) as manager:
            manager.acquire(ACCOUNT)
            await sink.wait_for(lambda: sink.state is UpstreamState.RECONNECTING)
            assert "did not start within 0.2 s" in sink.states[-1].detail
            sim.faults.first_byte_delay_seconds = 0.0
            await sink.wait_for(connected(sink))


def fake_upstream(body: bytes, media_type: str = "text/event-stream") -> Starlette:
    """An upstream that answers every /v1/events with `body` and ends the response."""

    async def events(request: Request) -> Response:
        assert request.headers["authorization"] == "Bearer cs_static"
        return Response(body, media_type=media_type)

    return Starlette(routes=[Route("/v1/events", events)])


STATIC_ACCOUNT = [{"id": ACCOUNT, "client_secret": "cs_static"}]


@pytest.mark.parametrize(
    ("healthy", "waits"),
    [(True, [0.3, 0.3]), (False, [0.5, 0.8])],
    ids=["after-an-event", "right-away"],
)
async def test_stream_retry_field_sets_the_wait_after_a_drop(
    healthy: bool, waits: list[float]
) -> None:
    """A stream that delivered an event is reconnected after its `retry:` (300 ms); one that
    drops right after connecting keeps backing off (0.5 s, then 0.8 s: its cap)."""
    call = b"event: call.unknown_kind\ndata: {}\n\n" if healthy else b""
    app = fake_upstream(b"retry: 300\n\nevent: connected\ndata: {}\n\n" + call)
    sink = RecordingSink()
    attempts = Attempts()
    async with running_server(app) as base_url:
        settings = upstream_settings(
            base_url, STATIC_ACCOUNT, backoff_initial_seconds=0.5, backoff_max_seconds=0.8
        )
        async with upstream_manager(settings, sink, attempts, Greedy()) as manager:
            manager.acquire(ACCOUNT)
            await eventually(lambda: len(attempts.times) >= 3)
    for gap, wait in zip(attempts.gaps(), waits, strict=False):
        assert wait <= gap < wait + 0.15
    if healthy:
        assert [e.type for e in sink.events[:2]] == ["call.unknown_kind"] * 2


async def test_answer_that_is_not_an_event_stream_is_retried_with_a_reason() -> None:
    app = fake_upstream(b"<html>maintenance</html>", media_type="text/html")
    sink = RecordingSink()
    async with running_server(app) as base_url:
        settings = upstream_settings(base_url, STATIC_ACCOUNT)
        async with upstream_manager(settings, sink) as manager:
            manager.acquire(ACCOUNT)
            await sink.wait_for(lambda: sink.state is UpstreamState.RECONNECTING)
    assert "text/html" in sink.states[1].detail
    assert "upstream.base_url" in sink.states[1].detail
    assert not sink.events


class GatedSink(RecordingSink):
    """Takes nothing until `gate` is set: a sink that has fallen behind."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()

    async def publish(self, account_id: str, event: Incoming) -> bool:
        await self.gate.wait()
        return await super().publish(account_id, event)


async def test_a_sink_that_falls_behind_holds_the_upstream_back_and_loses_nothing() -> None:
    """The reader stops reading once the inbox is full, so TCP pushes back on the upstream
    instead of the relay buffering what it offers (64 MiB here); every event arrives, in order."""
    count, padding = 65_536, "x" * 1000
    sent = 0

    async def events(request: Request) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            nonlocal sent
            yield b"event: connected\ndata: {}\n\n"
            for n in range(count):
                yield f'id: {n}\nevent: {TEST_EVENT}\ndata: {{"n": {n}, "p": "{padding}"}}\n\n'.encode()
                sent += 1

        return StreamingResponse(body(), media_type="text/event-stream")

    sink = GatedSink()
    app = Starlette(routes=[Route("/v1/events", events)])
    async with running_server(app) as base_url:
        settings = upstream_settings(base_url, STATIC_ACCOUNT, idle_timeout_seconds=30.0)
        async with upstream_manager(settings, sink) as manager:
            manager.acquire(ACCOUNT)
            await sink.wait_for(connected(sink))
            await asyncio.sleep(1.0)  # the sink takes nothing; the upstream sends what it can
            # The inbox holds 256 events, the sockets' buffers a few MiB: never all on offer.
            assert 0 < sent < count // 3, sent
            sink.gate.set()
            await sink.wait_for(lambda: len(sink.events) == count, timeout=30)
    assert sink.counters() == list(range(count))


@pytest.mark.parametrize("bad", [0, 100], ids=["first", "later"])
async def test_an_upstream_that_sends_other_than_json_is_told_once_and_forwarded(bad: int) -> None:
    """Events are checked one in a hundred, from the first: a stream that is not JSON from the
    start, or stops being JSON later, is logged (once), and its events are forwarded as sent."""

    def event(n: int) -> bytes:
        data = "<html>maintenance</html>" if n >= bad else json.dumps({"n": n})
        return f"id: {n}\nevent: {TEST_EVENT}\ndata: {data}\n\n".encode()

    app = fake_upstream(b"event: connected\ndata: {}\n\n" + b"".join(map(event, range(bad + 3))))
    sink = RecordingSink()
    with structlog.testing.capture_logs() as logs:
        async with running_server(app) as base_url:
            settings = upstream_settings(
                base_url, STATIC_ACCOUNT, backoff_initial_seconds=5, backoff_max_seconds=5
            )
            async with upstream_manager(settings, sink) as manager:
                manager.acquire(ACCOUNT)
                await sink.wait_for(lambda: len(sink.events) == bad + 3)
    warnings = [entry for entry in logs if entry["event"] == "invalid JSON from upstream"]
    assert len(warnings) == 1
    assert warnings[0]["account"] == ACCOUNT
    assert [e.data for e in sink.events[bad:]] == ["<html>maintenance</html>"] * 3


async def test_events_that_arrive_as_the_connect_timeout_fires_still_reach_the_actor() -> None:
    """The socket's callback can bring the first events after the connect timeout fired and before
    the reader task hears of it. They go into the inbox all the same: the parser's last id (where
    the next connection resumes) already counts them, so dropping them would lose them."""
    stream = _Stream(last_event_id="")
    inbox: Inbox[Any] = Inbox(8)
    took: list[bool] = []
    chunk = f"id: 7\nevent: {TEST_EVENT}\ndata: {{}}\n\n".encode()

    async def connect() -> None:
        async with asyncio.timeout(0) as connecting:  # fires on the loop's next turn
            receive = _receiver(stream, inbox, connecting)
            # Queued after the timeout's own callback, before this task learns it was cancelled.
            asyncio.get_running_loop().call_soon(lambda: took.append(receive(chunk)))
            await asyncio.sleep(5)

    with pytest.raises(TimeoutError):
        await connect()
    assert took == [True]
    assert stream.parser.last_event_id == "7"
    message = await inbox.get()
    assert (message.stream, message.event.id) == (stream, "7")


async def test_oversized_line_drops_the_stream_and_the_relay_carries_on() -> None:
    sim = simulator(send_ids=False)  # with ids the simulator would replay it on every reconnect
    sink = RecordingSink()
    async with (
        sim.serve() as base_url,
        upstream_manager(upstream_settings(base_url), sink) as manager,
    ):
        manager.acquire(ACCOUNT)
        await sink.wait_for(connected(sink))
        await sim.inject(ACCOUNT, TEST_EVENT, "x" * (1024 * 1024 + 1))
        await sink.wait_for(lambda: sink.state is UpstreamState.RECONNECTING)
        assert "line" in sink.states[-1].detail
        await settle(sim, sink)
        assert sink.counters() == []


async def test_aclose_leaves_nothing_running() -> None:
    sim = simulator(session_lifetime_seconds=1.0)
    sink = RecordingSink()
    async with sim.serve() as base_url:
        settings = upstream_settings(
            base_url, refresh_before_expiry_seconds=0.5, linger_seconds=5.0
        )
        async with upstream_manager(settings, sink) as manager:
            manager.acquire(ACCOUNT)
            manager.acquire("acct_lingering")
            manager.release("acct_lingering")  # closing in 5 s: aclose comes first
            await eventually(lambda: sim.open_streams(ACCOUNT) == 2)  # mid-rotation
        assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("upstream")]
        await eventually(lambda: sim.open_streams() == 0)
        manager.acquire(ACCOUNT)  # closed for good
        assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("upstream")]


def test_rotation_overlap_forwards_each_event_once() -> None:
    old, new = _Stream(""), _Stream("")
    overlap = _Overlap()

    def numbered(n: int, id: str | None = None) -> Event:
        return Event(TEST_EVENT, json.dumps({"n": n}), id, id or "")

    # The new stream joins at 2 and lags behind the old one.
    arrivals = [(old, 1), (old, 2), (new, 2), (old, 3), (old, 4), (new, 3), (new, 4), (new, 5)]
    forwarded = [n for stream, n in arrivals if overlap.admit(stream, numbered(n))]
    assert forwarded == [1, 2, 3, 4, 5]

    # An event that really happens twice is forwarded twice, whichever stream brings each copy.
    twice = Event(TEST_EVENT, "same", None, "")
    assert [overlap.admit(s, twice) for s in (old, new, new, old)] == [True, False, True, False]

    # With ids, the id alone tells copies apart.
    assert overlap.admit(old, numbered(9, "a"))
    assert overlap.admit(old, numbered(9, "b"))
    assert not overlap.admit(new, numbered(9, "a"))
