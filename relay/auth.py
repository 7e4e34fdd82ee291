"""Subscriber tokens: HS256 JWTs carrying the account, an expiry, and optional user and event scopes."""

from __future__ import annotations

import hmac
import json
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jwt

ALGORITHM = "HS256"
COOKIE_NAME = "relay_token"
_MAX_TOKEN_CHARS = (
    8192  # a header or cookie bigger than this is not one of ours; refuse before parsing
)


class InvalidToken(Exception):
    """The token cannot be used; the message is safe to return to the client (it never echoes the token)."""


@dataclass(frozen=True, slots=True)
class Grant:
    """What a verified token allows."""

    account_id: str
    expires_at: int
    subject: str | None = None
    user_id: str | None = None
    events: frozenset[str] | None = None  # None: every event type

    def narrowed(self, requested: frozenset[str] | None) -> frozenset[str] | None:
        """The event types allowed when a client asks for `requested`: the query narrows, never widens."""
        if requested is None:
            return self.events
        return requested if self.events is None else requested & self.events


def _clean_events(value: Any) -> frozenset[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise InvalidToken("claim 'events' must be a list of event type names")
    return frozenset(value)


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    if len({name for name, _ in pairs}) != len(pairs):
        raise InvalidToken("token repeats a name in its header or claims")
    return dict(pairs)


def _refuse_repeated_names(token: str) -> None:
    """JSON parsers disagree on which of two same-named members wins (RFC 7519 section 4 allows
    "the last" or "reject"); refusing leaves no token that means one thing here, another elsewhere."""
    for segment in token.split(".")[:2]:
        json.loads(jwt.utils.base64url_decode(segment), object_pairs_hook=_unique_members)


def _optional_str(claims: Mapping[str, Any], name: str) -> str | None:
    value = claims.get(name)
    if value is not None and (not isinstance(value, str) or not value):
        raise InvalidToken(f"claim '{name}' must be a non-empty string")
    return value


class TokenVerifier:
    """Checks tokens; a token seen recently is not checked again until it expires.

    A reconnecting fleet presents the same tokens again, and a signature check costs tens of
    microseconds; the memory is bounded and holds only tokens that verified.
    """

    def __init__(self, secret: str, max_ttl_seconds: int, remembered: int = 10_000) -> None:
        self._secret = secret
        self._max_ttl = max_ttl_seconds
        self._remembered = remembered
        self._verified: OrderedDict[str, Grant] = OrderedDict()

    def verify(self, token: str) -> Grant:
        grant = self._verified.get(token)
        if grant is not None:
            if grant.expires_at > time.time():
                self._verified.move_to_end(token)
                return grant
            del self._verified[token]
            raise InvalidToken("token expired")
        grant = self._check(token)
        self._verified[token] = grant
        if len(self._verified) > self._remembered:
            self._verified.popitem(last=False)
        return grant

    def _check(self, token: str) -> Grant:
        if len(token) > _MAX_TOKEN_CHARS:
            raise InvalidToken("token too large")
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[ALGORITHM],
                options={"require": ["exp", "account_id"]},
                leeway=0,
            )
        except jwt.ExpiredSignatureError:
            raise InvalidToken("token expired") from None
        except jwt.ImmatureSignatureError:
            raise InvalidToken("token not yet valid") from None
        except jwt.MissingRequiredClaimError as exc:
            raise InvalidToken(f"token lacks the required claim '{exc.claim}'") from None
        except jwt.InvalidTokenError:
            raise InvalidToken("token is not valid") from None
        _refuse_repeated_names(token)
        account_id = claims["account_id"]
        if not isinstance(account_id, str) or not account_id.startswith("acct_"):
            raise InvalidToken("claim 'account_id' must be an account id (acct_...)")
        exp = claims["exp"]
        # PyJWT also takes a string of digits; a number is what the claim is.
        if isinstance(exp, bool) or not isinstance(exp, int | float):
            raise InvalidToken("claim 'exp' must be a number of seconds since the epoch")
        if exp > time.time() + self._max_ttl:
            raise InvalidToken("token lifetime exceeds auth.max_token_ttl_seconds")
        return Grant(
            account_id=account_id,
            expires_at=int(exp),
            subject=_optional_str(claims, "sub"),
            user_id=_optional_str(claims, "user_id"),
            events=_clean_events(claims.get("events")),
        )


class TokenIssuer:
    def __init__(self, secret: str, max_ttl_seconds: int) -> None:
        self._secret = secret
        self._max_ttl = max_ttl_seconds

    def issue(
        self,
        account_id: str,
        ttl_seconds: int,
        *,
        subject: str | None = None,
        user_id: str | None = None,
        events: list[str] | None = None,
    ) -> tuple[str, int]:
        """A signed token and its expiry (unix seconds). Raises ValueError for unusable arguments."""
        if not account_id.startswith("acct_"):
            raise ValueError("account_id must be an account id (acct_...)")
        if not 0 < ttl_seconds <= self._max_ttl:
            raise ValueError(f"ttl_seconds must be between 1 and {self._max_ttl}")
        now = int(time.time())
        claims: dict[str, Any] = {"account_id": account_id, "iat": now, "exp": now + ttl_seconds}
        if subject is not None:
            claims["sub"] = subject
        if user_id is not None:
            claims["user_id"] = user_id
        if events is not None:
            claims["events"] = events
        return jwt.encode(claims, self._secret, algorithm=ALGORITHM), claims["exp"]


def admin_key_matches(expected: str | None, presented: str | None) -> bool:
    """Constant-time admin key check; with no admin key configured, the admin endpoints stay closed."""
    if expected is None or presented is None:
        return False
    return hmac.compare_digest(expected.encode(), presented.encode())
