"""The mailbox of one actor (relay/upstream.py): many producers that never wait, one consumer.

Producers are socket callbacks as often as tasks, so `put` never blocks: a producer asks `full()`
after putting and, when it is, holds back until `room()` says the consumer has taken the box down
to half. The box can therefore go past its limit by what one producer put before asking, which the
producer bounds (the events of one chunk read from a socket).

An asyncio.Queue does the same job for tasks only, with a coroutine call, a size check and a
join counter on every put and get; this box is a deque and, while the consumer is idle, one future.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Generic, TypeVar

Message = TypeVar("Message")


class Inbox(Generic[Message]):
    def __init__(self, limit: int) -> None:
        self._messages: deque[Message] = deque()
        self._limit = limit
        self._waiter: asyncio.Future[None] | None = None  # the consumer, waiting for a message
        self._held: list[asyncio.Future[None]] = []  # producers waiting for room

    def empty(self) -> bool:
        return not self._messages

    def put(self, message: Message) -> None:
        """Add `message` even past the limit; the producer asks `full()` next."""
        self._messages.append(message)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def full(self) -> bool:
        return len(self._messages) >= self._limit

    async def room(self) -> None:
        """Return once the consumer has taken the box down to half its limit."""
        if self._has_room():
            return
        freed = asyncio.get_running_loop().create_future()
        self._held.append(freed)
        await freed

    async def get(self) -> Message:
        while not self._messages:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        message = self._messages.popleft()
        if self._held and self._has_room():
            held, self._held = self._held, []
            for freed in held:
                if not freed.done():  # a producer cancelled while it waited
                    freed.set_result(None)
        return message

    def _has_room(self) -> bool:
        return len(self._messages) <= self._limit // 2
