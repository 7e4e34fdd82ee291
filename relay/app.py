"""HTTP routes. Each handler checks its input, asks the runtime, and answers; nothing else lives here."""

from __future__ import annotations

import contextlib
import functools
import json
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.datastructures import State
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from relay.auth import Grant, InvalidToken, admin_key_matches
from relay.channel import UpstreamState
from relay.config import Settings
from relay.events_request import EventsRequest, bearer_token
from relay.hub import Full, Hub, Opened
from relay.lease import held_elsewhere
from relay.runtime import Relay, drain, open_relay
from relay.stream import STREAM_HEADERS, SubscriberStream
from relay.subscriber import Subscriber
from relay.webhooks import dialstack_webhook

log = structlog.get_logger(__name__)
# One line per request, written by the relay rather than uvicorn: /v1/events logs each stream once,
# as "client disconnected" when it ends (with its duration, like an access line written at the end
# of a request), and the rest here, so no stream pays for an access record that is dropped.
access_log = structlog.get_logger("relay.access")
STATIC_DIR = Path(__file__).parent / "static"
EVENTS_PATH = "/v1/events"


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def unauthorized(message: str) -> JSONResponse:
    return error(401, message, {"WWW-Authenticate": 'Bearer realm="relay"'})


def runtime(request: Request) -> Relay:
    relay: Relay = request.app.state.relay
    return relay


def bearer(request: Request) -> str | None:
    return bearer_token(request.headers.get("authorization"))


def _grant(relay: Relay, request: EventsRequest) -> tuple[Grant, frozenset[str] | None]:
    """What the request's token allows, and the event types it asks for; raises InvalidToken or
    ValueError (the types asked for are unusable)."""
    token = request.token(relay.settings.auth.allow_query_token)
    if token is None:
        raise InvalidToken(
            "a subscriber token is required (Authorization: Bearer, relay_token cookie or ?token=)"
        )
    return relay.verifier.verify(token), request.event_types()


async def events(relay: Relay, request: EventsRequest) -> Response | SubscriberStream:
    if relay.draining:
        return error(503, "the relay is shutting down; reconnect", {"Retry-After": "1"})
    try:
        grant, requested = _grant(relay, request)
    except InvalidToken as exc:
        return unauthorized(str(exc))
    except ValueError as exc:
        return error(400, str(exc))
    if request.method == "HEAD":
        return Response(headers=STREAM_HEADERS)
    last_event_id = request.last_event_id()
    try:
        opened = await relay.hub.subscribe(
            grant.account_id,
            events=grant.narrowed(requested),
            user_id=grant.user_id,
            last_event_id=last_event_id,
            peer=request.client,
        )
    except Full as exc:
        return error(429, str(exc), {"Retry-After": str(exc.retry_after)})
    return _stream(relay, grant, opened, resumed=bool(last_event_id))


def open_now(relay: Relay, request: EventsRequest) -> SubscriberStream | None:
    """The stream of a request that opens without waiting (a GET with a usable token, no replay to
    fetch, within the limits), admitted; None for any other, which then goes the ASGI way through
    `events`, where it is answered in full (errors, HEAD, Last-Event-ID)."""
    if request.method != "GET" or relay.draining or request.last_event_id():
        return None
    try:
        grant, requested = _grant(relay, request)
        subscriber = relay.hub.admit(
            grant.account_id,
            events=grant.narrowed(requested),
            user_id=grant.user_id,
            peer=request.client,
        )
    except (InvalidToken, ValueError, Full):
        return None
    return _stream(relay, grant, Opened(subscriber, reset=None, replay=[]), resumed=False)


def _stream(relay: Relay, grant: Grant, opened: Opened, *, resumed: bool) -> SubscriberStream:
    log.debug("client connected", account=grant.account_id, subject=grant.subject)
    # What the closing line needs, and nothing else: each client holds its stream's callback for
    # as long as it is connected.
    closed = functools.partial(
        _closed,
        relay.hub,
        grant.subject,
        resumed,
        opened.reset is not None,
        len(opened.replay),
        time.monotonic(),
    )
    return SubscriberStream(
        opened,
        retry_ms=relay.settings.server.client_retry_ms,
        status=relay.hub.upstream_status(grant.account_id),
        on_close=closed,
    )


