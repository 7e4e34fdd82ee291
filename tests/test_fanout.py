"""Issue 3 acceptance: fan-out from one upstream per account to many SSE clients, over real HTTP.

Every test runs the simulated DialStack and the relay under uvicorn on loopback (`demo_stack`,
no generated calls) and drives the upstream with `simulator.inject`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import re
import socket
import statistics
import time
from collections.abc import Callable
from typing import Any

import httpx
from streams import Stream, open_stream, upstream_connected

from relay.demo import DEMO_ACCOUNTS, DemoStack, demo_stack
from relay.sse import Event

ACCT, OTHER = DEMO_ACCOUNTS
DEADLINE = 5.0
CALL_TYPES = ("call.incoming", "call.answered", "call.end")


stack = functools.partial(demo_stack, call_interval_seconds=None)  # events only when injected


def events_url(stack: DemoStack) -> str:
    return f"{stack.relay_url}/v1/events"


def calls(stream: Stream) -> list[Event]:
    return [e for e in stream.events if e.type.startswith("call.")]


def numbers(stream: Stream) -> list[int]:
    return [json.loads(e.data)["n"] for e in calls(stream)]


def saw_number(n: int) -> Callable[[list[Event]], bool]:
    return lambda events: any(
        e.type.startswith("call.") and json.loads(e.data).get("n") == n for e in events
    )


async def test_forty_clients_get_exactly_their_accounts_events_in_upstream_order(
    http: httpx.AsyncClient,
) -> None:
    per_account, rounds = 20, 30
    async with stack() as s, contextlib.AsyncExitStack() as clients:
        streams = {
            account: [
                await clients.enter_async_context(
                    open_stream(http, events_url(s), token=s.token(account))
                )
                for _ in range(per_account)
            ]
            for account in (ACCT, OTHER)
        }
        for account in (ACCT, OTHER):
            await streams[account][0].wait_for(upstream_connected)
        # Interleaved, so a mixed-up channel would show as foreign or misplaced events.
        for n in range(rounds):
            for account in (ACCT, OTHER):
                data = {"account": account, "n": n}
                await s.simulator.inject(account, CALL_TYPES[n % 3], data)
        for account, account_streams in streams.items():
            for stream in account_streams:
                await stream.wait_for(saw_number(rounds - 1))
                received = [json.loads(e.data) for e in calls(stream)]
                assert received == [{"account": account, "n": n} for n in range(rounds)]
                assert [e.type for e in calls(stream)] == [CALL_TYPES[n % 3] for n in range(rounds)]
                ids = [e.id for e in calls(stream)]
                assert len(set(ids)) == len(ids)
        assert s.simulator.streams_opened(ACCT) == s.simulator.streams_opened(OTHER) == 1


async def test_reconnecting_with_last_event_id_header_then_query_misses_and_repeats_nothing(
    http: httpx.AsyncClient,
) -> None:
    total = 60
    injected = 0
    progressed = asyncio.Event()

    async def inject_steadily(s: DemoStack) -> None:
        nonlocal injected
        for n in range(total):
            await s.simulator.inject(ACCT, "call.incoming", {"n": n})
            injected += 1
            progressed.set()
            await asyncio.sleep(0.01)  # pacing: events keep flowing while the client is away

    async def away_while_events_flow() -> None:
        """Stay disconnected until a few more events went upstream."""
        wanted = min(injected + 3, total)
        async with asyncio.timeout(DEADLINE):
            while injected < wanted:
                progressed.clear()
                await progressed.wait()

    async with stack() as s, asyncio.TaskGroup() as tasks:
        async with open_stream(http, events_url(s), token=s.token()) as first:
            await first.wait_for(upstream_connected)
            tasks.create_task(inject_steadily(s))
            await first.wait_for(lambda events: len(calls(first)) >= 10)
        await away_while_events_flow()
        resume = first.events[-1].last_event_id
        async with open_stream(
            http, events_url(s), token=s.token(), headers={"Last-Event-ID": resume}
        ) as second:
            await second.wait_for(lambda events: len(calls(second)) >= 10)
        await away_while_events_flow()
        resume = second.events[-1].last_event_id
        async with open_stream(
            http, events_url(s), token=s.token(), params={"last_event_id": resume}
        ) as third:
            await third.wait_for(saw_number(total - 1))

    assert numbers(first) + numbers(second) + numbers(third) == list(range(total))
    for stream in (first, second, third):
        assert not stream.of_type("relay.reset")
        assert stream.events[0].type == "connected"


async def test_resuming_from_outside_the_replay_window_gets_relay_reset_first(
    http: httpx.AsyncClient,
) -> None:
    async with (
        stack(replay={"max_events": 5}) as s,
        open_stream(http, events_url(s), token=s.token()) as watcher,
    ):
        await watcher.wait_for(upstream_connected)
        for n in range(11):
            await s.simulator.inject(ACCT, "call.incoming", {"n": n})
        await watcher.wait_for(saw_number(10))
        ids = [e.id for e in calls(watcher)]
        assert all(ids)

        # n=5 is just outside the 5 kept (6..10): resuming from it still misses nothing.
        async with open_stream(
            http, events_url(s), token=s.token(), headers={"Last-Event-ID": str(ids[5])}
        ) as edge:
            await edge.wait_for(saw_number(10))
            assert numbers(edge) == [6, 7, 8, 9, 10]
            assert not edge.of_type("relay.reset")

        resumes = [
            ("Last-Event-ID", str(ids[4])),  # 5..10 kept no longer: n=5 is lost
            ("last_event_id", str(ids[0])),
            ("Last-Event-ID", "garbage"),
            ("last_event_id", "99999999999999-1"),  # a relay id never given out
        ]
        async with contextlib.AsyncExitStack() as clients:
            resumed = []
            for where, value in resumes:
                in_header = where == "Last-Event-ID"
                stream = await clients.enter_async_context(
                    open_stream(
                        http,
                        events_url(s),
                        token=s.token(),
                        headers={where: value} if in_header else None,
                        params=None if in_header else {where: value},
                    )
                )
                await stream.wait_count("relay.reset", 1)
                resumed.append((value, stream))
            await s.simulator.inject(ACCT, "call.incoming", {"n": 11})
            for value, stream in resumed:
                await stream.wait_for(saw_number(11))
                types = [e.type for e in stream.events if e.type != "relay.upstream"]
                assert types == ["connected", "relay.reset", "call.incoming"]
                assert numbers(stream) == [11]
                reset = json.loads(stream.of_type("relay.reset")[0].data)
                assert reset["last_event_id"] == value


async def open_stalled_client(
    stack: DemoStack,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client that reads the start of its stream, up to `connected`, and then stops reading."""
    host, port = stack.relay_url.removeprefix("http://").split(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # A small receive window, so the stall shows at the relay sooner.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(
        (
            f"GET /v1/events HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Authorization: Bearer {stack.token()}\r\nAccept: text/event-stream\r\n\r\n"
        ).encode()
    )
    await writer.drain()
    async with asyncio.timeout(DEADLINE):
        await reader.readuntil(b"event: connected\n")
    return reader, writer


