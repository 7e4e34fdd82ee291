"""Accounts → subscribers: admission, replay handover and fan-out.

Sources (upstreams, webhooks) write into the hub as a `ChannelSink`; the broker numbers and keeps each
event and hands it back through `deliver`; on the loop's next turn the account's audience
(relay/audience.py) writes the once-encoded frame to every matching local subscriber, awaiting none.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import structlog

from relay.audience import Audience
from relay.brokers.base import Broker
from relay.channel import Incoming, UpstreamState, UpstreamStatus
from relay.http_protocol import http_chunk
from relay.metrics import Metrics
from relay.sse import encode_comment, encode_event
from relay.stored import Stored, id_key
from relay.subscriber import CutReason, Interest, Subscriber

log = structlog.get_logger(__name__)

# What clients see of the upstream state: the first connection counts as reconnecting too.
_CLIENT_STATE = {
    UpstreamState.CONNECTING: "reconnecting",
    UpstreamState.CONNECTED: "connected",
    UpstreamState.RECONNECTING: "reconnecting",
    UpstreamState.UNAUTHORIZED: "unauthorized",
    UpstreamState.DEGRADED: "degraded",
}


class Demand(Protocol):
    """Told when an account gains its first local subscriber and loses its last (the upstream manager)."""

    def acquire(self, account_id: str) -> None: ...

    def release(self, account_id: str) -> None: ...


class Full(Exception):
    """A client limit is reached; answer 429 with Retry-After."""

    def __init__(self, limit: str, reason: str, retry_after: int = 5) -> None:
        super().__init__(reason)
        self.limit = limit  # the setting, as the relay_clients_rejected metric labels it
        self.reason = reason
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class Limits:
    max_clients: int
    max_clients_per_account: int
    max_clients_per_ip: int
    client_buffer_events: int


@dataclass(slots=True)
class Opened:
    """A new subscription and what to send before live events: a reset notice and/or the replay."""

    subscriber: Subscriber
    reset: str | None  # the Last-Event-ID that fell outside the replay window
    replay: list[Stored]


HEARTBEAT = encode_comment("heartbeat")
HEARTBEAT_CHUNK = http_chunk(HEARTBEAT)


@functools.lru_cache(maxsize=1024)  # every client connecting while the state holds gets the same
def upstream_frame(status: UpstreamStatus) -> bytes:
    payload = {
        "state": _CLIENT_STATE.get(status.state, status.state.value),
        "since": status.since,
        "reconnects": status.reconnects,
    }
    if status.detail:
        payload["detail"] = status.detail
    return encode_event(json.dumps(payload), event="relay.upstream")


def reset_frame(last_event_id: str) -> bytes:
    payload = {
        "reason": "Last-Event-ID is outside the replay window; refetch your state",
        "last_event_id": last_event_id[:64],
    }
    return encode_event(json.dumps(payload), event="relay.reset")


class Hub:
    def __init__(
        self,
        broker: Broker,
        limits: Limits,
        metrics: Metrics,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._broker = broker
        self._limits = limits
        self._metrics = metrics
        self._clock = clock
        self._accounts: dict[str, Audience] = {}
        self._count = 0
        self._per_peer: dict[str, int] = {}  # open streams by client address
        # Set while no client is connected: the graceful drain waits on it.
        self.emptied = asyncio.Event()
        self.emptied.set()
        self._status: dict[str, UpstreamStatus] = {}
        self._outbox: dict[str, list[Stored]] = {}  # events waiting for the next fan-out
        self._tally = metrics.tally
        self.demand: Demand | None = None
        self._on_cut = self._cut  # one bound method for every subscriber, not one each
        metrics.clients.set_function(self.clients)  # read when scraped, not set per connection
        broker.attach(self.deliver)

    # -- sources -------------------------------------------------------------------------------

    async def publish(self, account_id: str, event: Incoming, source: str = "upstream") -> bool:
        """Publish into the account's channel; False when it was a duplicate and dropped."""
        stored = await self._broker.publish(account_id, event)
        if stored is None:
            self._metrics.duplicates.inc()
            return False
        self._tally.took(source)
        return True

    def upstream_changed(self, status: UpstreamStatus) -> None:
        previous = self._status.get(status.account_id)
        self._status[status.account_id] = status
        log.info(
            "upstream state",
            account=status.account_id,
            state=status.state.value,
            reconnects=status.reconnects,
            detail=status.detail or None,
        )
        if status.state is UpstreamState.IDLE:
            return
        if previous is not None and previous.state is status.state:
            return
        audience = self._accounts.get(status.account_id)
        if audience is not None:
            frame = upstream_frame(status)
            audience.broadcast(frame, http_chunk(frame))

    def upstream_status(self, account_id: str) -> UpstreamStatus | None:
        return self._status.get(account_id)

    # -- fan-out -------------------------------------------------------------------------------

    def deliver(self, account_id: str, event: Stored) -> None:
        """Queue `event` for the account's subscribers; they get it on the loop's next turn.

        Events that arrive together (a busy relay reads several per upstream chunk) reach each
        client as one write instead of one per event.
        """
        if account_id not in self._accounts:
            return
        batch = self._outbox.get(account_id)
        if batch is None:
            self._outbox[account_id] = [event]
            asyncio.get_running_loop().call_soon(self._fan_out, account_id)
        else:
            batch.append(event)

    def _fan_out(self, account_id: str) -> None:
        events = self._outbox.pop(account_id)
        audience = self._accounts.get(account_id)
        if audience is None:
            return
        started = self._clock()
        clients = audience.fan_out(events)
        self._tally.fanned_out(clients * len(events), self._clock() - started)

    # -- subscribers ---------------------------------------------------------------------------

    def clients(self, account_id: str | None = None) -> int:
        if account_id is None:
            return self._count
        return len(self._accounts.get(account_id, ()))

    def accounts(self) -> list[str]:
        return list(self._accounts)

    def admit(
        self,
        account_id: str,
        *,
        events: frozenset[str] | None,
        user_id: str | None,
        peer: str | None = None,
    ) -> Subscriber:
        """Admit a client from address `peer` to live events; raises Full past a limit (uncounted:
        `subscribe` counts the refusals it answers)."""
        if self._count >= self._limits.max_clients:
            raise Full("max_clients", "the relay is at max_clients")
        if len(self._accounts.get(account_id, ())) >= self._limits.max_clients_per_account:
            raise Full("max_clients_per_account", "this account is at max_clients_per_account")
        if peer is not None and self._per_peer.get(peer, 0) >= self._limits.max_clients_per_ip:
            raise Full("max_clients_per_ip", "this address is at max_clients_per_ip")
        audience = self._accounts.get(account_id)
        if audience is None:
            audience = self._open_account(account_id)
        subscriber = Subscriber(
            account_id,
            Interest(events, user_id),
            audience,
            peer=peer,
            capacity=self._limits.client_buffer_events,
            on_cut=self._on_cut,
        )
        self._add(subscriber, audience)
        return subscriber

    async def subscribe(
        self,
        account_id: str,
        *,
        events: frozenset[str] | None,
        user_id: str | None,
        last_event_id: str | None,
        peer: str | None = None,
    ) -> Opened:
        """`admit`, counting a refusal, then the replay after `last_event_id`: replay and live are
        handed over gap- and repeat-free."""
        try:
            subscriber = self.admit(account_id, events=events, user_id=user_id, peer=peer)
        except Full as exc:
            self._metrics.rejected.labels(exc.limit).inc()
            raise
        if not last_event_id:
            return Opened(subscriber, reset=None, replay=[])
        subscriber.begin_replay()
        try:
            replay = await self._broker.replay(account_id, last_event_id)
        except BaseException:
            self.unsubscribe(subscriber)
            raise
        if replay is None:
            self._metrics.resets.inc()
            subscriber.end_replay(None)
            return Opened(subscriber, reset=last_event_id, replay=[])
        self._metrics.replays.inc()
        bound = replay[-1].key if replay else id_key(last_event_id)
        wanted = [event for event in replay if subscriber.wants(event)]
        subscriber.end_replay(bound)
        return Opened(subscriber, reset=None, replay=wanted)

    def _open_account(self, account_id: str) -> Audience:
        audience = self._accounts[account_id] = Audience()
        self._broker.watch(account_id)
        if self.demand is not None:
            self.demand.acquire(account_id)
        return audience

    def _add(self, subscriber: Subscriber, audience: Audience) -> None:
        audience.add(subscriber)
        self._count += 1
        if subscriber.peer is not None:
            self._per_peer[subscriber.peer] = self._per_peer.get(subscriber.peer, 0) + 1
        self.emptied.clear()

    def unsubscribe(self, subscriber: Subscriber) -> None:
        audience = self._accounts.get(subscriber.account_id)
        if audience is None or subscriber not in audience:
            return
        audience.remove(subscriber)
        self._count -= 1
        if subscriber.peer is not None:
            if (left := self._per_peer[subscriber.peer] - 1) > 0:
                self._per_peer[subscriber.peer] = left
            else:
                del self._per_peer[subscriber.peer]
        if not self._count:
            self.emptied.set()
        if not audience:
            del self._accounts[subscriber.account_id]
            self._broker.unwatch(subscriber.account_id)
            if self.demand is not None:
                self.demand.release(subscriber.account_id)

    def finish_all(self, farewell: Callable[[], bytes]) -> int:
        """End every stream cleanly with its own `farewell()` frame; returns how many were told."""
        subscribers = [s for audience in self._accounts.values() for s in audience]
        for subscriber in subscribers:
            subscriber.finish(farewell())
        return len(subscribers)

    def _cut(self, subscriber: Subscriber) -> None:
        if subscriber.cut_reason is CutReason.SLOW:
            self._metrics.slow_disconnects.inc()
            log.info("slow client cut", account=subscriber.account_id)
        self.unsubscribe(subscriber)

    async def heartbeats(self, interval: float) -> None:
        """A comment to every client each `interval`: one loop for all, not a timer per connection."""
        while True:
            await asyncio.sleep(interval)
            for audience in tuple(self._accounts.values()):
                audience.broadcast(HEARTBEAT, HEARTBEAT_CHUNK)
