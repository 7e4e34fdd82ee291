"""One connected client: its filters, and how frames reach its socket.

The hub hands every frame to `push`, which never awaits. When the client's socket can take the bytes
now, they are written on the spot: no queue, no task wake-up. Only a client whose socket is backed up
gets a queue, bounded by `capacity`, which its own response task drains; past the bound it is cut and
resumes by reconnecting with Last-Event-ID.
"""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from collections.abc import Callable, Coroutine
from typing import cast

from starlette.types import Send

from relay.http_protocol import http_chunk
from relay.stored import Stored


class CutReason(enum.StrEnum):
    SLOW = "slow"  # its queue filled: it was not reading fast enough
    CLOSED = "closed"  # the client went away
    SHUTDOWN = "shutdown"  # the relay is draining: end the stream cleanly


class Subscriber:
    __slots__ = (
        "account_id",
        "blocked",
        "capacity",
        "cut_reason",
        "events",
        "frames",
        "on_cut",
        "peer",
        "pending",
        "replay_bound",
        "send",
        "task",
        "user_id",
        "wakeup",
        "write_chunk",
    )

    def __init__(
        self,
        account_id: str,
        *,
        events: frozenset[str] | None,
        user_id: str | None,
        capacity: int,
        on_cut: Callable[[Subscriber], None],
        peer: str | None = None,
    ) -> None:
        self.account_id = account_id
        self.peer = peer  # the client's address, for max_clients_per_ip
        self.events = events
        self.user_id = user_id
        self.capacity = capacity
        self.on_cut = on_cut
        self.frames: deque[bytes] = deque()
        self.wakeup = asyncio.Event()  # the response task has work: frames to flush, or an end
        self.cut_reason: CutReason | None = None
        self.send: Send | None = None  # set once the stream's opening frames are out
        # The server's direct writer of pre-framed body chunks (relay/http_protocol.py), if any.
        self.write_chunk: Callable[[bytes], bool] | None = None
        self.task: asyncio.Task[object] | None = None
        self.blocked = False  # the socket pushed back: frames queue until the task has flushed them
        # Handover from replay to live (Mercure's history/live bound): while the replay is fetched,
        # live events wait in `pending`; afterwards anything at or below the last id the client has
        # (replayed or given as Last-Event-ID) is skipped, so nothing is sent twice or missed.
        self.pending: list[Stored] | None = None
        self.replay_bound: tuple[int, int] | None = None

    # -- what this client gets -----------------------------------------------------------------

    def wants(self, event: Stored) -> bool:
        if self.events is not None and event.type not in self.events:
            return False
        return self.user_id is None or event.user_id is None or event.user_id == self.user_id

    def takes_all_after(self, key: tuple[int, int]) -> bool:
        """Whether every event from `key` on goes to this client as is (no filter, no handover)."""
        return (
            self.events is None
            and self.user_id is None
            and self.pending is None
            and (self.replay_bound is None or self.replay_bound < key)
        )

    def offer(self, event: Stored, chunk: bytes | None = None) -> None:
        """`chunk`: the event's frame as an HTTP chunk, when the caller framed it for everyone."""
        if self.replay_bound is not None and event.key <= self.replay_bound:
            return
        if self.pending is not None:
            if len(self.pending) >= self.capacity:
                self.cut(CutReason.SLOW)
            else:
                self.pending.append(event)
        elif self.wants(event):
            self.push(event.frame, chunk)

    def begin_replay(self) -> None:
        self.pending = []

    def end_replay(self, bound: tuple[int, int] | None) -> None:
        """Live from here on: release what waited during the replay fetch, minus what it covered."""
        waiting, self.pending = self.pending or [], None
        self.replay_bound = bound
        for event in waiting:
            self.offer(event)

    # -- writing -------------------------------------------------------------------------------

    def attach(self, send: Send, write_chunk: Callable[[bytes], bool] | None = None) -> None:
        """The opening frames are out: from now on frames may be written straight from `push`,
        through `write_chunk` when the server offers it, else by stepping `send`."""
        self.send = send
        self.write_chunk = write_chunk
        self.task = asyncio.current_task()
        if self.frames:
            self.blocked = True  # what queued meanwhile goes first, through the task
            self.wakeup.set()

    def push(self, frame: bytes, chunk: bytes | None = None) -> None:
        """`chunk`: `frame` framed as an HTTP chunk, when the caller framed it once for everyone."""
        if self.cut_reason is not None:
            return
        if self.send is not None and not self.blocked:
            if self.write_chunk is not None:
                try:
                    if self.write_chunk(chunk if chunk is not None else http_chunk(frame)):
                        return
                except Exception:  # never let one client's socket stop the fan-out to the rest
                    self.cut(CutReason.CLOSED)
                    return
            elif self._write_now(frame):
                return
            self.blocked = True
        if len(self.frames) >= self.capacity:
            self.cut(CutReason.SLOW)
            return
        self.frames.append(frame)
        self.wakeup.set()

    def _write_now(self, frame: bytes) -> bool:
        """Run the ASGI send to completion if it needs no wait; False if the socket is backed up.

        uvicorn's `send` awaits only when the transport has paused writing, and does so before it
        writes anything; closing the suspended coroutine then abandons a write that never happened,
        and the frame goes to the queue instead.
        """
        assert self.send is not None
        # ASGI servers' `send` is an `async def`: a coroutine we can step by hand.
        step = cast(
            Coroutine[object, None, None],
            self.send({"type": "http.response.body", "body": frame, "more_body": True}),
        )
        try:
            step.send(None)
        except StopIteration:
            return True
        except Exception:
            step.close()
            self.cut(CutReason.CLOSED)
            return True
        step.close()
        return False

    def take(self) -> bytes:
        """Everything queued, as one write."""
        chunk = b"".join(self.frames)
        self.frames.clear()
        return chunk

    # -- ending --------------------------------------------------------------------------------

    def finish(self, farewell: bytes) -> None:
        """End the stream cleanly after what is queued plus `farewell` (graceful shutdown)."""
        if self.cut_reason is None:
            self.push(farewell)
            self.cut_reason = CutReason.SHUTDOWN
            self.wakeup.set()

    def cut(self, reason: CutReason) -> None:
        """Drop the subscriber now: nothing more is sent, a write blocked on its socket is abandoned."""
        if self.cut_reason is not None:
            return
        self.cut_reason = reason
        self.frames.clear()
        self.pending = None
        self.wakeup.set()
        if reason is CutReason.SLOW and self.blocked and self.task is not None:
            self.task.cancel()  # it may be stuck in a send to a client that stopped reading
        self.on_cut(self)
