"""Session sources over real HTTP: DialStack (the simulator), a backend's session_url, static secrets."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from relay.config import Settings
from relay.serving import running_server
from relay.sessions import (
    SessionError,
    SessionRejected,
    SessionUnavailable,
    StaticSessions,
    session_source_for,
)
from relay.simulator import DEFAULT_SECRET_KEY, Simulator

ACCOUNT = "acct_sessions"
BACKEND_TOKEN = "backend-query-credential"


class Backend:
    """A customer's session endpoint whose answer each test chooses."""

    def __init__(self) -> None:
        self.answer: Callable[[], Response] = lambda: JSONResponse({})
        self.bodies: list[Any] = []
        self.app = Starlette(routes=[Route("/session", self._session, methods=["POST"])])

    async def _session(self, request: Request) -> Response:
        self.bodies.append(await request.json())
        return self.answer()


@pytest.fixture
async def backend() -> AsyncIterator[tuple[Backend, str]]:
    backend = Backend()
    async with running_server(backend.app) as base_url:
        yield backend, f"{base_url}/session?key={BACKEND_TOKEN}"


def backend_settings(session_url: str, accounts: list[dict[str, Any]] | None = None) -> Settings:
    return Settings.model_validate(
        {"upstream": {"session_url": session_url}, "accounts": accounts or []}
    )


async def test_dialstack_session_endpoint(http: httpx.AsyncClient) -> None:
    sim = Simulator(accounts=[ACCOUNT], call_interval_seconds=None)
    sim.faults.session_lifetime_seconds = 120
    async with sim.serve() as base_url:
        settings = Settings.model_validate(
            {"upstream": {"base_url": base_url, "secret_key": DEFAULT_SECRET_KEY}}
        )
        session = await session_source_for(settings, http).fetch(ACCOUNT)
    assert session.client_secret.get_secret_value().startswith("cs_")
    assert sim.sessions_created == 1
    assert session.expires_at is not None
    assert session.expires_at.tzinfo is not None
    expected = datetime.now(UTC) + timedelta(seconds=120)
    assert abs((session.expires_at - expected).total_seconds()) < 5
    assert session.client_secret.get_secret_value() not in repr(session)


async def test_dialstack_refusing_the_secret_key_is_an_auth_failure(
    http: httpx.AsyncClient,
) -> None:
    sim = Simulator(accounts=[ACCOUNT], call_interval_seconds=None, secret_key="sk_test_other")
    async with sim.serve() as base_url:
        settings = Settings.model_validate(
            {"upstream": {"base_url": base_url, "secret_key": DEFAULT_SECRET_KEY}}
        )
        with pytest.raises(SessionRejected) as caught:
            await session_source_for(settings, http).fetch(ACCOUNT)
    message = str(caught.value)
    assert "401" in message
    assert "upstream.secret_key" in message
    assert DEFAULT_SECRET_KEY not in message


async def test_backend_session_url(http: httpx.AsyncClient, backend: tuple[Backend, str]) -> None:
    server, url = backend
    server.answer = lambda: JSONResponse(
        {"account_id": ACCOUNT, "client_secret": "cs_backend", "expires_at": "2031-05-06T07:08:09Z"}
    )
    session = await session_source_for(backend_settings(url), http).fetch(ACCOUNT)
    assert server.bodies == [{"account": ACCOUNT}]
    assert session.client_secret.get_secret_value() == "cs_backend"
    assert session.expires_at == datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC)


@pytest.mark.parametrize(
    ("expires_at", "expected"),
    [
        ("2031-05-06T09:08:09+02:00", datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC)),
        ("2031-05-06T07:08:09.250Z", datetime(2031, 5, 6, 7, 8, 9, 250_000, tzinfo=UTC)),
        ("2031-05-06T07:08:09", datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC)),  # no offset: UTC
        (None, None),
    ],
)
async def test_expiry_forms(
    http: httpx.AsyncClient,
    backend: tuple[Backend, str],
    expires_at: str | None,
    expected: datetime | None,
) -> None:
    server, url = backend
    server.answer = lambda: JSONResponse({"client_secret": "cs_x", "expires_at": expires_at})
    session = await session_source_for(backend_settings(url), http).fetch(ACCOUNT)
    assert session.expires_at == expected