def _closed(
    hub: Hub,
    subject: str | None,
    resumed: bool,
    reset: bool,
    replayed: int,
    opened_at: float,
    subscriber: Subscriber,
) -> None:
    hub.unsubscribe(subscriber)
    log.info(
        "client disconnected",
        account=subscriber.account_id,
        subject=subject,
        resumed=resumed,
        reset=reset,
        replayed=replayed,
        cut=subscriber.cut_reason,
        seconds=round(time.monotonic() - opened_at, 3),
    )


def admin_only(request: Request) -> JSONResponse | None:
    key = runtime(request).settings.auth.admin_key
    expected = key.get_secret_value() if key is not None else None
    if expected is None:
        return error(403, "admin endpoints are disabled: set auth.admin_key")
    if not admin_key_matches(expected, bearer(request)):
        return unauthorized("admin key required: Authorization: Bearer <auth.admin_key>")
    return None


async def json_body(request: Request, limit: int = 16 * 1024) -> dict[str, Any]:
    body = await request.body()
    if len(body) > limit:
        raise ValueError(f"body larger than {limit} bytes")
    try:
        parsed = json.loads(body)
    except ValueError:
        raise ValueError("body must be a JSON object") from None
    if not isinstance(parsed, dict):
        raise ValueError("body must be a JSON object")
    return parsed


async def tokens(request: Request) -> Response:
    denied = admin_only(request)
    if denied is not None:
        return denied
    relay = runtime(request)
    try:
        body = await json_body(request)
        account_id = body.get("account_id")
        ttl = body.get("ttl_seconds", 3600)
        user_id = body.get("user_id")
        event_types = body.get("events")
        if not isinstance(account_id, str):
            raise ValueError("account_id (acct_...) is required")
        if not isinstance(ttl, int) or isinstance(ttl, bool):
            raise ValueError("ttl_seconds must be an integer")
        if user_id is not None and not isinstance(user_id, str):
            raise ValueError("user_id must be a string")
        if event_types is not None and (
            not isinstance(event_types, list)
            or not all(isinstance(e, str) and e for e in event_types)
        ):
            raise ValueError("events must be a list of event type names")
        ttl = min(ttl, relay.settings.auth.max_token_ttl_seconds)
        token, expires_at = relay.issuer.issue(account_id, ttl, user_id=user_id, events=event_types)
    except ValueError as exc:
        return error(400, str(exc))
    return JSONResponse({"token": token, "expires_at": expires_at})


async def status(request: Request) -> Response:
    denied = admin_only(request)
    if denied is not None:
        return denied
    hub = runtime(request).hub
    upstreams = {s.account_id: s for s in runtime(request).upstreams.status()}
    accounts = []
    for account_id in sorted(set(upstreams) | set(hub.accounts())):
        upstream = upstreams.get(account_id)
        entry: dict[str, Any] = {
            "account_id": account_id,
            "upstream": upstream.state.value if upstream else UpstreamState.IDLE.value,
            "since": upstream.since if upstream else None,
            "reconnects": upstream.reconnects if upstream else 0,
            "events_relayed": upstream.events if upstream else 0,
            "clients": hub.clients(account_id),
            "detail": upstream.detail if upstream and upstream.detail else None,
        }
        shown = hub.upstream_status(account_id)
        if shown is not None and held_elsewhere(upstream, shown):
            # Another instance holds the lease (Redis broker): the state it reports.
            entry |= {
                "upstream": "remote",
                "holder_state": shown.state.value,
                "since": shown.since,
                "reconnects": shown.reconnects,
                "detail": shown.detail or None,
            }
        accounts.append(entry)
    return JSONResponse({"clients": hub.clients(), "accounts": accounts})


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    relay = runtime(request)
    if relay.draining:
        return error(503, "shutting down")
    if not await relay.broker.ready():
        return error(503, "broker unreachable")
    return JSONResponse({"status": "ready"})


async def metrics(request: Request) -> Response:
    relay = runtime(request)
    relay.metrics.upstreams.clear()
    upstreams = {s.account_id: s for s in relay.upstreams.status()}
    for account_id in set(upstreams) | set(relay.hub.accounts()):
        upstream = upstreams.get(account_id)
        if held_elsewhere(upstream, relay.hub.upstream_status(account_id)):
            relay.metrics.upstreams.labels("remote").inc()
        elif upstream is not None:
            relay.metrics.upstreams.labels(upstream.state.value).inc()
    return Response(generate_latest(relay.metrics.registry), media_type=CONTENT_TYPE_LATEST)