async def slow_disconnects(http: httpx.AsyncClient, stack: DemoStack) -> float:
    response = await http.get(f"{stack.relay_url}/metrics")
    found = re.search(r"^relay_slow_client_disconnects_total (\S+)$", response.text, re.M)
    assert found is not None, response.text
    return float(found.group(1))


async def connected_clients(http: httpx.AsyncClient, stack: DemoStack) -> int:
    assert stack.settings.auth.admin_key is not None
    key = stack.settings.auth.admin_key.get_secret_value()
    response = await http.get(
        f"{stack.relay_url}/v1/status", headers={"Authorization": f"Bearer {key}"}
    )
    clients: int = response.json()["clients"]
    return clients


def latencies(streams: list[Stream], sent: dict[int, float], wanted: range) -> list[float]:
    """Inject → receive, in seconds, of events numbered in `wanted` on every stream."""
    measured = []
    for stream in streams:
        for event, at in zip(stream.events, stream.received_at, strict=True):
            if event.type.startswith("call."):
                n = json.loads(event.data)["n"]
                if n in wanted:
                    measured.append(at - sent[n])
    return measured


async def test_a_stalled_client_is_cut_without_delaying_the_others(
    http: httpx.AsyncClient,
) -> None:
    pad = "x" * 64 * 1024
    readers = 5
    sent: dict[int, float] = {}
    n = 0

    async def inject_one(s: DemoStack) -> None:
        nonlocal n
        sent[n] = time.perf_counter()
        await s.simulator.inject(ACCT, "call.incoming", {"n": n, "pad": pad})
        n += 1
        await asyncio.sleep(0.01)  # pacing: a steady flow of big events

    async with (
        stack(server={"client_buffer_events": 16}) as s,
        contextlib.AsyncExitStack() as clients,
    ):
        streams = [
            await clients.enter_async_context(open_stream(http, events_url(s), token=s.token()))
            for _ in range(readers)
        ]
        await streams[0].wait_for(upstream_connected)
        for _ in range(20):
            await inject_one(s)
        baseline = range(n)
        for stream in streams:
            await stream.wait_for(saw_number(n - 1))

        stalled, stalled_writer = await open_stalled_client(s)
        try:
            assert await connected_clients(http, s) == readers + 1
            stall_began = n
            async with asyncio.timeout(10):
                while await slow_disconnects(http, s) < 1:
                    await inject_one(s)
            during = range(stall_began, n)
            assert await connected_clients(http, s) == readers
            for stream in streams:
                await stream.wait_for(saw_number(n - 1))
                assert not stream.closed.is_set()
            # Read again: what the socket buffers held, then the end the relay put to the stream.
            async with asyncio.timeout(DEADLINE):
                held = await stalled.read()
            assert f'"n": {n - 1},'.encode() not in held  # it never got the latest events
        finally:
            stalled_writer.close()
            with contextlib.suppress(ConnectionError):
                await stalled_writer.wait_closed()

    assert len(during) >= 5
    for stream in streams:
        assert numbers(stream) == list(range(n))
    before = latencies(streams, sent, baseline)
    stall = latencies(streams, sent, during)
    assert max(before) < 1.0
    assert max(stall) < 1.0, f"max {max(stall):.3f}s during the stall"
    assert statistics.median(stall) < 5 * statistics.median(before) + 0.05, (
        f"median {statistics.median(stall):.4f}s during the stall, "
        f"{statistics.median(before):.4f}s before"
    )


