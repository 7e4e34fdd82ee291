"""Subscriber tokens: what is accepted, and every way a token is refused."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import jwt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jwt.exceptions import DecodeError

from relay.auth import _JWS, Grant, InvalidToken, TokenIssuer, TokenVerifier, admin_key_matches

SECRET = "k" * 48
verifier = TokenVerifier(SECRET, max_ttl_seconds=3600)
issuer = TokenIssuer(SECRET, max_ttl_seconds=3600)


def b64(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def signed(claims: dict[str, object], key: str = SECRET, **kwargs: object) -> str:
    return jwt.encode(claims, key, algorithm="HS256", **kwargs)  # type: ignore[arg-type]


def signed_raw(claims: str) -> str:
    """A correctly signed token around claims JSON that json.dumps would not write."""
    head = b64({"alg": "HS256", "typ": "JWT"})
    body = base64.urlsafe_b64encode(claims.encode()).rstrip(b"=").decode()
    mac = hmac.new(SECRET.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
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
            jwt.encode({"account_id": "acct_1", "exp": soon()}, SECRET, algorithm="HS512"),
            "not valid",
        ),
        (signed({"account_id": "acct_1", "exp": soon(), "iat": soon()}), "not yet valid"),
        (signed({"account_id": "acct_1", "exp": soon(), "aud": "someone"}), "not valid"),
        (signed({"account_id": "acct_1", "exp": soon(), "iat": "0"}), "iat"),
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


def test_the_fast_segment_check_overrides_a_method_pyjwt_still_has() -> None:
    # Were it renamed in a PyJWT release, the override would silently stop being used.
    assert "_decode_base64url_segment" in vars(jwt.PyJWS)
    assert "_decode_base64url_segment" in vars(_JWS)


def _outcome(decode: object, segment: bytes) -> bytes | str:
    assert callable(decode)
    try:
        result: bytes = decode(segment, "payload")
    except DecodeError as exc:
        return f"DecodeError: {exc}"
    return result


@settings(max_examples=500, deadline=None)
@given(
    st.binary(max_size=40)
    | st.text(
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=+/!. ", max_size=40
    ).map(str.encode)
)
def test_the_fast_segment_check_answers_as_pyjwt_does(segment: bytes) -> None:
    ours = _outcome(_JWS._decode_base64url_segment, segment)
    assert ours == _outcome(jwt.PyJWS._decode_base64url_segment, segment)


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
