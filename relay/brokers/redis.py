"""The Redis broker (`redis://`): events, replay and de-duplication shared by every relay process.

Each account has a Redis Stream, `relay:{acct}:events`, whose entry ids are the relay ids, so a
Last-Event-ID given to one process means the same on every other. An event is appended by one Lua
script that drops a repeated upstream id, appends, and trims the stream to the replay window (as
Centrifuge's Redis broker does); the newest trimmed id is kept as the stream's
`max-deleted-entry-id`, so a replay can tell "nothing missed" from "too old" (a reset).

Live events reach subscribers the same way whichever process appended them: one reader task per
process runs XREAD over the streams of the accounts it has subscribers for, and hands each entry to
the hub in id order.

While Redis is unreachable, events are queued here (up to `BACKLOG_EVENTS`) and appended in order
once it answers again; nothing is delivered meanwhile, since only Redis gives events their ids.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import Any

import structlog
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import KeyT, StreamIdT

from relay.backoff import Backoff
from relay.brokers.base import Deliver
from relay.channel import Incoming
from relay.config import ReplaySettings
from relay.stored import Stored, id_key

log = structlog.get_logger(__name__)

DEDUP_WINDOW = 10_000  # upstream ids remembered per account, as the memory broker does
IDLE_EXPIRY_MS = 24 * 3600 * 1000  # an account's keys outlive its last event by this, plus max age
BACKLOG_EVENTS = 10_000  # events held in this process while Redis is unreachable
COMMAND_TIMEOUT_SECONDS = 5.0  # a command unanswered this long: the link is taken for dead
BLOCK_MS = 5_000  # one XREAD waits this long for new entries before it is issued again
READ_BATCH = 500  # entries per stream per XREAD
LOCATE_TIMEOUT_SECONDS = 2.0  # a replay waits this long for the live reader to be in place
UNNUMBERED = "0-0"  # the id of an event queued during an outage: its real one is not known yet
_MAX_ID_PART = 2**64 - 1  # stream id parts are unsigned 64-bit
# Errors that mean "Redis cannot be reached now" (OSError covers the builtin TimeoutError), as
# opposed to a bug in a script or a command.
UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError)

# Trims the stream to the window: at most ARGV max events, none older than the horizon. The newest
# id it removes becomes the stream's max-deleted-entry-id (XTRIM alone does not record it).
_TRIM = """
local function trim(key, max_events, horizon_ms)
  local deleted = false
  local excess = redis.call('XLEN', key) - max_events
  if excess > 0 then
    local gone = redis.call('XRANGE', key, '-', '+', 'COUNT', excess)
    deleted = gone[#gone][1]
    redis.call('XTRIM', key, 'MAXLEN', max_events)
  end
  if horizon_ms > 0 then
    local horizon = horizon_ms .. '-0'
    local old = redis.call('XREVRANGE', key, '(' .. horizon, '-', 'COUNT', 1)
    if #old > 0 then
      deleted = old[1][1]
      redis.call('XTRIM', key, 'MINID', horizon)
    end
  end
  return deleted
end

local function now_ms()
  local time = redis.call('TIME')
  return tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
end
"""

# KEYS: events stream, seen upstream ids. ARGV: type, data, upstream id ('' for none), max events,
# max age ms, dedup window, idle expiry ms. Returns the new relay id, or nil for a duplicate.
_PUBLISH = (
    _TRIM
    + """
local now = now_ms()
if ARGV[3] ~= '' then
  if redis.call('ZADD', KEYS[2], 'NX', now, ARGV[3]) == 0 then
    return false
  end
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -tonumber(ARGV[6]) - 1)
  redis.call('PEXPIRE', KEYS[2], ARGV[7] + ARGV[5])
