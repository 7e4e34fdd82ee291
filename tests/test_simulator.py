"""The DialStack simulator over real loopback HTTP: sessions, /v1/events, every fault, webhooks."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import itertools
import json
import random
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from relay.serving import running_server
from relay.simulator import DEFAULT_SECRET_KEY, SIGNATURE_HEADER, Faults, Simulator, register_cli
from relay.simulator.calls import CallPlanner
from relay.simulator.cli import faults_from_args, simulator_from_args
from relay.simulator.faults import GARBAGE_LINES, cut_frame, split_pieces
from relay.sse import Event, SSEParser

ACCT = "acct_demo"
E164 = re.compile(r"\+[1-9]\d{7,14}")
DEADLINE = 5.0
CALL = {"event": "call.incoming", "account_id": ACCT, "from_name": "Zoë Clarke"}


def auth(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


class StreamReader:
    """An open /v1/events response: the raw bytes, how many reads they took, the events."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.raw = bytearray()
        self.reads = 0
        self.events: list[Event] = []
        self.ended = False
        self._parser = SSEParser()
        self._chunks = response.aiter_raw()

    async def _read(self) -> None:
        try:
            chunk = await anext(self._chunks)
        except StopAsyncIteration:
            self.ended = True
            return
        self.reads += 1
        self.raw += chunk
        self.events += self._parser.feed(chunk)

    async def until(self, done: Callable[[StreamReader], bool]) -> None:
        async with asyncio.timeout(DEADLINE):
            while not done(self):
                assert not self.ended, f"stream ended early: {bytes(self.raw)!r}"
                await self._read()

    async def events_count(self, count: int) -> list[Event]:
        await self.until(lambda r: len(r.events) >= count)
        return self.events

    async def to_end(self) -> None:
        async with asyncio.timeout(DEADLINE):
            while not self.ended:
                await self._read()

    def call_events(self) -> list[Event]:
        return [event for event in self.events if event.type != "connected"]


@pytest.fixture
def sim() -> Simulator:
    return Simulator(call_interval_seconds=None, seed=7)


@pytest.fixture
async def client(sim: Simulator) -> AsyncIterator[httpx.AsyncClient]:
    async with sim.serve() as base_url, httpx.AsyncClient(base_url=base_url, timeout=5) as client:
        yield client


@asynccontextmanager
async def open_events(
    client: httpx.AsyncClient, secret: str, last_event_id: str | None = None
) -> AsyncIterator[StreamReader]:
    headers = (
        auth(secret) if last_event_id is None else auth(secret) | {"Last-Event-ID": last_event_id}
    )
    async with client.stream("GET", "/v1/events", headers=headers) as response:
        assert response.status_code == 200
        yield StreamReader(response)


async def create_session(client: httpx.AsyncClient, account: str = ACCT) -> str:
    response = await client.post(
        "/v1/account_sessions", headers=auth(DEFAULT_SECRET_KEY), json={"account": account}
    )
    assert response.status_code == 200
    secret: str = response.json()["client_secret"]
    return secret


async def eventually(condition: Callable[[], bool]) -> None:
    """Poll, with a deadline, state that has no event to wait on (counters, a receiver's list)."""
    async with asyncio.timeout(DEADLINE):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


def sent_as_events(sim: Simulator, account: str = ACCT) -> list[tuple[str | None, str, str]]:
    return [(event.id, event.type, event.data) for event in sim.sent_log(account)]


def as_tuples(events: list[Event]) -> list[tuple[str | None, str, str]]:
    return [(event.id, event.type, event.data) for event in events]


# --- account sessions --------------------------------------------------------------------------


