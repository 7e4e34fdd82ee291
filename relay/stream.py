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
from collections.abc import Awaitable, Callable

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


async def _until_disconnect(receive: Receive, subscriber: Subscriber) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    subscriber.closed()


class SubscriberStream:
    headers = _RAW_HEADERS  # the response's own, beyond the server's `date` and `server`

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

    def opening(self) -> bytes:
        """The frames that go first (connected, a reset notice, the replay), handed over once."""
        first, self._first = self._first, b""
        return first

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        return self.serve(send, connection_of(scope), receive)

    async def serve(
        self, send: Send, connection: Connection | None, receive: Receive | None = None
    ) -> None:
        """The stream, from its opening frames to its end.

        `receive`: the request's, when the head and the opening frames are still to be sent through
        `send` (an ASGI response); None when the relay's protocol wrote them itself and runs this
        for the rest (relay/http_protocol.py).
        """
        # One coroutine for the whole stream, its flush loop included: each open stream keeps its
        # frames for as long as it lasts (relay/serve.py says why that matters).
        subscriber = self._subscriber
        watcher: asyncio.Task[None] | None = None
        try:
            if receive is not None:
                await send({"type": "http.response.start", "status": 200, "headers": self.headers})
                await send(_body(self.opening()))
            if connection is not None:  # the relay's own server says when the client goes
                connection.listener = subscriber
                if connection.is_lost:
                    subscriber.closed()
                elif connection.write_paused:  # the opening frames filled the socket's buffers
                    subscriber.paused()  # (a long replay): queue, bounded, until it drains
            else:  # any other ASGI server: a task waits for http.disconnect
                assert receive is not None
                watcher = asyncio.create_task(_until_disconnect(receive, subscriber))
            subscriber.attach(send, connection.writer() if connection else None)
            while True:
                await subscriber.work()
                subscriber.has_work = False
                while subscriber.frames and subscriber.cut_reason is not CutReason.CLOSED:
                    await send(_body(subscriber.take()))  # uvicorn's send waits for the drain
                if subscriber.cut_reason is CutReason.SHUTDOWN:
                    await send(_body(b"", more=False))
                if subscriber.cut_reason is not None:
                    break
                if connection is not None:
                    # Direct writes take no notice of a paused transport: resume them only once
                    # it drained.
                    await connection.writable()
                if not subscriber.frames and subscriber.cut_reason is None:
                    subscriber.unblock()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not (
                subscriber.cut_reason is CutReason.SLOW
                and task is not None
                and task.uncancel() == 0
            ):
                raise
            # Cut while its socket was backed up: leave, and abort the connection below.
        finally:
            if watcher is not None:
                watcher.cancel()
            if connection is not None:
                connection.listener = None
            self._on_close(subscriber)
        if subscriber.cut_reason is CutReason.SLOW and connection is not None:
            # Its unsent bytes would keep the connection open for as long as the client holds it.
            connection.abort()
            await asyncio.sleep(0)  # the server sees the connection lost before the app returns
