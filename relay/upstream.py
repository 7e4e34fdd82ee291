"""One resilient upstream `/v1/events` connection per account, shared by all its subscribers.

`UpstreamManager` counts subscribers per account and keeps one `AccountUpstream` running while
there are any (plus `linger_seconds`, so a page reload does not reconnect upstream). With the
Redis broker its subscribers are the leases (`relay.lease`): they start an upstream with the id
where the previous holder's stopped, and drop it at once when the lease goes elsewhere.

An `AccountUpstream` is a small actor: readers only fetch a session, connect, parse and put what
they read into the account's inbox (a task per stream, whose socket callback parses and puts the
events as the bytes arrive); the actor task alone decides, forwards to the sink and keeps the
state, so no decision races another and a reader can be cancelled at any point without cutting a
publish in half.

Reconnection rules:
- A stream that delivered its first event and then ended (cleanly or not) is followed by
  the stream's `retry:` wait when it sent one; any other failure waits the full-jitter
  backoff; a `Retry-After` header (429, 503) is a floor on either.
- Connecting (session, request, headers, first event) must finish within
  `connect_timeout_seconds`; after that, `idle_timeout_seconds` (when > 0) bounds silence.
- The backoff starts over once a stream proved healthy: it delivered a call event, or stayed
  connected for `_STABLE_SECONDS`. An upstream that accepts and then drops at once keeps
  backing off, and a `retry:` shorter than the backoff does not override it then.
- 401/403 (or a refusing session source) means a fresh session next time; after
  `_AUTH_FAILURES_BEFORE_UNAUTHORIZED` in a row the state is `unauthorized` and retries are at
  least `backoff_max_seconds` apart until one succeeds.

Session rotation: `refresh_before_expiry_seconds` before the session expires (or halfway through
a session shorter than twice that), a new stream is opened with a fresh session while the old
one keeps delivering; once the new one has said `connected`, the old one gets `_GRACE_SECONDS`
to deliver what is in flight and is closed. Both streams carry the same sequence, so `_Overlap`
forwards each event once whichever stream brings it first.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import random
import ssl
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import NamedTuple

import httpx
import structlog

from relay.backoff import Backoff, parse_retry_after
from relay.channel import ChannelSink, Incoming, UpstreamState, UpstreamStatus
from relay.config import Settings, UpstreamSettings
from relay.inbox import Inbox
from relay.sessions import (
    Session,
    SessionError,
    SessionRejected,
    SessionSource,
    describe_http_error,
)
from relay.sse import Event, LineTooLong, SSEParser
from relay.stream_transport import Receive, StreamTransport, for_upstream, read_body

log = structlog.get_logger(__name__)
RESERVED_PREFIX = "relay."  # relay.upstream, relay.reset: the relay's own events

_AUTH_FAILURES_BEFORE_UNAUTHORIZED = 3  # as DialStack's own SDK gives up
_STABLE_SECONDS = 60.0
_GRACE_SECONDS = 0.5
# After a rotation the new stream may still be behind the closed one by a few events; their
# keys are remembered this long so those late copies are recognised.
_OVERLAP_TAIL_SECONDS = 5.0
_MAX_LINE_BYTES = 1024 * 1024  # DialStack events are a few hundred bytes
_INBOX_EVENTS = 256  # readers hold back (and TCP pushes back) when the sink falls this far behind
# One event in this many of each stream, from its first on, is checked to be JSON as DialStack
# documents them: enough to tell an operator that an upstream speaks something else, from the
# start or later on, without parsing every event for it.
_JSON_CHECK_EVERY = 100


class _Kind(enum.Enum):
    DROPPED = "dropped"  # an established stream ended, cleanly or not
    FAILED = "failed"  # could not connect, unexpected answer, line too long, idle too long
    AUTH = "auth"  # 401/403 on /v1/events, or the session source refused us


@dataclass(frozen=True, slots=True)
class _Ended:
    kind: _Kind
    reason: str  # operator-facing, never a secret
    retry_after: float | None = None


@dataclass(eq=False)
class _Stream:
    """One `/v1/events` request; the reader task fills in the session it used."""

    last_event_id: str
    session: Session | None = None
    refresh_at: float | None = None  # unix time to rotate its session; None = never
    parser: SSEParser = field(default_factory=lambda: SSEParser(max_line_bytes=_MAX_LINE_BYTES))
    task: asyncio.Task[None] | None = None
    connected_at: float | None = None  # loop time of its first event
    received: int = 0  # events other than `connected`
    streaming: bool = False  # the reader saw its first event: connecting is over


class _Received(NamedTuple):  # one per event: a tuple is the cheapest immutable message
    stream: _Stream
    event: Event


class _Closed(NamedTuple):
    stream: _Stream
    ended: _Ended


class _Due:
    """Put into the inbox by the actor's timer: the deadline it was waiting for has passed."""