async def test_session_created_with_the_secret_key(
    sim: Simulator, client: httpx.AsyncClient
) -> None:
    sim.faults.session_lifetime_seconds = 120
    response = await client.post(
        "/v1/account_sessions",
        headers=auth(DEFAULT_SECRET_KEY),
        json={"account": "acct_new_one", "components": {"call_log": {"enabled": True}}},
    )

    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"account_id", "client_secret", "expires_at"}
    assert body["account_id"] == "acct_new_one"
    assert body["client_secret"].startswith("cs_")
    assert body["expires_at"].endswith("Z")
    lifetime = datetime.fromisoformat(body["expires_at"]) - datetime.now(UTC)
    assert 110 < lifetime.total_seconds() <= 120
    assert sim.sessions_created == 1


@pytest.mark.parametrize("headers", [{}, auth("sk_test_wrong"), {"Authorization": "Basic x"}])
async def test_session_refused_without_the_secret_key(
    sim: Simulator, client: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    response = await client.post("/v1/account_sessions", headers=headers, json={"account": ACCT})

    assert response.status_code == 401
    assert "error" in response.json()
    assert sim.sessions_created == 0


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b"{}",
        b'{"account": 5}',
        b'{"account": "customer_1"}',
        b'{"account": "acct_1", "components": "all"}',
    ],
)
async def test_session_refused_for_a_bad_body(client: httpx.AsyncClient, body: bytes) -> None:
    response = await client.post(
        "/v1/account_sessions", headers=auth(DEFAULT_SECRET_KEY), content=body
    )

    assert response.status_code == 400
    assert "error" in response.json()


# --- /v1/events auth ---------------------------------------------------------------------------


async def test_events_refused_for_unknown_missing_or_expired_secret(
    sim: Simulator, client: httpx.AsyncClient
) -> None:
    expired = sim.issue_session(ACCT, lifetime_seconds=0).client_secret
    for headers in (auth("cs_unknown"), {}, auth(expired)):
        response = await client.get("/v1/events", headers=headers)

        assert response.status_code == 401
        assert "error" in response.json()
    assert sim.streams_opened() == 0


async def test_open_stream_closes_when_its_session_expires(
    sim: Simulator, client: httpx.AsyncClient
) -> None:
    session = sim.issue_session(ACCT, lifetime_seconds=0.3)
    started = time.monotonic()
    async with open_events(client, session.client_secret) as stream:
        await stream.to_end()

    assert time.monotonic() - started >= 0.25
    assert (await client.get("/v1/events", headers=auth(session.client_secret))).status_code == 401


async def test_expire_sessions_early_revokes_live_sessions_only(
    sim: Simulator, client: httpx.AsyncClient
) -> None:
    old = await create_session(client)
    async with open_events(client, old) as stream:
        await stream.events_count(1)
        sim.faults.expire_sessions_early = True
        await stream.to_end()

    assert (await client.get("/v1/events", headers=auth(old))).status_code == 401
    fresh = await create_session(client)
    async with open_events(client, fresh) as stream:
        await sim.inject(ACCT, "call.incoming", CALL)
        assert [e.type for e in await stream.events_count(2)] == ["connected", "call.incoming"]


# --- /v1/events content ------------------------------------------------------------------------


async def test_connected_first_then_injected_events_with_increasing_ids(
    sim: Simulator, client: httpx.AsyncClient
) -> None:
    secret = await create_session(client)
    async with open_events(client, secret) as stream:
        assert stream.response.headers["content-type"].startswith("text/event-stream")
        await stream.events_count(1)
        first = await sim.inject(ACCT, "call.incoming", CALL)
        second = await sim.inject(ACCT, "call.custom", "two\nlines")
        events = await stream.events_count(3)

    assert events[0].type == "connected"
    assert json.loads(events[0].data) == {"message": "Connected to event stream"}
    assert events[0].id is None
    assert as_tuples(events[1:]) == [
        ("1", "call.incoming", json.dumps(CALL, ensure_ascii=False)),
        ("2", "call.custom", "two\nlines"),
    ]
    assert (first.id, second.id, first.connection) == ("1", "2", None)
    assert sent_as_events(sim) == as_tuples(events[1:])
    assert {event.connection for event in sim.sent_log(ACCT)} == {1}