@pytest.mark.parametrize(
    ("answer", "error", "says"),
    [
        pytest.param(lambda: JSONResponse({}, status_code=401), SessionRejected, "401", id="401"),
        pytest.param(lambda: JSONResponse({}, status_code=403), SessionRejected, "403", id="403"),
        pytest.param(
            lambda: JSONResponse({}, status_code=503), SessionUnavailable, "503", id="503"
        ),
        pytest.param(lambda: JSONResponse({}, status_code=404), SessionError, "404", id="404"),
        pytest.param(lambda: PlainTextResponse("<html>"), SessionError, "not JSON", id="html"),
        pytest.param(lambda: JSONResponse(["cs_x"]), SessionError, "not an object", id="list"),
        pytest.param(
            lambda: JSONResponse({"expires_at": None}),
            SessionError,
            "without a client_secret",
            id="no-secret",
        ),
        pytest.param(
            lambda: JSONResponse({"client_secret": "cs_x", "expires_at": "soon"}),
            SessionError,
            "unreadable expires_at",
            id="bad-expiry",
        ),
        pytest.param(
            lambda: JSONResponse({"client_secret": "cs_x", "account_id": "acct_other"}),
            SessionError,
            "another account",
            id="other-account",
        ),
    ],
)
async def test_backend_errors_are_clear_and_classified(
    http: httpx.AsyncClient,
    backend: tuple[Backend, str],
    answer: Callable[[], Response],
    error: type[SessionError],
    says: str,
) -> None:
    server, url = backend
    server.answer = answer
    with pytest.raises(SessionError) as caught:
        await session_source_for(backend_settings(url), http).fetch(ACCOUNT)
    assert type(caught.value) is error
    message = str(caught.value)
    assert says in message
    assert "upstream.session_url" in message
    assert ACCOUNT in message
    assert BACKEND_TOKEN not in message  # the URL may carry a credential: never echoed


async def test_throttled_backend_says_when_to_retry(
    http: httpx.AsyncClient, backend: tuple[Backend, str]
) -> None:
    server, url = backend
    server.answer = lambda: JSONResponse({}, status_code=429, headers={"Retry-After": "3"})
    with pytest.raises(SessionUnavailable) as caught:
        await session_source_for(backend_settings(url), http).fetch(ACCOUNT)
    assert caught.value.retry_after == 3.0


async def test_unreachable_backend_is_transient(http: httpx.AsyncClient) -> None:
    async with running_server(Starlette()) as base_url:
        pass  # the port is free again: nothing listens there now
    settings = backend_settings(f"{base_url}/session?key={BACKEND_TOKEN}")
    with pytest.raises(SessionUnavailable) as caught:
        await session_source_for(settings, http).fetch(ACCOUNT)
    assert "cannot reach upstream.session_url" in str(caught.value)
    assert BACKEND_TOKEN not in str(caught.value)


async def test_static_secret_wins_and_never_expires(
    http: httpx.AsyncClient, backend: tuple[Backend, str]
) -> None:
    server, url = backend
    server.answer = lambda: JSONResponse({"client_secret": "cs_from_backend"})
    settings = backend_settings(
        url, accounts=[{"id": ACCOUNT, "client_secret": "cs_static"}, {"id": "acct_dynamic"}]
    )
    source = session_source_for(settings, http)
    static = await source.fetch(ACCOUNT)
    assert static.client_secret.get_secret_value() == "cs_static"
    assert static.expires_at is None
    assert server.bodies == []
    dynamic = await source.fetch("acct_dynamic")
    assert dynamic.client_secret.get_secret_value() == "cs_from_backend"


async def test_no_source_for_an_account_is_refused(http: httpx.AsyncClient) -> None:
    settings = Settings.model_validate(
        {"accounts": [{"id": ACCOUNT, "client_secret": "cs_static"}]}
    )
    source = session_source_for(settings, http)
    with pytest.raises(SessionRejected) as caught:
        await source.fetch("acct_unknown")
    assert "upstream.secret_key" in str(caught.value)
    with pytest.raises(SessionRejected):
        await StaticSessions({}).fetch(ACCOUNT)
    session = await StaticSessions({ACCOUNT: SecretStr("cs_x")}).fetch(ACCOUNT)
    assert "cs_x" not in json.dumps(repr(session))
