"""The in-process broker (`memory://`): replay buffers and de-duplication in this process only."""

from __future__ import annotations

import time
from collections import OrderedDict

from relay.brokers.base import Deliver
from relay.channel import Incoming
from relay.config import ReplaySettings
from relay.replay import ReplayBuffer
from relay.stored import Stored

DEDUP_WINDOW = 10_000  # upstream ids remembered per account; redeliveries come within minutes


class MemoryBroker:
    def __init__(self, replay: ReplaySettings) -> None:
        self._settings = replay
        self._epoch_ms = int(time.time() * 1000)
        self._buffers: dict[str, ReplayBuffer] = {}
        self._seen: dict[str, OrderedDict[str, None]] = {}
        self._deliver: Deliver = lambda account_id, event: None

    def attach(self, deliver: Deliver) -> None:
        self._deliver = deliver

    def _buffer(self, account_id: str) -> ReplayBuffer:
        buffer = self._buffers.get(account_id)
        if buffer is None:
            buffer = ReplayBuffer(
                self._settings.max_events, self._settings.max_age_seconds, self._epoch_ms
            )
            self._buffers[account_id] = buffer
        return buffer

    def _is_duplicate(self, account_id: str, upstream_id: str) -> bool:
        seen = self._seen.get(account_id)
        if seen is None:
            seen = self._seen[account_id] = OrderedDict()
        if upstream_id in seen:
            return True
        seen[upstream_id] = None
        if len(seen) > DEDUP_WINDOW:
            seen.popitem(last=False)
        return False

    async def publish(self, account_id: str, event: Incoming) -> Stored | None:
        if event.upstream_id is not None and self._is_duplicate(account_id, event.upstream_id):
            return None
        buffer = self._buffer(account_id)
        stored = Stored(buffer.next_id(), event.type, event.data)
        buffer.append(stored)
        self._deliver(account_id, stored)
        return stored

    async def replay(self, account_id: str, last_id: str) -> list[Stored] | None:
        return self._buffer(account_id).after(last_id)

    async def last_id(self, account_id: str) -> str | None:
        return self._buffer(account_id).last_id

    def watch(self, account_id: str) -> None:
        """Every account is delivered in-process; nothing to start."""

    def unwatch(self, account_id: str) -> None:
        """Nothing to stop."""

    async def ready(self) -> bool:
        return True

    async def aclose(self) -> None:
        self._buffers.clear()
        self._seen.clear()