async def test_last_event_id_replays_the_events_after_it(
    sim: Simulator, client: httpx.AsyncClient
) -> None:
    for n in range(3):
        await sim.inject(ACCT, "call.incoming", {"n": n})
    secret = await create_session(client)
    async with open_events(client, secret, last_event_id="1") as stream:
        await stream.events_count(3)
        await sim.inject(ACCT, "call.end", {"n": 3})
        events = await stream.events_count(4)

    assert [(e.type, e.id) for e in events] == [
        ("connected", None),
        ("call.incoming", "2"),
        ("call.incoming", "3"),
        ("call.end", "4"),
    ]


async def test_unknown_last_event_id_replays_nothing(
    sim: Simulator, client: httpx.AsyncClient
) -> None:
    await sim.inject(ACCT, "call.incoming", {"n": 0})
    secret = await create_session(client)
    async with open_events(client, secret, last_event_id="999") as stream:
        await stream.events_count(1)
        await sim.inject(ACCT, "call.end", {"n": 1})
        events = await stream.events_count(2)

    assert [(e.type, e.id) for e in events] == [("connected", None), ("call.end", "2")]


async def test_every_stream_of_an_account_gets_the_same_events_and_no_other_account(
    sim: Simulator, client: httpx.AsyncClient
) -> None:
    secrets = [await create_session(client), await create_session(client)]
    other = await create_session(client, "acct_other")
    async with (
        open_events(client, secrets[0]) as first,
        open_events(client, secrets[1]) as second,
        open_events(client, other) as third,
    ):
        for stream in (first, second, third):
            await stream.events_count(1)
        assert (sim.open_streams(ACCT), sim.open_streams("acct_other"), sim.open_streams()) == (
            2,
            1,
            3,
        )
        await sim.inject(ACCT, "call.incoming", CALL)
        await sim.inject("acct_other", "call.end", {"other": True})
        await first.events_count(2)
        await second.events_count(2)
        await third.events_count(2)

    assert as_tuples(first.call_events()) == as_tuples(second.call_events())
    assert [e.data for e in third.call_events()] == ['{"other": true}']
    assert [e.connection for e in sim.sent_log(ACCT)] == [1, 2]


async def test_stream_counters_and_stats(sim: Simulator, client: httpx.AsyncClient) -> None:
    secret = await create_session(client)
    async with open_events(client, secret) as stream:
        await stream.events_count(1)
        assert (sim.open_streams(ACCT), sim.streams_opened(ACCT)) == (1, 1)
        stats = (await client.get("/v1/simulator/stats")).json()
        assert stats == {
            "accounts": {ACCT: {"open_streams": 1, "streams_opened": 1}},
            "sessions_created": 1,
        }

    await eventually(lambda: sim.open_streams() == 0)
    assert sim.streams_opened() == 1
    assert sim.open_streams("acct_never_seen") == 0


async def test_inject_over_http(sim: Simulator, client: httpx.AsyncClient) -> None:
    secret = await create_session(client)
    async with open_events(client, secret) as stream:
        await stream.events_count(1)
        response = await client.post(
            "/v1/simulator/inject",
            json={"account_id": ACCT, "type": "call.transfer", "data": {"x": 1}, "id": "evt_9"},
        )
        events = await stream.events_count(2)

    assert response.status_code == 200
    assert response.json() == {
        "connection": None,
        "id": "evt_9",
        "type": "call.transfer",
        "data": '{"x": 1}',
    }
    assert as_tuples(events[1:]) == [("evt_9", "call.transfer", '{"x": 1}')]


