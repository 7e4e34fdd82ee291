"""DialStack webhook ingestion: signature check, envelope parsing, publish into the account channel.

A webhook is published as it came: its `type` as the event type, the exact JSON text of its `data`
as the event data (same key order, spacing and number spelling as DialStack sent), and its `id` as
the de-duplication key, so a redelivery is acknowledged without reaching clients twice.

Answers: 404 while disabled, 413 for a body over `webhooks.max_body_bytes`, 400 for a malformed
signature header or envelope, 401 for a missing, unmatched, stale or future-dated signature, and
200 `{"status": "accepted" | "duplicate", "id"}`. The body is authenticated before it is parsed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import structlog
from pydantic import SecretStr
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from relay.channel import Incoming
from relay.runtime import Relay

log = structlog.get_logger(__name__)

SIGNATURE_HEADER = "X-DialStack-Signature"
MAX_ID_LENGTH = 255  # envelope ids are kept in the broker's de-duplication window
MAX_TYPE_LENGTH = 128
_ACCOUNT_ID = re.compile(r"acct_[A-Za-z0-9_]{1,64}")
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")
_TIMESTAMP = re.compile(r"[0-9]{1,12}")
# The relay's own stream events; a webhook must not pose as one.
_RESERVED_TYPE = re.compile(r"connected|relay\..*")
_WHITESPACE = re.compile(r"[ \t\n\r]*")


class WebhookRejected(Exception):
    """The webhook is refused with `status`; `message` is safe to answer and log (no secret, no signature)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class Envelope:
    id: str
    type: str
    account_id: str
    data: str  # the JSON text of the envelope's `data` object, exactly as received


def configured_secrets(secret: SecretStr) -> list[str]:
    """`webhooks.secret` holds one signing secret, or several separated by commas while rotating."""
    return [part.strip() for part in secret.get_secret_value().split(",") if part.strip()]


# -- signature -------------------------------------------------------------------------------------


def _malformed(reason: str) -> NoReturn:
    raise WebhookRejected(400, f"malformed {SIGNATURE_HEADER} header: {reason}")


def _parse_header(header: str) -> tuple[str, list[str]]:
    """`t=<unix seconds>,v1=<hex>[,v1=<hex>...]`; schemes other than v1 are ignored."""
    timestamps: list[str] = []
    signatures: list[str] = []
    for item in header.split(","):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not key or not value:
            _malformed("expected comma-separated key=value items")
        if key == "t":
            timestamps.append(value)
        elif key == "v1":
            signatures.append(value.lower())
    if len(timestamps) != 1 or not _TIMESTAMP.fullmatch(timestamps[0]):
        _malformed("expected exactly one t=<unix seconds>")
    if not signatures:
        _malformed("expected at least one v1=<hex HMAC-SHA256>")
    if not all(_HEX_DIGEST.fullmatch(signature) for signature in signatures):
        _malformed("each v1 must be 64 hex digits")
    return timestamps[0], signatures


def verify_signature(
    header: str | None, body: bytes, secrets: Sequence[str], now: float, tolerance_seconds: int
) -> None:
    """Raise WebhookRejected unless a v1 signature of `body` matches one of `secrets` and is fresh.

    v1 = hex HMAC-SHA256(secret, "<t>.<raw body>"). Several v1 values and several secrets let
    either side rotate its secret without a gap. The timestamp is checked after the signature,
    so only a genuine but replayed or delayed delivery learns that it was too old.
    """
    if header is None:
        raise WebhookRejected(401, f"the {SIGNATURE_HEADER} header is required")
    timestamp, signatures = _parse_header(header)
    signed = f"{timestamp}.".encode() + body  # the digits as sent, leading zeros and all
    expected = [hmac.new(s.encode(), signed, hashlib.sha256).hexdigest() for s in secrets]
    if not any(hmac.compare_digest(e, s) for e in expected for s in signatures):
        raise WebhookRejected(401, "no signature matches the webhook secret")
    age = now - int(timestamp)
    if age > tolerance_seconds:
        raise WebhookRejected(
            401, f"signature timestamp is {int(age)} s old (tolerance {tolerance_seconds} s)"
        )
    if -age > tolerance_seconds:
        raise WebhookRejected(
            401,
            f"signature timestamp is {int(-age)} s in the future (tolerance {tolerance_seconds} s)",
        )


# -- envelope --------------------------------------------------------------------------------------


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


_decoder = json.JSONDecoder(parse_constant=_reject_constant)


