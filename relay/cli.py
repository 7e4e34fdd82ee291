"""The `relay` command: demo, serve, simulate, token, check."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from relay import simulator
from relay.auth import TokenIssuer
from relay.config import ConfigError, Settings, load_settings, masked, require_serving

EXIT_CONFIG = 2


def _settings(args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> Settings:
    path: Path | None = args.config
    return load_settings(path, overrides)


def _server_overrides(args: argparse.Namespace) -> dict[str, Any]:
    server = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    return {"server": server} if server else {}


def cmd_check(args: argparse.Namespace) -> int:
    settings = _settings(args)
    print(json.dumps(masked(settings), indent=2))
    try:
        require_serving(settings)
    except ConfigError as exc:
        print(f"warning: {exc}", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from relay.serve import serve

    settings = _settings(args, _server_overrides(args))
    require_serving(settings)
    return serve(settings)


def cmd_token(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if settings.auth.secret is None:
        raise ConfigError("auth.secret: is required to sign tokens (set it or RELAY_AUTH__SECRET)")
    issuer = TokenIssuer(
        settings.auth.secret.get_secret_value(), settings.auth.max_token_ttl_seconds
    )
    events = [e.strip() for e in args.events.split(",") if e.strip()] if args.events else None
    try:
        token, _ = issuer.issue(
            args.account, args.ttl, subject=args.user, user_id=args.user, events=events
        )
    except ValueError as exc:
        print(f"relay token: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(token)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from relay.demo import run_demo

    return asyncio.run(run_demo(args.host, args.port))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relay", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo", help="relay + built-in DialStack simulator, no config needed"
    )
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=8080)
    demo.set_defaults(func=cmd_demo)

    serve = commands.add_parser("serve", help="run the relay")
    serve.add_argument("--config", type=Path, help="TOML file (default: ./config.toml if present)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.set_defaults(func=cmd_serve)

    simulator.register_cli(commands)

    token = commands.add_parser("token", help="print a subscriber token signed with auth.secret")
    token.add_argument("--config", type=Path)
    token.add_argument("--account", required=True, help="acct_...")
    token.add_argument("--ttl", type=int, default=3600, help="seconds (default 3600)")
    token.add_argument("--user", help="user_id: only that user's events (and those for no user)")
    token.add_argument("--events", help="comma-separated event types the token allows")
    token.set_defaults(func=cmd_token)

    check = commands.add_parser(
        "check", help="validate the config and print the effective settings"
    )
    check.add_argument("--config", type=Path)
    check.set_defaults(func=cmd_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"relay {args.command}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
