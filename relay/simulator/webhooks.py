"""Webhooks out, signed as DialStack signs them."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
import time
from typing import Any

import httpx
import structlog

log = structlog.get_logger(__name__)

SIGNATURE_HEADER = "X-DialStack-Signature"
TIMEOUT_SECONDS = 5.0
MAX_QUEUED = 1_000


def signature_header(secret: str, body: bytes, timestamp: int) -> str:
    """`t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>`."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def envelope(
    event_type: str, account_id: str, data: dict[str, Any], id: str | None = None
) -> bytes:
    """The raw body: `{"id", "type", "account_id", "data"}`, with a fresh `evt_` id by default."""
    body = {
        "id": id or f"evt_{secrets.token_hex(12)}",
        "type": event_type,
        "account_id": account_id,
        "data": data,
    }
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


async def post(client: httpx.AsyncClient, url: str, secret: str, body: bytes) -> int:
    """POST one signed envelope; returns the receiver's HTTP status."""
    headers = {
        "Content-Type": "application/json",
        SIGNATURE_HEADER: signature_header(secret, body, int(time.time())),
    }
    response = await client.post(url, content=body, headers=headers)
    return response.status_code


class WebhookForwarder:
    """Posts generated call events to one URL, in order, without holding up the calls.

    Events queue up to a bound while the receiver is slow; past it they are dropped, as a
    receiver that cannot keep up would miss deliveries anyway.
    """

    def __init__(self, url: str, secret: str) -> None:
        self._url = url
        self._secret = secret
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=MAX_QUEUED)

    def offer(self, event_type: str, account_id: str, data: dict[str, Any]) -> None:
        try:
            self._queue.put_nowait(envelope(event_type, account_id, data))
        except asyncio.QueueFull:
            log.warning("webhook dropped, receiver too slow", account_id=account_id)

    async def run(self) -> None:
        async with httpx.AsyncClient(timeout=TIMEOUT_SECONDS) as client:
            while True:
                body = await self._queue.get()
                try:
                    status = await post(client, self._url, self._secret, body)
                except httpx.HTTPError as exc:
                    log.warning("webhook delivery failed", error=type(exc).__name__)
                    continue
                if status >= 300:
                    log.warning("webhook refused", status=status)
