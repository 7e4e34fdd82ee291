"""Where the client secrets for `/v1/events` come from, behind one small protocol.

Three sources, chosen per account in this order:
1. the account's static `client_secret` in `[[accounts]]` (never expires);
2. `upstream.session_url`: your backend, POSTed `{"account": id}`, answering like DialStack;
3. DialStack itself: `POST {base_url}/v1/account_sessions` with `upstream.secret_key`.

Errors say what answered, with which status and what to check, and never carry a secret (nor
the session URL, which may embed a credential of its own). `SessionRejected` means retrying
soon will not help (credentials refused, nothing configured); `SessionUnavailable` means try
again later, not before `retry_after` when the source said so.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import httpx
from pydantic import SecretStr

from relay.backoff import parse_retry_after
from relay.config import Settings


@dataclass(frozen=True, slots=True)
class Session:
    client_secret: SecretStr  # masked in repr and str; use get_secret_value() only for the header
    expires_at: datetime | None = None  # aware (UTC when the source gave no offset); None = never


class SessionError(Exception):
    """No session this time; the message is for the operator and holds no secret."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class SessionRejected(SessionError):
    """The source refused our credentials (401/403) or none is configured for the account."""


class SessionUnavailable(SessionError):
    """Network trouble, 5xx or 429: worth retrying, not before `retry_after` seconds if set."""


class SessionSource(Protocol):
    async def fetch(self, account_id: str) -> Session: ...


def describe_http_error(exc: httpx.HTTPError) -> str:
    """What went wrong, safe to log: protocol errors, ours or the upstream's, can quote the bytes
    on the wire (our own headers, or whatever a broken upstream echoed), so only their kind."""
    if isinstance(exc, httpx.ProtocolError):
        return type(exc).__name__
    return f"{type(exc).__name__} {exc}".strip()


class StaticSessions:
    """Client secrets written in the config; they carry no expiry."""

    def __init__(self, secrets: Mapping[str, SecretStr]) -> None:
        self._secrets = dict(secrets)

    def __contains__(self, account_id: object) -> bool:
        return account_id in self._secrets

    async def fetch(self, account_id: str) -> Session:
        secret = self._secrets.get(account_id)
        if secret is None:
            raise SessionRejected(f"no client_secret configured for account {account_id}")
        return Session(secret)


class EndpointSessions:
    """A session endpoint that takes `{"account": id}` and answers DialStack's session JSON."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        url: str,
        *,
        name: str,
        check: str,
        secret_key: SecretStr | None = None,
        timeout_seconds: float = 10.0,
    ) -> None:
        self._http = http
        self._url = url
        self._name = name  # how messages refer to the endpoint (a config key, never the URL)
        self._check = check  # what the operator should look at when credentials are refused
        self._secret_key = secret_key
        self._timeout = timeout_seconds

    async def fetch(self, account_id: str) -> Session:
        headers = {"Accept": "application/json"}
        if self._secret_key is not None:
            headers["Authorization"] = f"Bearer {self._secret_key.get_secret_value()}"
        try:
            response = await self._http.post(
                self._url, json={"account": account_id}, headers=headers, timeout=self._timeout
            )
        except httpx.HTTPError as exc:
            raise SessionUnavailable(
                f"cannot reach {self._name} for account {account_id}: {describe_http_error(exc)}"
            ) from None
        status = response.status_code
        if status in (401, 403):
            raise SessionRejected(
                f"{self._name} answered {status} for account {account_id}; check {self._check}"
            )
        if status == 429 or status >= 500:
            raise SessionUnavailable(
                f"{self._name} answered {status} for account {account_id}; will retry",
                retry_after=parse_retry_after(response.headers.get("retry-after")),
            )
        if not 200 <= status < 300:
            raise SessionError(
                f"{self._name} answered {status} for account {account_id}; check that the "
                "account exists and the endpoint URL is right"
            )
        return self._parse(response, account_id)

    def _parse(self, response: httpx.Response, account_id: str) -> Session:
        def malformed(what: str) -> SessionError:
            return SessionError(
                f"{self._name} answered {response.status_code} for account {account_id} {what}; "
                'expected JSON {"account_id", "client_secret", "expires_at"}'
            )

        try:
            body: Any = response.json()
        except ValueError:
            raise malformed("with a body that is not JSON") from None
        if not isinstance(body, dict):
            raise malformed("with JSON that is not an object")
        secret = body.get("client_secret")
        if not isinstance(secret, str) or not secret:
            raise malformed("without a client_secret")
        answered_for = body.get("account_id")
        if answered_for is not None and answered_for != account_id:
            raise malformed(f"with a session for another account ({answered_for!s:.64})")
        return Session(SecretStr(secret), _expiry(body.get("expires_at"), malformed))


def _expiry(value: object, malformed: Callable[[str], SessionError]) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise malformed("with an expires_at that is not an ISO 8601 string")
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise malformed(f"with an unreadable expires_at ({value:.64})") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


class ConfiguredSessions:
    """Per account: its static secret if it has one, else the remote source, if configured."""

    def __init__(self, static: StaticSessions, remote: SessionSource | None) -> None:
        self._static = static
        self._remote = remote

    async def fetch(self, account_id: str) -> Session:
        if account_id in self._static:
            return await self._static.fetch(account_id)
        if self._remote is None:
            raise SessionRejected(
                f"account {account_id} has no client_secret in [[accounts]] and neither "
                "upstream.secret_key nor upstream.session_url is set"
            )
        return await self._remote.fetch(account_id)


def session_source_for(settings: Settings, http: httpx.AsyncClient) -> ConfiguredSessions:
    upstream = settings.upstream
    timeout = upstream.connect_timeout_seconds
    remote: SessionSource | None = None
    if upstream.session_url is not None:
        remote = EndpointSessions(
            http,
            str(upstream.session_url),
            name="upstream.session_url",
            check="that your session endpoint accepts this relay and knows the account",
            timeout_seconds=timeout,
        )
    elif upstream.secret_key is not None:
        remote = EndpointSessions(
            http,
            upstream.account_sessions_url,
            name="DialStack /v1/account_sessions",
            check="upstream.secret_key (sk_test_ and sk_live_ keys only work in their own mode)",
            secret_key=upstream.secret_key,
            timeout_seconds=timeout,
        )
    secrets = {a.id: a.client_secret for a in settings.accounts if a.client_secret is not None}
    return ConfiguredSessions(StaticSessions(secrets), remote)
