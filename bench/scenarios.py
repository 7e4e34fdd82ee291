"""The benchmark matrix: issue 7's scenarios, and their quick (one tenth) versions."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    clients: int
    accounts: int  # clients are spread evenly over them; each account is one upstream
    events_per_account: int
    rate_per_account: float  # events per second injected into each account
    # Reconnect storm: half the events live, then every client drops, a quarter is published
    # while they are away, all come back at once with Last-Event-ID, and the rest is live.
    storm: bool = False

    def quick(self) -> Scenario:
        """A tenth of the clients and accounts and a fifth of the events, for a fast look."""
        return dataclasses.replace(
            self,
            clients=max(1, self.clients // 10),
            accounts=max(1, self.accounts // 10),
            events_per_account=self.events_per_account // 5,
        )


SCENARIOS = {
    scenario.name: scenario
    for scenario in (
        Scenario(
            "fanout-1k", clients=1_000, accounts=1, events_per_account=100, rate_per_account=10
        ),
        Scenario(
            "fanout-5k", clients=5_000, accounts=1, events_per_account=100, rate_per_account=10
        ),
        Scenario(
            "fanout-10k", clients=10_000, accounts=1, events_per_account=100, rate_per_account=10
        ),
        Scenario(
            "accounts-1k", clients=10_000, accounts=1_000, events_per_account=10, rate_per_account=1
        ),
        Scenario("idle-10k", clients=10_000, accounts=1, events_per_account=0, rate_per_account=0),
        Scenario(
            "storm-10k",
            clients=10_000,
            accounts=1,
            events_per_account=40,
            rate_per_account=10,
            storm=True,
        ),
    )
}