BOARD_HEADERS = {
    "Cache-Control": "no-cache",
    # The board has no inline script and loads nothing from elsewhere; say so to the browser.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
}


async def board(request: Request) -> Response:
    return FileResponse(STATIC_DIR / "board.html", headers=BOARD_HEADERS)


def _cors(settings: Settings) -> list[Middleware]:
    origins = settings.server.cors_origins
    if not origins:
        return []
    return [
        Middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_credentials="*" not in origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "Last-Event-ID"],
            max_age=600,
        )
    ]


def log_request(scope: Scope, status: int) -> None:
    """The access line: method, path without the query string (it may carry a token), status."""
    client = scope.get("client")
    access_log.info(
        "request",
        method=scope["method"],
        path=scope["path"],
        status=status,
        client=client[0] if client else None,
    )


async def events_endpoint(scope: Scope, receive: Receive, send: Send) -> None:
    response = await _events_response(scope)
    await response(scope, receive, send)


async def _events_response(scope: Scope) -> ASGIApp:
    """The request is read here, so that nothing of it stays with an open stream."""
    request = EventsRequest.of(scope)
    if request.method in ("GET", "HEAD"):
        relay: Relay = scope["app"].state.relay
        response: ASGIApp = await events(relay, request)
    else:
        response = error(405, "use GET", {"Allow": "GET, HEAD"})
    if isinstance(response, Response):  # an open stream logs "client disconnected" instead
        log_request(scope, response.status_code)
    return response


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (unknown route, wrong method, missing static file) as JSON too."""
    assert isinstance(exc, HTTPException)
    return error(exc.status_code, exc.detail, dict(exc.headers or {}))


class RelayApp:
    """The Starlette app, except for `/v1/events`, which skips Starlette's routing and middleware.

    A stream is opened once but written to for every event of its account: the middleware's
    `send` wrappers would cost every delivery, and its routing every (re)connection. The stream
    gets the same CORS rules as the rest.
    """

    def __init__(self, app: Starlette, settings: Settings) -> None:
        self.app = app
        self._events: ASGIApp = events_endpoint
        cors = _cors(settings)
        for middleware in reversed(cors):
            self._events = middleware.cls(self._events, *middleware.args, **middleware.kwargs)
        self._cors = bool(cors)

    def open_stream(self, scope: Scope) -> SubscriberStream | None:
        """For the relay's protocol (relay/http_protocol.py): the stream of a `GET /v1/events`
        that opens at once (`open_now`), which the protocol then serves with no ASGI call; None
        for every other request, which the protocol hands to this app as usual."""
        if scope["path"] != EVENTS_PATH:
            return None
        relay: Relay | None = getattr(self.app.state, "relay", None)  # set once started
        if relay is None:
            return None
        request = EventsRequest.of(scope)
        if request.has_origin and self._cors:  # the CORS middleware's headers go on its response
            return None
        return open_now(relay, request)

    @property
    def state(self) -> State:
        return self.app.state

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # Not a coroutine itself: the server awaits the one it picks, and an open stream's chain
        # of suspended frames, kept for as long as the client stays, is one shorter (relay/serving.py
        # tells uvicorn that this is an ASGI 3 app all the same).
        if scope["type"] != "http":
            return self.app(scope, receive, send)
        if scope["path"] == EVENTS_PATH:
            scope["app"] = self.app  # what Request.app reads
            return self._events(scope, receive, send)
        return self._logged(scope, receive, send)

    async def _logged(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Every other route, with its access line."""
        status = 0

        async def recording(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording)
        finally:
            log_request(scope, status or 500)

    async def drain(self) -> None:
        """Graceful shutdown: /readyz turns 503, every client gets a jittered `retry:` and a clean close."""
        relay: Relay | None = getattr(self.app.state, "relay", None)
        if relay is not None:
            await drain(relay)


def create_app(settings: Settings) -> RelayApp:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with open_relay(settings) as relay:
            app.state.relay = relay
            yield

    routes = [
        Route("/v1/tokens", tokens, methods=["POST"]),
        Route("/v1/status", status, methods=["GET"]),
        Route("/v1/webhooks/dialstack", dialstack_webhook, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/", board, methods=["GET"]),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ]
    app = Starlette(
        routes=routes,
        middleware=_cors(settings),
        lifespan=lifespan,
        exception_handlers={HTTPException: http_error},
    )
    return RelayApp(app, settings)
