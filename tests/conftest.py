"""Fixtures shared by the test modules."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import httpx
import pytest


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client for long-lived streams: no read timeout, no cap on open connections."""
    async with httpx.AsyncClient(
        timeout=httpx.Timeout(10.0, read=None),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=0),
    ) as client:
        yield client


@pytest.fixture
def unused_port() -> int:
    """A loopback TCP port free a moment ago, for servers started in a subprocess."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
