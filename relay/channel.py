"""What flows into an account's channel, and the interface the sources (upstream, webhooks) write to.

Sources know nothing of subscribers: they hand `Incoming` events and upstream state changes to a
`ChannelSink` (the hub), which assigns relay ids, de-duplicates, keeps replay and fans out.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NamedTuple, Protocol


class Incoming(NamedTuple):
    """One event from a source, before the relay gives it an id. (A NamedTuple: immutable, and
    built for every event in half the time of a frozen dataclass.)"""

    type: str
    data: str
    upstream_id: str | None = None  # SSE `id` or webhook envelope `id`: the de-duplication key


class UpstreamState(enum.StrEnum):
    IDLE = "idle"  # no subscribers, no connection
    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    UNAUTHORIZED = "unauthorized"  # 3 auth failures in a row: retrying slowly, the secret is wrong
    DEGRADED = "degraded"  # the broker is unreachable; events are buffered locally (Redis broker)


@dataclass(frozen=True, slots=True)
class UpstreamStatus:
    account_id: str
    state: UpstreamState
    since: float  # unix time of the last state change
    reconnects: int
    events: int  # events received from the upstream
    detail: str = ""  # operator-facing reason, never a secret


class ChannelSink(Protocol):
    async def publish(self, account_id: str, event: Incoming) -> bool:
        """False when the event repeated an upstream id and was dropped."""
        ...

    def upstream_changed(self, status: UpstreamStatus) -> None: ...
