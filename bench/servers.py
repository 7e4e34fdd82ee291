"""The processes under test, each started alone: the simulator, the relay, the naive baseline and the
empty SSE server of the connection floor.

Each server is its own process so /proc can tell its CPU time and memory apart from the load
generator's. Their logs go to files in the run's directory, never to a pipe nobody reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from relay.simulator import DEFAULT_SECRET_KEY

ROOT = Path(__file__).resolve().parent.parent
SERVERS = ("relay", "naive")  # measured side by side, in this order
START_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 20.0
# Well above the scenarios' clients: a 429 would measure the limit, not the fan-out.
MAX_CLIENTS = 100_000


class ServerFailed(Exception):
    """A server process would not start."""


@dataclass(frozen=True, slots=True)
class ServerProcess:
    name: str
    process: asyncio.subprocess.Process
    host: str
    port: int
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def exit_code(self) -> int | None:
        """None while it runs."""
        return self.process.returncode


async def stop(process: asyncio.subprocess.Process, timeout: float) -> None:
    """SIGTERM, then SIGKILL if the process has not exited within `timeout` seconds."""
    if process.returncode is not None:
        return
    process.terminate()
    try:
        async with asyncio.timeout(timeout):
            await process.wait()
    except TimeoutError:
        process.kill()
        await process.wait()


def free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


async def _listening(server: ServerProcess, timeout: float) -> None:
    """Returns once the server accepts connections; raises ServerFailed if it exits first."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                if server.exit_code() is not None:
                    log = await asyncio.to_thread(server.log.read_text, errors="replace")
                    raise ServerFailed(f"{server.name} exited at start-up:\n{log[-2000:]}")
                try:
                    _, writer = await asyncio.open_connection(server.host, server.port)
                except OSError:
                    await asyncio.sleep(0.05)
                    continue
                writer.close()
                await writer.wait_closed()
                return
    except TimeoutError:
        raise ServerFailed(f"{server.name} did not listen within {timeout:.0f} s") from None


@contextlib.asynccontextmanager
async def _running(
    name: str,
    argv: list[str],
    host: str,
    port: int,
    log: Path,
    env: dict[str, str],
    start_timeout: float = START_TIMEOUT_SECONDS,
) -> AsyncIterator[ServerProcess]:
    output = await asyncio.to_thread(log.open, "wb")
    with output:
        process = await asyncio.create_subprocess_exec(
            *argv, cwd=ROOT, env={**os.environ, **env}, stdout=output, stderr=subprocess.STDOUT
        )
    server = ServerProcess(name, process, host, port, log)
    try:
        await _listening(server, start_timeout)
        yield server
    finally:
        await stop(process, STOP_TIMEOUT_SECONDS)


def simulator(workdir: Path, host: str) -> contextlib.AbstractAsyncContextManager[ServerProcess]:
    """The DialStack simulator, generating no calls: the bench injects every event."""
    port = free_port(host)
    argv = [sys.executable, "-m", "relay", "simulate", "--host", host, "--port", str(port)]
    argv += ["--call-interval", "0"]
    return _running("simulator", argv, host, port, workdir / "simulator.log", {})


def empty(workdir: Path, host: str) -> contextlib.AbstractAsyncContextManager[ServerProcess]:
    """bench/empty_sse.py: uvicorn as the relay runs it, with an app that only says `connected`."""
    port = free_port(host)
    argv = [sys.executable, "-m", "bench.empty_sse", "--host", host, "--port", str(port)]
    return _running("empty", argv, host, port, workdir / "empty.log", {})


def server(
    name: str,
    workdir: Path,
    host: str,
    upstream_url: str,
    secret: str,
    *,
    under: Sequence[str] = (),
    start_timeout: float = START_TIMEOUT_SECONDS,
) -> contextlib.AbstractAsyncContextManager[ServerProcess]:
    """`relay serve`, or the naive baseline, reading upstream from the simulator at `upstream_url`;
    `under`: a command that runs it (valgrind, for bench/instructions.py)."""
    port = free_port(host)
    env = {"RELAY_AUTH__SECRET": secret}
    if name == "relay":
        config = workdir / "relay.toml"
        config.write_text(
            "[server]\n"
            f'host = "{host}"\nport = {port}\n'
            f"max_clients = {MAX_CLIENTS}\nmax_clients_per_account = {MAX_CLIENTS}\n"
            f"max_clients_per_ip = {MAX_CLIENTS}\n\n"  # each load worker is one address
            "[upstream]\n"
            f'base_url = "{upstream_url}"\nsecret_key = "{DEFAULT_SECRET_KEY}"\n'
        )
        argv = [sys.executable, "-m", "relay", "serve", "--config", str(config)]
    elif name == "naive":
        argv = [sys.executable, "-m", "bench.naive_relay", "--host", host, "--port", str(port)]
        argv += ["--upstream", upstream_url, "--secret-key", DEFAULT_SECRET_KEY]
    else:
        raise ValueError(f"unknown server {name!r}; choose from {', '.join(SERVERS)}")
    return _running(name, [*under, *argv], host, port, workdir / f"{name}.log", env, start_timeout)
