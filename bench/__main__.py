"""`python -m bench`: the relay and the naive sse-starlette baseline, side by side, on issue 7's load.

    uv run python -m bench                                  # the whole matrix, 3 times (20 min)
    uv run python -m bench --repeat 1                       # the whole matrix once (7 min)
    uv run python -m bench --scenario fanout-1k --quick     # 100 clients, 20 events (seconds)

Each scenario runs on the relay and then on the naive baseline, --repeat times over, alternating so
that each pair shares the machine's conditions. Prints one Markdown table of the runs' medians
(each scenario: relay, naive, and their ratio), then issue 7's targets with each pair's own ratio,
and writes everything as JSON with the servers' logs under bench/results/<time>/.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import secrets
import shlex
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import uvloop

from bench import report
from bench.run import Result, measure
from bench.scenarios import SCENARIOS, Scenario
from bench.servers import SERVERS, ServerFailed
from bench.worker import raise_file_limit

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--scenario",
        action="append",
        choices=list(SCENARIOS),
        help="run only this scenario (repeatable; default: all, in this order)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a tenth of the clients, a fifth of the events"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        metavar="N",
        help="runs of each scenario on each server; the table shows their medians (default: 3)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        help="directory for results.json and the logs (default: bench/results/<time>)",
    )
    return parser.parse_args(argv)


async def run_matrix(
    scenarios: list[Scenario], repeat: int, output: Path
) -> tuple[list[Result], list[str]]:
    """Every run's result, and why the measurements that have none were not made.

    SIGTERM cancels it as Ctrl-C does, so the servers and load workers it started are stopped."""
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    secret = secrets.token_urlsafe(48)  # the servers' token key, for this run only
    results = []
    unmeasured = []
    for scenario in scenarios:
        for run in range(1, repeat + 1):
            for server in SERVERS:
                name = f"{scenario.name} / {server}" + (f" / run {run}" if repeat > 1 else "")
                print(
                    f"{name}: {scenario.clients:,} clients, {scenario.accounts:,} accounts, "
                    f"{scenario.events_per_account} events each ...",
                    file=sys.stderr,
                    flush=True,
                )
                workdir = output / (f"{scenario.name}-{server}" + (f"-{run}" if repeat > 1 else ""))
                started = time.perf_counter()
                try:
                    result = await measure(scenario, server, workdir, secret)
                except ServerFailed as exc:
                    # One server that does not start must not cost the rest of the matrix.
                    print(f"  not measured: {exc}", file=sys.stderr, flush=True)
                    unmeasured.append(f"{name}: not measured: {exc}")
                    continue
                print(
                    f"  done in {time.perf_counter() - started:.0f} s: {result.delivered:,}/"
                    f"{result.expected:,} delivered, {report.errors(result)} errors",
                    file=sys.stderr,
                    flush=True,
                )
                results.append(result)
    return results, unmeasured


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.repeat < 1:
        print("python -m bench: --repeat must be at least 1", file=sys.stderr)
        return 2
    names = args.scenario or list(SCENARIOS)
    scenarios = [SCENARIOS[n].quick() if args.quick else SCENARIOS[n] for n in names]
    output: Path = args.output or RESULTS / time.strftime("%Y%m%d-%H%M%S")
    output.mkdir(parents=True, exist_ok=True)
    # The servers inherit it: each of their clients is a file descriptor too.
    raise_file_limit()
    try:
        runs, unmeasured = uvloop.run(run_matrix(scenarios, args.repeat, output))
    except asyncio.CancelledError:
        print("python -m bench: stopped by SIGTERM; its servers are stopped", file=sys.stderr)
        return 128 + signal.SIGTERM
    command = shlex.join(
        ["uv", "run", "python", "-m", "bench", *(argv if argv is not None else sys.argv[1:])]
    )
    print(f"\n{command}\n")
    if args.repeat > 1:
        print(f"Medians of {args.repeat} runs of each scenario on each server.\n")
    print(report.table(report.reduced(runs)))
    problems = [*unmeasured, *report.failures(runs)]
    if problems:
        print("\nProblems:\n" + "\n".join(f"  {line}" for line in problems))
    print("\nIssue 7 targets (relay):\n" + "\n".join(f"  {line}" for line in report.targets(runs)))
    machine = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "system": platform.platform(),
    }
    path = output / "results.json"
    report.write_json(path, command, runs, problems, machine)
    print(f"\nJSON and server logs: {path.parent}")
    return 1 if unmeasured else 0


if __name__ == "__main__":
    sys.exit(main())
