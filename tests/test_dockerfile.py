"""The Dockerfile and .dockerignore, checked without Docker: what the image runs, as whom, from what."""

from __future__ import annotations

import asyncio
import fnmatch
import json
import os
import shlex
import sys
import tomllib
from pathlib import Path

import pytest

from relay.cli import build_parser, cmd_serve
from relay.config import ServerSettings
from relay.demo import demo_stack
from relay.serving import bind_socket

ROOT = Path(__file__).resolve().parent.parent
Instruction = tuple[str, str]


def instructions(text: str) -> list[Instruction]:
    """(KEYWORD, arguments) per instruction, continuation lines joined and comments dropped."""
    parsed: list[Instruction] = []
    current = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        keyword, _, arguments = (current + stripped).partition(" ")
        parsed.append((keyword.upper(), arguments.strip()))
        current = ""
    assert not current, "the Dockerfile ends inside a continuation line"
    return parsed


DOCKERFILE = instructions((ROOT / "Dockerfile").read_text())


def arguments_of(keyword: str) -> list[str]:
    return [arguments for name, arguments in DOCKERFILE if name == keyword]


def only(keyword: str) -> str:
    [arguments] = arguments_of(keyword)
    return arguments


def exec_form(arguments: str) -> list[str]:
    assert arguments.startswith("["), (
        f"use the exec (JSON) form, so signals reach relay: {arguments}"
    )
    argv = json.loads(arguments)
    assert isinstance(argv, list)
    assert all(isinstance(arg, str) for arg in argv)
    return argv


def healthcheck_argv() -> list[str]:
    options, _, command = only("HEALTHCHECK").partition("CMD ")
    assert "--interval=" in options
    return exec_form(command.strip())


def env() -> dict[str, str]:
    values: dict[str, str] = {}
    for arguments in arguments_of("ENV"):
        for pair in shlex.split(arguments):
            key, sep, value = pair.partition("=")
            assert sep, f"use ENV KEY=value: {pair}"
            values[key] = value
    return values


def workdir() -> str:
    return arguments_of("WORKDIR")[-1]


def test_base_is_one_slim_python_stage() -> None:
    image = only("FROM")
    name, _, tag = image.partition(":")
    assert name == "python"
    assert tag.startswith(("3.11", "3.12"))
    assert "-slim" in tag


def test_uv_comes_from_pypi() -> None:
    assert any("pip install" in run and '"uv==' in run for run in arguments_of("RUN"))
    assert not any("--from" in copy for copy in arguments_of("COPY"))


def test_dependencies_are_installed_frozen_without_dev() -> None:
    syncs = [run for run in arguments_of("RUN") if "uv sync" in run]
    assert syncs
    for sync in syncs:
        assert "--frozen" in sync.split()
        assert "--no-dev" in sync.split()
    assert env()["UV_PROJECT_ENVIRONMENT"] == "/app/.venv"
    assert env()["PATH"].startswith("/app/.venv/bin:")


def test_runs_as_a_user_it_creates_not_root() -> None:
    entrypoint = DOCKERFILE.index(("ENTRYPOINT", only("ENTRYPOINT")))
    users = [arguments for name, arguments in DOCKERFILE[:entrypoint] if name == "USER"]
    assert users
    user = users[-1].partition(":")[0]
    assert user not in ("root", "0")
    assert any("useradd" in run and user in run.split() for run in arguments_of("RUN"))
    # Nothing may run as root after the switch, or the files it writes would be root-owned.
    switched = DOCKERFILE.index(("USER", users[-1]))
    assert not any(name == "RUN" for name, _ in DOCKERFILE[switched:])


def test_entry_point_is_relay_serve_with_the_copied_config() -> None:
    argv = exec_form(only("ENTRYPOINT")) + exec_form(only("CMD"))
    assert argv[:2] == ["relay", "serve"]
    args = build_parser().parse_args(argv[1:])
    assert args.func is cmd_serve
    assert args.config == Path(workdir(), "config.toml")
    assert any("config.toml" in copy.split()[:-1] for copy in arguments_of("COPY"))


def test_listens_on_every_interface_at_the_default_port() -> None:
    assert env()["RELAY_SERVER__HOST"] == "0.0.0.0"
    config = tomllib.loads((ROOT / "config.toml").read_text())
    assert only("EXPOSE") == str(ServerSettings().port) == str(config["server"]["port"])
    assert f"'{ServerSettings().port}'" in " ".join(healthcheck_argv())


async def test_healthcheck_passes_on_a_live_relay_and_fails_without_one() -> None:
    argv = healthcheck_argv()
    assert argv[0] == "python"  # slim has no curl or wget
    assert "/healthz" in argv[-1]
    command = [sys.executable, *argv[1:]]

    async def exit_code(port: int) -> int:
        environment = {**os.environ, "RELAY_SERVER__PORT": str(port)}
        process = await asyncio.create_subprocess_exec(
            *command,
            env=environment,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        async with asyncio.timeout(15):
            return await process.wait()

    async with demo_stack(call_interval_seconds=None) as stack:
        assert await exit_code(int(stack.relay_url.rpartition(":")[2])) == 0
    refusing = bind_socket("127.0.0.1", 0)  # bound, never listening: connections are refused
    try:
        assert await exit_code(refusing.getsockname()[1]) != 0
    finally:
        refusing.close()


# -- the build context -----------------------------------------------------------------------------


def ignore_rules() -> list[tuple[bool, str]]:
    """(excludes, pattern) per .dockerignore line, in order; the last matching rule wins."""
    rules: list[tuple[bool, str]] = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            pattern = line.removeprefix("!").strip("/")
            rules.append((not line.startswith("!"), pattern))
    return rules


def _matches(pattern: str, path: str) -> bool:
    """Docker's rule: a pattern matches a path or any of its parent directories; `**/` any depth."""
    parts = path.split("/")
    candidates = ["/".join(parts[:end]) for end in range(1, len(parts) + 1)]
    if pattern.startswith("**/"):
        tail = pattern.removeprefix("**/")
        candidates = [
            "/".join(parts[start:end]) for end in range(1, len(parts) + 1) for start in range(end)
        ]
        pattern = tail
    return any(fnmatch.fnmatchcase(candidate, pattern) for candidate in candidates)


def in_context(path: str) -> bool:
    included = True
    for excludes, pattern in ignore_rules():
        if _matches(pattern, path):
            included = not excludes
    return included


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        ".git/HEAD",
        ".env",
        "tests/test_webhooks.py",
        "bench/__init__.py",
        ".pytest_cache/README.md",
        ".mypy_cache/3.11/x.json",
        ".hypothesis/examples/x",
        "relay/__pycache__/app.cpython-312.pyc",
        "relay/brokers/__pycache__/memory.cpython-312.pyc",
    ],
)
def test_context_leaves_out(path: str) -> None:
    assert not in_context(path)


def copied_sources() -> list[str]:
    sources: list[str] = []
    for copy in arguments_of("COPY"):
        sources.extend(source.strip("/").removeprefix("./") for source in copy.split()[:-1])
    return sources


def test_context_holds_everything_copied_and_the_image_needs() -> None:
    sources = copied_sources()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    # uv.lock for --frozen; the readme is project metadata, needed to build the package.
    for needed in (
        "pyproject.toml",
        "uv.lock",
        project["project"]["readme"],
        "relay",
        "config.toml",
    ):
        assert needed in sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert in_context(source), f"{source} is copied but .dockerignore leaves it out"
    for path in ("relay/app.py", "relay/static/x.js", "relay/simulator/app.py"):
        assert in_context(path)
    assert not {"tests", "bench", ".venv"} & set(sources)
