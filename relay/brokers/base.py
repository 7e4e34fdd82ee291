"""The broker: where an account's events are numbered, de-duplicated, kept for replay and shared.

Like Mercure's Transport or Centrifuge's Broker: one small protocol, a backend per URL scheme.
`memory://` lives in this process; `redis://` shares events and replay between relay processes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from relay.channel import Incoming
from relay.stored import Stored

Deliver = Callable[[str, Stored], None]
"""Called with (account_id, event) for each new event of a watched account, in id order."""


class Broker(Protocol):
    def attach(self, deliver: Deliver) -> None:
        """Set the one callback that receives live events (the hub's fan-out)."""

    async def publish(self, account_id: str, event: Incoming) -> Stored | None:
        """Number and keep `event`; None when its upstream id was already published (a duplicate)."""

    async def replay(self, account_id: str, last_id: str) -> list[Stored] | None:
        """Events after `last_id`, or None when it is unknown or outside the replay window."""

    async def last_id(self, account_id: str) -> str | None:
        """The newest relay id of the account, if any."""

    def watch(self, account_id: str) -> None:
        """This process has subscribers of the account: deliver its live events."""

    def unwatch(self, account_id: str) -> None:
        """No more local subscribers of the account."""

    async def ready(self) -> bool:
        """Whether the broker can take events now (for /readyz)."""

    async def aclose(self) -> None: ...