@pytest.mark.parametrize(
    "body",
    [
        {"type": "call.end", "data": {}},
        {"account_id": ACCT, "type": "call\nend", "data": {}},
        {"account_id": ACCT, "type": "call.end", "data": 3},
        {"account_id": "nope", "type": "call.end", "data": {}},
    ],
)
async def test_inject_over_http_refuses_bad_bodies(
    client: httpx.AsyncClient, body: dict[str, Any]
) -> None:
    response = await client.post("/v1/simulator/inject", json=body)

    assert response.status_code == 400
    assert "error" in response.json()


# --- faults ------------------------------------------------------------------------------------


async def test_drop_every_closes_the_stream_after_that_long(
    sim: Simulator, client: httpx.AsyncClient
) -> None:
    sim.faults.drop_every_seconds = 0.3
    secret = await create_session(client)
    started = time.monotonic()
    async with open_events(client, secret) as stream:
        await stream.to_end()

    assert time.monotonic() - started >= 0.3
    assert [e.type for e in stream.events] == ["connected"]
    assert stream.raw.endswith(b"\n\n")
    await eventually(lambda: sim.open_streams() == 0)


async def test_drop_mid_event_leaves_a_partial_frame_not_in_the_sent_log(
    sim: Simulator, client: httpx.AsyncClient
) -> None:
    sim.faults.drop_every_seconds = 0.0
    sim.faults.drop_mid_event = True
    secret = await create_session(client)
    async with open_events(client, secret) as stream:
        await stream.events_count(1)
        await sim.inject(ACCT, "call.incoming", CALL)
        await stream.to_end()

    frame = f"id: 1\nevent: call.incoming\ndata: {json.dumps(CALL, ensure_ascii=False)}\n\n"
    partial = bytes(stream.raw).split(b"\n\n", 1)[1]
    assert partial
    assert frame.encode().startswith(partial)
    assert not partial.endswith(b"\n\n")
    assert [e.type for e in stream.events] == ["connected"]
    assert sim.sent_log(ACCT) == []


@pytest.mark.parametrize(("name", "ending"), [("crlf", b"\r\n"), ("cr", b"\r")])
async def test_line_endings_in_the_raw_bytes(
    sim: Simulator, client: httpx.AsyncClient, name: str, ending: bytes
) -> None:
    sim.faults.line_ending = "\r\n" if name == "crlf" else "\r"
    secret = await create_session(client)
    async with open_events(client, secret) as stream:
        await sim.inject(ACCT, "call.incoming", CALL)
        events = await stream.events_count(2)

    assert b"event: connected" + ending + b"data: " in stream.raw
    assert stream.raw.endswith(ending + ending)
    if name == "cr":
        assert b"\n" not in stream.raw
    assert as_tuples(events[1:]) == sent_as_events(sim)


async def test_split_writes_arrive_in_pieces_and_still_parse(
    sim: Simulator, client: httpx.AsyncClient
) -> None:
    sim.faults.split_writes = True
    sim.faults.line_ending = "\r\n"
    secret = await create_session(client)
    async with open_events(client, secret) as stream:
        for _ in range(3):
            await sim.inject(ACCT, "call.incoming", CALL)
        events = await stream.events_count(4)

    assert stream.reads > len(events)
    assert as_tuples(events[1:]) == sent_as_events(sim)
    assert json.loads(events[1].data)["from_name"] == "Zoë Clarke"


def test_split_pieces_cut_inside_crlf_and_multibyte_characters() -> None:
    chunk = "data: Zoë\r\n\r\n".encode()
    boundaries: set[int] = set()
    for seed in range(200):
        pieces = split_pieces(chunk, random.Random(seed))
        assert b"".join(pieces) == chunk
        assert all(1 <= len(piece) <= 7 for piece in pieces)
        boundaries.update(itertools.accumulate(len(piece) for piece in pieces[:-1]))

    assert chunk.index(b"\xc3") + 1 in boundaries  # inside ë
    assert chunk.index(b"\r\n") + 1 in boundaries  # between CR and LF


