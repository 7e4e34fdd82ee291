"""relay/stream.py: a subscriber's stream from its opening frames to its end."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from starlette.types import Message
from test_http_protocol import Recorded, StreamingCycle
from uvicorn.protocols.http.flow_control import FlowControl

from relay.audience import Audience
from relay.http_protocol import Connection, http_chunk
from relay.hub import Opened
from relay.stored import Stored
from relay.stream import SubscriberStream
from relay.subscriber import CutReason, Interest, Subscriber


async def until(condition: Callable[[], bool], seconds: float = 5) -> None:
    async with asyncio.timeout(seconds):
        while not condition():  # noqa: ASYNC110 - the stream's task is stepped by the loop alone
            await asyncio.sleep(0)


async def test_a_stream_whose_socket_is_full_when_it_opens_queues_until_the_socket_drains() -> None:
    audience = Audience()
    subscriber = Subscriber("acct_1", Interest(), audience, capacity=10, on_cut=audience.remove)
    audience.add(subscriber)
    closed: list[Subscriber] = []
    stream = SubscriberStream(
        Opened(subscriber, reset=None, replay=[]),
        retry_ms=1000,
        status=None,
        on_close=closed.append,
    )
    transport = Recorded()
    flow = FlowControl(transport)  # type: ignore[arg-type]
    connection = Connection(transport, flow)  # type: ignore[arg-type]
    cycle = StreamingCycle()  # held here: the connection keeps only a weak reference
    connection.bind(cycle)  # type: ignore[arg-type]
    sent: list[bytes] = []

    async def send(message: Message) -> None:  # the cycle's: waits for the drain, then writes
        await flow.drain()
        sent.append(message["body"])

    flow.pause_writing()  # the opening frames (a long replay) filled the buffers
    serving = asyncio.create_task(stream.serve(send, connection))
    await until(lambda: subscriber.send is not None)  # attached
    event = Stored("1-1", "call.incoming", "{}")
    subscriber.offer(event, http_chunk(event.frame))
    assert transport.writes == []  # not written into the full socket behind its back ...
    assert subscriber.frames == [event.frame]  # ... but queued, within client_buffer_events
    flow.resume_writing()
    await until(lambda: sent == [event.frame])  # drained: the queue goes first
    await until(lambda: subscriber in audience and not subscriber.blocked)
    later = Stored("1-2", "call.incoming", "{}")
    audience.fan_out([later])
    assert transport.writes == [http_chunk(later.frame)]  # then straight into the socket
    subscriber.cut(CutReason.CLOSED)
    async with asyncio.timeout(5):
        await serving
    assert closed == [subscriber]