def _members(text: str) -> dict[str, tuple[Any, str]]:
    """The members of a JSON object text, each value with its exact source text.

    Raises ValueError (or RecursionError, for absurd nesting) when `text` is not one JSON object.
    A repeated key keeps its last value, as json.loads does.
    """

    def skip(index: int) -> int:
        match = _WHITESPACE.match(text, index)
        assert match is not None  # `*` matches the empty string anywhere
        return match.end()

    index = skip(0)
    if not text.startswith("{", index):
        raise ValueError("not an object")
    index = skip(index + 1)
    members: dict[str, tuple[Any, str]] = {}
    closed = text.startswith("}", index)
    while not closed:
        if not text.startswith('"', index):
            raise ValueError("expected a member name")
        key, index = _decoder.raw_decode(text, index)
        index = skip(index)
        if not text.startswith(":", index):
            raise ValueError("expected ':'")
        start = skip(index + 1)
        value, end = _decoder.raw_decode(text, start)
        members[key] = (value, text[start:end])
        index = skip(end)
        closed = text.startswith("}", index)
        if not closed:
            if not text.startswith(",", index):
                raise ValueError("expected ',' or '}'")
            index = skip(index + 1)
    if skip(index + 1) != len(text):
        raise ValueError("trailing data after the object")
    return members


def _bad_envelope(reason: str) -> NoReturn:
    raise WebhookRejected(400, f"invalid webhook envelope: {reason}")


def parse_envelope(body: bytes) -> Envelope:
    """`{"id": str, "type": str, "account_id": "acct_...", "data": {...}}`, else WebhookRejected(400)."""
    try:
        members = _members(body.decode("utf-8"))
    except (ValueError, RecursionError):
        _bad_envelope("the body must be one JSON object in UTF-8")
    id = members.get("id", (None, ""))[0]
    type = members.get("type", (None, ""))[0]
    account_id = members.get("account_id", (None, ""))[0]
    data, data_text = members.get("data", (None, ""))
    # Printable excludes CR and LF (a type cannot add SSE fields), other controls and surrogates.
    if not isinstance(id, str) or not id.isprintable() or not 0 < len(id) <= MAX_ID_LENGTH:
        _bad_envelope(f"'id' must be a printable string of 1 to {MAX_ID_LENGTH} characters")
    if not isinstance(type, str) or not type.isprintable() or not 0 < len(type) <= MAX_TYPE_LENGTH:
        _bad_envelope(f"'type' must be a printable string of 1 to {MAX_TYPE_LENGTH} characters")
    if _RESERVED_TYPE.fullmatch(type):
        _bad_envelope(f"'type' {type!r} is reserved for the relay's own events")
    if not isinstance(account_id, str) or not _ACCOUNT_ID.fullmatch(account_id):
        _bad_envelope("'account_id' must be an account id (acct_...)")
    if not isinstance(data, dict):
        _bad_envelope("'data' must be a JSON object")
    return Envelope(id, type, account_id, data_text)


# -- HTTP ------------------------------------------------------------------------------------------


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit` bytes."""
    too_large = WebhookRejected(413, f"body larger than {limit} bytes (webhooks.max_body_bytes)")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


def _answer(status: int, content: dict[str, str]) -> JSONResponse:
    return JSONResponse(content, status_code=status)


async def dialstack_webhook(request: Request) -> Response:
    """`POST /v1/webhooks/dialstack`: verify, parse and publish one webhook; answers in a few ms."""
    # Not relay.app.runtime(): app.py imports this module to mount the route.
    relay: Relay = request.app.state.relay
    settings = relay.settings.webhooks
    if not settings.enabled or settings.secret is None:
        return _answer(404, {"error": "webhook ingestion is disabled (webhooks.enabled)"})
    try:
        body = await read_body(request, settings.max_body_bytes)
        verify_signature(
            request.headers.get(SIGNATURE_HEADER),
            body,
            configured_secrets(settings.secret),
            time.time(),
            settings.tolerance_seconds,
        )
        envelope = parse_envelope(body)
    except WebhookRejected as exc:
        log.warning("webhook rejected", status=exc.status, reason=exc.message)
        return _answer(exc.status, {"error": exc.message})
    fresh = await relay.hub.publish(
        envelope.account_id,
        Incoming(envelope.type, envelope.data, upstream_id=envelope.id),
        source="webhook",
    )
    outcome = "accepted" if fresh else "duplicate"
    log.info("webhook " + outcome, account=envelope.account_id, type=envelope.type, id=envelope.id)
    return _answer(200, {"status": outcome, "id": envelope.id})
