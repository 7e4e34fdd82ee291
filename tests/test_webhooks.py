"""Webhook ingestion: the signature check and envelope parsing alone, then over real HTTP into SSE clients."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st
from pydantic import SecretStr
from streams import Stream, open_stream

from relay.demo import DemoStack, demo_stack
from relay.webhooks import (
    SIGNATURE_HEADER,
    Envelope,
    WebhookRejected,
    configured_secrets,
    parse_envelope,
    verify_signature,
)

SECRET = "whsec_test_" + "s" * 32
OLD_SECRET = "whsec_old_" + "o" * 32
NOW = 1_700_000_000
TOLERANCE = 300
BODY = b'{"id":"evt_1","type":"call.incoming","account_id":"acct_demo","data":{}}'
MAX_BODY = 2048


def v1(body: bytes, timestamp: int, secret: str = SECRET) -> str:
    """Signed independently of the code under test, as DialStack documents it."""
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def header(body: bytes, timestamp: int = NOW, secret: str = SECRET) -> str:
    return f"t={timestamp},v1={v1(body, timestamp, secret)}"


def verify(
    value: str | None, body: bytes = BODY, secrets: tuple[str, ...] = (SECRET,), now: float = NOW
) -> None:
    verify_signature(value, body, secrets, now, TOLERANCE)


def rejected(call: Callable[[], object]) -> WebhookRejected:
    with pytest.raises(WebhookRejected) as info:
        call()
    return info.value


# -- verify_signature ------------------------------------------------------------------------------


def test_good_signature_is_accepted() -> None:
    verify(header(BODY))


def test_any_of_several_v1_values_may_match() -> None:
    verify(f"t={NOW},v1={v1(BODY, NOW, OLD_SECRET)},v1={v1(BODY, NOW)}")
    verify(f"t={NOW},v1={v1(BODY, NOW)},v1={v1(BODY, NOW, OLD_SECRET)}")


def test_any_of_several_configured_secrets_may_match() -> None:
    verify(header(BODY, secret=OLD_SECRET), secrets=(SECRET, OLD_SECRET))
    verify(header(BODY), secrets=(OLD_SECRET, SECRET))


def test_lenient_on_spacing_hex_case_and_unknown_schemes() -> None:
    signature = v1(BODY, NOW)
    verify(f" t={NOW} , v0=abc, v1={signature.upper()} ")
    verify(f"v1={signature},t={NOW}")


def test_timestamp_is_signed_as_written() -> None:
    signed_with_zero = hmac.new(SECRET.encode(), f"0{NOW}.".encode() + BODY, hashlib.sha256)
    verify(f"t=0{NOW},v1={signed_with_zero.hexdigest()}")
    assert rejected(lambda: verify(f"t=0{NOW},v1={v1(BODY, NOW)}")).status == 401


@pytest.mark.parametrize(
    ("value", "body", "reason"),
    [
        (header(BODY, secret=OLD_SECRET), BODY, "no signature matches"),
        (header(BODY), BODY.replace(b"evt_1", b"evt_2"), "no signature matches"),
        (header(BODY).replace(f"t={NOW}", f"t={NOW + 1}"), BODY, "no signature matches"),
        (header(BODY, NOW - TOLERANCE - 1), BODY, "s old"),
        (header(BODY, NOW + TOLERANCE + 1), BODY, "in the future"),
        (None, BODY, "header is required"),
    ],
    ids=["wrong-secret", "tampered-body", "tampered-timestamp", "stale", "future", "missing"],
)
def test_unauthenticated_is_401(value: str | None, body: bytes, reason: str) -> None:
    error = rejected(lambda: verify(value, body))
    assert error.status == 401
    assert reason in error.message
    for secret_part in (SECRET, v1(BODY, NOW)):
        assert secret_part not in error.message


def test_tolerance_is_inclusive_both_ways() -> None:
    verify(header(BODY, NOW - TOLERANCE))
    verify(header(BODY, NOW + TOLERANCE))


def test_no_configured_secret_matches_nothing() -> None:
    assert rejected(lambda: verify(header(BODY), secrets=())).status == 401


GOOD = v1(BODY, NOW)


@pytest.mark.parametrize(
    "value",
    [
        "",
        " ",
        "garbage",
        f"t={NOW}",
        f"v1={GOOD}",
        f"t={NOW},v1=",
        f"t=,v1={GOOD}",
        f"={NOW},v1={GOOD}",
        f"t={NOW},,v1={GOOD}",
        f"t={NOW},v1={GOOD},",
        f"t={NOW};v1={GOOD}",
        f"t={NOW} v1={GOOD}",
        f"t={NOW},t={NOW},v1={GOOD}",
        f"t=-{NOW},v1={GOOD}",
        f"t={NOW}.5,v1={GOOD}",
        f"t=1e9,v1={GOOD}",
        f"t=0x10,v1={GOOD}",
        f"t={'9' * 13},v1={GOOD}",
        f"t=١٢٣,v1={GOOD}",  # non-ASCII digits that int() would take
        f"t={NOW},v1={GOOD[:-1]}",
        f"t={NOW},v1={GOOD}0",
        f"t={NOW},v1={'z' * 64}",
        f"t={NOW},v1={GOOD},v1=nothex",
        f"t={NOW},v0={GOOD}",
    ],
)
def test_malformed_header_is_400(value: str) -> None:
    error = rejected(lambda: verify(value))
    assert error.status == 400
    assert error.message.startswith(f"malformed {SIGNATURE_HEADER} header")
    assert GOOD not in error.message


def test_configured_secrets_split_on_commas() -> None:
    assert configured_secrets(SecretStr(SECRET)) == [SECRET]
    assert configured_secrets(SecretStr(f" {SECRET} , {OLD_SECRET},")) == [SECRET, OLD_SECRET]


# -- parse_envelope --------------------------------------------------------------------------------


def test_envelope_keeps_the_exact_text_of_data() -> None:
    data = '{ "from_number":"+15550100",\n  "big": 12345678901234567890123, "f": 1.50, "e": "\\u00e9",\n "n": {"a": [1, {}]}}'
    body = f'\n{{"data" : {data} ,"id":"evt_1", "type":"call.incoming","account_id":"acct_1"}}\n'
    assert parse_envelope(body.encode()) == Envelope("evt_1", "call.incoming", "acct_1", data)


def test_envelope_with_empty_data_and_unknown_members() -> None:
    body = b'{"id":"e","type":"call.future","account_id":"acct_1","data":{},"created":1,"livemode":true}'
    assert parse_envelope(body) == Envelope("e", "call.future", "acct_1", "{}")


def test_repeated_member_keeps_the_last_like_json_loads() -> None:
    body = b'{"id":"a","id":"b","type":"t","account_id":"acct_1","data":{"x":1},"data":{"x":2}}'
    assert parse_envelope(body) == Envelope("b", "t", "acct_1", '{"x":2}')


def envelope_json(**changes: Any) -> bytes:
    envelope: dict[str, Any] = {
        "id": "evt_1",
        "type": "call.incoming",
        "account_id": "acct_1",
        "data": {},
    }
    envelope.update(changes)
    return json.dumps({k: v for k, v in envelope.items() if v is not ...}).encode()


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "one JSON object"),
        (b"not json", "one JSON object"),
        (b"[]", "one JSON object"),
        (b'"text"', "one JSON object"),
        (b"{", "one JSON object"),
        (b'{"id":"e",}', "one JSON object"),
        (b'{"id" "e"}', "one JSON object"),
        (b'{"id":"e"} {}', "one JSON object"),
        (b'{"id":"e"}x', "one JSON object"),
        (b'{id:"e"}', "one JSON object"),
        (b'{"id":"e" "type":"t"}', "one JSON object"),
        (b'{"a":"\xff"}', "one JSON object"),
        (b"\xef\xbb\xbf{}", "one JSON object"),
        (b'{"data":{"n":NaN}}', "one JSON object"),
        (b'{"data":{"n":-Infinity}}', "one JSON object"),
        (b'{"data":' + b"[" * 100_000 + b"]" * 100_000 + b"}", "one JSON object"),
        (envelope_json(id=...), "'id'"),
        (envelope_json(id=""), "'id'"),
        (envelope_json(id=7), "'id'"),
        (envelope_json(id="a\nb"), "'id'"),
        (envelope_json(id="x" * 256), "'id'"),
        (envelope_json(type=...), "'type'"),
        (envelope_json(type=""), "'type'"),
        (envelope_json(type=None), "'type'"),
        (envelope_json(type="call.incoming\ndata: forged"), "'type'"),
        (envelope_json(type="call.incoming\r"), "'type'"),
        (envelope_json(type="call\x00"), "'type'"),
        (envelope_json(type="call\u2028x"), "'type'"),
        (envelope_json(type="\ud800"), "'type'"),
        (envelope_json(type="t" * 129), "'type'"),
        (envelope_json(type="relay.reset"), "reserved"),
        (envelope_json(type="relay.upstream"), "reserved"),
        (envelope_json(type="connected"), "reserved"),
        (envelope_json(account_id=...), "'account_id'"),
        (envelope_json(account_id="acct_"), "'account_id'"),
        (envelope_json(account_id="cus_1"), "'account_id'"),
        (envelope_json(account_id="acct_1/../x"), "'account_id'"),
        (envelope_json(account_id=["acct_1"]), "'account_id'"),
        (envelope_json(data=...), "'data'"),
        (envelope_json(data=None), "'data'"),
        (envelope_json(data=[]), "'data'"),
        (envelope_json(data="{}"), "'data'"),
    ],
)
def test_bad_envelope_is_400_saying_what(body: bytes, reason: str) -> None:
    error = rejected(lambda: parse_envelope(body))
    assert error.status == 400
    assert error.message.startswith("invalid webhook envelope")
    assert reason in error.message


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@given(
    data=st.dictionaries(st.text(max_size=8), json_values, max_size=5),
    indent=st.sampled_from([None, 0, 2]),
    ensure_ascii=st.booleans(),
)
def test_data_text_is_what_was_sent(
    data: dict[str, Any], indent: int | None, ensure_ascii: bool
) -> None:
    envelope = {"id": "evt_1", "type": "call.x", "account_id": "acct_1", "data": data}
    body = json.dumps(envelope, indent=indent, ensure_ascii=ensure_ascii)
    sent = json.dumps(data, indent=indent, ensure_ascii=ensure_ascii)
    if indent is not None:
        sent = sent.replace("\n", "\n" + " " * indent)  # nested one level inside the envelope
    parsed = parse_envelope(body.encode())
    assert parsed.data == sent
    assert json.loads(parsed.data) == data


# -- end to end: a relay and a simulated DialStack on loopback -------------------------------------


@pytest.fixture
async def stack() -> AsyncIterator[DemoStack]:
    webhooks = {"enabled": True, "secret": f"{SECRET},{OLD_SECRET}", "max_body_bytes": MAX_BODY}
    async with demo_stack(call_interval_seconds=None, webhooks=webhooks) as running:
        yield running


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(5.0, read=None)) as http:
        yield http


def webhook_body(
    type: str, account_id: str = "acct_demo", id: str | None = None, **data: Any
) -> bytes:
    envelope = {"id": id or f"evt_{type}", "type": type, "account_id": account_id, "data": data}
    return json.dumps(envelope).encode()


async def post(
    client: httpx.AsyncClient, stack: DemoStack, body: bytes, signature: str | None = "sign"
) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if signature == "sign":
        signature = header(body, int(time.time()))
    if signature is not None:
        headers[SIGNATURE_HEADER] = signature
    return await client.post(
        f"{stack.relay_url}/v1/webhooks/dialstack", content=body, headers=headers
    )


@pytest.fixture
async def subscriber(stack: DemoStack, client: httpx.AsyncClient) -> AsyncIterator[Stream]:
    async with open_stream(client, f"{stack.relay_url}/v1/events", token=stack.token()) as stream:
        assert stream.status_code == 200
        await stream.wait_count("connected", 1)
        yield stream


async def marker(
    client: httpx.AsyncClient, stack: DemoStack, stream: Stream, account_id: str = "acct_demo"
) -> None:
    """Publish a marker and wait for it: anything published before it has been delivered by now."""
    response = await post(
        client, stack, webhook_body("test.marker", account_id, id=f"marker_{time.monotonic_ns()}")
    )
    assert response.status_code == 200
    await stream.wait_count("test.marker", 1)


async def test_signed_webhook_reaches_only_its_accounts_subscribers(
    stack: DemoStack, client: httpx.AsyncClient, subscriber: Stream
) -> None:
    url = f"{stack.relay_url}/v1/webhooks/dialstack"
    data = {"call_id": "call_1", "from_number": "+15550100", "from_name": None, "user_id": None}
    async with open_stream(
        client, f"{stack.relay_url}/v1/events", token=stack.token("acct_other")
    ) as other:
        await other.wait_count("connected", 1)
        status = await stack.simulator.send_webhook(
            url, SECRET, "call.incoming", "acct_demo", data, id="evt_a"
        )
        assert status == 200
        [event] = await subscriber.wait_count("call.incoming", 1)
        assert event.data == json.dumps(data, ensure_ascii=False, separators=(",", ":"))
        assert event.id  # a relay id, so the client can resume with Last-Event-ID
        await marker(client, stack, other, "acct_other")
        assert other.of_type("call.incoming") == []


async def test_data_is_relayed_exactly_as_sent(
    stack: DemoStack, client: httpx.AsyncClient, subscriber: Stream
) -> None:
    data = '{"call_id": "call_1",\n  "amount": 1.50, "to_number": "+15550199", "name": "\\u00e9"}'
    body = f'{{"id": "evt_x", "type": "call.answered", "account_id": "acct_demo", "data": {data}}}'.encode()
    response = await post(client, stack, body)
    assert response.json() == {"status": "accepted", "id": "evt_x"}
    [event] = await subscriber.wait_count("call.answered", 1)
    assert event.data == data


async def test_redelivery_is_acknowledged_but_not_sent_twice(
    stack: DemoStack, client: httpx.AsyncClient, subscriber: Stream
) -> None:
    body = webhook_body("call.end", id="evt_again", call_id="call_1")
    first = await post(client, stack, body)
    assert (first.status_code, first.json()) == (200, {"status": "accepted", "id": "evt_again"})
    # DialStack signs each delivery afresh; only the envelope id says it is the same event.
    again = await post(client, stack, body, header(body, int(time.time()) + 1))
    assert (again.status_code, again.json()) == (200, {"status": "duplicate", "id": "evt_again"})
    await marker(client, stack, subscriber)
    assert len(subscriber.of_type("call.end")) == 1


async def test_same_id_in_another_account_is_not_a_duplicate(
    stack: DemoStack, client: httpx.AsyncClient, subscriber: Stream
) -> None:
    other = await post(client, stack, webhook_body("call.end", "acct_other", id="evt_shared"))
    assert other.json()["status"] == "accepted"
    mine = await post(client, stack, webhook_body("call.end", "acct_demo", id="evt_shared"))
    assert mine.json()["status"] == "accepted"
    await subscriber.wait_count("call.end", 1)


def _forged() -> tuple[bytes, str | None]:
    body = webhook_body("call.forged")
    return body, header(body, int(time.time()), "whsec_attacker_" + "a" * 32)


def _stale() -> tuple[bytes, str | None]:
    body = webhook_body("call.stale")
    return body, header(body, int(time.time()) - TOLERANCE - 60)


def _future() -> tuple[bytes, str | None]:
    body = webhook_body("call.future")
    return body, header(body, int(time.time()) + TOLERANCE + 60)


def _tampered() -> tuple[bytes, str | None]:
    body = webhook_body("call.tampered", user_id="u_1")
    return body.replace(b"u_1", b"u_2"), header(body, int(time.time()))


def _unsigned() -> tuple[bytes, str | None]:
    return webhook_body("call.unsigned"), None


def _malformed_header() -> tuple[bytes, str | None]:
    body = webhook_body("call.malformed")
    return body, header(body, int(time.time())).replace("v1=", "v2=")


def _bad_envelope() -> tuple[bytes, str | None]:
    body = json.dumps(
        {"id": "evt_bad", "type": "call.bad", "account_id": "acct_demo", "data": []}
    ).encode()
    return body, header(body, int(time.time()))


@pytest.mark.parametrize(
    ("make", "status"),
    [
        (_forged, 401),
        (_stale, 401),
        (_future, 401),
        (_tampered, 401),
        (_unsigned, 401),
        (_malformed_header, 400),
        (_bad_envelope, 400),
    ],
    ids=["forged", "stale", "future", "tampered", "unsigned", "malformed-header", "bad-envelope"],
)
async def test_refused_webhook_answers_json_and_is_not_delivered(
    stack: DemoStack,
    client: httpx.AsyncClient,
    subscriber: Stream,
    make: Callable[[], tuple[bytes, str | None]],
    status: int,
) -> None:
    body, signature = make()
    event_type = json.loads(body)["type"]
    with structlog.testing.capture_logs() as logs:
        response = await post(client, stack, body, signature)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]
    assert [entry["status"] for entry in logs if entry["event"] == "webhook rejected"] == [status]
    logged = repr(logs)
    assert SECRET not in logged
    assert OLD_SECRET not in logged
    if signature is not None:
        assert signature.rpartition("=")[2] not in logged
    await marker(client, stack, subscriber)
    assert subscriber.of_type(event_type) == []


async def test_a_refused_delivery_does_not_use_up_its_id(
    stack: DemoStack, client: httpx.AsyncClient, subscriber: Stream
) -> None:
    body = webhook_body("call.incoming", id="evt_retry")
    refused = await post(
        client, stack, body, header(body, int(time.time()), "whsec_wrong_" + "w" * 32)
    )
    assert refused.status_code == 401
    accepted = await post(client, stack, body)
    assert accepted.json() == {"status": "accepted", "id": "evt_retry"}
    await subscriber.wait_count("call.incoming", 1)


async def test_secret_being_rotated_out_is_still_accepted(
    stack: DemoStack, client: httpx.AsyncClient, subscriber: Stream
) -> None:
    body = webhook_body("call.initiated")
    response = await post(client, stack, body, header(body, int(time.time()), OLD_SECRET))
    assert response.status_code == 200
    await subscriber.wait_count("call.initiated", 1)


async def test_oversize_body_is_413_with_or_without_content_length(
    stack: DemoStack, client: httpx.AsyncClient, subscriber: Stream
) -> None:
    body = webhook_body("call.huge", padding="x" * MAX_BODY)
    declared = await post(client, stack, body)
    assert declared.status_code == 413
    assert "max_body_bytes" in declared.json()["error"]

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 512):
            yield body[start : start + 512]

    headers = {SIGNATURE_HEADER: header(body, int(time.time()))}
    url = f"{stack.relay_url}/v1/webhooks/dialstack"
    streamed = await client.post(url, content=chunks(), headers=headers)
    assert "content-length" not in streamed.request.headers
    assert streamed.status_code == 413
    await marker(client, stack, subscriber)
    assert subscriber.of_type("call.huge") == []


async def test_body_at_the_limit_is_accepted(
    stack: DemoStack, client: httpx.AsyncClient, subscriber: Stream
) -> None:
    body = webhook_body("call.full", padding="")
    body = webhook_body("call.full", padding="x" * (MAX_BODY - len(body)))
    assert len(body) == MAX_BODY
    assert (await post(client, stack, body)).status_code == 200
    await subscriber.wait_count("call.full", 1)


async def test_disabled_webhooks_are_404(client: httpx.AsyncClient) -> None:
    async with demo_stack(call_interval_seconds=None) as disabled:
        body = webhook_body("call.incoming")
        response = await post(client, disabled, body)
    assert response.status_code == 404
    assert "webhooks.enabled" in response.json()["error"]


async def test_only_post_is_routed(stack: DemoStack, client: httpx.AsyncClient) -> None:
    response = await client.get(f"{stack.relay_url}/v1/webhooks/dialstack")
    assert response.status_code == 405


async def test_many_concurrent_webhooks_all_arrive_once_in_each_stream(
    stack: DemoStack, client: httpx.AsyncClient, subscriber: Stream
) -> None:
    bodies = [webhook_body("call.burst", id=f"evt_burst_{n}", n=n) for n in range(50)]
    responses = await asyncio.gather(*(post(client, stack, body) for body in bodies * 2))
    statuses = sorted(r.json()["status"] for r in responses)
    assert statuses == ["accepted"] * 50 + ["duplicate"] * 50
    events = await subscriber.wait_count("call.burst", 50)
    await marker(client, stack, subscriber)
    assert sorted(json.loads(e.data)["n"] for e in subscriber.of_type("call.burst")) == list(
        range(50)
    )
    assert len(events) == 50