@pytest.mark.parametrize("ending", ["\n", "\r\n", "\r"])
def test_a_cut_frame_never_dispatches(ending: str) -> None:
    frame = f"id: 1{ending}event: call.end{ending}data: ë{ending}{ending}".encode()
    for seed in range(100):
        partial = cut_frame(frame, ending, random.Random(seed))  # type: ignore[arg-type]

        assert partial
        assert frame.startswith(partial)
        assert SSEParser().feed(partial) == []


async def test_garbage_lines_are_present_and_events_still_parse(
    sim: Simulator, client: httpx.AsyncClient
) -> None:
    sim.faults.garbage_lines = True
    secret = await create_session(client)
    async with open_events(client, secret) as stream:
        for n in range(20):
            await sim.inject(ACCT, "call.incoming", {"n": n})
        await stream.until(lambda r: len(r.call_events()) >= len(sim.sent_log(ACCT)) >= 20)

    lines = bytes(stream.raw).decode().split("\n")
    assert sum(line in GARBAGE_LINES for line in lines) >= 5
    garbled = [e for e in stream.call_events() if e.type == "call.garbled"]
    assert garbled
    assert all(e.id is not None for e in garbled)
    assert as_tuples(stream.call_events()) == sent_as_events(sim)


async def test_fail_status_429_with_retry_after_for_fail_count_requests(
    sim: Simulator, client: httpx.AsyncClient
) -> None:
    sim.faults.fail_status = 429
    sim.faults.fail_count = 2
    sim.faults.retry_after_seconds = 7
    secret = await create_session(client)
    for _ in range(2):
        response = await client.get("/v1/events", headers=auth(secret))

        assert response.status_code == 429
        assert response.headers["retry-after"] == "7"
        assert "error" in response.json()

    assert sim.faults.fail_count == 0
    async with open_events(client, secret) as stream:
        await stream.events_count(1)


async def test_fail_status_500_has_no_retry_after(
    sim: Simulator, client: httpx.AsyncClient
) -> None:
    sim.faults.fail_status = 500
    sim.faults.fail_count = 1
    sim.faults.retry_after_seconds = 7

    response = await client.get("/v1/events", headers=auth("cs_whatever"))

    assert response.status_code == 500
    assert "retry-after" not in response.headers
    assert sim.streams_opened() == 0


async def test_first_byte_delay_holds_back_the_response_headers(
    sim: Simulator, client: httpx.AsyncClient
) -> None:
    sim.faults.first_byte_delay_seconds = 0.3
    secret = await create_session(client)
    started = time.monotonic()
    async with open_events(client, secret) as stream:
        headers_after = time.monotonic() - started
        await stream.events_count(1)

    assert headers_after >= 0.3


async def test_no_ids(sim: Simulator, client: httpx.AsyncClient) -> None:
    sim.faults.send_ids = False
    secret = await create_session(client)
    async with open_events(client, secret) as stream:
        event = await sim.inject(ACCT, "call.incoming", CALL)
        events = await stream.events_count(2)

    assert event.id is None
    assert events[1].id is None
    assert b"id:" not in stream.raw
    assert sent_as_events(sim) == [(None, "call.incoming", event.data)]


async def test_heartbeat_comments(sim: Simulator, client: httpx.AsyncClient) -> None:
    sim.faults.heartbeat_seconds = 0.05
    secret = await create_session(client)
    async with open_events(client, secret) as stream:
        await stream.until(lambda r: r.raw.count(b": keep-alive\n\n") >= 2)

    assert [e.type for e in stream.events] == ["connected"]


async def test_a_reader_too_slow_for_its_queue_is_cut_off(
    sim: Simulator, client: httpx.AsyncClient
) -> None:
    secret = await create_session(client)
    async with open_events(client, secret) as stream:
        await stream.events_count(1)
        for n in range(1_001):  # one more than the stream's queue holds
            await sim.inject(ACCT, "call.incoming", {"n": n})
        await stream.to_end()

    assert 0 < len(stream.call_events()) <= 1_001
    assert as_tuples(stream.call_events()) == sent_as_events(sim)


