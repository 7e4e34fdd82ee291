"""A fake DialStack speaking real HTTP: account sessions, `/v1/events` with faults, test hooks.

Accounts: any `acct_...` id is accepted (sessions, injection), so a relay or a test can use
accounts the simulator was not told about; an account seen for the first time joins the ones
that get generated calls.

Replay: every event published to an account (whether or not a stream is open) goes into a
small history; a request with `Last-Event-ID` gets the events after that id first. An id the
history does not hold (too old, or never sent) replays nothing.

Sessions: `/v1/events` answers 401 for an unknown, revoked or expired client secret, and a
stream open on a session closes when the session expires or is revoked.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import json
import math
import random
import re
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import asdict
from typing import Any

import httpx
import structlog
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from relay.serving import running_server
from relay.simulator import webhooks
from relay.simulator.accounts import Account, SentEvent, Stream
from relay.simulator.calls import CallPlanner, play_calls
from relay.simulator.faults import (
    GARBLED_DATA,
    Faults,
    cut_frame,
    event_lines,
    render_frame,
    split_pieces,
)
from relay.simulator.sessions import Session, SessionStore

log = structlog.get_logger(__name__)

DEFAULT_SECRET_KEY = "sk_test_simulator"  # noqa: S105 - a well-known test value, not a secret
CONNECTED_DATA = json.dumps({"message": "Connected to event stream"})
HEARTBEAT = ": keep-alive"
# How often an idle stream re-reads the faults, so flipping one on a live simulator takes effect.
FAULT_POLL_SECONDS = 0.1
MAX_ACCOUNTS = 10_000
GARBLED_RATE = 0.25  # with garbage_lines: chance of a `call.garbled` event after each event
ACCOUNT_ID = re.compile(r"acct_[A-Za-z0-9_]{1,64}")
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


class _EventStreamResponse(StreamingResponse):
    """Runs `on_close` however the response ends: finished, client gone or server cancelled."""

    def __init__(self, frames: AsyncGenerator[bytes, None], on_close: Callable[[], None]) -> None:
        super().__init__(
            frames,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._frames = frames
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
            await self._frames.aclose()


class Simulator:
    def __init__(
        self,
        *,
        secret_key: str = DEFAULT_SECRET_KEY,
        accounts: Sequence[str] = ("acct_demo",),
        call_interval_seconds: float | None = 2.0,
        faults: Faults | None = None,
        seed: int | None = None,
        webhook_url: str | None = None,
        webhook_secret: str | None = None,
    ) -> None:
        """`call_interval_seconds=None` generates no calls (tests inject events instead).

        With `webhook_url` and `webhook_secret`, every generated call event is also POSTed
        there as a signed webhook.
        """
        if (webhook_url is None) != (webhook_secret is None):
            raise ValueError("webhook_url and webhook_secret go together")
        self.secret_key = secret_key
        self.faults = faults if faults is not None else Faults()
        self._seed = seed
        self._rng = random.Random(seed)  # wire-level choices: garbage, cuts, pieces
        self._call_interval = call_interval_seconds
        self._forwarder = (
            webhooks.WebhookForwarder(webhook_url, webhook_secret)
            if webhook_url is not None and webhook_secret is not None
            else None
        )
        self._sessions = SessionStore()
        self._accounts: dict[str, Account] = {}
        self._connection_numbers = itertools.count(1)
        self._early_expiry_applied = False
        self._running = False
        self._closing = False
        self._forwarding: asyncio.Task[None] | None = None
        for account_id in accounts:
            self._account(account_id)
        self.app = Starlette(
            routes=[
                Route("/v1/account_sessions", self._create_session_route, methods=["POST"]),
                Route("/v1/events", self._events_route, methods=["GET"]),
                Route("/v1/simulator/inject", self._inject_route, methods=["POST"]),
                Route("/v1/simulator/stats", self._stats_route, methods=["GET"]),
            ],
            lifespan=self._lifespan,
        )

    # --- observation ---------------------------------------------------------------------------

    @property
    def sessions_created(self) -> int:
        return self._sessions.created

    def open_streams(self, account_id: str | None = None) -> int:
        return sum(len(account.streams) for account in self._selected(account_id))

    def streams_opened(self, account_id: str | None = None) -> int:
        return sum(account.streams_opened for account in self._selected(account_id))

    def sent_log(self, account_id: str) -> list[SentEvent]:
        """Every call event written in full on a connection of the account, in order."""
        account = self._accounts.get(account_id)
        return [] if account is None else list(account.sent)

    # --- test hooks ----------------------------------------------------------------------------

    async def inject(
        self, account_id: str, type: str, data: dict[str, Any] | str, id: str | None = None
    ) -> SentEvent:
        """Publish an event now to every open stream of the account (and its history).

        Without `id`, the event gets the account's next id (none when `faults.send_ids` is
        off). String data is sent as it is, one `data:` line per line.
        """
        account = self._account(account_id)
        if not type or _LINE_BREAK.search(type):
            raise ValueError("type must be one non-empty line")
        if id is not None and (_LINE_BREAK.search(id) or "\0" in id):
            raise ValueError("id must be one line without NUL")
        text = _json(data) if isinstance(data, dict) else "\n".join(_LINE_BREAK.split(data))
        return self._publish(account, type, text, id)

    def issue_session(self, account_id: str, lifetime_seconds: float | None = None) -> Session:
        """Mint a session as `POST /v1/account_sessions` does (default lifetime from faults)."""
        account = self._account(account_id)
        self._apply_early_expiry()
        if lifetime_seconds is None:
            lifetime_seconds = self.faults.session_lifetime_seconds
        return self._sessions.issue(account.id, lifetime_seconds)

    async def send_webhook(
        self,
        url: str,
        secret: str,
        type: str,
        account_id: str,
        data: dict[str, Any],
        id: str | None = None,
    ) -> int:
        """POST one signed webhook envelope to `url`; returns the receiver's HTTP status."""
        body = webhooks.envelope(type, account_id, data, id)
        async with httpx.AsyncClient(timeout=webhooks.TIMEOUT_SECONDS) as client:
            return await webhooks.post(client, url, secret, body)

    # --- running -------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def serve(self, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
        """Serve on `host:port` (0: a free port) and yield the base URL.

        Prefer it to `running_server(sim.app)` when streams may still be open at exit: it ends
        them first, where uvicorn alone would wait out its graceful-shutdown timeout.
        """
        async with running_server(self.app, host, port) as base_url:
            try:
                yield base_url
            finally:
                await self.shutdown()

    async def shutdown(self) -> None:
        """Close every stream (within FAULT_POLL_SECONDS) and stop generated calls and webhooks."""
        self._closing = True
        self._running = False
        tasks = [account.calls for account in self._accounts.values() if account.calls is not None]
        if self._forwarding is not None:
            tasks.append(self._forwarding)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._forwarding = None
        for account in self._accounts.values():
            account.calls = None

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self._closing = False
        self._running = True
        for account in self._accounts.values():
            self._start_calls(account)
        if self._forwarder is not None:
            self._forwarding = asyncio.create_task(self._forwarder.run())
        try:
            yield
        finally:
            await self.shutdown()

    # --- HTTP ----------------------------------------------------------------------------------

    async def _create_session_route(self, request: Request) -> Response:
        if not hmac.compare_digest(_bearer(request).encode(), self.secret_key.encode()):
            return _error(401, "invalid secret key")
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "body must be JSON")
        if not isinstance(body, dict) or not isinstance(body.get("account"), str):
            return _error(400, "account is required")
        if not isinstance(body.get("components", {}), dict):
            return _error(400, "components must be an object")
        try:
            session = self.issue_session(body["account"])
        except ValueError as exc:
            return _error(400, str(exc))
        return JSONResponse(session.to_json())

    async def _events_route(self, request: Request) -> Response:
        faults = self.faults
        if faults.first_byte_delay_seconds > 0:
            await asyncio.sleep(faults.first_byte_delay_seconds)
        if faults.fail_status is not None and faults.fail_count > 0:
            faults.fail_count -= 1
            headers = {}
            if faults.retry_after_seconds is not None and faults.fail_status in (429, 503):
                headers["Retry-After"] = str(faults.retry_after_seconds)
            return _error(faults.fail_status, "simulated failure", headers)
        self._apply_early_expiry()
        session = self._sessions.lookup(_bearer(request))
        if session is None:
            return _error(401, "invalid or expired client secret")
        account = self._account(session.account_id)
        stream = account.open_stream(
            next(self._connection_numbers),
            session,
            asyncio.get_running_loop().time(),
            request.headers.get("last-event-id"),
        )
        log.debug("stream opened", account_id=account.id, connection=stream.number)

        def close() -> None:
            account.close_stream(stream)
            log.debug("stream closed", account_id=account.id, connection=stream.number)

        return _EventStreamResponse(self._write(stream), close)

    async def _inject_route(self, request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "body must be JSON")
        if not isinstance(body, dict):
            return _error(400, "body must be an object")
        account_id, event_type, data = body.get("account_id"), body.get("type"), body.get("data")
        id = body.get("id")
        if not (
            isinstance(account_id, str)
            and isinstance(event_type, str)
            and isinstance(data, dict | str)
            and isinstance(id, str | None)
        ):
            return _error(400, "expected {account_id, type, data (object or string), id?}")
        try:
            event = await self.inject(account_id, event_type, data, id)
        except ValueError as exc:
            return _error(400, str(exc))
        return JSONResponse(asdict(event))

    async def _stats_route(self, request: Request) -> Response:
        accounts = {
            account.id: {
                "open_streams": len(account.streams),
                "streams_opened": account.streams_opened,
            }
            for account in self._accounts.values()
        }
        return JSONResponse({"accounts": accounts, "sessions_created": self.sessions_created})

    # --- streams -------------------------------------------------------------------------------

    async def _write(self, stream: Stream) -> AsyncGenerator[bytes, None]:
        """The response body: frames, cut into pieces with split_writes; logs what was sent."""
        async with contextlib.aclosing(self._frames(stream)) as frames:
            async for frame, event in frames:
                pieces = split_pieces(frame, self._rng) if self.faults.split_writes else [frame]
                for index, piece in enumerate(pieces):
                    if index:
                        # Let the reader run, so pieces reach it apart rather than coalesced.
                        await asyncio.sleep(0)
                    yield piece
                # Resumed after the last piece: the server took the whole frame.
                if event is not None:
                    stream.log_sent(event)

    async def _frames(self, stream: Stream) -> AsyncGenerator[tuple[bytes, SentEvent | None], None]:
        """Frames of one stream, each with the event to log once it is written in full."""
        loop = asyncio.get_running_loop()
        yield self._render("connected", CONNECTED_DATA, None), None
        last_heartbeat = loop.time()
        while True:
            self._apply_early_expiry()
            faults = self.faults
            if self._closing or stream.overflowed or not self._sessions.is_live(stream.session):
                return
            now = loop.time()
            drop_in = math.inf
            if faults.drop_every_seconds is not None:
                drop_in = stream.opened_at + faults.drop_every_seconds - now
            if drop_in <= 0 and not faults.drop_mid_event:
                return
            heartbeat_in = math.inf
            if faults.heartbeat_seconds is not None:
                heartbeat_in = last_heartbeat + faults.heartbeat_seconds - now
            if heartbeat_in <= 0:
                yield render_frame([HEARTBEAT], faults.line_ending), None
                last_heartbeat = loop.time()
                continue
            # A pending mid-event drop waits for the next event, which it cuts.
            wait = min(
                FAULT_POLL_SECONDS,
                heartbeat_in,
                stream.session.seconds_left(),
                drop_in if drop_in > 0 else math.inf,
            )
            try:
                async with asyncio.timeout(max(wait, 0.0)):
                    event = await stream.queue.get()
            except TimeoutError:
                continue
            frame = self._render(event.type, event.data, event.id)
            if self.faults.drop_mid_event and self._drop_due(stream):
                yield cut_frame(frame, self.faults.line_ending, self._rng), None
                return
            yield frame, event

    def _drop_due(self, stream: Stream) -> bool:
        drop_every = self.faults.drop_every_seconds
        loop = asyncio.get_running_loop()
        return drop_every is not None and loop.time() >= stream.opened_at + drop_every

    def _render(self, event_type: str, data: str, id: str | None) -> bytes:
        garbage = self._rng if self.faults.garbage_lines else None
        return render_frame(event_lines(event_type, data, id), self.faults.line_ending, garbage)

    # --- accounts and events -------------------------------------------------------------------

    def _account(self, account_id: str) -> Account:
        account = self._accounts.get(account_id)
        if account is not None:
            return account
        if not ACCOUNT_ID.fullmatch(account_id):
            raise ValueError("account must look like acct_...")
        if len(self._accounts) >= MAX_ACCOUNTS:
            raise ValueError("too many accounts")
        account = self._accounts[account_id] = Account(account_id)
        if self._running:
            self._start_calls(account)
        return account

    def _selected(self, account_id: str | None) -> list[Account]:
        if account_id is None:
            return list(self._accounts.values())
        account = self._accounts.get(account_id)
        return [] if account is None else [account]

    def _start_calls(self, account: Account) -> None:
        if self._call_interval is None or account.calls is not None:
            return
        # Per-account randomness, so a seed gives each account the same calls however they
        # interleave with other accounts'.
        rng = random.Random(None if self._seed is None else f"{self._seed}/{account.id}")
        planner = CallPlanner(account.id, self._call_interval, rng)

        def emit(event_type: str, data: dict[str, Any]) -> None:
            self._publish(account, event_type, _json(data), None)
            if self._forwarder is not None:
                self._forwarder.offer(event_type, account.id, data)

        account.calls = asyncio.create_task(play_calls(planner, emit))

    def _publish(self, account: Account, event_type: str, data: str, id: str | None) -> SentEvent:
        numbered = self.faults.send_ids
        event = account.publish(event_type, data, id, numbered=numbered)
        if self.faults.garbage_lines and self._rng.random() < GARBLED_RATE:
            garbled = self._rng.choice(GARBLED_DATA)
            account.publish("call.garbled", garbled, None, numbered=numbered)
        return event

    def _apply_early_expiry(self) -> None:
        """Revoke all sessions when `expire_sessions_early` is first seen switched on."""
        if self.faults.expire_sessions_early and not self._early_expiry_applied:
            self._sessions.revoke_all()
        self._early_expiry_applied = self.faults.expire_sessions_early


def _json(data: dict[str, Any]) -> str:
    return json.dumps(data, ensure_ascii=False)


def _bearer(request: Request) -> str:
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    return credentials.strip() if scheme.lower() == "bearer" else ""


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse({"error": message}, status_code=status, headers=headers)
