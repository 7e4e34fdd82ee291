"""Per-account state: event ids, the replay history, open streams and what each stream sent."""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field

from relay.simulator.sessions import Session

HISTORY_SIZE = 100  # for Last-Event-ID replay
SENT_LOG_SIZE = 100_000
STREAM_QUEUE_SIZE = 1_000  # events waiting for one slow reader before its stream is closed


@dataclass(frozen=True)
class SentEvent:
    """A call event as written on the wire: `id` is None when no `id:` line was sent.

    In `sent_log`, `connection` numbers the `/v1/events` connection that wrote it in full;
    an event as published (returned by `inject`) has no connection.
    """

    connection: int | None
    id: str | None
    type: str
    data: str


@dataclass(eq=False)
class Stream:
    """One open `/v1/events` connection and the events waiting to be written on it."""

    number: int
    account: Account
    session: Session
    opened_at: float  # event loop time
    queue: asyncio.Queue[SentEvent] = field(
        default_factory=lambda: asyncio.Queue(maxsize=STREAM_QUEUE_SIZE)
    )
    overflowed: bool = False

    def log_sent(self, event: SentEvent) -> None:
        self.account.sent.append(SentEvent(self.number, event.id, event.type, event.data))


@dataclass(eq=False)
class Account:
    id: str
    next_id: int = 1
    history: deque[SentEvent] = field(default_factory=lambda: deque(maxlen=HISTORY_SIZE))
    streams: dict[int, Stream] = field(default_factory=dict)
    streams_opened: int = 0
    sent: deque[SentEvent] = field(default_factory=lambda: deque(maxlen=SENT_LOG_SIZE))
    calls: asyncio.Task[None] | None = None  # generated calls, while the simulator runs

    def publish(self, event_type: str, data: str, id: str | None, *, numbered: bool) -> SentEvent:
        """Record the event and queue it on every open stream.

        `numbered` gives an event without an explicit `id` the account's next one.
        """
        if id is None and numbered:
            id = str(self.next_id)
            self.next_id += 1
        event = SentEvent(None, id, event_type, data)
        self.history.append(event)
        for stream in self.streams.values():
            try:
                stream.queue.put_nowait(event)
            except asyncio.QueueFull:
                stream.overflowed = True
        return event

    def open_stream(
        self, number: int, session: Session, opened_at: float, last_event_id: str | None
    ) -> Stream:
        """Register a stream with the events after `last_event_id` already queued on it.

        An id the history does not hold (too old, or never sent) replays nothing.
        """
        stream = Stream(number, self, session, opened_at)
        if last_event_id:
            for event in self._after(last_event_id):
                stream.queue.put_nowait(event)
        self.streams[number] = stream
        self.streams_opened += 1
        return stream

    def close_stream(self, stream: Stream) -> None:
        self.streams.pop(stream.number, None)

    def _after(self, last_event_id: str) -> list[SentEvent]:
        history = list(self.history)
        for index in range(len(history) - 1, -1, -1):
            if history[index].id == last_event_id:
                return history[index + 1 :]
        return []
