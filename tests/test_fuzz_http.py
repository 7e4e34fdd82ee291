"""Issue 8, fuzzing the HTTP surface of a running relay over loopback.

Arbitrary headers, query strings, cookies, token strings (forged, and signed with the right key
around arbitrary claims), Last-Event-ID values, admin keys, webhook bodies and signatures. Every
answer must be a documented status; every refusal must be JSON `{"error": "..."}`; never a 500, a
traceback, or a hang. Requests are written byte for byte on a bare socket, so nothing an HTTP
client library would refuse to send is left out. The example counts are the ones reported in
docs/hardening.md; each test's relay serves all of its examples.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote_from_bytes

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.demo import DemoStack, demo_stack

RUNS_EVENTS_REQUESTS = 400
RUNS_SIGNED_CLAIMS = 300
RUNS_WEBHOOKS_UNSIGNED = 300
RUNS_WEBHOOKS_SIGNED = 300
RUNS_ADMIN = 200

WEBHOOK_SECRET = "whsec_fuzzing_0123456789abcdef"
ACCT = "acct_demo"
# uvicorn's own answer to bytes that are not HTTP/1.1: before the relay, and not the relay's to shape.
PROTOCOL_REJECTION = b"Invalid HTTP request received."


def fuzz(runs: int) -> settings:
    # One relay per test serves every example: the fixture is shared by design.
    return settings(
        max_examples=runs,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


@pytest.fixture
async def relay() -> AsyncIterator[DemoStack]:
    webhooks = {"enabled": True, "secret": WEBHOOK_SECRET}
    async with demo_stack(call_interval_seconds=None, webhooks=webhooks) as stack:
        yield stack


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


async def exchange(stack: DemoStack, request: bytes) -> Answer:
    """Send `request` as is; read the answer's head and its body (a stream: up to `connected`)."""
    host, port = stack.relay_url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        async with asyncio.timeout(5):
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = {}
            for line in filter(None, lines[1:]):
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            if "content-length" in headers:
                body = await reader.readexactly(int(headers["content-length"]))
            else:
                body = b""
                while b"event: connected" not in body:
                    chunk = await reader.read(65536)
                    assert chunk, f"the stream ended before `connected`: {body!r}"
                    body += chunk
            return Answer(int(lines[0].split(" ")[1]), headers, body)
    finally:
        writer.close()


def assert_documented(answer: Answer, allowed: set[int]) -> None:
    assert answer.status in allowed, answer
    if answer.status == 400 and answer.body == PROTOCOL_REJECTION:
        return
    assert answer.headers["content-type"].startswith("application/json"), answer
    body = json.loads(answer.body)
    if answer.status >= 400:
        assert set(body) == {"error"}, answer
        assert isinstance(body["error"], str)
        assert body["error"]


