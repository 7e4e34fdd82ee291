"""`relay demo`: the relay, a simulated DialStack and the live call board in one process, no config."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from relay.app import create_app
from relay.auth import TokenIssuer
from relay.config import Settings
from relay.logs import configure_logging
from relay.serving import running_server, until_stop_signal
from relay.simulator import Simulator

DEMO_ACCOUNTS = ("acct_demo", "acct_other")
DEMO_TOKEN_TTL = 12 * 3600


@dataclass(slots=True)
class DemoStack:
    relay_url: str
    simulator_url: str
    simulator: Simulator
    settings: Settings
    issuer: TokenIssuer

    def token(
        self,
        account_id: str = DEMO_ACCOUNTS[0],
        ttl: int = DEMO_TOKEN_TTL,
        *,
        user_id: str | None = None,
        events: list[str] | None = None,
    ) -> str:
        return self.issuer.issue(account_id, ttl, user_id=user_id, events=events)[0]


def demo_settings(
    simulator_url: str,
    secret_key: str,
    accounts: Sequence[str] = DEMO_ACCOUNTS,
    **sections: dict[str, object],
) -> Settings:
    values: dict[str, object] = {
        "auth": {"secret": secrets.token_urlsafe(48), "admin_key": secrets.token_urlsafe(32)},
        "upstream": {
            "base_url": simulator_url,
            "secret_key": secret_key,
            "linger_seconds": 5,
            "backoff_initial_seconds": 0.5,
            "backoff_max_seconds": 5,
        },
        "accounts": [{"id": account, "always_on": True} for account in accounts],
    }
    for name, section in sections.items():
        current = values.get(name)
        values[name] = {**current, **section} if isinstance(current, dict) else section
    return Settings(**values)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def demo_stack(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    call_interval_seconds: float | None = 4.0,
    accounts: Sequence[str] = DEMO_ACCOUNTS,
    **sections: dict[str, object],
) -> AsyncIterator[DemoStack]:
    """Simulator and relay served on loopback (the relay on `port`); used by `relay demo` and tests."""
    simulator = Simulator(accounts=accounts, call_interval_seconds=call_interval_seconds)
    async with simulator.serve() as simulator_url:
        settings = demo_settings(simulator_url, simulator.secret_key, accounts, **sections)
        assert settings.auth.secret is not None
        issuer = TokenIssuer(
            settings.auth.secret.get_secret_value(), settings.auth.max_token_ttl_seconds
        )
        async with running_server(
            create_app(settings), host, port, trusted_proxies=settings.server.trusted_proxies
        ) as relay_url:
            yield DemoStack(relay_url, simulator_url, simulator, settings, issuer)


async def run_demo(host: str, port: int) -> int:
    configure_logging("WARNING")
    async with demo_stack(host, port) as stack:
        token = stack.token()
        print(
            f"relay demo is running (simulated DialStack at {stack.simulator_url})\n\n"
            f"  Live call board:  {stack.relay_url}/#token={token}\n\n"
            f"  Raw stream:       curl -N -H 'Authorization: Bearer {token}' {stack.relay_url}/v1/events\n\n"
            f"  Another account:  {stack.relay_url}/#token={stack.token(DEMO_ACCOUNTS[1])}\n\n"
            "A call arrives every few seconds. Ctrl-C stops.",
            flush=True,
        )
        await until_stop_signal()
    return 0