end
-- A stream created now (first event, or Redis lost its data) knows nothing of earlier ids:
-- marking its first entry as deleted makes any earlier Last-Event-ID a reset.
local fresh = redis.call('EXISTS', KEYS[1]) == 0
local id = redis.call('XADD', KEYS[1], '*', 't', ARGV[1], 'd', ARGV[2])
local deleted = trim(KEYS[1], tonumber(ARGV[4]), now - tonumber(ARGV[5]))
if fresh and not deleted then
  deleted = id
end
if deleted then
  redis.call('XSETID', KEYS[1], id, 'MAXDELETEDID', deleted)
end
redis.call('PEXPIRE', KEYS[1], ARGV[7] + ARGV[5])
return id
"""
)

# KEYS: events stream. ARGV: the id to replay after, max events, max age ms.
# Returns nil when the stream does not exist, else {last-generated-id, max-deleted-entry-id, entries}.
_REPLAY = (
    _TRIM
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return false
end
local info = redis.call('XINFO', 'STREAM', KEYS[1])
local last, deleted
for i = 1, #info, 2 do
  if info[i] == 'last-generated-id' then last = info[i + 1] end
  if info[i] == 'max-deleted-entry-id' then deleted = info[i + 1] end
end
local trimmed = trim(KEYS[1], tonumber(ARGV[2]), now_ms() - tonumber(ARGV[3]))
if trimmed then
  redis.call('XSETID', KEYS[1], last, 'MAXDELETEDID', trimmed)
  deleted = trimmed
end
return {last, deleted, redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], '+')}
"""
)


def events_key(account_id: str) -> str:
    # The braces make an account's keys one Redis Cluster hash slot, as its scripts need.
    return f"relay:{{{account_id}}}:events"


def seen_key(account_id: str) -> str:
    return f"relay:{{{account_id}}}:seen"


def connect(url: str) -> Redis:
    """A client that fails fast: one immediate retry (a pooled connection Redis closed), then errors.

    No socket timeout: redis-py enforces it with `asyncio.wait_for`, which on Python 3.11 can
    swallow a cancellation (a cancelled XREAD then blocks on). Callers bound each call with
    `asyncio.timeout` instead.
    """
    return Redis.from_url(
        url,
        decode_responses=True,
        socket_connect_timeout=2.0,
        socket_timeout=None,
        retry=Retry(NoBackoff(), 1),
    )


class BrokerUnavailable(Exception):
    """Redis is unreachable and the local backlog is full: the event could not be kept."""


def _stored(entry_id: str, fields: dict[str, str]) -> Stored:
    return Stored(entry_id, fields["t"], fields["d"])


