"""Subscriber tokens: what is accepted, and every way a token is refused."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable

import jwt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jwt.exceptions import DecodeError

from relay.auth import (
    Grant,
    InvalidToken,
    TokenIssuer,
    TokenVerifier,
    _segment,
    admin_key_matches,
)

SECRET = "k" * 48
verifier = TokenVerifier(SECRET, max_ttl_seconds=3600)
issuer = TokenIssuer(SECRET, max_ttl_seconds=3600)


def b64(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def signed(claims: dict[str, object], key: str = SECRET, **kwargs: object) -> str:
    return jwt.encode(claims, key, algorithm="HS256", **kwargs)  # type: ignore[arg-type]


def signed_raw(claims: str, alg: str = "HS256") -> str:
    """A token signed with SECRET around claims JSON that json.dumps would not write, or with
    another HMAC algorithm (PyJWT would warn that SECRET is short for SHA-512)."""
    digest = {"HS256": hashlib.sha256, "HS512": hashlib.sha512}[alg]
    head = b64({"alg": alg, "typ": "JWT"})
    body = base64.urlsafe_b64encode(claims.encode()).rstrip(b"=").decode()
    mac = hmac.new(SECRET.encode(), f"{head}.{body}".encode(), digest).digest()
    return f"{head}.{body}." + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def soon() -> int:
    return int(time.time()) + 600


def test_issued_token_round_trips() -> None:
    token, expires_at = issuer.issue("acct_1", 600, user_id="user_1", events=["call.incoming"])
    grant = verifier.verify(token)
    assert grant == Grant("acct_1", expires_at, None, "user_1", frozenset({"call.incoming"}))


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (signed({"account_id": "acct_1", "exp": soon()}, key="x" * 48), "not valid"),
        (signed({"account_id": "acct_1", "exp": int(time.time()) - 1}), "expired"),
        (signed({"account_id": "acct_1", "exp": soon(), "nbf": soon()}), "not yet valid"),
        (signed({"exp": soon()}), "account_id"),
        (signed({"account_id": "acct_1"}), "exp"),
        (signed({"account_id": "acct_1", "exp": int(time.time()) + 7200}), "max_token_ttl"),
        (signed({"account_id": "bob", "exp": soon()}), "acct_"),
        (signed({"account_id": "acct_1", "exp": soon(), "events": "call.end"}), "events"),
        (signed({"account_id": "acct_1", "exp": soon(), "user_id": 7}), "user_id"),
        (
            b64({"alg": "none", "typ": "JWT"})
            + "."
            + b64({"account_id": "acct_1", "exp": soon()})
            + ".",
            "not valid",
        ),
        (
            signed_raw(json.dumps({"account_id": "acct_1", "exp": soon()}), alg="HS512"),
            "not valid",
        ),
        (signed({"account_id": "acct_1", "exp": soon(), "iat": soon()}), "not yet valid"),
        (signed({"account_id": "acct_1", "exp": soon(), "aud": "someone"}), "not valid"),
        (signed({"account_id": "acct_1", "exp": soon(), "iat": "0"}), "iat"),
        (signed_raw('{"account_id": "acct_1", "exp": true}'), "exp"),
        (signed_raw('{"account_id": "acct_1", "exp": NaN}'), "exp"),
        (signed_raw('{"account_id": "acct_1", "exp": Infinity}'), "exp"),
        (signed_raw(f'{{"account_id": "acct_1", "exp": {soon()}, "nbf": NaN}}'), "nbf"),
        (signed_raw('["acct_1"]'), "not valid"),
        ("not-a-jwt", "not valid"),
        (signed({"account_id": "acct_1", "exp": soon()})[:-1] + "!", "not valid"),
        (signed({"account_id": "acct_1", "exp": soon()}) + "===", "not valid"),
        ("=" + signed({"account_id": "acct_1", "exp": soon()}), "not valid"),
        ("a" * 10_000, "too large"),
    ],
    ids=[
        "forged",
        "expired",
        "not-yet-valid",
        "no-account",
        "no-exp",
        "too-long-lived",
        "bad-account",
        "events-not-list",
        "user-not-string",
        "alg-none",
        "other-algorithm",
        "iat-in-the-future",
        "audience",
        "iat-a-string",
        "exp-a-boolean",
        "exp-nan",
        "exp-infinity",
        "nbf-nan",
        "claims-not-an-object",
        "garbage",
        "junk-in-signature",
        "over-padded",
        "padding-in-header",
        "huge",
    ],
)
def test_refused_tokens(token: str, reason: str) -> None:
    with pytest.raises(InvalidToken) as caught:
        verifier.verify(token)
    assert reason in str(caught.value)
    assert token not in str(caught.value)


@pytest.mark.parametrize(
    "around", [(" ", ""), ("", "\n"), ("\t", " \r\n")], ids=["before", "after", "both"]
)
def test_claims_with_whitespace_around_them_are_read_as_pyjwt_reads_them(
    around: tuple[str, str],
) -> None:
    before, after = around
    claims = json.dumps({"account_id": "acct_1", "exp": soon()})
    token = signed_raw(before + claims + after)
    assert jwt.decode(token, SECRET, algorithms=["HS256"])["account_id"] == "acct_1"
    assert TokenVerifier(SECRET, 3600).verify(token).account_id == "acct_1"


@pytest.mark.parametrize("tail", ["x", "{}", ' {"account_id": "acct_2"}'])
def test_claims_followed_by_anything_but_whitespace_are_refused(tail: str) -> None:
    token = signed_raw(json.dumps({"account_id": "acct_1", "exp": soon()}) + tail)
    with pytest.raises(InvalidToken, match="not valid"):
        TokenVerifier(SECRET, 3600).verify(token)


def test_query_narrows_but_never_widens() -> None:
    scoped = Grant("acct_1", soon(), events=frozenset({"call.incoming", "call.end"}))
    assert scoped.narrowed(frozenset({"call.end", "call.answered"})) == frozenset({"call.end"})
    assert scoped.narrowed(None) == frozenset({"call.incoming", "call.end"})
    assert Grant("acct_1", soon()).narrowed(frozenset({"call.end"})) == frozenset({"call.end"})


def test_issuer_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="acct_"):
        issuer.issue("user_1", 60)
    with pytest.raises(ValueError, match="ttl_seconds"):
        issuer.issue("acct_1", 7200)


def test_admin_key_check() -> None:
    assert admin_key_matches("a" * 40, "a" * 40)
    assert not admin_key_matches("a" * 40, "b" * 40)
    assert not admin_key_matches(None, "anything")
    assert not admin_key_matches("a" * 40, None)


def test_a_remembered_token_still_expires() -> None:
    short = TokenVerifier(SECRET, max_ttl_seconds=3600)
    token, _ = issuer.issue("acct_1", 600)
    assert short.verify(token) == short.verify(token)  # the second answer comes from memory
    short._verified[token] = Grant("acct_1", int(time.time()) - 1)  # as if its exp had passed
    with pytest.raises(InvalidToken, match="expired"):
        short.verify(token)
    with pytest.raises(InvalidToken, match="expired"):
        short.verify(signed({"account_id": "acct_1", "exp": int(time.time()) - 1}))


def test_remembered_tokens_are_bounded() -> None:
    small = TokenVerifier(SECRET, max_ttl_seconds=3600, remembered=3)
    for n in range(5):
        small.verify(issuer.issue("acct_1", 600, subject=f"s{n}")[0])
    assert len(small._verified) == 3


def _outcome(decode: Callable[[], bytes]) -> bytes | None:
    try:
        return decode()
    except (DecodeError, InvalidToken):
        return None


@settings(max_examples=500, deadline=None)
@given(
    st.binary(max_size=40).map(lambda raw: raw.decode("latin-1"))
    | st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=+/!. ", max_size=40)
)
def test_segments_are_read_as_strictly_as_pyjwt_reads_them(segment: str) -> None:
    # PyJWT's own reader is the reference: a release that renames it fails here, to be looked at.
    reference = jwt.PyJWS._decode_base64url_segment
    ours = _outcome(lambda: _segment(segment))
    if not segment.isascii():
        assert ours is None  # never base64url, whatever its bytes
    else:
        assert ours == _outcome(lambda: reference(segment.encode(), "payload"))


def _verdicts(token: str) -> tuple[bool, bool]:
    """Whether PyJWS's HS256 verification accepts `token`, and whether the relay's does."""
    try:
        jwt.PyJWS().decode_complete(token, SECRET, algorithms=["HS256"])
        pyjwt_accepts = True
    except jwt.InvalidTokenError:
        pyjwt_accepts = False
    try:
        TokenVerifier(SECRET, max_ttl_seconds=3600).verify(token)
        ours = True
    except InvalidToken:
        ours = False
    return pyjwt_accepts, ours


HEADERS = [
    {"alg": "HS256", "typ": "JWT"},
    {"alg": "HS256"},
    {"alg": "HS256", "kid": "key-1"},
    {"alg": "HS256", "kid": 7},
    {"alg": "HS256", "typ": "at+jwt", "cty": "JWT", "x5u": "https://example/"},
    {"alg": "none"},
    {"alg": "HS512"},
    {"alg": "RS256"},
    {"alg": ["HS256"]},
    {"alg": ""},
    {"typ": "JWT"},
    {"alg": "HS256", "crit": ["b64"], "b64": False},
    {"alg": "HS256", "crit": ["exp"]},
    {"alg": "HS256", "crit": []},
    {"alg": "HS256", "b64": True},
    ["HS256"],
    "HS256",
]


@pytest.mark.parametrize("header", HEADERS, ids=[json.dumps(h) for h in HEADERS])
def test_a_correctly_signed_token_with_any_header_gets_pyjwts_verdict_or_a_stricter_one(
    header: object,
) -> None:
    claims = {"account_id": "acct_1", "exp": soon()}
    head = base64.urlsafe_b64encode(json.dumps(header).encode()).rstrip(b"=").decode()
    body = b64(claims)
    mac = hmac.new(SECRET.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    token = f"{head}.{body}." + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
    pyjwt_accepts, ours = _verdicts(token)
    strict_only = isinstance(header, dict) and ("crit" in header or "b64" in header)
    assert ours == (pyjwt_accepts and not strict_only), (ours, pyjwt_accepts)
    assert ours == (header in HEADERS[:3] or header == HEADERS[4])


def test_header_checks_are_remembered_but_a_repeated_name_is_still_refused() -> None:
    fresh = TokenVerifier(SECRET, max_ttl_seconds=3600)
    for n in range(3):
        fresh.verify(issuer.issue("acct_1", 600, subject=f"s{n}")[0])
    assert len(fresh._headers) == 1  # every issued token carries the same header
    repeated = base64.urlsafe_b64encode(b'{"alg": "HS256", "alg": "HS256"}').rstrip(b"=")
    body = b64({"account_id": "acct_1", "exp": soon()})
    mac = hmac.new(SECRET.encode(), repeated + b"." + body.encode(), hashlib.sha256).digest()
    token = f"{repeated.decode()}.{body}." + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
    with pytest.raises(InvalidToken, match="repeats a name"):
        fresh.verify(token)
    assert len(fresh._headers) == 1


def _signature_variants(canonical: str) -> list[str]:
    last = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    other_low_bits = last[last.index(canonical[-1]) ^ 1]  # same 32 bytes, unused bits differ
    return [
        canonical,
        canonical + "=",
        canonical + "==",
        canonical + "===",
        canonical[:-1] + other_low_bits,
        canonical[:-1] + other_low_bits + "=",
        canonical[:-1],
        canonical + "A",
        canonical.replace("-", "+").replace("_", "/"),
        canonical[:20] + "=" + canonical[20:],
        canonical + " ",
        " " + canonical,
        canonical + "\n",
        canonical + "é",
        "",
    ]


@settings(max_examples=300, deadline=None)
@given(
    st.integers(0, 14),
    st.text("AZaz09-_=+/ .é", max_size=3),
    st.booleans(),
)
def test_the_signature_segment_gets_pyjwts_verdict(variant: int, edit: str, append: bool) -> None:
    claims = {"account_id": "acct_1", "exp": soon()}
    head, body, canonical = signed(claims).split(".")
    signature = _signature_variants(canonical)[variant]
    signature = signature + edit if append else edit + signature
    token = f"{head}.{body}.{signature}"
    pyjwt_accepts, ours = _verdicts(token)
    assert ours == pyjwt_accepts, (signature, pyjwt_accepts)
    assert ours == (signature in (canonical, canonical + "="))  # bare, or with its one `=`