async def test_an_idle_stream_gets_heartbeats_at_the_configured_interval(
    http: httpx.AsyncClient,
) -> None:
    async with (
        stack(server={"heartbeat_seconds": 0.3}) as s,
        open_stream(http, events_url(s), token=s.token()) as stream,
    ):
        await stream.wait_for(upstream_connected)
        before = stream.heartbeats
        await asyncio.sleep(1.6)  # the observation window itself
        during = stream.heartbeats - before
    assert 4 <= during <= 7, f"{during} heartbeats in 1.6 s"
    assert not calls(stream)


async def test_token_events_claim_and_events_query_narrow_and_never_widen(
    http: httpx.AsyncClient,
) -> None:
    injected = ["call.incoming", "call.answered", "call.end", "call.transfer", "call.new_type"]
    async with stack() as s, contextlib.AsyncExitStack() as clients:
        scoped = s.issuer.issue(ACCT, 600, events=["call.incoming", "call.end"])[0]

        async def client(token: str, events: str | None = None) -> Stream:
            params = {"events": events} if events is not None else None
            return await clients.enter_async_context(
                open_stream(http, events_url(s), token=token, params=params)
            )

        by_token = await client(scoped)
        narrowed = await client(scoped, "call.incoming,call.answered")
        widening = await client(scoped, "call.end,call.transfer")
        disjoint = await client(scoped, "call.answered")
        by_query = await client(s.token(), "call.answered, call.new_type")
        everything = await client(s.token())
        await everything.wait_for(upstream_connected)
        for n, event_type in enumerate(injected):
            await s.simulator.inject(ACCT, event_type, {"n": n})
        # Per-client order is upstream order: a final event each client accepts closes the check.
        for n, event_type in enumerate(("call.incoming", "call.answered", "call.end"), start=100):
            await s.simulator.inject(ACCT, event_type, {"n": n})
        await everything.wait_for(saw_number(102))
        await by_token.wait_for(saw_number(102))
        await narrowed.wait_for(saw_number(100))
        await by_query.wait_for(saw_number(101))
        await widening.wait_for(saw_number(102))

        assert numbers(everything) == [0, 1, 2, 3, 4, 100, 101, 102]
        assert numbers(by_token) == [0, 2, 100, 102]
        assert numbers(narrowed) == [0, 100]
        assert numbers(by_query) == [1, 4, 101]
        assert numbers(widening) == [2, 102]
        # Nothing to wait for here; anything it was wrongly sent came before the others' last.
        assert numbers(disjoint) == []
        for stream in (by_token, narrowed, widening, disjoint, by_query):
            assert stream.events[0].type == "connected"
            assert upstream_connected(stream.events)


