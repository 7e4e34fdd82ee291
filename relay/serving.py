"""Run an ASGI app under uvicorn inside the current event loop, on a socket bound up front.

Binding the socket ourselves means the caller knows the port before the server starts
(port 0 picks a free one), which the demo (relay + simulator in one process) and the tests
both need.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from collections.abc import AsyncIterator
from typing import Any, Protocol, runtime_checkable

import uvicorn
from starlette.types import ASGIApp

from relay.http_protocol import RelayHttpProtocol


@runtime_checkable
class Drainable(Protocol):
    async def drain(self) -> None:
        """Called when the server starts shutting down, before it stops accepting connections."""


class DrainingServer(uvicorn.Server):
    """uvicorn, but an app with `drain()` is told first, so its long-lived streams end cleanly
    instead of being cut when uvicorn's graceful-shutdown timeout runs out."""

    def __init__(self, config: uvicorn.Config, app: object) -> None:
        super().__init__(config)
        self._drainable = app if isinstance(app, Drainable) else None

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self._drainable is not None:
            await self._drainable.drain()
        await super().shutdown(sockets)


def uvicorn_config(
    app: ASGIApp, *, trusted_proxies: list[str] | None = None, **options: Any
) -> uvicorn.Config:
    """How the relay runs under uvicorn everywhere: uvloop, httptools with a head cap and abort
    (relay/http_protocol.py), no logging config of uvicorn's own (relay/logs.py owns it), and the
    client address taken from X-Forwarded-For only when the peer is a trusted proxy."""
    return uvicorn.Config(
        app,
        loop="uvloop",
        http=RelayHttpProtocol,
        interface="asgi3",  # RelayApp's __call__ returns its awaitable rather than being async
        log_config=None,
        access_log=False,  # relay/app.py writes its own, without query strings
        proxy_headers=True,
        forwarded_allow_ips=trusted_proxies,
        **options,
    )


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def base_url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


@contextlib.asynccontextmanager
async def running_server(
    app: ASGIApp,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    shutdown_timeout: int = 5,
    trusted_proxies: list[str] | None = None,
) -> AsyncIterator[str]:
    """Serve `app` until the block exits; yields the base URL (``http://host:port``)."""
    sock = bind_socket(host, port)
    config = uvicorn_config(
        app,
        trusted_proxies=trusted_proxies,
        lifespan="on",
        timeout_graceful_shutdown=shutdown_timeout,
    )
    server = DrainingServer(config, app)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(10):
            while not server.started:
                if task.done():
                    task.result()  # re-raise the start-up failure
                    raise RuntimeError("uvicorn exited during start-up")
                await asyncio.sleep(0.01)
        yield base_url_of(sock)
    finally:
        server.should_exit = True
        try:
            async with asyncio.timeout(shutdown_timeout + 5):
                await task
        except TimeoutError:
            server.force_exit = True
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        sock.close()


async def until_stop_signal() -> None:
    """Return on SIGINT or SIGTERM. Call it once the servers run: installed after uvicorn's own
    handlers, these win, so Ctrl-C stops everything in the process rather than one server."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
