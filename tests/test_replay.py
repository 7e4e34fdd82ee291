"""The replay window and the replay → live handover of a subscriber, without sockets."""

from __future__ import annotations

import asyncio

from starlette.types import Message

from relay.audience import Audience
from relay.replay import ReplayBuffer
from relay.stored import Stored, id_key, user_of
from relay.subscriber import CutReason, Interest, Subscriber


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def fill(buffer: ReplayBuffer, count: int) -> list[Stored]:
    events = []
    for n in range(count):
        event = Stored(buffer.next_id(), "call.incoming", f'{{"n": {n}}}')
        buffer.append(event)
        events.append(event)
    return events


def test_after_returns_what_follows_an_id() -> None:
    buffer = ReplayBuffer(10, 60, epoch_ms=1000)
    events = fill(buffer, 5)
    assert buffer.after(events[1].id) == events[2:]
    assert buffer.after(events[-1].id) == []
    assert buffer.last_id == "1000-5"


def test_ids_outside_the_window_are_a_reset() -> None:
    buffer = ReplayBuffer(3, 60, epoch_ms=1000)
    events = fill(buffer, 6)  # keeps 4, 5, 6
    assert (
        buffer.after(events[2].id) == events[3:]
    )  # id 3 is just before the window: nothing missed
    assert buffer.after(events[1].id) is None  # id 4 was dropped: the client missed it
    assert buffer.after("999-2") is None  # another process's epoch
    assert buffer.after("1000-99") is None  # from the future
    assert buffer.after("garbage") is None
    assert buffer.after("") is None


def test_old_events_age_out() -> None:
    clock = Clock()
    buffer = ReplayBuffer(100, 10, epoch_ms=1, clock=clock)
    old = fill(buffer, 2)
    clock.now = 11
    fresh = fill(buffer, 1)
    assert buffer.after(old[0].id) is None
    assert buffer.after(old[1].id) == fresh


def test_no_replay_window_still_knows_the_latest_id() -> None:
    buffer = ReplayBuffer(0, 60, epoch_ms=1)
    events = fill(buffer, 3)
    assert buffer.after(events[-1].id) == []
    assert buffer.after(events[0].id) is None


def test_ids_order_as_pairs() -> None:
    assert id_key("10-9") < id_key("10-10") < id_key("11-0")


def test_user_of_reads_json_objects_only() -> None:
    assert user_of('{"user_id": "user_1"}') == "user_1"
    assert user_of('{"user_id": null}') is None
    assert user_of('["user_id"]') is None
    assert user_of('{"user_id": ') is None


def subscriber(capacity: int = 10) -> tuple[Subscriber, list[Subscriber]]:
    cut: list[Subscriber] = []
    sub = Subscriber("acct_1", Interest(), Audience(), capacity=capacity, on_cut=cut.append)
    return sub, cut


def test_handover_sends_nothing_twice_and_misses_nothing() -> None:
    buffer = ReplayBuffer(100, 60, epoch_ms=1)
    events = fill(buffer, 6)
    sub, _ = subscriber()
    sub.begin_replay()
    sub.offer(events[4])  # live events arriving while the replay is fetched
    sub.offer(events[5])
    replayed = events[2:5]  # the fetch covered up to event 5 (index 4)
    sub.end_replay(replayed[-1].key)
    sub.offer(events[4])  # a late live copy of a replayed event
    assert sub.take() == events[5].frame


def test_slow_subscriber_is_cut_with_bounded_memory() -> None:
    sub, cut = subscriber(capacity=3)
    frames = [Stored(f"1-{n}", "x", "d").frame for n in range(1, 6)]
    for frame in frames:
        sub.push(frame)
    assert sub.cut_reason is CutReason.SLOW
    assert cut == [sub]
    assert sub.has_work  # its response task wakes to end the stream
    assert not sub.frames


def test_filters_by_type_and_user() -> None:
    interest = Interest(frozenset({"call.incoming"}), "u1")
    assert interest.wants(Stored("1-1", "call.incoming", '{"user_id": "u1"}'))
    assert interest.wants(Stored("1-2", "call.incoming", '{"user_id": null}'))
    assert interest.wants(Stored("1-3", "call.incoming", "{}"))
    assert not interest.wants(Stored("1-4", "call.incoming", '{"user_id": "u2"}'))
    assert not interest.wants(Stored("1-5", "call.end", '{"user_id": "u1"}'))


class FakeSocket:
    """An ASGI `send` like uvicorn's: writes at once unless paused, then waits for the drain."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.writable = asyncio.Event()
        self.writable.set()

    async def send(self, message: Message) -> None:
        if not self.writable.is_set():
            await self.writable.wait()
        self.written.append(message["body"])


async def test_frames_go_straight_to_a_writable_socket_and_queue_when_it_pushes_back() -> None:
    socket = FakeSocket()
    sub, cut = subscriber(capacity=2)
    sub.attach(socket.send)
    sub.task = None  # no response task here to cancel when the client is cut
    sub.push(b"a")
    assert socket.written == [b"a"]
    assert not sub.frames  # written on the spot: no queue, no task wake-up
    socket.writable.clear()
    sub.push(b"b")
    sub.push(b"c")
    assert socket.written == [b"a"]  # the suspended send wrote nothing
    assert list(sub.frames) == [b"b", b"c"]
    assert sub.blocked
    sub.push(b"d")
    assert sub.cut_reason is CutReason.SLOW
    assert cut == [sub]