def request(
    method: str, target: str, headers: list[tuple[bytes, bytes]], body: bytes = b""
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1".encode(), b"Host: relay.test"]
    lines += [name + b": " + value for name, value in headers]
    if body or method == "POST":
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


# -- strategies ------------------------------------------------------------------------------------

TOKEN_CHARS = st.characters(codec="ascii", exclude_characters="\r\n")
# Header values: any byte but CR and LF (a NUL makes the request malformed, which is fine too).
header_values = st.binary(max_size=120).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
header_names = st.from_regex(rb"\A[A-Za-z0-9!#$%&'*+.^_`|~-]{1,24}\Z")
query_values = st.binary(max_size=60).map(lambda b: quote_from_bytes(b, safe=""))
relay_ids = st.builds(lambda ms, seq: f"{ms}-{seq}", st.integers(0, 2**70), st.integers(0, 2**70))
last_event_ids = relay_ids | st.text(TOKEN_CHARS, max_size=80) | st.just("x" * 8000)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


@st.composite
def token_strings(draw: st.DrawFn, stack: DemoStack) -> str:
    """A token a client might send: valid, cut, tampered, foreign, or noise."""
    valid = stack.token(ACCT, 600)
    return draw(
        st.sampled_from([valid, valid[:-3], valid + "x", valid.replace(".", "..", 1), "Bearer"])
        | st.text(TOKEN_CHARS, max_size=200)
        | st.just("a" * 9000)
    )


def hs256(header: dict[str, Any], claims: dict[str, Any], key: str) -> str:
    """A JWT signed by hand, so that even headers a JWT library refuses to write can be sent."""
    signing_input = b".".join(
        base64.urlsafe_b64encode(json.dumps(part).encode()).rstrip(b"=")
        for part in (header, claims)
    )
    mac = hmac.new(key.encode(), signing_input, hashlib.sha256).digest()
    return (signing_input + b"." + base64.urlsafe_b64encode(mac).rstrip(b"=")).decode()


# -- the event stream ------------------------------------------------------------------------------


@fuzz(RUNS_EVENTS_REQUESTS)
@given(data=st.data())
async def test_event_stream_requests_with_arbitrary_headers_and_queries(
    relay: DemoStack, data: st.DataObject
) -> None:
    token = data.draw(token_strings(relay))
    headers: list[tuple[bytes, bytes]] = []
    where = data.draw(st.sampled_from(["bearer", "cookie", "query", "raw", "none"]))
    if where == "bearer":
        headers.append((b"Authorization", b"Bearer " + token.encode()))
    elif where == "cookie":
        cookie = data.draw(header_values)
        headers.append((b"Cookie", cookie + b"; relay_token=" + token.encode()))
    elif where == "raw":
        headers.append((b"Authorization", data.draw(header_values)))
    if data.draw(st.booleans()):
        headers.append((b"Last-Event-ID", data.draw(last_event_ids).encode()))
    headers += data.draw(st.lists(st.tuples(header_names, header_values), max_size=4))
    query = data.draw(
        st.lists(
            st.tuples(
                st.sampled_from(["events", "last_event_id", "token", "x", ""]) | query_values,
                query_values | last_event_ids.map(lambda v: quote_from_bytes(v.encode())),
            ),
            max_size=4,
        )
    )
    if where == "query":
        query.append(("token", quote_from_bytes(token.encode())))
    target = "/v1/events?" + "&".join(f"{k}={v}" for k, v in query)
    answer = await exchange(relay, request("GET", target, headers))
    assert_documented_stream(answer)


def assert_documented_stream(answer: Answer) -> None:
    if answer.status == 200:
        assert answer.headers["content-type"].startswith("text/event-stream")
        assert b"event: connected" in answer.body
    else:
        assert_documented(answer, {400, 401, 429})


CLAIMS = ("account_id", "exp", "nbf", "iat", "sub", "user_id", "events")
claim_values = (
    st.integers(-5, 7200).map(lambda d: int(time.time()) + d)
    | st.integers(-5, 7200).map(lambda d: str(int(time.time()) + d))
    | st.sampled_from([ACCT, "acct_", "acct_x\ny", ["call.end"], [""], 2**64, -1, 1e300])
    | json_values
)


@fuzz(RUNS_SIGNED_CLAIMS)
@given(
    # Mutations of a valid token: a few claims changed, added or removed.
    changed=st.dictionaries(st.sampled_from(CLAIMS), claim_values, max_size=3),
    removed=st.sets(st.sampled_from(CLAIMS), max_size=1),
    header=st.fixed_dictionaries(
        {}, optional={"kid": json_values, "typ": json_values, "crit": json_values}
    ),
)
async def test_tokens_signed_with_the_right_key_around_any_claims_are_200_or_401(
    relay: DemoStack, changed: dict[str, Any], removed: set[str], header: dict[str, Any]
) -> None:
    claims = {"account_id": ACCT, "exp": int(time.time()) + 600, **changed}
    for name in removed:
        claims.pop(name, None)
    assert relay.settings.auth.secret is not None
    secret = relay.settings.auth.secret.get_secret_value()
    token = hs256({"alg": "HS256", **header}, claims, secret)
    answer = await exchange(
        relay, request("GET", "/v1/events", [(b"Authorization", f"Bearer {token}".encode())])
    )
    assert_documented_stream(answer)
    assert answer.status in (200, 401)


# -- webhooks --------------------------------------------------------------------------------------


def signature(body: bytes, timestamp: int, secret: str = WEBHOOK_SECRET) -> bytes:
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}".encode()