class RedisBroker:
    def __init__(self, url: str, replay: ReplaySettings) -> None:
        self.redis = connect(url)
        self._max_events = replay.max_events
        self._max_age_ms = int(replay.max_age_seconds * 1000)
        self._publish = self.redis.register_script(_PUBLISH)
        self._replay = self.redis.register_script(_REPLAY)
        self._deliver: Deliver = lambda account_id, event: None
        # Watched accounts, each with an event set once the reader knows where to read it from.
        self._watched: dict[str, asyncio.Event] = {}
        self._positions: dict[str, str] = {}  # watched account -> last id read (or the start)
        self._changed = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self._backlog: deque[tuple[str, Incoming]] = deque()
        self._recovery: asyncio.Task[None] | None = None  # runs while publishing cannot reach Redis

    def attach(self, deliver: Deliver) -> None:
        self._deliver = deliver

    # -- publishing ----------------------------------------------------------------------------

    async def publish(self, account_id: str, event: Incoming) -> Stored | None:
        """The stored event, or None for a repeated upstream id.

        While Redis is unreachable the event joins the backlog and comes back with the id
        `UNNUMBERED`; it is de-duplicated and numbered when appended. Raises BrokerUnavailable
        when the backlog is full.
        """
        if self._recovery is not None:
            return self._defer(account_id, event)
        try:
            relay_id = await self._append(account_id, event)
        except UNREACHABLE as exc:
            # The script may have run before the link broke; its upstream id (if any) then
            # makes the second append a duplicate.
            if self._recovery is None:
                log.warning("redis unreachable; queueing events", reason=str(exc))
                self._recovery = asyncio.create_task(self._recover(), name="redis broker recovery")
            return self._defer(account_id, event)
        return None if relay_id is None else Stored(relay_id, event.type, event.data)

    async def _append(self, account_id: str, event: Incoming) -> str | None:
        async with asyncio.timeout(COMMAND_TIMEOUT_SECONDS):
            relay_id: str | None = await self._publish(
                keys=[events_key(account_id), seen_key(account_id)],
                args=[
                    event.type,
                    event.data,
                    event.upstream_id or "",
                    self._max_events,
                    self._max_age_ms,
                    DEDUP_WINDOW,
                    IDLE_EXPIRY_MS,
                ],
            )
        return relay_id

    def _defer(self, account_id: str, event: Incoming) -> Stored:
        if len(self._backlog) >= BACKLOG_EVENTS:
            raise BrokerUnavailable(
                f"Redis is unreachable and {BACKLOG_EVENTS} events are already waiting for it"
            )
        self._backlog.append((account_id, event))
        return Stored(UNNUMBERED, event.type, event.data)

    async def _recover(self) -> None:
        """Append the backlog in order once Redis answers; publishing goes direct again after."""
        backoff = Backoff(0.1, 2.0)
        appended = 0
        while self._backlog:
            account_id, event = self._backlog[0]
            try:
                appended += await self._append(account_id, event) is not None
            except UNREACHABLE:
                await asyncio.sleep(backoff.next_delay())
                continue
            except Exception:  # Redis refused this event for good: do not hold the rest back
                log.error("queued event dropped", account=account_id, exc_info=True)
            self._backlog.popleft()
        self._recovery = None
        log.info("redis reachable again; queued events appended", events=appended)

    # -- replay --------------------------------------------------------------------------------

    async def replay(self, account_id: str, last_id: str) -> list[Stored] | None:
        try:
            key = id_key(last_id)
        except ValueError:
            return None
        if key[0] > _MAX_ID_PART or key[1] >= _MAX_ID_PART:
            return None
        if not await self._located(account_id):
            log.warning("replay impossible: redis unreachable", account=account_id)
            return None
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT_SECONDS):
                reply = await self._replay(
                    keys=[events_key(account_id)],
                    args=[f"{key[0]}-{key[1]}", self._max_events, self._max_age_ms],
                )
        except UNREACHABLE as exc:
            log.warning("replay impossible: redis unreachable", account=account_id, reason=str(exc))
            return None
        if reply is None:
            return None
        last, deleted, entries = reply
        if key > id_key(last) or key < id_key(deleted):
            return None
        # Entries from a script come as Redis sends them: [id, [field, value, ...]].
        return [
            _stored(entry_id, dict(zip(flat[::2], flat[1::2], strict=True)))
            for entry_id, flat in entries
        ]

    async def _located(self, account_id: str) -> bool:
        """Wait until the live reader reads the account from a point no later than now.

        A replay fetched after that point overlaps the live events instead of leaving a gap; the
        subscriber's replay bound drops the overlap.
        """
        located = self._watched.get(account_id)
        if located is None:
            return True
        try:
            async with asyncio.timeout(LOCATE_TIMEOUT_SECONDS):
                await located.wait()
        except TimeoutError:
            return False
        return True

    async def last_id(self, account_id: str) -> str | None:
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT_SECONDS):
                info = await self.redis.xinfo_stream(events_key(account_id))
        except RedisError as exc:
            if "no such key" in str(exc).lower():
                return None
            raise
        last: str = info["last-generated-id"]
        return last

    # -- live events ---------------------------------------------------------------------------

    def watch(self, account_id: str) -> None:
        if account_id in self._watched:
            return
        self._watched[account_id] = asyncio.Event()
        self._changed.set()
        if self._reader is None:
            self._reader = asyncio.create_task(self._read(), name="redis broker reader")

    def unwatch(self, account_id: str) -> None:
        self._watched.pop(account_id, None)
        self._positions.pop(account_id, None)
        self._changed.set()

    async def _read(self) -> None:
        backoff = Backoff(0.1, 2.0)
        unreachable = False
        while True:
            self._changed.clear()
            try:
                await self._locate()
                batch = await self._next_batch()
            except UNREACHABLE as exc:
                if not unreachable:
                    log.warning("redis unreachable; live events paused", reason=str(exc))
                unreachable = True
                await asyncio.sleep(backoff.next_delay())
                continue
            except Exception:  # a bug here must not stop live events for good
                log.error("redis broker reader failed", exc_info=True)
                await asyncio.sleep(backoff.next_delay())
                continue
            if unreachable:
                log.info("redis reachable again; live events resumed")
                unreachable = False
            backoff.reset()
            for account_id, watch, entries in batch:
                if self._watched.get(account_id) is not watch:
                    continue  # unwatched (or watched anew) while the read was in flight
                for entry_id, fields in entries:
                    self._positions[account_id] = entry_id
                    self._deliver(account_id, _stored(entry_id, fields))

    async def _locate(self) -> None:
        """Start newly watched accounts from their newest entry (nothing before is live)."""
        new = {a: w for a, w in self._watched.items() if a not in self._positions}
        if not new:
            return
        async with (
            asyncio.timeout(COMMAND_TIMEOUT_SECONDS),
            self.redis.pipeline(transaction=False) as pipe,
        ):
            for account_id in new:
                pipe.xrevrange(events_key(account_id), count=1)
            newest = await pipe.execute()
        for (account_id, watch), entries in zip(new.items(), newest, strict=True):
            if self._watched.get(account_id) is watch:
                self._positions[account_id] = entries[0][0] if entries else UNNUMBERED
                watch.set()

    async def _next_batch(
        self,
    ) -> list[tuple[str, asyncio.Event, list[tuple[str, dict[str, str]]]]]:
        """New entries of the watched accounts; empty when the watched set changed meanwhile."""
        if not self._positions:
            await self._changed.wait()
            return []
        accounts = {events_key(a): a for a in self._positions}
        watches = {a: self._watched[a] for a in self._positions}
        streams: dict[KeyT, StreamIdT] = {key: self._positions[a] for key, a in accounts.items()}
        read = asyncio.ensure_future(self._xread(streams))
        changed = asyncio.ensure_future(self._changed.wait())
        try:
            await asyncio.wait((read, changed), return_when=asyncio.FIRST_COMPLETED)
        finally:
            changed.cancel()
            if not read.done():
                # redis-py drops the connection of a cancelled command; the next read opens one.
                read.cancel()
                await asyncio.wait((read,))
        if read.cancelled():
            return []
        reply = read.result() or []
        # RESP2 answers [[key, entries], ...], RESP3 {key: entries}; entries are (id, fields).
        pairs = reply.items() if isinstance(reply, dict) else reply
        return [(accounts[key], watches[accounts[key]], entries) for key, entries in pairs]

    async def _xread(self, streams: dict[KeyT, StreamIdT]) -> Any:
        async with asyncio.timeout(BLOCK_MS / 1000 + COMMAND_TIMEOUT_SECONDS):
            return await self.redis.xread(streams, count=READ_BATCH, block=BLOCK_MS)

    # -- operations ----------------------------------------------------------------------------

    async def ready(self) -> bool:
        try:
            async with asyncio.timeout(1.0):
                await self.redis.ping()
        except UNREACHABLE:
            return False
        return True

    async def aclose(self) -> None:
        for task in (self._reader, self._recovery):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._backlog:
            log.error("closing with events Redis never took", events=len(self._backlog))
        await self.redis.aclose()
