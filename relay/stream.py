"""The SSE response of one subscriber: connected, replay or reset, then live frames and heartbeats."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.types import Message, Receive, Scope, Send

from relay.channel import UpstreamStatus
from relay.hub import Opened, reset_frame, upstream_frame
from relay.sse import encode_event
from relay.subscriber import Subscriber

STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
SEND_TIMEOUT_SECONDS = 30.0  # a socket that takes no bytes for this long is gone (vanished client)


def connected_frame(account_id: str, retry_ms: int) -> bytes:
    payload = {"message": "Connected to event stream", "account_id": account_id, "via": "relay"}
    return encode_event(json.dumps(payload), event="connected", retry_ms=retry_ms)


async def _frames(
    opened: Opened,
    first: bytes,
) -> AsyncIterator[bytes]:
    subscriber = opened.subscriber
    yield first + b"".join(event.frame for event in opened.replay)
    while True:
        if subscriber.frames:
            yield subscriber.take()
        elif subscriber.cut_reason is not None:
            return
        else:
            await subscriber.wakeup.wait()


class SubscriberStream(EventSourceResponse):
    """sse-starlette's response, also torn down when the hub cuts the subscriber.

    A slow client may be blocked inside a write when its queue overflows; reporting the cut as a
    client disconnect makes sse-starlette cancel that write and end the response.
    """

    def __init__(
        self,
        opened: Opened,
        *,
        retry_ms: int,
        heartbeat_seconds: float,
        status: UpstreamStatus | None,
        on_close: Callable[[Subscriber], None],
    ) -> None:
        subscriber = opened.subscriber
        first = connected_frame(subscriber.account_id, retry_ms)
        if opened.reset is not None:
            first += reset_frame(opened.reset)
        if status is not None:
            first += upstream_frame(status)
        super().__init__(
            _frames(opened, first),
            headers=STREAM_HEADERS,
            ping=heartbeat_seconds,
            sep="\n",
            ping_message_factory=lambda: ServerSentEvent(comment="heartbeat", sep="\n"),
            send_timeout=SEND_TIMEOUT_SECONDS,
        )
        self._subscriber = subscriber
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gone = self._subscriber.gone

        async def receive_or_cut() -> Message:
            receiving = asyncio.ensure_future(receive())
            cut = asyncio.ensure_future(gone.wait())
            try:
                await asyncio.wait((receiving, cut), return_when=asyncio.FIRST_COMPLETED)
            finally:
                cut.cancel()
                if not receiving.done():
                    receiving.cancel()
            if receiving.done() and not receiving.cancelled():
                return receiving.result()
            return {"type": "http.disconnect"}

        try:
            await super().__call__(scope, receive_or_cut, send)
        finally:
            self._on_close(self._subscriber)
