"""Operating the relay as a process: graceful SIGTERM drain with many clients, and logs free of secrets."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from relay.auth import TokenIssuer
from relay.serving import bind_socket
from relay.simulator import Simulator

ROOT = Path(__file__).resolve().parent.parent
AUTH_SECRET = "auth-secret-for-operations-test-0123456789abcdef"
ADMIN_KEY = "admin-key-for-operations-test-0123456789abcdef"
SECRET_KEY = "sk_test_operations_secret_key_0123456789"
CLIENTS = 200
EXIT_BOUND_SECONDS = 12.0  # drain wait (5 s) + uvicorn's own shutdown, with room for a slow machine


def free_port() -> int:
    sock = bind_socket("127.0.0.1", 0)
    port: int = sock.getsockname()[1]
    sock.close()
    return port


@dataclass
class RelayProcess:
    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def relay_process(tmp_path: Path, simulator_url: str) -> Iterator[RelayProcess]:
    port = free_port()
    config = tmp_path / "relay.toml"
    config.write_text(
        f"""
[server]
port = {port}
heartbeat_seconds = 30
[upstream]
base_url = "{simulator_url}"
linger_seconds = 1
[[accounts]]
id = "acct_ops"
always_on = true
"""
    )
    env = {
        **os.environ,
        "RELAY_AUTH__SECRET": AUTH_SECRET,
        "RELAY_AUTH__ADMIN_KEY": ADMIN_KEY,
        "RELAY_UPSTREAM__SECRET_KEY": SECRET_KEY,
    }
    log_path = tmp_path / "relay.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "relay", "serve", "--config", str(config)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        yield RelayProcess(proc, f"http://127.0.0.1:{port}", log_path)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


async def wait_ready(url: str, proc: subprocess.Popen[bytes]) -> None:
    async with httpx.AsyncClient() as client, asyncio.timeout(20):
        while True:
            assert proc.poll() is None, "relay exited during start-up"
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(f"{url}/readyz")).status_code == 200:
                    return
            await asyncio.sleep(0.1)


@dataclass
class RawClient:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    received: bytearray


async def open_raw(url: str, token: str) -> RawClient:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        f"GET /v1/events HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
        "Accept: text/event-stream\r\n\r\n".encode()
    )
    received = bytearray()
    while b"event: connected" not in received:
        chunk = await reader.read(65536)
        assert chunk, f"closed before connected: {bytes(received)!r}"
        received += chunk
    return RawClient(reader, writer, received)


async def read_to_end(client: RawClient) -> bytes:
    while chunk := await client.reader.read(65536):
        client.received += chunk
    client.writer.close()
    return bytes(client.received)


@contextlib.asynccontextmanager
async def simulator() -> AsyncIterator[tuple[Simulator, str]]:
    sim = Simulator(secret_key=SECRET_KEY, accounts=["acct_ops"], call_interval_seconds=None)
    async with sim.serve() as url:
        yield sim, url


async def test_sigterm_drains_200_clients_with_retry_then_clean_close(tmp_path: Path) -> None:
    issuer = TokenIssuer(AUTH_SECRET, 86_400)
    async with simulator() as (_, sim_url):
        with relay_process(tmp_path, sim_url) as relay:
            await wait_ready(relay.url, relay.proc)
            async with asyncio.timeout(60):
                clients = await asyncio.gather(
                    *(open_raw(relay.url, issuer.issue("acct_ops", 600)[0]) for _ in range(CLIENTS))
                )
            sent = time.monotonic()
            relay.proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(EXIT_BOUND_SECONDS):
                bodies = await asyncio.gather(*(read_to_end(c) for c in clients))
                await asyncio.to_thread(relay.proc.wait)
            took = time.monotonic() - sent
            assert relay.proc.returncode == 0, relay.logs()[-2000:]
    assert took < EXIT_BOUND_SECONDS
    retries = set()
    for body in bodies:
        _, _, tail = body.partition(b"event: connected")
        assert b"retry: " in tail, body[-300:]
        retries.add(tail.split(b"retry: ")[1].split(b"\n")[0])
        assert body.endswith(b"0\r\n\r\n"), f"not a clean end of the chunked body: {body[-80:]!r}"
    # Jittered: a fleet told to come back at one instant would reconnect in one burst.
    assert len(retries) > CLIENTS // 4


async def test_logs_never_contain_a_token_or_secret(tmp_path: Path) -> None:
    issuer = TokenIssuer(AUTH_SECRET, 86_400)
    header_token = issuer.issue("acct_ops", 600)[0]
    query_token = issuer.issue("acct_ops", 600, user_id="user_1")[0]
    async with simulator() as (sim, sim_url):
        with relay_process(tmp_path, sim_url) as relay:
            await wait_ready(relay.url, relay.proc)
            async with httpx.AsyncClient(timeout=10) as client:
                # Every path that handles a secret: header and query tokens, a bad token, the admin
                # endpoints, a minted token, and the upstream session fetched with the secret key.
                async with client.stream(
                    "GET", f"{relay.url}/v1/events", params={"token": query_token}
                ) as stream:
                    assert stream.status_code == 200
                async with client.stream(
                    "GET",
                    f"{relay.url}/v1/events",
                    headers={"Authorization": f"Bearer {header_token}"},
                ) as stream:
                    assert stream.status_code == 200
                bad = await client.get(
                    f"{relay.url}/v1/events", params={"token": header_token + "x"}
                )
                assert bad.status_code == 401
                minted = await client.post(
                    f"{relay.url}/v1/tokens",
                    headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                    json={"account_id": "acct_ops"},
                )
                assert minted.status_code == 200
                status = await client.get(
                    f"{relay.url}/v1/status", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
                )
                assert status.json()["accounts"][0]["upstream"] == "connected"
            relay.proc.send_signal(signal.SIGTERM)
            relay.proc.wait(timeout=EXIT_BOUND_SECONDS)
            client_secrets = [s.client_secret for s in sim._sessions._by_secret.values()]
    logs = relay.logs()
    assert "client disconnected" in logs  # the scan reads real logs
    assert "upstream state" in logs
    lines = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    assert lines, "logs are JSON lines when not a terminal"
    # The relay's own access lines: the refused stream and the admin calls, paths without queries.
    answered = {(line["path"], line["status"]) for line in lines if line["event"] == "request"}
    assert {("/v1/events", 401), ("/v1/tokens", 200), ("/v1/status", 200)} <= answered
    # Each stream's one access line, written as it ended.
    ended = [line for line in lines if line["event"] == "client disconnected"]
    assert ended
    for line in ended:
        assert line["account"] == "acct_ops"
        assert {"subject", "resumed", "reset", "replayed", "cut"} <= line.keys()
        assert line["seconds"] >= 0
    assert client_secrets, "the relay fetched at least one session"
    secrets = [
        AUTH_SECRET,
        ADMIN_KEY,
        SECRET_KEY,
        header_token,
        query_token,
        minted.json()["token"],
    ]
    for secret in [*secrets, *client_secrets]:
        assert secret not in logs
        assert secret[:24] not in logs
    assert "eyJ" not in logs  # no JWT fragment at all


def _documented(markdown: str, language: str, starting: str) -> str:
    """The fenced block of `language` in docs/scaling.md whose text starts with `starting`."""
    for block in markdown.split("```" + language + "\n")[1:]:
        code = textwrap.dedent(block.split("```")[0])
        if code.lstrip().startswith(starting):
            return code
    raise AssertionError(f"docs/scaling.md has no {language} block starting {starting!r}")


@contextlib.contextmanager
def uvicorn_process(argv: list[str], cwd: Path, env: dict[str, str]) -> Iterator[RelayProcess]:
    log_path = cwd / "uvicorn.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield RelayProcess(proc, "", log_path)
    finally:
        proc.kill()
        proc.wait(timeout=10)


async def test_the_documented_uvicorn_command_serves_event_streams(tmp_path: Path) -> None:
    """docs/scaling.md's `uvicorn asgi:app ...` for several workers, run as written but for one
    worker on a loopback port, with its asgi.py: clients get their streams."""
    markdown = (ROOT / "docs" / "scaling.md").read_text()
    (tmp_path / "asgi.py").write_text(_documented(markdown, "python", "from relay.app"))
    shell = _documented(markdown, "sh", "export").replace("\\\n", " ")
    command = shlex.split(next(line for line in shell.splitlines() if "uvicorn " in line))
    port = free_port()
    substitutes = {"--host": "127.0.0.1", "--port": str(port), "--workers": "1"}
    argv = [sys.executable, "-m", "uvicorn"]
    argv += [substitutes.get(previous, word) for previous, word in itertools.pairwise(command)]
    issuer = TokenIssuer(AUTH_SECRET, 86_400)
    async with simulator() as (_, sim_url):
        env = {
            **os.environ,
            "PYTHONPATH": str(tmp_path),
            "RELAY_AUTH__SECRET": AUTH_SECRET,
            "RELAY_UPSTREAM__SECRET_KEY": SECRET_KEY,
            "RELAY_UPSTREAM__BASE_URL": sim_url,
        }
        with uvicorn_process(argv, tmp_path, env) as served:
            url = f"http://127.0.0.1:{port}"
            await wait_ready(url, served.proc)
            async with asyncio.timeout(20):
                client = await open_raw(url, issuer.issue("acct_ops", 600)[0])
            client.writer.close()
    assert client.received.startswith(b"HTTP/1.1 200 OK"), served.logs()[-2000:]


@pytest.fixture(autouse=True)
def _no_orphans() -> Iterator[None]:
    yield
    children = subprocess.run(
        ["pgrep", "-P", str(os.getpid())], capture_output=True, text=True, check=False
    ).stdout.split()
    assert not children, f"processes left behind: {children}"
