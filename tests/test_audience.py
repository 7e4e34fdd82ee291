"""relay/audience.py: direct writes grouped by interest, and every way a client stops being direct."""

from __future__ import annotations

from collections.abc import Callable

from relay.audience import Audience
from relay.http_protocol import http_chunk
from relay.stored import Stored
from relay.subscriber import CutReason, Interest, Subscriber

EVERYTHING = Interest()


class Transport:
    """A transport's `write`: records, and can pause (calling back as uvloop does) or be closed."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.pause_after: int | None = None  # pause once this many chunks were taken
        self.on_pause: Callable[[], None] | None = None
        self.closed = False

    def write(self, chunk: bytes) -> None:
        if self.closed:
            raise RuntimeError("unable to perform operation on <TCPTransport closed=True>")
        self.chunks.append(chunk)
        if self.pause_after is not None and len(self.chunks) >= self.pause_after:
            assert self.on_pause is not None
            self.on_pause()


async def no_send(message: object) -> None:
    raise AssertionError("a subscriber with a transport writer never steps the ASGI send")


def event(n: int, type: str = "call.incoming", data: str = "{}") -> Stored:
    return Stored(f"1-{n}", type, data)


def joined(*events: Stored) -> bytes:
    return http_chunk(b"".join(e.frame for e in events))


class Fixture:
    def __init__(self) -> None:
        self.audience = Audience()
        self.cut: list[Subscriber] = []

    def client(
        self, interest: Interest = EVERYTHING, capacity: int = 3
    ) -> tuple[Subscriber, Transport]:
        sub = Subscriber("acct_1", interest, self.audience, capacity=capacity, on_cut=self.gone)
        self.audience.add(sub)
        transport = Transport()
        transport.on_pause = sub.paused
        sub.attach(no_send, transport.write)
        sub.task = None  # no response task to cancel here
        return sub, transport

    def gone(self, sub: Subscriber) -> None:
        self.cut.append(sub)
        self.audience.remove(sub)


async def test_direct_clients_get_one_write_per_fan_out_matched_once_per_interest() -> None:
    f = Fixture()
    everyone = [f.client() for _ in range(3)]
    incoming_only = [f.client(Interest(frozenset({"call.incoming"}))) for _ in range(2)]
    user_2 = f.client(Interest(None, "u2"))
    a, b, c = event(1), event(2, "call.end"), event(3, data='{"user_id": "u1"}')
    f.audience.fan_out([a, b, c])
    for _, transport in everyone:
        assert transport.chunks == [joined(a, b, c)]  # three events, one write
    for _, transport in incoming_only:
        assert transport.chunks == [joined(a, c)]
    assert user_2[1].chunks == [joined(a, b)]  # u1's event is not for u2
    assert len(f.audience) == 6
    assert not f.cut


async def test_a_client_whose_socket_pauses_queues_from_then_on_and_gets_nothing_twice() -> None:
    f = Fixture()
    (slow, slow_socket), (_, fast_socket) = f.client(), f.client()
    slow_socket.pause_after = 1
    f.audience.fan_out([event(1)])  # taken by the socket, which then pauses
    assert slow.blocked
    assert slow.has_work
    assert slow_socket.chunks == [http_chunk(event(1).frame)]  # once, not again through offer
    f.audience.fan_out([event(2)])
    f.audience.fan_out([event(3)])
    assert slow_socket.chunks == [http_chunk(event(1).frame)]
    assert list(slow.frames) == [event(2).frame, event(3).frame]  # for the task to flush
    assert fast_socket.chunks == [http_chunk(event(n).frame) for n in (1, 2, 3)]
    slow.take()
    slow.unblock()  # the task flushed the queue and the socket drained
    f.audience.fan_out([event(4)])
    assert slow_socket.chunks[-1] == http_chunk(event(4).frame)
    for n in (5, 6, 7, 8):  # paused for good: past its buffer it is cut, the other goes on
        f.audience.fan_out([event(n)])
    assert f.cut == [slow]
    assert slow.cut_reason is CutReason.SLOW
    assert fast_socket.chunks[-1] == http_chunk(event(8).frame)
    assert len(f.audience) == 1


async def test_a_transport_closed_under_the_fan_out_cuts_only_its_own_client() -> None:
    f = Fixture()
    clients = [f.client() for _ in range(4)]
    clients[1][1].closed = True
    f.audience.fan_out([event(1)])
    assert f.cut == [clients[1][0]]
    assert clients[1][0].cut_reason is CutReason.CLOSED
    for index in (0, 2, 3):
        assert clients[index][1].chunks == [http_chunk(event(1).frame)]


async def test_a_resumed_client_is_direct_only_once_live_events_pass_its_replay() -> None:
    f = Fixture()
    sub = Subscriber("acct_1", Interest(), f.audience, capacity=5, on_cut=f.gone)
    f.audience.add(sub)
    sub.begin_replay()
    f.audience.fan_out([event(3)])  # live while the replay is fetched
    sub.end_replay(event(4).key)  # the replay went up to event 4
    transport = Transport()
    sub.attach(no_send, transport.write)
    f.audience.fan_out([event(4)])  # a late live copy of a replayed event
    assert transport.chunks == []
    f.audience.fan_out([event(5)])
    f.audience.fan_out([event(6)])
    assert transport.chunks == [http_chunk(event(5).frame), http_chunk(event(6).frame)]
    assert sub in f.audience
    assert not sub.frames


async def test_ended_clients_leave_the_direct_groups_and_broadcasts_reach_every_interest() -> None:
    f = Fixture()
    (sub, socket), (other, other_socket) = f.client(Interest(frozenset({"x"}))), f.client()
    f.audience.broadcast(b": hb\n\n", http_chunk(b": hb\n\n"))
    assert socket.chunks == other_socket.chunks == [http_chunk(b": hb\n\n")]
    sub.finish(b"retry: 5\n\n")  # the drain: said on the spot, then nothing more
    assert socket.chunks[-1] == http_chunk(b"retry: 5\n\n")
    f.audience.fan_out([event(1, "x")])
    assert socket.chunks[-1] == http_chunk(b"retry: 5\n\n")
    assert sub.cut_reason is CutReason.SHUTDOWN
    assert sub.has_work
    assert other_socket.chunks[-1] == http_chunk(event(1, "x").frame)
    other.cut(CutReason.CLOSED)
    f.audience.broadcast(b": hb\n\n", http_chunk(b": hb\n\n"))
    assert other_socket.chunks[-1] == http_chunk(event(1, "x").frame)
    assert f.cut == [other]


async def test_attached_clients_are_written_to_directly_not_offered_each_event() -> None:
    f = Fixture()
    members = [f.client() for _ in range(1000)]
    assert not f.audience._queued  # all in direct groups: no Subscriber method runs per event
    f.audience.fan_out([event(1)])
    assert all(transport.chunks == [http_chunk(event(1).frame)] for _, transport in members)