_DUE = _Due()
_Message = _Received | _Closed | _Due


class _Overlap:
    """Forwards each event of two streams carrying the same sequence once.

    The n-th copy of a key on one stream is new only if fewer than n copies were forwarded,
    which also keeps events that legitimately repeat. Keys are SSE ids, or (type, data) when
    the upstream sends none; an id-less event identical to one only the old stream delivered
    shortly before may then be taken for a copy.
    """

    def __init__(self) -> None:
        self._forwarded: Counter[tuple[str, ...]] = Counter()
        self._seen: defaultdict[_Stream, Counter[tuple[str, ...]]] = defaultdict(Counter)
        self.ends_at: float | None = None  # loop time; set once one of the two streams is gone

    def admit(self, stream: _Stream, event: Event) -> bool:
        key = ("id", event.id) if event.id else ("event", event.type, event.data)
        seen = self._seen[stream]
        seen[key] += 1
        if seen[key] <= self._forwarded[key]:
            return False
        self._forwarded[key] = seen[key]
        return True


def _refresh_time(session: Session, fetched_at: float, lead: float) -> float | None:
    if session.expires_at is None:
        return None
    expires = session.expires_at.timestamp()
    if expires <= fetched_at:
        # Already over by our clock (skewed against the source's): rotating would only churn,
        # so rely on the upstream refusing it instead.
        return None
    return expires - min(lead, (expires - fetched_at) / 2)