async def test_user_id_claim_gets_that_users_events_and_unaddressed_ones_only(
    http: httpx.AsyncClient,
) -> None:
    users: list[dict[str, Any]] = [
        {"user_id": "usr_1"},
        {"user_id": "usr_2"},
        {},
        {"user_id": None},
        {"user_id": "usr_2"},
        {"user_id": "usr_1"},
    ]
    async with stack() as s:
        token = s.issuer.issue(ACCT, 600, user_id="usr_1")[0]
        async with (
            open_stream(http, events_url(s), token=token) as user_1,
            open_stream(http, events_url(s), token=s.token()) as everyone,
        ):
            await user_1.wait_for(upstream_connected)
            for n, user in enumerate(users):
                await s.simulator.inject(ACCT, "call.incoming", {"n": n, **user})
            await s.simulator.inject(ACCT, "call.end", {"n": 99})
            await user_1.wait_for(saw_number(99))
            await everyone.wait_for(saw_number(99))
    assert numbers(user_1) == [0, 2, 3, 5, 99]
    assert numbers(everyone) == [0, 1, 2, 3, 4, 5, 99]
    assert [e.type for e in user_1.events[:1]] == ["connected"]
    assert upstream_connected(user_1.events)


async def test_a_repeated_upstream_id_is_delivered_once(http: httpx.AsyncClient) -> None:
    async with stack() as s, open_stream(http, events_url(s), token=s.token()) as stream:
        await stream.wait_for(upstream_connected)
        await s.simulator.inject(ACCT, "call.incoming", {"n": 1}, id="evt_same")
        await s.simulator.inject(ACCT, "call.incoming", {"n": 1}, id="evt_same")
        await s.simulator.inject(ACCT, "call.end", {"n": 2}, id="evt_next")
        await stream.wait_for(saw_number(2))
    assert numbers(stream) == [1, 2]


def upstream_states(events: list[Event]) -> list[str]:
    return [json.loads(e.data)["state"] for e in events if e.type == "relay.upstream"]


async def test_only_the_relays_own_connected_event_reaches_clients_across_upstream_reconnects(
    http: httpx.AsyncClient,
) -> None:
    async with stack() as s, open_stream(http, events_url(s), token=s.token()) as stream:
        await stream.wait_for(upstream_connected)
        settled = len(upstream_states(stream.events))
        # Dropped once: the fault is lifted as soon as the relay reports the drop, well before
        # the stream opened next gets as old as drop_every_seconds.
        s.simulator.faults.drop_every_seconds = 0.2
        await stream.wait_for(lambda events: "reconnecting" in upstream_states(events)[settled:])
        s.simulator.faults.drop_every_seconds = None
        await stream.wait_for(lambda events: upstream_states(events)[-1] == "connected")
        assert s.simulator.streams_opened(ACCT) >= 2
        await s.simulator.inject(ACCT, "call.incoming", {"n": 1})
        await stream.wait_for(saw_number(1))
    assert [e.type for e in stream.events].count("connected") == 1
    first = stream.events[0]
    assert first.type == "connected"
    assert json.loads(first.data)["message"] == "Connected to event stream"
    assert json.loads(first.data)["account_id"] == ACCT
    assert stream.raw.startswith(b"retry: ")


async def test_multi_line_data_is_preserved_byte_for_byte(http: httpx.AsyncClient) -> None:
    data = 'first line\n  indented: "quoted"\n\ndata: not a field\n: not a comment\nid: 7\nété ☎ 📞'
    async with stack() as s, open_stream(http, events_url(s), token=s.token()) as stream:
        await stream.wait_for(upstream_connected)
        await s.simulator.inject(ACCT, "call.note", data)
        [event] = await stream.wait_count("call.note", 1)
    assert event.data == data
    wire = "".join(f"data: {line}\n" for line in data.split("\n")).encode()
    assert b"event: call.note\n" + wire + b"\n" in stream.raw


async def test_event_stream_response_headers(http: httpx.AsyncClient) -> None:
    async with stack() as s, open_stream(http, events_url(s), token=s.token()) as stream:
        await stream.wait_count("connected", 1)
        headers = stream.response.headers
    assert stream.status_code == 200
    assert headers["content-type"].startswith("text/event-stream")
    assert headers["cache-control"] == "no-cache"
    assert headers["x-accel-buffering"] == "no"
