"""`relay simulate`: the DialStack simulator alone, with faults chosen by flags."""

from __future__ import annotations

import argparse
import asyncio
import sys

from relay.logs import configure_logging
from relay.serving import until_stop_signal
from relay.simulator.app import DEFAULT_SECRET_KEY, Simulator
from relay.simulator.faults import Faults, LineEnding

LINE_ENDINGS: dict[str, LineEnding] = {"lf": "\n", "crlf": "\r\n", "cr": "\r"}


def register_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "simulate",
        help="the DialStack simulator alone (sessions, /v1/events, webhooks out, faults)",
        description="Serve a fake DialStack: POST /v1/account_sessions, GET /v1/events with "
        "generated calls, POST /v1/simulator/inject, GET /v1/simulator/stats.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--secret-key", default=DEFAULT_SECRET_KEY)
    parser.add_argument(
        "--account",
        action="append",
        dest="accounts",
        metavar="ACCT",
        help="account with generated calls (repeatable; default acct_demo)",
    )
    parser.add_argument(
        "--call-interval", type=float, default=2.0, help="seconds between calls (0: none)"
    )
    parser.add_argument("--session-lifetime", type=float, default=3600.0, metavar="S")
    parser.add_argument("--seed", type=int, help="make generated calls and faults repeatable")

    faults = parser.add_argument_group("faults")
    faults.add_argument("--drop-every", type=float, metavar="S", help="close streams after S s")
    faults.add_argument("--drop-mid-event", action="store_true", help="cut an event in two")
    faults.add_argument("--split-writes", action="store_true", help="write frames in pieces")
    faults.add_argument("--line-ending", choices=sorted(LINE_ENDINGS), default="lf")
    faults.add_argument("--garbage", action="store_true", help="junk lines and non-JSON events")
    faults.add_argument("--fail-status", type=int, metavar="N", help="answer /v1/events with N")
    faults.add_argument(
        "--fail-count", type=int, default=1, metavar="K", help="for K requests (default 1)"
    )
    faults.add_argument("--retry-after", type=int, metavar="S", help="Retry-After on 429/503")
    faults.add_argument("--first-byte-delay", type=float, default=0.0, metavar="S")
    faults.add_argument("--no-ids", action="store_true", help="no id: lines")
    faults.add_argument("--heartbeat", type=float, metavar="S", help="keep-alive comments")

    webhooks = parser.add_argument_group("webhooks out (every generated call event)")
    webhooks.add_argument("--webhook-url")
    webhooks.add_argument("--webhook-secret")
    parser.set_defaults(func=run_simulate)


def faults_from_args(args: argparse.Namespace) -> Faults:
    return Faults(
        drop_every_seconds=args.drop_every,
        drop_mid_event=args.drop_mid_event,
        split_writes=args.split_writes,
        line_ending=LINE_ENDINGS[args.line_ending],
        garbage_lines=args.garbage,
        session_lifetime_seconds=args.session_lifetime,
        fail_status=args.fail_status,
        fail_count=args.fail_count if args.fail_status is not None else 0,
        retry_after_seconds=args.retry_after,
        first_byte_delay_seconds=args.first_byte_delay,
        send_ids=not args.no_ids,
        heartbeat_seconds=args.heartbeat,
    )


def simulator_from_args(args: argparse.Namespace) -> Simulator:
    """Raises ValueError for a bad account id or a webhook URL without a secret."""
    return Simulator(
        secret_key=args.secret_key,
        accounts=args.accounts or ("acct_demo",),
        call_interval_seconds=args.call_interval or None,
        faults=faults_from_args(args),
        seed=args.seed,
        webhook_url=args.webhook_url,
        webhook_secret=args.webhook_secret,
    )


def run_simulate(args: argparse.Namespace) -> int:
    try:
        simulator = simulator_from_args(args)
    except ValueError as exc:
        print(f"relay simulate: {exc}", file=sys.stderr)
        return 2
    configure_logging()
    asyncio.run(_serve_until_stopped(simulator, args.host, args.port))
    return 0


async def _serve_until_stopped(simulator: Simulator, host: str, port: int) -> None:
    async with simulator.serve(host, port) as base_url:
        key = simulator.secret_key  # a simulator's secret key is a test value: fine to print
        print(
            f"DialStack simulator at {base_url} (secret key {key})\n\n"
            f"  curl -X POST {base_url}/v1/account_sessions -H 'Authorization: Bearer {key}' "
            """-d '{"account": "acct_demo"}'\n"""
            f"  curl -N {base_url}/v1/events -H 'Authorization: Bearer <client_secret>'\n\n"
            "Ctrl-C stops.",
            flush=True,
        )
        # Leaving `serve` ends the open streams first, rather than uvicorn waiting for them.
        await until_stop_signal()
