"""One account's subscribers in this process, arranged so that a fan-out costs one write per client.

Direct subscribers (relay/subscriber.py) are grouped by interest and held as their transports'
`write`: an event is matched once per group, framed once per account, and written to each member
in a tight loop, with no Python call per client beyond the write itself. The others (opening,
resuming, backed up, or served by another ASGI server) are queued and get each event through
`Subscriber.offer`, which knows the replay handover and the bounded queue.
"""

from __future__ import annotations

from collections.abc import Iterator

from relay.http_protocol import http_chunk
from relay.stored import Stored
from relay.subscriber import CutReason, Interest, Subscriber, Write

_EVERYTHING = Interest()  # a client without filters: nothing to match


class Audience:
    __slots__ = ("_direct", "_queued")

    def __init__(self) -> None:
        self._direct: dict[Interest, dict[Subscriber, Write]] = {}
        self._queued: set[Subscriber] = set()

    def __len__(self) -> int:
        return len(self._queued) + sum(map(len, self._direct.values()))

    def __iter__(self) -> Iterator[Subscriber]:
        yield from tuple(self._queued)
        for group in tuple(self._direct.values()):
            yield from tuple(group)

    def __contains__(self, subscriber: Subscriber) -> bool:
        group = self._direct.get(subscriber.interest)
        return subscriber in self._queued or (group is not None and subscriber in group)

    # -- membership (the hub adds and removes; each subscriber moves itself) -------------------

    def add(self, subscriber: Subscriber) -> None:
        self._queued.add(subscriber)

    def remove(self, subscriber: Subscriber) -> None:
        self._queued.discard(subscriber)
        self._leave_group(subscriber)

    def make_direct(self, subscriber: Subscriber, write: Write) -> None:
        if subscriber in self._queued:
            self._queued.discard(subscriber)
            self._direct.setdefault(subscriber.interest, {})[subscriber] = write

    def make_queued(self, subscriber: Subscriber) -> None:
        if self._leave_group(subscriber):
            self._queued.add(subscriber)

    def _leave_group(self, subscriber: Subscriber) -> bool:
        group = self._direct.get(subscriber.interest)
        if group is None or group.pop(subscriber, None) is None:
            return False
        if not group:
            del self._direct[subscriber.interest]
        return True

    # -- fan-out -------------------------------------------------------------------------------

    def fan_out(self, events: list[Stored]) -> int:
        """Every event to every subscriber that wants it, in order; one write per direct client.
        Returns how many subscribers there were."""
        # Taken first: a direct client that pauses below becomes queued, and must not get the
        # events a second time through offer.
        queued = tuple(self._queued)
        subscribers = len(queued)
        if self._direct:
            joined = events[0].frame if len(events) == 1 else b"".join(e.frame for e in events)
            everything = http_chunk(joined)
            for interest, group in tuple(self._direct.items()):
                subscribers += len(group)
                wanted = (
                    events
                    if interest == _EVERYTHING
                    else [event for event in events if interest.wants(event)]
                )
                if len(wanted) == len(events):
                    _write_each(group, everything)
                elif wanted:
                    _write_each(group, http_chunk(b"".join(event.frame for event in wanted)))
        single = http_chunk(events[0].frame) if len(events) == 1 and queued else None
        for subscriber in queued:
            for event in events:
                subscriber.offer(event, single)
        return subscribers

    def broadcast(self, frame: bytes, chunk: bytes) -> None:
        """A frame every client gets whatever its interest: upstream state, heartbeats."""
        queued = tuple(self._queued)
        for group in tuple(self._direct.values()):
            _write_each(group, chunk)
        for subscriber in queued:
            subscriber.push(frame, chunk)


def _write_each(group: dict[Subscriber, Write], chunk: bytes) -> None:
    """`chunk` into every member's transport; a transport that raises (closed under us before its
    loss was reported) cuts only its own subscriber. (A `try` costs nothing until it catches.)

    A write can move its subscriber out of the group (a full transport pauses it), so the loop
    walks a copy: a dict's, whose items view hands out one reused tuple rather than one each."""
    for subscriber, write in group.copy().items():
        try:
            write(chunk)
        except Exception:
            subscriber.cut(CutReason.CLOSED)
