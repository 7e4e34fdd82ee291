"""What one new connection costs the relay in instructions, counted by callgrind: a figure that is
the same run after run, where CPU time on these machines moves by a quarter between runs.

    uv run python -m bench.instructions [--clients 300]

The relay runs under `valgrind --tool=callgrind` with counting off. One client connects and the
account's upstream opens, then counting is switched on, the other clients connect (the bench's own
clients, as in `python -m bench`), and the relay's user-space instructions per connection are
printed. Instructions are not time: the kernel (accept, the opening write), cache misses and page
faults are not in them. This tells whether a change made a connection's own work smaller; the
matrix tells what it is worth.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import uvloop

from bench import servers
from bench.fleet import Fleet
from bench.inject import SimulatorClient
from bench.run import HOST, account_ids, upstreams_open, worker_plans
from bench.scenarios import Scenario
from bench.worker import raise_file_limit

START_TIMEOUT_SECONDS = 300.0  # the relay starts some 50 times slower under valgrind
CONTROL_TIMEOUT_SECONDS = 60.0


def _control(pid: int, *args: str) -> None:
    """callgrind_control on the relay: switch counting, zero or dump its counts."""
    subprocess.run(
        ["callgrind_control", *args, str(pid)],
        check=True,
        capture_output=True,
        timeout=CONTROL_TIMEOUT_SECONDS,
    )


def _total(dump: Path) -> int:
    """The instructions a callgrind dump counted."""
    for line in dump.read_text().splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {dump}")


async def count_connections(clients: int, workdir: Path) -> None:
    """Runs the relay under callgrind and connects `clients`, the last `clients - 1` counted: their
    counts are dumped to `workdir`/callgrind.out.1."""
    secret = secrets.token_urlsafe(48)
    scenario = Scenario(
        "instructions", clients, accounts=1, events_per_account=0, rate_per_account=0
    )
    valgrind = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={workdir}/callgrind.out",
    ]
    async with (
        servers.simulator(workdir, HOST) as simulator_process,
        servers.server(
            "relay",
            workdir,
            HOST,
            simulator_process.url,
            secret,
            under=valgrind,
            start_timeout=START_TIMEOUT_SECONDS,
        ) as relay,
        SimulatorClient(HOST, simulator_process.port) as simulator,
        Fleet.started(worker_plans(scenario, relay.port, secret)) as fleet,
    ):
        await fleet.connect(below=1)
        if await upstreams_open(simulator, account_ids(1)) < 1:
            raise RuntimeError("the relay's upstream did not open")
        await asyncio.to_thread(_control, relay.pid, "--instr=on")
        await asyncio.to_thread(_control, relay.pid, "--zero")
        connected = await fleet.connect(below=clients)
        await asyncio.to_thread(_control, relay.pid, "--dump=connections")
    if connected.opened < clients - 1:
        raise RuntimeError(f"only {connected.opened} of {clients - 1} clients connected")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.instructions",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--clients", type=int, default=300, help="clients to connect (default 300)")
    args = parser.parse_args(argv)
    if args.clients < 2:
        parser.error("--clients must be at least 2")
    if shutil.which("valgrind") is None:
        print(
            "python -m bench.instructions: needs valgrind (apt-get install valgrind)",
            file=sys.stderr,
        )
        return 2
    raise_file_limit()
    with tempfile.TemporaryDirectory(prefix="relay-instructions-") as workdir:
        uvloop.run(count_connections(args.clients, Path(workdir)))
        # The dump made once they connected, not the one the relay wrote as it stopped.
        count = _total(Path(workdir) / "callgrind.out.1") / (args.clients - 1)
    print(
        f"{count:,.0f} instructions per connection (relay, user space, {args.clients - 1} clients)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
