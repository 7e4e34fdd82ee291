"""relay/inbox.py: the upstream actor's mailbox, driven directly."""

from __future__ import annotations

import asyncio

from relay.inbox import Inbox


async def test_messages_come_out_in_order_and_the_consumer_waits_for_the_next() -> None:
    inbox: Inbox[int] = Inbox(4)
    assert inbox.empty()
    inbox.put(1)
    inbox.put(2)
    assert [await inbox.get(), await inbox.get()] == [1, 2]
    waiting = asyncio.create_task(inbox.get())
    await asyncio.sleep(0)  # let it wait
    assert not waiting.done()
    inbox.put(3)  # from a callback, say: no await
    async with asyncio.timeout(5):
        assert await waiting == 3


async def test_a_producer_told_it_is_full_waits_until_the_consumer_took_it_down_to_half() -> None:
    inbox: Inbox[int] = Inbox(4)
    for n in range(5):
        inbox.put(n)  # past the limit: put never refuses
    assert inbox.full()
    room = asyncio.create_task(inbox.room())
    gone = asyncio.create_task(inbox.room())
    await asyncio.sleep(0)
    gone.cancel()  # a reader cancelled while it waited does not trouble the consumer
    assert await inbox.get() == 0
    assert await inbox.get() == 1
    assert not room.done()  # three left: more than half of 4
    assert await inbox.get() == 2
    async with asyncio.timeout(5):
        await room  # two left: half
    await inbox.room()  # already room: returns at once
    assert [await inbox.get(), await inbox.get()] == [3, 4]
    assert not inbox.full()