async def test_shutdown_ends_open_streams_promptly(
    sim: Simulator, client: httpx.AsyncClient
) -> None:
    secret = await create_session(client)
    async with open_events(client, secret) as stream:
        await stream.events_count(1)
        await sim.shutdown()
        async with asyncio.timeout(1):
            await stream.to_end()

    assert stream.ended


# --- generated calls ---------------------------------------------------------------------------


def calls_by_id(events: list[Event]) -> dict[str, list[dict[str, Any]]]:
    calls: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        data = json.loads(event.data)
        assert data["event"] == event.type
        calls.setdefault(data["call_id"], []).append(data)
    return calls


def assert_call_shapes(steps: list[dict[str, Any]]) -> None:
    first, last = steps[0], steps[-1]
    assert first["event"] in {"call.incoming", "call.initiated"}
    assert last["event"] == "call.end"
    for step in steps:
        assert step["account_id"] == ACCT
        assert E164.fullmatch(step["from_number"])
        assert E164.fullmatch(step["to_number"])
    if first["event"] == "call.incoming":
        assert set(first) == {
            "event",
            "account_id",
            "call_id",
            "from_number",
            "from_name",
            "to_number",
            "user_id",
        }
    else:
        assert first["user_id"].startswith("user_")
    assert last["status"] in {"completed", "missed", "voicemail", "no_answer"}
    assert isinstance(last["duration_seconds"], int)
    datetime.fromisoformat(last["ended_at"])
    for step in steps[1:-1]:
        assert step["event"] in {"call.answered", "call.transfer"}
        if step["event"] == "call.answered":
            assert step["direction"] in {"inbound", "outbound"}
            datetime.fromisoformat(step["answered_at"])
        else:
            assert step["transferred_to"].isdigit()


def whole_calls(events: list[Event]) -> list[list[dict[str, Any]]]:
    """Calls seen from their first event to `call.end` (not those begun before the stream)."""
    return [
        steps
        for steps in calls_by_id(events).values()
        if steps[0]["event"] in {"call.incoming", "call.initiated"}
        and steps[-1]["event"] == "call.end"
    ]


async def test_generated_call_lifecycles() -> None:
    sim = Simulator(call_interval_seconds=0.05, seed=3)
    async with sim.serve() as base_url, httpx.AsyncClient(base_url=base_url) as client:
        secret = await create_session(client)
        async with open_events(client, secret) as stream:

            def answered_calls_ended(reader: StreamReader) -> bool:
                calls = whole_calls(reader.call_events())
                answered = [steps for steps in calls if steps[1]["event"] == "call.answered"]
                return len(calls) >= 3 and bool(answered)

            await stream.until(answered_calls_ended)

    for steps in whole_calls(stream.call_events()):
        assert_call_shapes(steps)
    ids = [int(event.id or 0) for event in stream.call_events()]
    assert ids == sorted(ids)


def test_call_plans_are_deterministic_for_a_seed() -> None:
    start = datetime(2026, 1, 15, 14, 30, tzinfo=UTC)

    def plans(seed: str) -> list[Any]:
        planner = CallPlanner(ACCT, 2.0, random.Random(seed))
        return [planner.plan(start) for _ in range(50)]

    assert plans("1") == plans("1")
    assert plans("1") != plans("2")
    steps = [step for plan in plans("1") for step in plan]
    incoming = [step.data for step in steps if step.type == "call.incoming"]
    assert any(data["from_name"] is None for data in incoming)
    assert any(data["from_name"] is not None for data in incoming)
    assert {step.type for step in steps} >= {
        "call.incoming",
        "call.initiated",
        "call.answered",
        "call.transfer",
        "call.end",
    }


# --- webhooks ----------------------------------------------------------------------------------


