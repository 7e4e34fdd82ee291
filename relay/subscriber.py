"""One connected client: its filters and its bounded queue of frames waiting to be written."""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from collections.abc import Callable

from relay.stored import Stored


class CutReason(enum.StrEnum):
    SLOW = "slow"  # its queue filled: it was not reading fast enough
    SHUTDOWN = "shutdown"


class Subscriber:
    """Fed by the hub without ever awaiting; drained by the client's response task.

    A subscriber whose queue would exceed `capacity` is cut, never allowed to hold the others back:
    it resumes by reconnecting with Last-Event-ID.
    """

    __slots__ = (
        "account_id",
        "capacity",
        "cut_reason",
        "events",
        "frames",
        "gone",
        "on_cut",
        "pending",
        "replay_bound",
        "user_id",
        "wakeup",
    )

    def __init__(
        self,
        account_id: str,
        *,
        events: frozenset[str] | None,
        user_id: str | None,
        capacity: int,
        on_cut: Callable[[Subscriber], None],
    ) -> None:
        self.account_id = account_id
        self.events = events
        self.user_id = user_id
        self.capacity = capacity
        self.on_cut = on_cut
        self.frames: deque[bytes] = deque()
        self.wakeup = asyncio.Event()
        self.cut_reason: CutReason | None = None
        self.gone = asyncio.Event()  # set once cut: the response stops even if blocked writing
        # Handover from replay to live (Mercure's history/live bound): while the replay is fetched,
        # live events wait in `pending`; afterwards anything at or below the last id the client has
        # (replayed or given as Last-Event-ID) is skipped, so nothing is sent twice or missed.
        self.pending: list[Stored] | None = None
        self.replay_bound: tuple[int, int] | None = None

    def wants(self, event: Stored) -> bool:
        if self.events is not None and event.type not in self.events:
            return False
        return self.user_id is None or event.user_id is None or event.user_id == self.user_id

    def offer(self, event: Stored) -> None:
        if self.replay_bound is not None and event.key <= self.replay_bound:
            return
        if self.pending is not None:
            if len(self.pending) >= self.capacity:
                self.cut(CutReason.SLOW)
            else:
                self.pending.append(event)
        elif self.wants(event):
            self.push(event.frame)

    def begin_replay(self) -> None:
        self.pending = []

    def end_replay(self, bound: tuple[int, int] | None) -> None:
        """Live from here on: release what waited during the replay fetch, minus what it covered."""
        waiting, self.pending = self.pending or [], None
        self.replay_bound = bound
        for event in waiting:
            self.offer(event)

    def push(self, frame: bytes) -> None:
        if self.cut_reason is not None:
            return
        if len(self.frames) >= self.capacity:
            self.cut(CutReason.SLOW)
            return
        self.frames.append(frame)
        self.wakeup.set()

    def cut(self, reason: CutReason) -> None:
        """Drop the subscriber now: nothing more is sent, a blocked write is abandoned."""
        if self.cut_reason is None:
            self.cut_reason = reason
            self.frames.clear()
            self.pending = None
            self.wakeup.set()
            self.gone.set()
            self.on_cut(self)

    def finish(self, farewell: bytes) -> None:
        """End the stream cleanly after what is queued plus `farewell` (graceful shutdown)."""
        if self.cut_reason is None:
            self.frames.append(farewell)
            self.cut_reason = CutReason.SHUTDOWN
            self.wakeup.set()

    def take(self) -> bytes:
        """Everything queued, as one write."""
        chunk = b"".join(self.frames)
        self.frames.clear()
        self.wakeup.clear()
        return chunk
