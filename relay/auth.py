"""Subscriber tokens: HS256 JWTs carrying the account, an expiry, and optional user and event scopes."""

from __future__ import annotations

import binascii
import hashlib
import hmac
import json
import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jwt
from jwt.algorithms import HMACAlgorithm

ALGORITHM = "HS256"
COOKIE_NAME = "relay_token"
_MAX_TOKEN_CHARS = (
    8192  # a header or cookie bigger than this is not one of ours; refuse before parsing
)
_HEADERS_REMEMBERED = 64


class InvalidToken(Exception):
    """The token cannot be used; the message is safe to return to the client (it never echoes the token)."""


class Grant(NamedTuple):  # immutable (verified grants are remembered), and cheap to make
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
# The decoder's scanner, called directly: `decode` adds two frames and two whitespace matches for
# what a compact JSON text, as every JWT library writes, never has.
_SCAN_ONCE: Callable[[str, int], tuple[Any, int]] = _STRICT_JSON.scan_once  # type: ignore[attr-defined]


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        text = raw.decode()
        try:
            value, end = _SCAN_ONCE(text, 0)
        except StopIteration:  # no value where the text starts
            end = -1
        if end != len(text):  # whitespace around the value, or not JSON: the full decoder says
            value = _STRICT_JSON.decode(text)
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
    # Finite JSON numbers only: the parser's ints and floats by their exact types (a bool is
    # neither), without the NaN and Infinity that Python's parser also reads (PyJWT's claim checks
    # would also take a string of digits).
    if value is None or type(value) is int or (type(value) is float and math.isfinite(value)):
        return value
    raise InvalidToken(f"claim '{name}' must be a number of seconds since the epoch")


_BASE64URL = re.compile(rb"[A-Za-z0-9_-]*")


_TO_STANDARD = bytes.maketrans(b"-_", b"+/")
_TO_URLSAFE = bytes.maketrans(b"+/", b"-_")


def _segment(segment: str) -> bytes:
    """One base64url segment of a compact JWS, as strictly as PyJWT 2.15 reads it: up to two
    trailing `=` where the length allows them, the alphabet only, and the canonical encoding of
    what it decodes to (tests/test_auth.py compares the two on arbitrary input)."""
    raw = segment.encode()
    stripped = raw.rstrip(b"=")
    padding = len(raw) - len(stripped)
    if padding > 2 or (padding and len(raw) % 4 != 0):
        raise InvalidToken("token is not valid")
    if len(stripped) % 4 == 1 or not _BASE64URL.fullmatch(stripped):
        raise InvalidToken("token is not valid")
    standard = stripped.translate(_TO_STANDARD)
    decoded = binascii.a2b_base64(standard + b"=" * (-len(standard) % 4))
    canonical = binascii.b2a_base64(decoded, newline=False).rstrip(b"=")
    if canonical != standard:  # unused low bits set: another token meaning the same bytes
        raise InvalidToken("token is not valid")
    return decoded


def _base64url(raw: bytes) -> bytes:
    """The canonical, unpadded base64url encoding of `raw`."""
    return binascii.b2a_base64(raw, newline=False).rstrip(b"=").translate(_TO_URLSAFE)


def _check_header(header: Mapping[str, Any]) -> None:
    """What PyJWS refuses in an HS256-only verifier, and what it would accept that we refuse."""
    if header.get("alg") != ALGORITHM:  # none, other algorithms, a missing or odd `alg`
        raise InvalidToken("token is not valid")
    if "crit" in header or "b64" in header:  # extensions to honour: none is understood here
        raise InvalidToken("token is not valid")
    if "kid" in header and not isinstance(header["kid"], str):
        raise InvalidToken("token is not valid")


class TokenVerifier:
    """Checks tokens; a token seen recently is not checked again until it expires.

    PyJWT issues them; the compact JWS is read here, strictly, and its HS256 MAC compared in
    constant time. PyJWS's general path (any algorithm, JWKs, detached payloads) cost 40-60 µs
    of each new client's connection; what it checks that matters to an HS256 verifier is checked
    here too, and a test compares the two verdicts on a catalogue of headers. Claims
    are read once, with repeated names refused. A reconnecting fleet presents the same tokens
    again; the memory of them is bounded and holds only tokens that verified.
    """

    def __init__(self, secret: str, max_ttl_seconds: int, remembered: int = 10_000) -> None:
        self._secret = secret.encode()
        self._max_ttl = max_ttl_seconds
        self._remembered = remembered
        self._verified: OrderedDict[str, Grant] = OrderedDict()
        # PyJWT refuses HMAC keys that look like PEM, SSH or JWK public keys (key confusion).
        key = HMACAlgorithm(HMACAlgorithm.SHA256).prepare_key(self._secret)
        # Keyed once; each token's MAC starts from a copy (hmac.digest looks SHA-256 up in
        # OpenSSL again on every call).
        self._mac = hmac.new(key, digestmod=hashlib.sha256)
        # Header segments already checked: an issuer writes the same one into every token. Only
        # tokens whose MAC verified get here, so strangers cannot fill it; the bound is for a key
        # shared by many issuers.
        self._headers: set[str] = set()

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
        header, _, rest = token.partition(".")
        payload, _, signature = rest.partition(".")
        if not payload or "." in signature:
            raise InvalidToken("token is not valid")
        mac = self._mac.copy()
        mac.update(f"{header}.{payload}".encode())
        # Compared encoded: the only segments that `_segment` reads as this MAC are its canonical
        # encoding and that with the one `=` of padding that 32 bytes allow.
        expected = _base64url(mac.digest())
        presented = signature.encode()
        if len(presented) == len(expected) + 1 and presented.endswith(b"="):
            presented = presented[:-1]
        if not hmac.compare_digest(presented, expected):
            raise InvalidToken("token is not valid")
        if header not in self._headers:
            _check_header(_json_object(_segment(header)))  # repeated names refused too
            if len(self._headers) < _HEADERS_REMEMBERED:
                self._headers.add(header)
        claims = _json_object(_segment(payload))
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
