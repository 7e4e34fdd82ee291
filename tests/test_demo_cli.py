"""The `relay demo` and `relay token` commands, run as an operator would: in a subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from streams import open_stream

from relay.auth import TokenVerifier

SECRET = "a-test-secret-for-relay-token-0123456789abcdef"
RAW_STREAM = re.compile(r"curl -N -H 'Authorization: Bearer (?P<token>[\w.-]+)' (?P<url>\S+)")


def relay_env() -> dict[str, str]:
    """This environment without RELAY_* variables, so only the flags and files given count."""
    return {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}


@contextlib.asynccontextmanager
async def demo_process(port: int, cwd: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relay",
        "demo",
        "--port",
        str(port),
        cwd=cwd,
        env={**relay_env(), "PYTHONUNBUFFERED": "1"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def read_until(stream: asyncio.StreamReader, pattern: re.Pattern[str]) -> re.Match[str]:
    """Lines of `stream` until one matches `pattern` (the caller bounds the wait)."""
    seen: list[str] = []
    while True:
        line = (await stream.readline()).decode()
        if not line:
            raise EOFError(f"stream ended; got {seen}")
        seen.append(line)
        found = pattern.search(line)
        if found is not None:
            return found


async def first_call_event(url: str, token: str) -> str:
    """The `event: call.*` line of the first call event, read with curl when it is installed."""
    curl = shutil.which("curl")
    if curl is None:
        async with (
            httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None)) as client,
            open_stream(client, url, token=token) as stream,
        ):
            await stream.wait_for(
                lambda events: any(e.type.startswith("call.") for e in events), 15
            )
            return next(f"event: {e.type}" for e in stream.events if e.type.startswith("call."))
    process = await asyncio.create_subprocess_exec(
        curl,
        "-sN",
        "--max-time",
        "20",
        "-H",
        f"Authorization: Bearer {token}",
        url,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        return (await read_until(process.stdout, re.compile(r"^event: call\.\S+"))).group(0)
    finally:
        if process.returncode is None:
            process.terminate()
        await process.wait()


def children_of(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            # The command name (field 2) may hold spaces; the parent pid follows its ')'.
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(stat.parent.name))
    return children


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_demo_serves_a_ready_token_streams_calls_and_stops_cleanly_on_ctrl_c(
    tmp_path: Path, unused_port: int
) -> None:
    async with demo_process(unused_port, tmp_path) as process:
        assert process.stdout is not None
        async with asyncio.timeout(20):
            printed = await read_until(process.stdout, RAW_STREAM)
        assert printed["url"] == f"http://127.0.0.1:{unused_port}/v1/events"
        async with asyncio.timeout(15):
            line = await first_call_event(printed["url"], printed["token"])
        assert line.startswith("event: call.")
        children = children_of(process.pid)

        # Ctrl-C with a client still connected: the demo ends its stream rather than waiting on it.
        async with (
            httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None)) as client,
            open_stream(client, printed["url"], token=printed["token"]) as stream,
        ):
            await stream.wait_count("connected", 1)
            process.send_signal(signal.SIGINT)
            async with asyncio.timeout(5):
                _, stderr = await process.communicate()
                await stream.closed.wait()
        assert process.returncode == 0, stderr.decode()
    assert not [pid for pid in children if alive(pid)]
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", unused_port)


def relay_token(*args: str, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", "token", "--config", str(config), *args],
        cwd=config.parent,
        env=relay_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(f'[auth]\nsecret = "{SECRET}"\nmax_token_ttl_seconds = 3600\n')
    return path


def test_relay_token_prints_a_token_the_verifier_accepts(config: Path) -> None:
    done = relay_token(
        "--account", "acct_1", "--ttl", "60", "--events", "call.incoming", config=config
    )
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    assert done.stdout == token + "\n"
    grant = TokenVerifier(SECRET, 3600).verify(token)
    assert grant.account_id == "acct_1"
    assert grant.events == frozenset({"call.incoming"})
    assert grant.user_id is None
    assert 0 < grant.expires_at - time.time() <= 60
    assert token not in done.stderr


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (("--account", "bob"), "account"),
        (("--account", "acct_1", "--ttl", "7200"), "ttl"),
    ],
)
def test_relay_token_refuses_what_it_cannot_sign_with_exit_2(
    config: Path, args: tuple[str, ...], complaint: str
) -> None:
    done = relay_token(*args, config=config)
    assert done.returncode == 2
    assert done.stdout == ""
    assert complaint in done.stderr
