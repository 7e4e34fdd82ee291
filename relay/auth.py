"""Subscriber tokens: HS256 JWTs carrying the account, an expiry, and optional user and event scopes."""

from __future__ import annotations

import binascii
import hmac
import json
import math
import re
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jwt
from jwt.algorithms import HMACAlgorithm
from jwt.exceptions import DecodeError
from jwt.utils import base64url_decode, base64url_encode

ALGORITHM = "HS256"
COOKIE_NAME = "relay_token"
_MAX_TOKEN_CHARS = (
    8192  # a header or cookie bigger than this is not one of ours; refuse before parsing
)
_HEADERS_REMEMBERED = 64


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
    """JSON parsers disagree on which of two same-named members wins (RFC 7519 section 4 allows
    "the last" or "reject"); refusing leaves no token that means one thing here, another elsewhere."""
    members = dict(pairs)
    if len(members) != len(pairs):
        raise InvalidToken("token repeats a name in its header or claims")
    return members


_STRICT_JSON = json.JSONDecoder(object_pairs_hook=_unique_members)  # one decoder, not one per call


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        value = _STRICT_JSON.decode(raw.decode())
    except (ValueError, RecursionError):
        raise InvalidToken("token is not valid") from None
    if not isinstance(value, dict):
        raise InvalidToken("token is not valid")
    return value


def _optional_str(claims: Mapping[str, Any], name: str) -> str | None:
    value = claims.get(name)
    if value is not None and (not isinstance(value, str) or not value):
        raise InvalidToken(f"claim '{name}' must be a non-empty string")
    return value


def _time_claim(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    # Finite JSON numbers only (Python's parser also reads NaN and Infinity; PyJWT's claim checks
    # would also take a string of digits).
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value)
    ):
        raise InvalidToken(f"claim '{name}' must be a number of seconds since the epoch")
    return value


_BASE64URL = re.compile(rb"[A-Za-z0-9_-]*")


class _JWS(jwt.PyJWS):
    """PyJWT's JWS with its segment check done by a regular expression.

    PyJWT 2.15 tests every character of a token against the base64url alphabet in a Python loop, a
    third of a whole token check. This is the same check, in the same order, with the same errors
    (tests/test_auth.py compares the two on arbitrary input).
    """

    @staticmethod
    def _decode_base64url_segment(segment: bytes, name: str) -> bytes:
        stripped = segment.rstrip(b"=")
        padding = len(segment) - len(stripped)
        if padding > 2 or (padding and len(segment) % 4 != 0):
            raise DecodeError(f"Invalid {name} padding")
        if len(stripped) % 4 == 1 or not _BASE64URL.fullmatch(stripped):
            raise DecodeError(f"Invalid {name} padding")
        try:
            decoded = base64url_decode(stripped)
        except (TypeError, binascii.Error) as err:
            raise DecodeError(f"Invalid {name} padding") from err
        if base64url_encode(decoded) != stripped:
            raise DecodeError(f"Invalid {name} padding")
        return decoded


class _PreparedHS256(HMACAlgorithm):
    """PyJWT's HS256, with the relay's key checked once instead of on every token (PyJWT makes
    sure each key is no PEM, SSH, DER or JWK look-alike: a third of a token check's time)."""

    def __init__(self, secret: bytes) -> None:
        super().__init__(HMACAlgorithm.SHA256)
        self._secret = secret
        self._prepared = super().prepare_key(secret)

    def prepare_key(self, key: str | bytes) -> bytes:
        return self._prepared if key == self._secret else super().prepare_key(key)


class TokenVerifier:
    """Checks tokens; a token seen recently is not checked again until it expires.

    PyJWT's JWS layer checks the algorithm and the signature; the claims are read here, once, with
    repeated names refused. A reconnecting fleet presents the same tokens again, and a check costs
    tens of microseconds; the memory is bounded and holds only tokens that verified.
    """

    def __init__(self, secret: str, max_ttl_seconds: int, remembered: int = 10_000) -> None:
        self._secret = secret.encode()
        self._max_ttl = max_ttl_seconds
        self._remembered = remembered
        self._verified: OrderedDict[str, Grant] = OrderedDict()
        self._jws = _JWS(algorithms=[ALGORITHM])
        # Header segments already found free of repeated names: an issuer writes the same one
        # into every token. Only tokens whose signature verified get here, so strangers cannot
        # fill it; the bound is for a key shared by many issuers.
        self._headers: set[str] = set()
        self._jws.unregister_algorithm(ALGORITHM)
        self._jws.register_algorithm(ALGORITHM, _PreparedHS256(self._secret))

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
            signed = self._jws.decode_complete(token, self._secret, algorithms=[ALGORITHM])
        except jwt.InvalidTokenError:
            raise InvalidToken("token is not valid") from None
        header = token.partition(".")[0]
        if header not in self._headers:
            _json_object(base64url_decode(header))  # repeated names
            if len(self._headers) < _HEADERS_REMEMBERED:
                self._headers.add(header)
        claims = _json_object(signed["payload"])
        for name in ("account_id", "exp"):
            if claims.get(name) is None:
                raise InvalidToken(f"token lacks the required claim '{name}'")
        exp = _time_claim(claims, "exp")
        assert exp is not None
        now = time.time()
        if exp <= now:
            raise InvalidToken("token expired")
        if exp > now + self._max_ttl:
            raise InvalidToken("token lifetime exceeds auth.max_token_ttl_seconds")
        for name in ("nbf", "iat"):
            start = _time_claim(claims, name)
            if start is not None and start > now:
                raise InvalidToken("token not yet valid")
        if claims.get("aud"):
            raise InvalidToken("token is not valid: subscriber tokens carry no 'aud' claim")
        account_id = claims["account_id"]
        if not isinstance(account_id, str) or not account_id.startswith("acct_"):
            raise InvalidToken("claim 'account_id' must be an account id (acct_...)")
        _optional_str(claims, "jti")
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