class AccountUpstream:
    """The upstream connection of one account: started, stopped, observed."""

    def __init__(
        self,
        account_id: str,
        settings: UpstreamSettings,
        sink: ChannelSink,
        sessions: SessionSource,
        http: httpx.AsyncClient,
        rng: random.Random,
    ) -> None:
        self.account_id = account_id
        self._settings = settings
        self._sink = sink
        self._sessions = sessions
        self._http = http
        self._backoff = Backoff(settings.backoff_initial_seconds, settings.backoff_max_seconds, rng)
        self._rotation_backoff = Backoff(
            settings.backoff_initial_seconds, settings.backoff_max_seconds, rng
        )
        self._timeout = httpx.Timeout(
            settings.connect_timeout_seconds, read=settings.idle_timeout_seconds or None
        )
        self._state = UpstreamState.IDLE
        self._since = time.time()
        self._detail = ""
        self._reconnects = 0
        self._events = 0
        self._task: asyncio.Task[None] | None = None
        self._stopping: asyncio.Task[None] | None = None
        self._inbox: Inbox[_Message] = Inbox(_INBOX_EVENTS)
        # The actor's one timer (rotation, handover), re-armed when its deadline changes rather
        # than a timeout around every message.
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._due = False
        self._streams: set[_Stream] = set()
        self._overlap: _Overlap | None = None
        # Carried from stream to stream as an EventSource carries them across reconnections.
        self._last_event_id = ""
        self._retry_seconds: float | None = None
        self._session: Session | None = None  # reused until due for refresh or refused
        self._session_refresh_at: float | None = None
        self._auth_failures = 0
        self._warned_invalid_json = False
        self._warned_reserved = False

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, resume_from: str = "") -> None:
        """Connect unless connected; a connection started now sends `Last-Event-ID: resume_from`
        (when given) rather than the newest id it received itself."""
        if self._task is not None:
            return
        # Subscribers are back after a pause: earlier failures say little about now.
        self._backoff.reset()
        self._auth_failures = 0
        self._set_state(UpstreamState.CONNECTING)
        # A connection being stopped is waited for first, so two never overlap.
        self._task = asyncio.create_task(
            self._run(after=self._stopping, resume_from=resume_from),
            name=f"upstream {self.account_id}",
        )

    def stop(self) -> None:
        """Cancel the connection; `aclose()` also waits until it is gone."""
        task, self._task = self._task, None
        if task is None:
            return
        self._set_state(UpstreamState.IDLE)
        task.cancel()
        self._stopping = task

    async def aclose(self) -> None:
        self.stop()
        if self._stopping is not None:
            await asyncio.wait([self._stopping])
        await self._http.aclose()

    def status(self) -> UpstreamStatus:
        return UpstreamStatus(
            self.account_id, self._state, self._since, self._reconnects, self._events, self._detail
        )

    def _set_state(self, state: UpstreamState, detail: str = "") -> None:
        """Tell the sink; a repeated reconnect is news too, for its counter."""
        if state is not self._state or detail != self._detail:
            self._state, self._detail, self._since = state, detail, time.time()
        self._sink.upstream_changed(self.status())

    # -- the actor -----------------------------------------------------------------------------

    async def _run(self, after: asyncio.Task[None] | None, resume_from: str) -> None:
        if after is not None:
            await asyncio.wait([after])
        if resume_from:
            # Set only now: the stopped connection leaves its own id behind as it closes.
            self._last_event_id = resume_from
        try:
            while True:
                stream: _Stream | None = None
                try:
                    stream, ended = await self._follow()
                except Exception as exc:  # a broken upstream or sink must never take the relay down
                    log.error(
                        "upstream connection failed",
                        account=self.account_id,
                        state=self._state.value,
                        reason=type(exc).__name__,
                        exc_info=True,
                    )
                    await self._close_streams()
                    ended = _Ended(_Kind.FAILED, f"internal error ({type(exc).__name__})")
                await self._wait_to_reconnect(stream, ended)
        finally:
            await self._close_streams()

    async def _follow(self) -> tuple[_Stream, _Ended]:
        """Connect and forward, rotating sessions, until the stream ends for good."""
        loop = asyncio.get_running_loop()
        self._overlap = None  # a reconnect starts after the last event id, not alongside a stream
        primary = self._open(self._reusable_session())
        candidate: _Stream | None = None
        rotate_at: float | None = None
        handover_at: float | None = None
        while True:
            deadline = handover_at if candidate is not None else rotate_at
            message = await self._receive(deadline)
            now = loop.time()
            if message is None and candidate is not None:
                await self._retire(primary)
                primary, candidate, handover_at = candidate, None, None
                rotate_at = self._rotation_deadline(primary)
                self._rotation_backoff.reset()
            elif message is None:
                log.info("rotating upstream session", account=self.account_id)
                candidate = self._open(None, last_event_id=self._resume_id(primary))
                self._overlap = _Overlap()
            elif isinstance(message, _Received):
                stream, event = message.stream, message.event
                if stream.connected_at is None:
                    stream.connected_at = now
                    if stream is primary:
                        self._auth_failures = 0
                        self._set_state(UpstreamState.CONNECTED)
                        rotate_at = self._rotation_deadline(stream)
                    elif stream is candidate:
                        handover_at = now + _GRACE_SECONDS
                if event.type == "connected" or event.type.startswith(RESERVED_PREFIX):
                    # The relay's own names: an upstream must not speak for the relay.
                    self._warn_reserved(event.type)
                else:
                    stream.received += 1
                    await self._forward(stream, event)
            elif message.stream is candidate:
                # The old stream still works: keep it and try rotating again shortly.
                self._end_overlap(now)
                self._absorb(candidate)
                self._streams.discard(candidate)
                candidate, handover_at = None, None
                delay = max(self._rotation_backoff.next_delay(), message.ended.retry_after or 0.0)
                rotate_at = now + delay
                log.warning(
                    "upstream session rotation failed",
                    account=self.account_id,
                    state=self._state.value,
                    reason=message.ended.reason,
                    retry_in=round(delay, 3),
                )
            elif message.stream is primary:
                self._absorb(primary)
                self._streams.discard(primary)
                if candidate is None:
                    return primary, message.ended
                self._end_overlap(now)
                primary, candidate, handover_at = candidate, None, None
                rotate_at = self._rotation_deadline(primary)

    async def _receive(self, deadline: float | None) -> _Received | _Closed | None:
        """The next message, or None once the loop clock reaches `deadline`."""
        if deadline != self._timer_at:
            self._arm(deadline)
        while not self._due:
            message = await self._inbox.get()
            if not isinstance(message, _Due):  # a marker of an earlier deadline is stale
                return message
        self._arm(None)  # this deadline is spent
        return None

    def _arm(self, deadline: float | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at, self._due = None, deadline, False
        if deadline is not None:
            self._timer = asyncio.get_running_loop().call_at(deadline, self._deadline_passed)

    def _deadline_passed(self) -> None:
        self._timer, self._due = None, True
        if self._inbox.empty():  # the actor is waiting: wake it (a busy one sees `_due` next)
            self._inbox.put(_DUE)

    def _warn_reserved(self, event_type: str) -> None:
        if event_type != "connected" and not self._warned_reserved:
            self._warned_reserved = True
            log.warning("upstream event with a relay.* name dropped", account=self.account_id)

    async def _forward(self, stream: _Stream, event: Event) -> None:
        overlap = self._overlap
        if overlap is not None:
            if overlap.ends_at is not None and asyncio.get_running_loop().time() > overlap.ends_at:
                self._overlap = None
            elif not overlap.admit(stream, event):
                return
        self._events += 1
        if stream.received % _JSON_CHECK_EVERY == 1 and not self._warned_invalid_json:
            try:
                json.loads(event.data)
            except ValueError:
                self._warned_invalid_json = True
                # Forwarded anyway (transparency); said once so a chatty upstream cannot flood the log.
                log.warning("invalid JSON from upstream", account=self.account_id, type=event.type)
        await self._sink.publish(
            self.account_id, Incoming(event.type, event.data, upstream_id=event.id or None)
        )

    async def _wait_to_reconnect(self, stream: _Stream | None, ended: _Ended) -> None:
        loop = asyncio.get_running_loop()
        healthy = stream is not None and (
            stream.received > 0
            or (
                stream.connected_at is not None
                and loop.time() - stream.connected_at >= _STABLE_SECONDS
            )
        )
        if healthy:
            self._backoff.reset()
        if ended.kind is _Kind.AUTH:
            self._auth_failures += 1
            if stream is not None and self._session is stream.session:
                self._session = None
        delay = self._backoff.next_delay()
        if ended.kind is _Kind.DROPPED and self._retry_seconds is not None:
            delay = self._retry_seconds if healthy else max(delay, self._retry_seconds)
        delay = max(delay, ended.retry_after or 0.0)
        unauthorized = self._auth_failures >= _AUTH_FAILURES_BEFORE_UNAUTHORIZED
        if unauthorized:
            delay = max(delay, self._settings.backoff_max_seconds)
        self._reconnects += 1
        if unauthorized and ended.kind is _Kind.AUTH:
            detail = (
                f"{self._auth_failures} authentication failures in a row, last: {ended.reason}; "
                "check that the session source (upstream.secret_key, upstream.session_url or "
                "the account's client_secret) is right for this account and environment"
            )
            self._set_state(UpstreamState.UNAUTHORIZED, detail)
        else:
            self._set_state(UpstreamState.RECONNECTING, ended.reason)
        log.warning(
            "upstream disconnected",
            account=self.account_id,
            state=self._state.value,
            reason=ended.reason,
            retry_in=round(delay, 3),
        )
        await asyncio.sleep(delay)

    # -- streams -------------------------------------------------------------------------------

    def _reusable_session(self) -> Session | None:
        refresh_at = self._session_refresh_at
        if refresh_at is not None and time.time() >= refresh_at:
            return None
        return self._session

    def _rotation_deadline(self, stream: _Stream) -> float | None:
        if stream.refresh_at is None:
            return None
        loop = asyncio.get_running_loop()
        return loop.time() + max(0.0, stream.refresh_at - time.time())

    def _resume_id(self, stream: _Stream) -> str:
        return stream.parser.last_event_id or self._last_event_id

    def _absorb(self, stream: _Stream) -> None:
        """Keep what the next stream must inherit from one that is going away."""
        self._last_event_id = self._resume_id(stream)
        if stream.parser.retry_ms is not None:
            self._retry_seconds = stream.parser.retry_ms / 1000

    def _end_overlap(self, now: float) -> None:
        if self._overlap is not None:
            self._overlap.ends_at = now + _OVERLAP_TAIL_SECONDS

    def _open(self, session: Session | None, last_event_id: str | None = None) -> _Stream:
        stream = _Stream(self._last_event_id if last_event_id is None else last_event_id)
        if session is not None:
            stream.session, stream.refresh_at = session, self._session_refresh_at
        stream.task = asyncio.create_task(self._pump(stream), name=f"upstream {self.account_id}")
        self._streams.add(stream)
        return stream

    async def _retire(self, stream: _Stream) -> None:
        """Close a stream that a newer one has taken over from."""
        self._streams.discard(stream)
        await self._cancel(stream)
        self._absorb(stream)
        self._end_overlap(asyncio.get_running_loop().time())

    async def _close_streams(self) -> None:
        self._arm(None)
        streams, self._streams = self._streams, set()
        for stream in streams:
            await self._cancel(stream)
            self._absorb(stream)
        self._overlap = None
        # Whatever they queued belongs to connections that are gone.
        self._inbox = Inbox(_INBOX_EVENTS)

    @staticmethod
    async def _cancel(stream: _Stream) -> None:
        if stream.task is not None:
            stream.task.cancel()
            await asyncio.wait([stream.task])

    async def _pump(self, stream: _Stream) -> None:
        inbox = self._inbox
        try:
            ended = await self._read(stream, inbox)
        except Exception as exc:  # a broken upstream must never take the relay down
            log.error(
                "upstream stream failed",
                account=self.account_id,
                state=self._state.value,
                reason=type(exc).__name__,
                exc_info=True,
            )
            ended = _Ended(_Kind.FAILED, f"internal error ({type(exc).__name__})")
        inbox.put(_Closed(stream, ended))

    async def _read(self, stream: _Stream, inbox: Inbox[_Message]) -> _Ended:
        if stream.session is None:
            try:
                session = await self._sessions.fetch(self.account_id)
            except SessionRejected as exc:
                return _Ended(_Kind.AUTH, str(exc))
            except SessionError as exc:
                return _Ended(_Kind.FAILED, str(exc), exc.retry_after)
            lead = self._settings.refresh_before_expiry_seconds
            stream.session, stream.refresh_at = session, _refresh_time(session, time.time(), lead)
            self._session, self._session_refresh_at = session, stream.refresh_at
        headers = {
            "Authorization": f"Bearer {stream.session.client_secret.get_secret_value()}",
            "Accept": "text/event-stream",
            "Cache-Control": "no-cache",
        }
        if stream.last_event_id:
            headers["Last-Event-ID"] = stream.last_event_id
        connect_timeout = self._settings.connect_timeout_seconds
        try:
            async with (
                contextlib.AsyncExitStack() as stack,
                # Until the first event, so a server that answers and then says nothing is
                # caught too; the idle timeout takes over from there.
                asyncio.timeout(connect_timeout) as connecting,
            ):
                response = await stack.enter_async_context(
                    self._http.stream(
                        "GET", self._settings.events_url, headers=headers, timeout=self._timeout
                    )
                )
                refused = _refusal(response)
                if refused is not None:
                    return refused
                await read_body(response, _receiver(stream, inbox, connecting), inbox.room)
        except TimeoutError:
            return _Ended(_Kind.FAILED, f"/v1/events did not start within {connect_timeout} s")
        except LineTooLong:
            return _Ended(_Kind.FAILED, f"upstream sent a line over {_MAX_LINE_BYTES} bytes")
        except httpx.ReadTimeout:
            idle = self._settings.idle_timeout_seconds
            return _Ended(_Kind.FAILED, f"upstream silent for {idle} s (idle_timeout_seconds)")
        except httpx.HTTPError as exc:
            if stream.streaming:
                return _Ended(_Kind.DROPPED, f"stream broke: {describe_http_error(exc)}")
            return _Ended(_Kind.FAILED, f"cannot connect to /v1/events: {describe_http_error(exc)}")
        return _Ended(_Kind.DROPPED, "upstream closed the stream")


def _receiver(stream: _Stream, inbox: Inbox[_Message], connecting: asyncio.Timeout) -> Receive:
    """What read_body hands the stream's chunks to, in the socket's callback: the stream's parser,
    then the inbox; False once the inbox is full."""

    def receive(chunk: bytes) -> bool:
        for event in stream.parser.feed(chunk):
            if not stream.streaming:
                stream.streaming = True
                # The callback can run after the connect timeout fired and before the reader has
                # heard: the events still go in, as the parser's last id already counts them.
                if not connecting.expired():
                    connecting.reschedule(None)
            inbox.put(_Received(stream, event))
        return not inbox.full()

    return receive


def _refusal(response: httpx.Response) -> _Ended | None:
    """Why a `/v1/events` answer is not an event stream, or None when it is one."""
    status = response.status_code
    if status in (401, 403):
        return _Ended(_Kind.AUTH, f"/v1/events answered {status} to the session's client secret")
    if status != 200:
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        return _Ended(_Kind.FAILED, f"/v1/events answered {status}", retry_after)
    media_type = response.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "text/event-stream":
        return _Ended(
            _Kind.FAILED,
            f"/v1/events answered {media_type or 'no'} content type, not text/event-stream; "
            "check upstream.base_url",
        )
    return None


class UpstreamManager:
    """Opens an account's upstream for its first subscriber and closes it after the last left."""

    def __init__(
        self,
        settings: Settings,
        sink: ChannelSink,
        sessions: SessionSource,
        http: httpx.AsyncClient,
        *,
        tls: ssl.SSLContext | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._settings = settings
        self._sink = sink
        self._sessions = sessions
        self._http = http  # for sessions; each account's streams get a pool of their own
        # Loading the CA bundle takes tens of milliseconds of CPU: once, before any client waits.
        self._tls = tls if tls is not None else httpx.create_ssl_context()
        self._stream_transport: StreamTransport | None = for_upstream(self._tls)
        if self._stream_transport is None:
            log.info("a proxy is set in the environment: upstream streams use httpx's transport")
        self._rng = rng or random.Random()
        self._upstreams: dict[str, AccountUpstream] = {}
        self._subscribers: Counter[str] = Counter()
        self._lingering: dict[str, asyncio.TimerHandle] = {}
        self._closed = False
        for account in settings.accounts:
            self._upstream(account.id)

    async def start(self) -> None:
        """Open the always_on accounts; they hold a subscriber of their own until aclose()."""
        for account in self._settings.accounts:
            if account.always_on:
                self.acquire(account.id)

    def acquire(self, account_id: str, *, last_event_id: str = "") -> None:
        """One more subscriber. `last_event_id` is where another process's upstream of the account
        stopped: if this acquire opens the connection, it resumes from there."""
        if self._closed:
            return
        self._subscribers[account_id] += 1
        self._stop_lingering(account_id)
        self._upstream(account_id).start(last_event_id)

    def release(self, account_id: str) -> None:
        if self._subscribers[account_id] <= 0:
            log.error("upstream released more often than acquired", account=account_id)
            return
        self._subscribers[account_id] -= 1
        if self._subscribers[account_id] == 0 and not self._closed:
            del self._subscribers[account_id]
            loop = asyncio.get_running_loop()
            self._lingering[account_id] = loop.call_later(
                self._settings.upstream.linger_seconds, self._expire, account_id
            )

    def drop(self, account_id: str) -> None:
        """Forget the account's subscribers and stop its upstream now, without lingering."""
        self._subscribers.pop(account_id, None)
        self._stop_lingering(account_id)
        upstream = self._upstreams.get(account_id)
        if upstream is not None:
            upstream.stop()

    def status(self) -> list[UpstreamStatus]:
        return [self._upstreams[a].status() for a in sorted(self._upstreams)]

    def status_of(self, account_id: str) -> UpstreamStatus | None:
        upstream = self._upstreams.get(account_id)
        return upstream.status() if upstream is not None else None

    async def aclose(self) -> None:
        """Stop every connection; nothing of this manager runs afterwards."""
        self._closed = True
        for handle in self._lingering.values():
            handle.cancel()
        self._lingering.clear()
        for upstream in self._upstreams.values():
            await upstream.aclose()

    def _upstream(self, account_id: str) -> AccountUpstream:
        upstream = self._upstreams.get(account_id)
        if upstream is None:
            upstream = AccountUpstream(
                account_id,
                self._settings.upstream,
                self._sink,
                self._sessions,
                self._stream_client(),
                self._rng,
            )
            self._upstreams[account_id] = upstream
        return upstream

    def _stream_client(self) -> httpx.AsyncClient:
        """A client of the account's own for its streams (one, two while rotating), on the
        stream transport (relay/stream_transport.py) unless a proxy is configured.

        httpx's own transport pools connections, and its pool scans every connection it holds on
        each request and release: on one pool shared by 1,000 long-lived streams, opening an
        upstream cost ~45 ms of CPU. The TLS context is shared; timeout and hooks are the shared
        client's.
        """
        return httpx.AsyncClient(
            timeout=self._http.timeout,
            verify=self._tls,
            event_hooks=self._http.event_hooks,
            transport=self._stream_transport,
        )

    def _stop_lingering(self, account_id: str) -> None:
        lingering = self._lingering.pop(account_id, None)
        if lingering is not None:
            lingering.cancel()

    def _expire(self, account_id: str) -> None:
        del self._lingering[account_id]
        self._upstreams[account_id].stop()
