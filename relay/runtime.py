"""The composition root: builds broker, hub, upstream manager and token checks from the settings."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio.lowlevel
import httpx
import structlog

from relay.auth import TokenIssuer, TokenVerifier
from relay.brokers.base import Broker
from relay.brokers.memory import MemoryBroker
from relay.brokers.redis import RedisBroker
from relay.channel import ChannelSink
from relay.config import Settings
from relay.hub import Hub, Limits
from relay.lease import leased_upstreams
from relay.metrics import Metrics
from relay.sessions import session_source_for
from relay.sse import encode_comment
from relay.stream_transport import for_upstream
from relay.upstream import UpstreamManager

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class Relay:
    settings: Settings
    metrics: Metrics
    broker: Broker
    hub: Hub
    upstreams: UpstreamManager
    verifier: TokenVerifier
    issuer: TokenIssuer
    draining: bool = False


def _broker_for(settings: Settings) -> Broker:
    if settings.broker.url.startswith("memory:"):
        return MemoryBroker(settings.replay)
    return RedisBroker(settings.broker.url, settings.replay)


@contextlib.asynccontextmanager
async def _local_upstreams(hub: Hub, upstreams: UpstreamManager) -> AsyncIterator[UpstreamManager]:
    """Upstreams of this process alone: the hub's demand opens them directly."""
    hub.demand = upstreams
    await upstreams.start()
    try:
        yield upstreams
    finally:
        await upstreams.aclose()


@contextlib.asynccontextmanager
async def open_relay(settings: Settings) -> AsyncIterator[Relay]:
    """A running relay (upstreams of always_on accounts opened); everything is closed on exit."""
    if settings.auth.secret is None:
        raise ValueError("auth.secret is required")
    secret = settings.auth.secret.get_secret_value()
    ttl = settings.auth.max_token_ttl_seconds
    metrics = Metrics()
    broker = _broker_for(settings)
    server = settings.server
    hub = Hub(
        broker,
        Limits(
            server.max_clients,
            server.max_clients_per_account,
            server.max_clients_per_ip,
            server.client_buffer_events,
        ),
        metrics,
    )
    timeout = httpx.Timeout(settings.upstream.connect_timeout_seconds, read=None)
    # One TLS context (its CA bundle) for every upstream connection, loaded now rather than while
    # the first client waits for its account's upstream.
    tls = httpx.create_ssl_context()
    # Session requests only: each account's streams have a client of their own (upstream.py).
    async with httpx.AsyncClient(timeout=timeout, verify=tls, transport=for_upstream(tls)) as http:
        # httpx's own transport (taken when a proxy is configured) and Starlette's file responses
        # load anyio's asyncio backend on first use: load it during start-up rather than while a
        # client waits (tens of milliseconds of CPU where no bytecode is cached).
        await anyio.lowlevel.checkpoint()

        def upstreams_for(sink: ChannelSink) -> UpstreamManager:
            sessions = session_source_for(settings, http)
            return UpstreamManager(settings, sink, sessions, http, tls=tls)

        # With Redis, a lease per account decides which process opens its upstream.
        running = (
            leased_upstreams(broker.redis, hub, settings, upstreams_for)
            if isinstance(broker, RedisBroker)
            else _local_upstreams(hub, upstreams_for(hub))
        )
        heartbeats = asyncio.create_task(hub.heartbeats(server.heartbeat_seconds))
        try:
            async with running as upstreams:
                yield Relay(
                    settings,
                    metrics,
                    broker,
                    hub,
                    upstreams,
                    TokenVerifier(secret, ttl),
                    TokenIssuer(secret, ttl),
                )
        finally:
            heartbeats.cancel()
            await broker.aclose()


DRAIN_SPREAD_MS = 15_000  # clients are told to come back over this window, not all at once
DRAIN_WAIT_SECONDS = 5.0


async def drain(relay: Relay) -> None:
    """Stop admitting clients, end every stream with a jittered `retry:`, wait (bounded) for them to go."""
    relay.draining = True
    base = relay.settings.server.client_retry_ms

    def farewell() -> bytes:
        retry_ms = base + random.randint(0, DRAIN_SPREAD_MS)
        return f"retry: {retry_ms}\n".encode() + encode_comment("relay shutting down")

    told = relay.hub.finish_all(farewell)
    log.info("draining", clients=told)
    try:
        async with asyncio.timeout(DRAIN_WAIT_SECONDS):
            await relay.hub.emptied.wait()
    except TimeoutError:
        log.warning("drain timed out; remaining clients will be cut", clients=relay.hub.clients())
