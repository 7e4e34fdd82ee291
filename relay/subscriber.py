"""One connected client: what it wants, and how frames reach its socket.

A subscriber whose socket takes bytes now is *direct*: its account's audience (relay/audience.py)
writes each event's chunk straight into its transport, with no call into this object, no queue and
no task wake-up. It stops being direct while it opens or resumes (the replay handover below), once
its socket pushes back (the transport pauses writing), and when it ends. Frames meanwhile go through
`offer`/`push`: written on the spot when the socket can take them, else queued up to `capacity`,
which the client's own response task drains; past the bound it is cut and resumes by reconnecting
with Last-Event-ID.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, NamedTuple, cast

from starlette.types import Send

from relay.http_protocol import http_chunk
from relay.stored import Stored

if TYPE_CHECKING:
    from relay.audience import Audience

Write = Callable[[bytes], object]  # a transport's write: takes an HTTP chunk now, never waits


class CutReason(enum.StrEnum):
    SLOW = "slow"  # its queue filled: it was not reading fast enough
    CLOSED = "closed"  # the client went away
    SHUTDOWN = "shutdown"  # the relay is draining: end the stream cleanly


class Interest(NamedTuple):
    """Which of its account's events a client gets: the event types its token and query allow, and
    events of its user or of no user. Clients with equal interests are matched against an event
    once, as a group (a tuple: hashed in C, as a key of the audience's groups)."""

    events: frozenset[str] | None = None  # None: every type
    user_id: str | None = None  # None: every user's

    def wants(self, event: Stored) -> bool:
        if self.events is not None and event.type not in self.events:
            return False
        return self.user_id is None or event.user_id is None or event.user_id == self.user_id


class Subscriber:
    __slots__ = (
        "_audience",
        "_direct",
        "_waiter",
        "_write",
        "account_id",
        "blocked",
        "capacity",
        "cut_reason",
        "frames",
        "has_work",
        "interest",
        "on_cut",
        "peer",
        "pending",
        "replay_bound",
        "send",
        "task",
    )

    def __init__(
        self,
        account_id: str,
        interest: Interest,
        audience: Audience,
        *,
        capacity: int,
        on_cut: Callable[[Subscriber], None],
        peer: str | None = None,
    ) -> None:
        self.account_id = account_id
        self.interest = interest
        self.peer = peer  # the client's address, for max_clients_per_ip
        self.capacity = capacity
        self.on_cut = on_cut
        self._audience = audience
        self._direct = False  # in the audience's direct groups
        self.frames: list[bytes] = []
        # The response task has work: frames to flush, a paused socket to wait out, or an end.
        # A flag and one future rather than an asyncio.Event: every client holds one, and the
        # cycle collector walks each object a client keeps (relay/serve.py).
        self.has_work = False
        self._waiter: asyncio.Future[None] | None = None
        self.cut_reason: CutReason | None = None
        self.send: Send | None = None  # set once the stream's opening frames are out
        # The transport's write, when the server offers it (relay/http_protocol.py).
        self._write: Write | None = None
        self.task: asyncio.Task[object] | None = None
        self.blocked = False  # the socket pushed back: frames queue until the task has flushed them
        # Handover from replay to live (Mercure's history/live bound): while the replay is fetched,
        # live events wait in `pending`; afterwards anything at or below the last id the client has
        # (replayed or given as Last-Event-ID) is skipped, so nothing is sent twice or missed.
        self.pending: list[Stored] | None = None
        self.replay_bound: tuple[int, int] | None = None

    def wants(self, event: Stored) -> bool:
        return self.interest.wants(event)

    def work(self) -> asyncio.Future[None]:
        """Done once `has_work` is set (at once if it is): the response task awaits it, then
        clears `has_work` before it looks at what there is to do."""
        waiter = self._waiter
        if waiter is None or waiter.done():
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            if self.has_work:
                waiter.set_result(None)
        return waiter

    def _wake(self) -> None:
        self.has_work = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- direct or not -------------------------------------------------------------------------

    def _settle(self) -> None:
        """Direct exactly while every event may go straight to the socket as it comes."""
        direct = (
            self._write is not None
            and not self.blocked
            and self.cut_reason is None
            and self.pending is None
            and self.replay_bound is None
            and not self.frames
        )
        if direct is not self._direct:
            self._direct = direct
            if direct:
                assert self._write is not None
                self._audience.make_direct(self, self._write)
            else:
                self._audience.make_queued(self)

    def paused(self) -> None:
        """The transport paused writing: what it already took stays, the rest queues."""
        self.blocked = True
        self._settle()
        self._wake()  # the task waits for the drain, then lets it be direct again

    def unblock(self) -> None:
        """The response task flushed the queue and the socket takes bytes again."""
        self.blocked = False
        self._settle()

    # -- frames through this object ------------------------------------------------------------

    def offer(self, event: Stored, chunk: bytes | None = None) -> None:
        """`chunk`: the event's frame as an HTTP chunk, when the caller framed it for everyone."""
        bound = self.replay_bound
        if bound is not None:
            if event.key <= bound:
                return
            # Live events reach the hub in id order (both brokers read their account's events in
            # sequence): none at or below the bound can follow this one, so the handover is over.
            self.replay_bound = None
        if self.pending is not None:
            if len(self.pending) >= self.capacity:
                self.cut(CutReason.SLOW)
            else:
                self.pending.append(event)
        elif self.interest.wants(event):
            self.push(event.frame, chunk)
        if bound is not None:
            self._settle()

    def begin_replay(self) -> None:
        self.pending = []

    def end_replay(self, bound: tuple[int, int] | None) -> None:
        """Live from here on: release what waited during the replay fetch, minus what it covered."""
        waiting, self.pending = self.pending or [], None
        self.replay_bound = bound
        for event in waiting:
            if (bound is None or event.key > bound) and self.interest.wants(event):
                self.push(event.frame)
        self._settle()

    def attach(self, send: Send, write: Write | None = None) -> None:
        """The opening frames are out: from now on frames may be written straight into the socket,
        through the transport's `write` when the server offers it, else by stepping `send`."""
        self.send = send
        self._write = write
        self.task = asyncio.current_task()
        if self.frames:
            self.blocked = True  # what queued meanwhile goes first, through the task
            self._wake()
        self._settle()

    def push(self, frame: bytes, chunk: bytes | None = None) -> None:
        """`chunk`: `frame` framed as an HTTP chunk, when the caller framed it once for everyone."""
        if self.cut_reason is not None:
            return
        if self.send is not None and not self.blocked:
            if self._write is not None:
                try:
                    # Should the transport pause now, `paused` has run by the time this returns.
                    self._write(chunk if chunk is not None else http_chunk(frame))
                except Exception:  # never let one client's socket stop the fan-out to the rest
                    self.cut(CutReason.CLOSED)
                return
            if self._write_now(frame):
                return
            self.blocked = True
        if len(self.frames) >= self.capacity:
            self.cut(CutReason.SLOW)
            return
        self.frames.append(frame)
        self._wake()

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
            self._settle()
            self._wake()

    def closed(self) -> None:
        """The client went away (as the connection's `Listener`, relay/http_protocol.py)."""
        self.cut(CutReason.CLOSED)

    def cut(self, reason: CutReason) -> None:
        """Drop the subscriber now: nothing more is sent, a write blocked on its socket is abandoned."""
        if self.cut_reason is not None:
            return
        self.cut_reason = reason
        self.frames.clear()
        self.pending = None
        self._settle()
        self._wake()
        if reason is CutReason.SLOW and self.blocked and self.task is not None:
            self.task.cancel()  # it may be stuck in a send to a client that stopped reading
        self.on_cut(self)
