"""One upstream per account across relay processes: a lease in Redis says which process holds it.

With the Redis broker, the hub's `Demand` is `UpstreamLeases`, not the `UpstreamManager`. While
an account is wanted here (local subscribers, or `always_on`), this process contends for
`relay:{acct}:lease` (SET NX PX, the process's token as value); the holder renews it every third
of the lease time (`broker.lease_seconds`) and is the only one to open the account's upstream.
Another process takes over when the holder stops renewing: it died, or it let go
(compare-and-delete) after its subscribers left and `linger_seconds` passed. A holder that finds
its lease taken closes its upstream at once.

The holder writes the newest upstream event id beside the lease (`relay:{acct}:upstream`) as events
arrive, once Redis has the event, and the next holder's upstream resumes from it with
`Last-Event-ID`: so events DialStack sent while no process held the upstream are relayed after
the takeover, as far as DialStack replays them.

While Redis is unreachable the holder keeps its upstream (the broker queues its events), since an
outage that every process sees leaves no one else to take over. The price is a network partition
that cuts only the holder off: the others take over after the lease time and, until the holder can
reach Redis again and finds the lease gone, the account has two upstreams (their events share
upstream ids, so clients still get each once).

`UpstreamStates` makes the upstream state one for all processes: the holder writes it to Redis and
publishes it (`relay:upstream`), the others show it to their subscribers, and while Redis is
unreachable every process tells its subscribers `degraded`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from relay.backoff import Backoff
from relay.brokers.redis import COMMAND_TIMEOUT_SECONDS, UNREACHABLE, seen_key
from relay.channel import ChannelSink, Incoming, UpstreamState, UpstreamStatus
from relay.config import Settings
from relay.hub import Hub
from relay.upstream import UpstreamManager

log = structlog.get_logger(__name__)

CHANNEL = "relay:upstream"  # holders publish each state change of their upstreams here
KEEP_UPSTREAM_MS = 24 * 3600 * 1000  # the newest upstream id outlives the lease by this
PING_SECONDS = 1.0  # the state subscription pings Redis this often ...
SILENT_SECONDS = 3.0  # ... and counts a link that answers nothing for this long as broken
RELEASE_TIMEOUT_SECONDS = 2.0
SHARE_RETRY_MAX_SECONDS = 1.0  # a state or id Redis could not take is written again this soon
_TAKEN_BACK = 2  # what _RENEW answers when the lease was gone and is this process's again
_FORGOTTEN = 2  # what _CLAIM answers when Redis lost a lease this process saw held

# KEYS: lease, upstream. ARGV: token, lease ms, '1' if this process has found the lease held,
# keep ms. The holder's token stays beside the lease (KEEP_UPSTREAM_MS) after it goes, so a lease
# gone together with it means Redis lost its data (a restart): the holder is about to take its
# lease back, and a process that saw it held does not claim it now. Returns {1, newest upstream
# id or ''} when claimed, {2, ''} for that, else {0, ms until the lease expires}.
_CLAIM = """
if ARGV[3] == '1' and redis.call('EXISTS', KEYS[1], KEYS[2]) == 0 then
  return {2, ''}
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  redis.call('HSET', KEYS[2], 'holder', ARGV[1])
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
  return {1, redis.call('HGET', KEYS[2], 'last_event_id') or ''}
end
return {0, redis.call('PTTL', KEYS[1])}
"""

# KEYS: lease, upstream. ARGV: token, lease ms, keep ms.
# A missing lease is taken back: Redis lost it (a restart) or it lapsed while the holder could not
# reach Redis, and nobody took it meanwhile. Returns 1 when renewed, 2 when taken back, 0 when
# another process holds it.
_RENEW = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('HSET', KEYS[2], 'holder', ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
if holder then
  return 1
end
return 2
"""

# An upstream id is kept as the one to resume from only once the broker has appended its event
# (its id is in the seen set): an event still queued in a holder during an outage is not in Redis,
# so resuming after it could lose it. Returns false when the event is not there yet.
_RESUME_FROM = """
local function resume_from(upstream, seen, id)
  if id == '' then
    return true
  end
  if not redis.call('ZSCORE', seen, id) then
    return false
  end
  redis.call('HSET', upstream, 'last_event_id', id)
  return true
end
"""