@fuzz(RUNS_WEBHOOKS_UNSIGNED)
@given(
    body=st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()),
    header=st.none()
    | header_values
    | st.builds(
        lambda t, sig: f"t={t},v1={sig}".encode(),
        st.integers(-(2**40), 2**40) | st.text(TOKEN_CHARS, max_size=14),
        st.text("0123456789abcdefABCDEF", max_size=70),
    ),
)
async def test_webhooks_with_any_body_and_signature_header_are_refused_in_json(
    relay: DemoStack, body: bytes, header: bytes | None
) -> None:
    headers = [(b"Content-Type", b"application/json")]
    if header is not None:
        headers.append((b"X-DialStack-Signature", header))
    answer = await exchange(relay, request("POST", "/v1/webhooks/dialstack", headers, body))
    assert_documented(answer, {400, 401, 413})


@fuzz(RUNS_WEBHOOKS_SIGNED)
@given(
    envelope=st.fixed_dictionaries(
        {},
        optional={
            "id": st.text(max_size=20) | json_values,
            "type": st.sampled_from(["call.incoming", "connected", "relay.reset"])
            | st.text(max_size=20)
            | json_values,
            "account_id": st.just(ACCT) | st.text(max_size=12) | json_values,
            "data": st.dictionaries(st.text(max_size=6), json_values, max_size=3) | json_values,
            "extra": json_values,
        },
    ),
    skew=st.sampled_from([0, 0, 0, -400, 400]),
)
async def test_signed_webhooks_with_any_envelope_are_accepted_or_refused_in_json(
    relay: DemoStack, envelope: dict[str, Any], skew: int
) -> None:
    body = json.dumps(envelope).encode()
    headers = [(b"X-DialStack-Signature", signature(body, int(time.time()) + skew))]
    answer = await exchange(relay, request("POST", "/v1/webhooks/dialstack", headers, body))
    assert_documented(answer, {200, 400, 401})
    if answer.status == 200:
        assert json.loads(answer.body)["status"] in ("accepted", "duplicate")


# -- admin -----------------------------------------------------------------------------------------


@fuzz(RUNS_ADMIN)
@given(
    authorization=st.none() | header_values,
    path=st.sampled_from(["/v1/status", "/v1/tokens"]),
    body=st.binary(max_size=100) | json_values.map(lambda v: json.dumps(v).encode()),
)
async def test_admin_endpoints_answer_nothing_but_401_to_a_wrong_key(
    relay: DemoStack, authorization: bytes | None, path: str, body: bytes
) -> None:
    headers = [] if authorization is None else [(b"Authorization", authorization)]
    method = "GET" if path == "/v1/status" else "POST"
    answer = await exchange(relay, request(method, path, headers, body))
    assert_documented(answer, {400, 401})
    assert answer.status == 401 or answer.body == PROTOCOL_REJECTION


@fuzz(RUNS_ADMIN)
@given(
    body=st.binary(max_size=200)
    | json_values.map(lambda v: json.dumps(v).encode())
    | st.fixed_dictionaries(
        {},
        optional={
            "account_id": st.just(ACCT) | json_values,
            "ttl_seconds": st.integers() | json_values,
            "user_id": json_values,
            "events": st.lists(st.text(max_size=6), max_size=3) | json_values,
        },
    ).map(lambda v: json.dumps(v).encode())
)
async def test_minting_tokens_from_any_body_is_200_or_400(relay: DemoStack, body: bytes) -> None:
    assert relay.settings.auth.admin_key is not None
    key = relay.settings.auth.admin_key.get_secret_value()
    headers = [(b"Authorization", f"Bearer {key}".encode()), (b"Content-Type", b"application/json")]
    answer = await exchange(relay, request("POST", "/v1/tokens", headers, body))
    assert_documented(answer, {200, 400})


async def test_unknown_routes_and_methods_answer_a_json_error(relay: DemoStack) -> None:
    for method, path in [
        ("POST", "/v1/events"),  # the relay's own 405: JSON
        ("GET", "/v1/nothing"),
        ("DELETE", "/v1/tokens"),
        ("PUT", "/v1/status"),
        ("GET", "/static/nothing.js"),
    ]:
        answer = await exchange(relay, request(method, path, []))
        assert_documented(answer, {404, 405})
