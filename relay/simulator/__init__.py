"""A fake DialStack for the demo, the tests and the benchmarks: real HTTP, realistic calls, faults.

sim = Simulator(call_interval_seconds=None, faults=Faults(split_writes=True))
async with sim.serve() as base_url:
    ...  # POST {base_url}/v1/account_sessions, GET {base_url}/v1/events
    await sim.inject("acct_demo", "call.incoming", {...})
"""

from relay.simulator.accounts import SentEvent
from relay.simulator.app import DEFAULT_SECRET_KEY, Simulator
from relay.simulator.cli import register_cli
from relay.simulator.faults import Faults
from relay.simulator.sessions import Session
from relay.simulator.webhooks import SIGNATURE_HEADER, signature_header

__all__ = [
    "DEFAULT_SECRET_KEY",
    "SIGNATURE_HEADER",
    "Faults",
    "SentEvent",
    "Session",
    "Simulator",
    "register_cli",
    "signature_header",
]