# KEYS: lease, upstream, seen. ARGV: token, newest upstream id ('' if none), keep ms.
_RELEASE = (
    _RESUME_FROM
    + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1])
redis.call('HDEL', KEYS[2], 'status')
resume_from(KEYS[2], KEYS[3], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return 1
"""
)

_SHARED = 1
_ID_NOT_IN_REDIS_YET = 2

# KEYS: lease, upstream, seen. ARGV: token, state (JSON, '' if unchanged), channel, keep ms, newest
# upstream id ('' if unchanged). Only the holder's counts. Returns 0 when this process is not the
# holder, 1 when written, 2 when written but for the id, whose event is not in Redis yet.
_SHARE = (
    _RESUME_FROM
    + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
if ARGV[2] ~= '' then
  redis.call('HSET', KEYS[2], 'status', ARGV[2])
  redis.call('PUBLISH', ARGV[3], ARGV[2])
end
local written = resume_from(KEYS[2], KEYS[3], ARGV[5])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
if written then
  return 1
end
return 2
"""
)


def lease_key(account_id: str) -> str:
    return f"relay:{{{account_id}}}:lease"


def upstream_key(account_id: str) -> str:
    return f"relay:{{{account_id}}}:upstream"


def process_token() -> str:
    """Names the lease holder: host and pid for operators, random so a restarted pid differs."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def encode_status(status: UpstreamStatus) -> str:
    return json.dumps(dataclasses.asdict(status))


def decode_status(text: str) -> UpstreamStatus | None:
    try:
        fields: dict[str, Any] = json.loads(text)
        return UpstreamStatus(**{**fields, "state": UpstreamState(fields["state"])})
    except (ValueError, TypeError, KeyError):
        return None


def held_elsewhere(local: UpstreamStatus | None, shown: UpstreamStatus | None) -> bool:
    """Whether the account's upstream runs in another process, as far as this one can tell.

    `local` is this process's upstream of the account, `shown` what the hub shows its
    subscribers here: with the Redis broker, the lease holder's state (idle once they are gone).
    """
    return (local is None or local.state is UpstreamState.IDLE) and (
        shown is not None and shown.state is not UpstreamState.IDLE
    )


class Upstreams(Protocol):
    """What the leases use of the `UpstreamManager`."""

    def acquire(self, account_id: str, *, last_event_id: str = "") -> None: ...

    def release(self, account_id: str) -> None: ...

    def drop(self, account_id: str) -> None: ...

    def status_of(self, account_id: str) -> UpstreamStatus | None: ...


class UpstreamStates:
    """The `ChannelSink` of this process's upstreams, and the upstream state its subscribers see.

    Events pass straight to the hub. A state change of an upstream this process holds the lease
    of goes to the hub and, through Redis, to the other processes; for an account held elsewhere
    the hub gets the holder's states. `degraded` replaces them all while Redis is unreachable.
    """

    def __init__(self, redis: Redis, hub: Hub, token: str) -> None:
        self._redis = redis
        self._hub = hub
        self._token = token
        self._share_script = redis.register_script(_SHARE)
        self._followed: set[str] = set()  # accounts with local subscribers
        self._owned: set[str] = set()  # accounts whose lease this process holds
        self._local: dict[str, UpstreamStatus] = {}  # newest state of each upstream of this process
        self._resume: dict[str, str] = {}  # newest upstream event id from this process's upstream
        self._unwritten: dict[str, str] = {}  # held accounts' newest ids not yet beside the lease
        self._heard: dict[str, int] = {}  # shared states received per account (orders fetches)
        self._unshared: dict[str, UpstreamStatus] = {}  # held accounts' states not yet in Redis
        self._share_wanted = asyncio.Event()
        self._reachable = True
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._spawn(self._listen(), "upstream states")
        self._spawn(self._write(), "upstream states writer")

    async def aclose(self) -> None:
        for task in tuple(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, coroutine: Any, name: str) -> None:
        task = asyncio.create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- ChannelSink (this process's upstreams) ------------------------------------------------

    async def publish(self, account_id: str, event: Incoming) -> bool:
        published = await self._hub.publish(account_id, event)
        if event.upstream_id is not None and account_id in self._owned:
            # Written at once (not with the renewals): the less it lags, the less DialStack has
            # to replay to the next holder after a crash.
            self._resume[account_id] = self._unwritten[account_id] = event.upstream_id
            self._share_wanted.set()
        return published

    def upstream_changed(self, status: UpstreamStatus) -> None:
        self._local[status.account_id] = status
        if status.account_id not in self._owned:
            return  # an upstream still lingering after the lease went elsewhere: not the truth
        self._unshared[status.account_id] = status
        self._share_wanted.set()
        if self._reachable:
            self._hub.upstream_changed(status)

    def resume_id(self, account_id: str) -> str:
        """The newest upstream event id this process received for the account ('' if none)."""
        return self._resume.get(account_id, "")

    # -- told by the leases --------------------------------------------------------------------

    def follow(self, account_id: str) -> None:
        """The account has local subscribers: show them its state, wherever its upstream runs."""
        self._followed.add(account_id)
        if account_id in self._owned:
            return
        # Until the shared state is read, say what is true of an upstream not known to be up.
        state = UpstreamState.CONNECTING if self._reachable else UpstreamState.DEGRADED
        self._hub.upstream_changed(UpstreamStatus(account_id, state, time.time(), 0, 0))
        if self._reachable:
            self._spawn(self._fetch(account_id), f"upstream state of {account_id}")

    def unfollow(self, account_id: str) -> None:
        self._followed.discard(account_id)
        if account_id not in self._owned:
            # The holder's states are no longer followed: what the hub shows would go stale.
            self._hub.upstream_changed(
                UpstreamStatus(account_id, UpstreamState.IDLE, time.time(), 0, 0)
            )

    def own(self, account_id: str, status: UpstreamStatus | None) -> None:
        """This process holds the lease; `status` is its upstream's state now."""
        self._owned.add(account_id)
        if status is not None:
            self.upstream_changed(status)

    def disown(self, account_id: str) -> None:
        self._owned.discard(account_id)
        self._unshared.pop(account_id, None)
        self._unwritten.pop(account_id, None)
        self._resume.pop(account_id, None)
        if account_id in self._followed and self._reachable:
            self._spawn(self._fetch(account_id), f"upstream state of {account_id}")

    # -- the holders' states -------------------------------------------------------------------

    def _show_shared(self, status: UpstreamStatus) -> None:
        account_id = status.account_id
        if account_id not in self._followed or account_id in self._owned or not self._reachable:
            return
        # An idle upstream is about to be taken over: its subscribers keep the last real state.
        if status.state is not UpstreamState.IDLE:
            self._hub.upstream_changed(status)

    async def _fetch(self, account_id: str) -> None:
        heard = self._heard.get(account_id, 0)
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT_SECONDS):
                text = await self._redis.hget(upstream_key(account_id), "status")
        except UNREACHABLE:
            return  # the subscription notices the outage; the state is fetched again after it
        status = decode_status(text) if isinstance(text, str) else None
        # A state published while this was on its way is newer than what was read.
        if status is not None and self._heard.get(account_id, 0) == heard:
            self._show_shared(status)

    async def _listen(self) -> None:
        backoff = Backoff(0.1, 2.0)
        while True:
            try:
                async with self._redis.pubsub() as pubsub:
                    async with asyncio.timeout(COMMAND_TIMEOUT_SECONDS):
                        await pubsub.subscribe(CHANNEL)
                    self._reached()
                    backoff.reset()
                    await self._receive(pubsub)
            except UNREACHABLE as exc:
                self._unreached(str(exc))
            except Exception as exc:  # a bug here must not leave the states unfollowed for good
                log.error("upstream state subscription failed", exc_info=True)
                self._unreached(type(exc).__name__)
            await asyncio.sleep(backoff.next_delay())

    async def _receive(self, pubsub: PubSub) -> None:
        loop = asyncio.get_running_loop()
        heard_at = pinged_at = loop.time()
        while True:
            # Not ignore_subscribe_messages: redis-py (8.1, decoding replies) takes the answer to
            # a ping for one of those and would drop it, leaving the link silent.
            message = await pubsub.get_message(timeout=PING_SECONDS)
            now = loop.time()
            if message is not None:
                heard_at = now
                if message["type"] == "message":
                    self._on_message(message["data"])
            if now - heard_at > SILENT_SECONDS:
                raise ConnectionError(f"Redis answered nothing for {SILENT_SECONDS} s")
            if now - pinged_at >= PING_SECONDS:
                pinged_at = now
                await pubsub.ping()

    def _on_message(self, data: str) -> None:
        status = decode_status(data)
        if status is None:
            log.warning("unreadable upstream state in Redis", channel=CHANNEL)
            return
        self._heard[status.account_id] = self._heard.get(status.account_id, 0) + 1
        self._show_shared(status)

    def _unreached(self, reason: str) -> None:
        if not self._reachable:
            return
        self._reachable = False
        log.warning(
            "redis unreachable; subscribers told the upstream state is degraded", reason=reason
        )
        detail = "Redis is unreachable: events are held until it answers again"
        for account_id in self._followed | self._owned:
            previous = self._hub.upstream_status(account_id)
            status = (
                dataclasses.replace(previous, state=UpstreamState.DEGRADED, detail=detail)
                if previous is not None
                else UpstreamStatus(account_id, UpstreamState.DEGRADED, time.time(), 0, 0, detail)
            )
            self._hub.upstream_changed(dataclasses.replace(status, since=time.time()))

    def _reached(self) -> None:
        if self._reachable:
            return
        self._reachable = True
        log.info("redis reachable again; upstream states shared again")
        for account_id in self._followed | self._owned:
            local = self._local.get(account_id)
            if account_id in self._owned and local is not None:
                self.upstream_changed(local)
            elif account_id not in self._owned:
                self._spawn(self._fetch(account_id), f"upstream state of {account_id}")

    async def _write(self) -> None:
        """Write the held accounts' newest states and upstream ids to Redis, one at a time."""
        backoff = Backoff(0.1, SHARE_RETRY_MAX_SECONDS)
        while True:
            await self._share_wanted.wait()
            self._share_wanted.clear()
            for account_id in list(self._unshared.keys() | self._unwritten.keys()):
                status = self._unshared.get(account_id)
                resume = self._unwritten.get(account_id, "")
                written = await self._share(account_id, status, resume)
                if not written and account_id in self._owned:
                    continue  # Redis is down, or the lease is being taken back: retried below
                # Unless a newer one came meanwhile, which is next.
                if status is not None and self._unshared.get(account_id) is status:
                    del self._unshared[account_id]
                if written != _ID_NOT_IN_REDIS_YET and self._unwritten.get(account_id) == resume:
                    del self._unwritten[account_id]
                if written == _SHARED:
                    backoff.reset()
            if self._unshared or self._unwritten:
                # Retry later, or as soon as there is news.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(backoff.next_delay()):
                        await self._share_wanted.wait()
                self._share_wanted.set()

    async def _share(self, account_id: str, status: UpstreamStatus | None, resume: str) -> int:
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT_SECONDS):
                written: int = await self._share_script(
                    keys=[lease_key(account_id), upstream_key(account_id), seen_key(account_id)],
                    args=[
                        self._token,
                        encode_status(status) if status is not None else "",
                        CHANNEL,
                        KEEP_UPSTREAM_MS,
                        resume,
                    ],
                )
        except UNREACHABLE:
            return 0
        except Exception:  # retried like an outage, but said
            log.error("upstream state not shared", account=account_id, exc_info=True)
            return 0
        return written


