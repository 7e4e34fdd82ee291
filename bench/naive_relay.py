"""The baseline of the benchmarks: the relay as anyone would first write it with sse-starlette.

Like the relay it keeps one upstream `/v1/events` connection per account, checks an HS256
subscriber token and replays from a history after `Last-Event-ID`. Unlike it, each client gets
an unbounded asyncio.Queue that every event is put on, and its own response task that encodes
each event again as a ServerSentEvent. That is the design issue 7 measures the relay against,
so it is deliberately left plain: do not optimise it.

    RELAY_AUTH__SECRET=... python -m bench.naive_relay --port 8081 \\
        --upstream http://127.0.0.1:8765 --secret-key sk_test_simulator
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import jwt
import uvicorn
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

log = logging.getLogger("naive_relay")

HISTORY_EVENTS = 1_000
HEARTBEAT_SECONDS = 15
RECONNECT_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class Event:
    id: str | None
    type: str
    data: str


@dataclass
class Account:
    id: str
    queues: set[asyncio.Queue[Event]] = field(default_factory=set)
    history: deque[Event] = field(default_factory=lambda: deque(maxlen=HISTORY_EVENTS))
    upstream: asyncio.Task[None] | None = None

    def publish(self, event: Event) -> None:
        self.history.append(event)
        for queue in self.queues:
            queue.put_nowait(event)

    def after(self, last_event_id: str | None) -> list[Event]:
        if not last_event_id:
            return []
        events = list(self.history)
        for index, event in enumerate(events):
            if event.id == last_event_id:
                return events[index + 1 :]
        return []


class NaiveRelay:
    def __init__(self, upstream_url: str, secret_key: str, token_secret: str) -> None:
        self.upstream_url = upstream_url.rstrip("/")
        self.secret_key = secret_key
        self.token_secret = token_secret
        self.accounts: dict[str, Account] = {}
        # No pool limit: one long-lived connection per account, however many accounts.
        self.http = httpx.AsyncClient(
            timeout=httpx.Timeout(10.0, read=None),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
        )

    def account(self, account_id: str) -> Account:
        account = self.accounts.get(account_id)
        if account is None:
            account = self.accounts[account_id] = Account(account_id)
            account.upstream = asyncio.create_task(self.follow(account))
        return account

    async def follow(self, account: Account) -> None:
        while True:
            try:
                await self.read_upstream(account)
            except (httpx.HTTPError, KeyError, ValueError) as exc:
                log.warning("upstream of %s failed: %s", account.id, type(exc).__name__)
            await asyncio.sleep(RECONNECT_SECONDS)

    async def read_upstream(self, account: Account) -> None:
        session = await self.http.post(
            f"{self.upstream_url}/v1/account_sessions",
            headers={"Authorization": f"Bearer {self.secret_key}"},
            json={"account": account.id},
        )
        session.raise_for_status()
        headers = {
            "Authorization": f"Bearer {session.json()['client_secret']}",
            "Accept": "text/event-stream",
        }
        url = f"{self.upstream_url}/v1/events"
        async with self.http.stream("GET", url, headers=headers) as response:
            response.raise_for_status()
            fields: dict[str, str] = {}
            data: list[str] = []
            async for line in response.aiter_lines():
                if not line:
                    if data and fields.get("event") != "connected":
                        event = Event(
                            fields.get("id"), fields.get("event", "message"), "\n".join(data)
                        )
                        account.publish(event)
                    fields, data = {}, []
                elif not line.startswith(":"):
                    name, _, value = line.partition(":")
                    value = value.removeprefix(" ")
                    if name == "data":
                        data.append(value)
                    else:
                        fields[name] = value

    async def events(self, request: Request) -> Response:
        token = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        try:
            claims = jwt.decode(
                token,
                self.token_secret,
                algorithms=["HS256"],
                options={"require": ["exp", "account_id"]},
            )
        except jwt.InvalidTokenError:
            return JSONResponse({"error": "invalid token"}, status_code=401)
        account = self.account(claims["account_id"])
        replay = account.after(request.headers.get("last-event-id"))
        queue: asyncio.Queue[Event] = asyncio.Queue()
        account.queues.add(queue)

        async def stream() -> AsyncIterator[ServerSentEvent]:
            try:
                yield ServerSentEvent(
                    event="connected", data=json.dumps({"message": "Connected to event stream"})
                )
                for event in replay:
                    yield ServerSentEvent(id=event.id, event=event.type, data=event.data)
                while True:
                    event = await queue.get()
                    yield ServerSentEvent(id=event.id, event=event.type, data=event.data)
            finally:
                account.queues.discard(queue)

        return EventSourceResponse(stream(), ping=HEARTBEAT_SECONDS)

    async def aclose(self) -> None:
        for account in self.accounts.values():
            if account.upstream is not None:
                account.upstream.cancel()
        await self.http.aclose()


def create_app(relay: NaiveRelay) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await relay.aclose()

    return Starlette(routes=[Route("/v1/events", relay.events)], lifespan=lifespan)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.naive_relay", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--upstream", required=True, help="DialStack base URL")
    parser.add_argument("--secret-key", required=True, help="sk_test_... for account sessions")
    args = parser.parse_args()
    secret = os.environ.get("RELAY_AUTH__SECRET")
    if not secret:
        parser.error("set RELAY_AUTH__SECRET, the HS256 key of the subscriber tokens")
    relay = NaiveRelay(args.upstream, args.secret_key, secret)
    uvicorn.run(create_app(relay), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
