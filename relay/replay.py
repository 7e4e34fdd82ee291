"""The per-account replay window kept in memory: the last `max_events` events, none older than max age."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from relay.stored import Stored, id_key


class ReplayBuffer:
    """Ids are `<epoch ms>-<seq>` with a per-process epoch, so an id from before a restart is unknown."""

    def __init__(
        self,
        max_events: int,
        max_age_seconds: float,
        epoch_ms: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max_events = max_events
        self._max_age = max_age_seconds
        self._epoch = epoch_ms
        self._clock = clock
        self._events: deque[tuple[float, int, Stored]] = deque()
        self._last_seq = 0

    def next_id(self) -> str:
        return f"{self._epoch}-{self._last_seq + 1}"

    def append(self, event: Stored) -> None:
        """Keep `event`, whose id must be the one `next_id()` returned."""
        self._last_seq += 1
        if self._max_events > 0:
            self._events.append((self._clock(), self._last_seq, event))
            if len(self._events) > self._max_events:
                self._events.popleft()
        self._expire()

    @property
    def last_id(self) -> str | None:
        return f"{self._epoch}-{self._last_seq}" if self._last_seq else None

    def after(self, last_id: str) -> list[Stored] | None:
        """Events after `last_id`, or None when that id is unknown or older than the window (reset)."""
        try:
            epoch, seq = id_key(last_id)
        except ValueError:
            return None
        if epoch != self._epoch or seq > self._last_seq:
            return None
        self._expire()
        oldest = self._events[0][1] if self._events else self._last_seq + 1
        if seq < oldest - 1:
            return None  # events between `seq` and the window were dropped: the client missed some
        return [event for _, s, event in self._events if s > seq]

    def _expire(self) -> None:
        horizon = self._clock() - self._max_age
        while self._events and self._events[0][0] < horizon:
            self._events.popleft()