@asynccontextmanager
async def webhook_receiver() -> AsyncIterator[tuple[str, list[tuple[str, bytes]]]]:
    received: list[tuple[str, bytes]] = []

    async def receive(request: Request) -> Response:
        received.append((request.headers[SIGNATURE_HEADER], await request.body()))
        return Response(status_code=204)

    app = Starlette(routes=[Route("/hook", receive, methods=["POST"])])
    async with running_server(app) as base_url:
        yield f"{base_url}/hook", received


def verify(secret: str, header: str, body: bytes) -> bool:
    fields = dict(part.split("=", 1) for part in header.split(","))
    expected = hmac.new(secret.encode(), f"{fields['t']}.".encode() + body, hashlib.sha256)
    fresh = abs(time.time() - int(fields["t"])) <= 300
    return fresh and hmac.compare_digest(expected.hexdigest(), fields["v1"])


async def test_signed_webhook_verifies(sim: Simulator) -> None:
    async with webhook_receiver() as (url, received):
        status = await sim.send_webhook(url, "whsec_test", "call.incoming", ACCT, CALL, "evt_1")

    assert status == 204
    [(header, body)] = received
    assert verify("whsec_test", header, body)
    assert not verify("whsec_other", header, body)
    assert json.loads(body) == {
        "id": "evt_1",
        "type": "call.incoming",
        "account_id": ACCT,
        "data": CALL,
    }


async def test_generated_calls_are_also_posted_as_signed_webhooks() -> None:
    async with webhook_receiver() as (url, received):
        sim = Simulator(call_interval_seconds=0.05, webhook_url=url, webhook_secret="whsec_gen")
        async with sim.serve():
            await eventually(lambda: len(received) >= 3)

    for header, body in received:
        assert verify("whsec_gen", header, body)
        envelope = json.loads(body)
        assert envelope["id"].startswith("evt_")
        assert envelope["type"] == envelope["data"]["event"]
        assert envelope["account_id"] == envelope["data"]["account_id"] == ACCT
    assert len({json.loads(body)["id"] for _, body in received}) == len(received)


# --- CLI ---------------------------------------------------------------------------------------


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="relay")
    register_cli(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["simulate", *argv])


def test_cli_flags_become_faults() -> None:
    args = parse(
        [
            "--drop-every", "5", "--drop-mid-event", "--split-writes", "--line-ending", "crlf",
            "--garbage", "--fail-status", "429", "--fail-count", "3", "--retry-after", "2",
            "--first-byte-delay", "0.5", "--no-ids", "--heartbeat", "15",
            "--session-lifetime", "60",
        ]
    )  # fmt: skip

    assert faults_from_args(args) == Faults(
        drop_every_seconds=5.0,
        drop_mid_event=True,
        split_writes=True,
        line_ending="\r\n",
        garbage_lines=True,
        session_lifetime_seconds=60.0,
        fail_status=429,
        fail_count=3,
        retry_after_seconds=2,
        first_byte_delay_seconds=0.5,
        send_ids=False,
        heartbeat_seconds=15.0,
    )
    assert args.func.__name__ == "run_simulate"


def test_cli_defaults_and_accounts() -> None:
    args = parse(["--account", "acct_a", "--account", "acct_b", "--call-interval", "0"])

    assert faults_from_args(args) == Faults()
    assert (args.host, args.port, args.secret_key) == ("127.0.0.1", 8765, DEFAULT_SECRET_KEY)
    assert (args.accounts, args.call_interval) == (["acct_a", "acct_b"], 0.0)
    assert simulator_from_args(args).faults == Faults()
    with pytest.raises(ValueError, match="webhook"):
        simulator_from_args(parse(["--webhook-url", "http://127.0.0.1:1/hook"]))
    with pytest.raises(ValueError, match="acct_"):
        simulator_from_args(parse(["--account", "customer_1"]))