@dataclass(eq=False)
class _Lease:
    """This process's side of one account's lease."""

    wanted: int = 0  # local subscribers' demand (the hub's acquire/release), always_on included
    held: bool = False  # this process holds the lease, as far as it knows
    counted: bool = False  # acquired from the UpstreamManager and not released
    unwanted_at: float | None = None  # loop time the demand dropped to 0
    resume_from: str = ""  # the previous holder's newest upstream id, until the upstream opens
    seen_held: bool = False  # a claim found the lease held by another process
    claim_after: float = 0.0  # loop time before which this process does not contend
    woken: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)


class UpstreamLeases:
    """The hub's `Demand` when processes share Redis: the upstream opens only where the lease is."""

    def __init__(
        self,
        redis: Redis,
        upstreams: Upstreams,
        states: UpstreamStates,
        settings: Settings,
        token: str,
    ) -> None:
        self._upstreams = upstreams
        self._states = states
        self._settings = settings
        self._token = token
        self._lease_seconds = settings.broker.lease_seconds
        self._renew_every = self._lease_seconds / 3
        self._linger = settings.upstream.linger_seconds
        self._claim = redis.register_script(_CLAIM)
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)
        self._leases: dict[str, _Lease] = {}
        self._letting_go: dict[str, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    def start(self) -> None:
        """Want the always_on accounts for as long as this process runs."""
        for account in self._settings.accounts:
            if account.always_on:
                self.acquire(account.id)

    def held(self) -> list[str]:
        """The accounts whose lease this process holds."""
        return sorted(a for a, lease in self._leases.items() if lease.held)

    # -- Demand --------------------------------------------------------------------------------

    def acquire(self, account_id: str) -> None:
        if self._closed:
            return
        lease = self._leases.get(account_id)
        if lease is None:
            lease = self._leases[account_id] = _Lease()
            # A lease of this account still being let go is released before it is contended
            # again: both carry this process's token.
            after = self._letting_go.get(account_id)
            task = asyncio.create_task(
                self._hold(account_id, lease, after), name=f"lease {account_id}"
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        lease.wanted += 1
        if lease.wanted > 1:
            return
        lease.unwanted_at = None
        self._states.follow(account_id)
        self._settle(account_id, lease)

    def release(self, account_id: str) -> None:
        lease = self._leases.get(account_id)
        if lease is None or lease.wanted <= 0:
            log.error("upstream lease released more often than acquired", account=account_id)
            return
        lease.wanted -= 1
        if lease.wanted:
            return
        lease.unwanted_at = asyncio.get_running_loop().time()
        self._states.unfollow(account_id)
        # The manager keeps the upstream `linger_seconds` more; the lease is kept as long, so
        # that no other process opens one meanwhile.
        self._settle(account_id, lease)
        lease.woken.set()

    async def aclose(self) -> None:
        """Let go of every lease; call once the UpstreamManager has closed its connections."""
        self._closed = True
        for lease in self._leases.values():
            lease.wanted = 0
            lease.unwanted_at = -self._linger  # long enough ago: done at the next check
            lease.woken.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- the lease -----------------------------------------------------------------------------

    def _settle(self, account_id: str, lease: _Lease) -> None:
        """Counted in the manager exactly while the lease is held and the account wanted here."""
        if lease.held and lease.wanted > 0 and not lease.counted:
            lease.counted = True
            self._upstreams.acquire(account_id, last_event_id=lease.resume_from)
            lease.resume_from = ""  # from here on, this process's upstream knows better
            self._states.own(account_id, self._upstreams.status_of(account_id))
        elif lease.counted and not (lease.held and lease.wanted > 0):
            lease.counted = False
            self._upstreams.release(account_id)

    async def _hold(self, account_id: str, lease: _Lease, after: asyncio.Task[None] | None) -> None:
        if after is not None:
            await asyncio.wait((after,))
        loop = asyncio.get_running_loop()
        backoff = Backoff(0.1, self._renew_every)
        try:
            while not self._done_with(lease, loop.time()):
                try:
                    # Bounded by the renewal period: a stuck call must not outlive the lease.
                    async with asyncio.timeout(self._renew_every):
                        delay = await self._step(
                            account_id, lease, loop.time() >= lease.claim_after
                        )
                    backoff.reset()
                except UNREACHABLE as exc:
                    if lease.held and not backoff.attempt:
                        # Kept all the same: an outage every process sees leaves no one else.
                        log.warning(
                            "upstream lease not renewed: redis unreachable",
                            account=account_id,
                            reason=str(exc),
                        )
                    if not lease.held:
                        # After an outage the holder takes its lease back first, rather than
                        # every process racing for it (Redis may have restarted empty).
                        lease.claim_after = loop.time() + self._lease_seconds
                    delay = backoff.next_delay()
                except Exception:  # a bug here must not end the contention for good
                    log.error("upstream lease step failed", account=account_id, exc_info=True)
                    delay = backoff.next_delay()
                if lease.held and lease.unwanted_at is not None:
                    delay = min(delay, max(0.0, lease.unwanted_at + self._linger - loop.time()))
                lease.woken.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await lease.woken.wait()
        finally:
            if self._leases.get(account_id) is lease:
                del self._leases[account_id]
            if lease.held:
                await self._let_go(account_id, lease)

    def _done_with(self, lease: _Lease, now: float) -> bool:
        if lease.wanted > 0 or lease.unwanted_at is None:
            return False
        return not lease.held or now - lease.unwanted_at >= self._linger

    async def _step(self, account_id: str, lease: _Lease, may_claim: bool) -> float:
        """Renew or claim once; returns the seconds until the next step."""
        keys = [lease_key(account_id), upstream_key(account_id)]
        if lease.held:
            renewed = await self._renew(
                keys=keys, args=[self._token, int(self._lease_seconds * 1000), KEEP_UPSTREAM_MS]
            )
            if not renewed:
                self._lost(account_id, lease)
            elif renewed == _TAKEN_BACK:
                # Redis forgot the lease, so it forgot the state shared with it too.
                self._states.own(account_id, self._upstreams.status_of(account_id))
            return self._renew_every
        if lease.wanted == 0 or not may_claim:
            return self._renew_every
        claimed, value = await self._claim(
            keys=keys,
            args=[
                self._token,
                int(self._lease_seconds * 1000),
                int(lease.seen_held),
                KEEP_UPSTREAM_MS,
            ],
        )
        if claimed == _FORGOTTEN:
            # The holder may not have failed a step during the outage, nor this process: a lease
            # time lets it renew, which takes the lease back, before anyone else contends.
            log.info("upstream lease gone with redis's data; the holder takes it back first")
            lease.seen_held = False
            lease.claim_after = asyncio.get_running_loop().time() + self._lease_seconds
            return self._renew_every
        if not claimed:
            lease.seen_held = True
            # Try again as the holder's lease would run out, were it to stop renewing it.
            return min(max(int(value), 10) / 1000, self._renew_every)
        lease.held, lease.resume_from = True, value
        log.info("upstream lease taken", account=account_id, resume_from=value or None)
        self._settle(account_id, lease)
        return self._renew_every

    def _lost(self, account_id: str, lease: _Lease) -> None:
        log.warning("upstream lease lost to another process", account=account_id)
        self._close_upstream(account_id, lease)

    def _close_upstream(self, account_id: str, lease: _Lease) -> None:
        """No longer the holder: the upstream closes now, not after `linger_seconds`, since
        another process may be opening its own."""
        lease.held = lease.counted = False
        self._upstreams.drop(account_id)
        self._states.disown(account_id)

    async def _let_go(self, account_id: str, lease: _Lease) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._letting_go[account_id] = task
        resume = self._states.resume_id(account_id)
        self._close_upstream(account_id, lease)
        try:
            async with asyncio.timeout(RELEASE_TIMEOUT_SECONDS):
                await self._release(
                    keys=[lease_key(account_id), upstream_key(account_id), seen_key(account_id)],
                    args=[self._token, resume, KEEP_UPSTREAM_MS],
                )
        except (TimeoutError, *UNREACHABLE) as exc:
            log.warning("upstream lease left to expire", account=account_id, reason=str(exc))
        else:
            log.info("upstream lease released", account=account_id)
        finally:
            if self._letting_go.get(account_id) is task:
                del self._letting_go[account_id]


@contextlib.asynccontextmanager
async def leased_upstreams(
    redis: Redis,
    hub: Hub,
    settings: Settings,
    upstreams_for: Callable[[ChannelSink], UpstreamManager],
) -> AsyncIterator[UpstreamManager]:
    """This process's upstreams, each opened only where its account's lease is held.

    Sets `hub.demand`; on exit closes the connections first, then lets go of the leases.
    """
    token = process_token()
    states = UpstreamStates(redis, hub, token)
    upstreams = upstreams_for(states)
    leases = UpstreamLeases(redis, upstreams, states, settings, token)
    hub.demand = leases
    states.start()
    leases.start()
    try:
        yield upstreams
    finally:
        await upstreams.aclose()
        await leases.aclose()
        await states.aclose()
