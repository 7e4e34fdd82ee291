"""The SSE response of one subscriber: connected, reset or replay, then live frames until it ends.

A lean ASGI response rather than a generic streaming one: live frames are written by the hub straight
into the socket (relay/audience.py, relay/subscriber.py), so this task only wakes to flush a
backed-up queue, to wait for a paused socket to drain, or to end the stream. Under the relay's own
server (relay/http_protocol.py) the protocol says when the client goes and when its socket pushes
back; under any other, one small watcher task waits for the client to go.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Callable

from starlette.types import Receive, Scope, Send

from relay.channel import UpstreamStatus
from relay.http_protocol import Connection, connection_of
from relay.hub import Opened, reset_frame, upstream_frame
from relay.sse import encode_event
from relay.subscriber import CutReason, Subscriber

STREAM_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}
_RAW_HEADERS = [(k.lower().encode(), v.encode()) for k, v in STREAM_HEADERS.items()]


@functools.lru_cache(maxsize=4096)  # the same for every client of an account: encoded once
def connected_frame(account_id: str, retry_ms: int) -> bytes:
    payload = {"message": "Connected to event stream", "account_id": account_id, "via": "relay"}
    return encode_event(json.dumps(payload), event="connected", retry_ms=retry_ms)


def _body(chunk: bytes, more: bool = True) -> dict[str, object]:
    return {"type": "http.response.body", "body": chunk, "more_body": more}


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class SubscriberStream:
    def __init__(
        self,
        opened: Opened,
        *,
        retry_ms: int,
        status: UpstreamStatus | None,
        on_close: Callable[[Subscriber], None],
    ) -> None:
        subscriber = opened.subscriber
        first = connected_frame(subscriber.account_id, retry_ms)
        if opened.reset is not None:
            first += reset_frame(opened.reset)
        if status is not None:
            first += upstream_frame(status)
        self._first = first + b"".join(event.frame for event in opened.replay)
        self._subscriber = subscriber
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        subscriber = self._subscriber
        connection = connection_of(scope)
        watcher: asyncio.Task[None] | None = None
        try:
            await send({"type": "http.response.start", "status": 200, "headers": _RAW_HEADERS})
            await send(_body(self._first))
            if connection is not None:  # the relay's own server says when the client goes
                connection.lost = functools.partial(subscriber.cut, CutReason.CLOSED)
                connection.paused = subscriber.paused
                if connection.is_lost:
                    subscriber.cut(CutReason.CLOSED)
            else:  # any other ASGI server: a task waits for http.disconnect
                watcher = asyncio.create_task(_until_disconnect(receive))
                watcher.add_done_callback(lambda _: subscriber.cut(CutReason.CLOSED))
            subscriber.attach(send, connection.writer() if connection else None)
            await self._flush_until_end(send, connection)
        finally:
            if watcher is not None:
                watcher.cancel()
            if connection is not None:
                connection.lost = connection.paused = None
            self._on_close(subscriber)
        if subscriber.cut_reason is CutReason.SLOW and connection is not None:
            # Its unsent bytes would keep the connection open for as long as the client holds it.
            connection.abort()
            await asyncio.sleep(0)  # the server sees the connection lost before the app returns

    async def _flush_until_end(self, send: Send, connection: Connection | None) -> None:
        subscriber = self._subscriber
        try:
            while True:
                await subscriber.wakeup.wait()
                subscriber.wakeup.clear()
                while subscriber.frames and subscriber.cut_reason is not CutReason.CLOSED:
                    await send(_body(subscriber.take()))  # uvicorn's send waits for the drain
                if subscriber.cut_reason is CutReason.SHUTDOWN:
                    await send(_body(b"", more=False))
                    return
                if subscriber.cut_reason is not None:
                    return
                if connection is not None:
                    # Direct writes take no notice of a paused transport: resume them only once
                    # it drained.
                    await connection.writable()
                if not subscriber.frames and subscriber.cut_reason is None:
                    subscriber.unblock()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if (
                subscriber.cut_reason is CutReason.SLOW
                and task is not None
                and task.uncancel() == 0
            ):
                return  # cut while its socket was backed up: leave, and abort the connection
            raise
