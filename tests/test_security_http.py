"""Issue 3 acceptance, the guarded edges over real HTTP: tokens, limits, CORS, admin and ops routes.

The relay and the simulated DialStack run under uvicorn on loopback (`demo_stack`); the logging
test runs `relay serve` as a subprocess so it reads the log lines an operator would get.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import os
import re
import secrets
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jwt
from streams import open_stream, upstream_connected

from relay.auth import TokenIssuer
from relay.demo import DEMO_ACCOUNTS, DemoStack, demo_stack
from relay.simulator import DEFAULT_SECRET_KEY, Simulator

ACCT, OTHER = DEMO_ACCOUNTS
DEADLINE = 5.0


stack = functools.partial(demo_stack, call_interval_seconds=None)  # events only when injected


def secret_of(stack: DemoStack) -> str:
    assert stack.settings.auth.secret is not None
    return stack.settings.auth.secret.get_secret_value()


def admin_key_of(stack: DemoStack) -> str:
    assert stack.settings.auth.admin_key is not None
    return stack.settings.auth.admin_key.get_secret_value()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def presentations(token: str) -> list[tuple[dict[str, str], dict[str, str]]]:
    """The three ways a client presents a token, as (headers, query): bearer, cookie, ?token=."""
    return [(bearer(token), {}), ({"Cookie": f"relay_token={token}"}, {}), ({}, {"token": token})]


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def unsigned(claims: dict[str, Any]) -> str:
    header = b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{header}.{b64url(json.dumps(claims).encode())}."


def tampered(token: str, **changes: str) -> str:
    """The token with its claims changed and its original signature kept."""
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return f"{header}.{b64url(json.dumps({**claims, **changes}).encode())}.{signature}"


def assert_json_error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    assert isinstance(body["error"], str)
    assert body["error"]
    message: str = body["error"]
    return message


def assert_unauthorized(response: httpx.Response, token: str | None = None) -> None:
    assert_json_error(response, 401)
    assert response.headers["www-authenticate"].startswith("Bearer")
    if token is not None:
        assert token not in response.text


async def test_unusable_tokens_get_401_with_a_json_error_and_www_authenticate(
    http: httpx.AsyncClient,
) -> None:
    async with stack() as s, stack() as other_installation:
        secret = secret_of(s)
        now = int(time.time())
        valid = s.token()
        cases = {
            "forged claims": tampered(valid, account_id=OTHER),
            "wrong key": jwt.encode(
                {"account_id": ACCT, "exp": now + 60}, secrets.token_urlsafe(48), "HS256"
            ),
            "other installation": other_installation.token(ACCT),
            "expired": jwt.encode({"account_id": ACCT, "exp": now - 5}, secret, "HS256"),
            "alg none": unsigned({"account_id": ACCT, "exp": now + 60}),
            "alg HS512": jwt.encode({"account_id": ACCT, "exp": now + 60}, secret, "HS512"),
            "not yet valid": jwt.encode(
                {"account_id": ACCT, "exp": now + 120, "nbf": now + 60}, secret, "HS256"
            ),
            "lifetime past max_token_ttl": jwt.encode(
                {"account_id": ACCT, "exp": now + 2 * 86_400}, secret, "HS256"
            ),
            "no exp": jwt.encode({"account_id": ACCT}, secret, "HS256"),
            "no account": jwt.encode({"exp": now + 60}, secret, "HS256"),
            "not an account": jwt.encode({"account_id": "bob", "exp": now + 60}, secret, "HS256"),
            "events not a list": jwt.encode(
                {"account_id": ACCT, "exp": now + 60, "events": "call.end"}, secret, "HS256"
            ),
            "not a JWT": "definitely-not-a-token",
        }
        url = f"{s.relay_url}/v1/events"
        for case, token in cases.items():
            for headers, query in presentations(token):
                response = await http.get(url, headers=headers, params=query)
                assert response.status_code == 401, (case, headers, query)
                assert_unauthorized(response, token)
        assert_unauthorized(await http.get(url))
        assert_unauthorized(await http.get(url, headers={"Authorization": "Bearer"}))
        assert_unauthorized(await http.get(url, headers={"Authorization": f"Basic {valid}"}))
        # The other installation's own token works there, so the 401 above was the secret.
        async with open_stream(
            http, f"{other_installation.relay_url}/v1/events", token=other_installation.token()
        ) as there:
            assert there.status_code == 200


async def test_a_token_is_accepted_from_header_cookie_and_query(http: httpx.AsyncClient) -> None:
    async with stack() as s:
        url = f"{s.relay_url}/v1/events"
        token = s.token()
        for headers, query in presentations(token):
            async with open_stream(http, url, headers=headers, params=query) as stream:
                [connected] = await stream.wait_count("connected", 1)
                assert json.loads(connected.data)["account_id"] == ACCT
    async with stack(auth={"allow_query_token": False}) as s:
        response = await http.get(f"{s.relay_url}/v1/events", params={"token": s.token()})
        assert_unauthorized(response)
        assert "allow_query_token" in response.json()["error"]


async def test_a_bad_events_query_is_400(http: httpx.AsyncClient) -> None:
    async with stack() as s:
        url = f"{s.relay_url}/v1/events"
        for events in ("", " , ", ",".join(f"call.t{i}" for i in range(65))):
            response = await http.get(url, headers=bearer(s.token()), params={"events": events})
            assert_json_error(response, 400)


async def test_client_limits_answer_429_with_retry_after(http: httpx.AsyncClient) -> None:
    async with (
        stack(server={"max_clients_per_account": 2, "max_clients": 3}) as s,
        contextlib.AsyncExitStack() as clients,
    ):
        url = f"{s.relay_url}/v1/events"

        async def admitted(account: str) -> None:
            stream = await clients.enter_async_context(
                open_stream(http, url, token=s.token(account))
            )
            assert stream.status_code == 200

        await admitted(ACCT)
        await admitted(ACCT)
        per_account = await http.get(url, headers=bearer(s.token(ACCT)))
        assert "max_clients_per_account" in assert_json_error(per_account, 429)
        assert int(per_account.headers["retry-after"]) > 0
        await admitted(OTHER)
        total = await http.get(url, headers=bearer(s.token(OTHER)))
        assert assert_json_error(total, 429) == "the relay is at max_clients"
        assert int(total.headers["retry-after"]) > 0
        metrics = (await http.get(f"{s.relay_url}/metrics")).text
        assert 'relay_clients_rejected_total{reason="max_clients_per_account"} 1.0' in metrics
        assert 'relay_clients_rejected_total{reason="max_clients"} 1.0' in metrics


async def test_cors_allows_the_configured_origin_with_credentials_only(
    http: httpx.AsyncClient,
) -> None:
    allowed, stranger = "https://app.example", "https://evil.example"
    async with stack(server={"cors_origins": [allowed]}) as s:
        url = f"{s.relay_url}/v1/events"
        preflight_headers = {
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization, last-event-id",
        }
        preflight = await http.options(url, headers={"Origin": allowed, **preflight_headers})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == allowed
        assert preflight.headers["access-control-allow-credentials"] == "true"
        allowed_headers = preflight.headers["access-control-allow-headers"].lower()
        assert "authorization" in allowed_headers
        assert "last-event-id" in allowed_headers
        refused = await http.options(url, headers={"Origin": stranger, **preflight_headers})
        assert "access-control-allow-origin" not in refused.headers

        async with open_stream(http, url, token=s.token(), headers={"Origin": allowed}) as stream:
            assert stream.status_code == 200
            assert stream.response.headers["access-control-allow-origin"] == allowed
            assert stream.response.headers["access-control-allow-credentials"] == "true"
        async with open_stream(http, url, token=s.token(), headers={"Origin": stranger}) as stream:
            assert "access-control-allow-origin" not in stream.response.headers


async def test_minting_tokens_needs_the_admin_key_and_a_valid_body(
    http: httpx.AsyncClient,
) -> None:
    async with stack() as s:
        url = f"{s.relay_url}/v1/tokens"
        admin = bearer(admin_key_of(s))
        body = {"account_id": ACCT, "ttl_seconds": 60, "events": ["call.incoming"]}
        assert_unauthorized(await http.post(url, json=body))
        assert_unauthorized(await http.post(url, json=body, headers=bearer("x" * 43)))
        assert_unauthorized(await http.post(url, json=body, headers=bearer(secret_of(s))))

        minted = await http.post(url, json={**body, "user_id": "usr_1"}, headers=admin)
        assert minted.status_code == 200, minted.text
        answer = minted.json()
        assert set(answer) == {"token", "expires_at"}
        assert abs(answer["expires_at"] - (time.time() + 60)) < 5
        claims = jwt.decode(answer["token"], secret_of(s), algorithms=["HS256"])
        assert claims["account_id"] == ACCT
        assert claims["events"] == ["call.incoming"]
        assert claims["user_id"] == "usr_1"
        async with open_stream(http, f"{s.relay_url}/v1/events", token=answer["token"]) as stream:
            await stream.wait_for(upstream_connected)
            await s.simulator.inject(ACCT, "call.end", {"n": 1})
            await s.simulator.inject(ACCT, "call.incoming", {"n": 2, "user_id": "usr_2"})
            await s.simulator.inject(ACCT, "call.incoming", {"n": 3})
            [delivered] = await stream.wait_count("call.incoming", 1)
        assert json.loads(delivered.data) == {"n": 3}
        assert [e.type for e in stream.events if e.type.startswith("call.")] == ["call.incoming"]

        capped = await http.post(
            url, json={"account_id": ACCT, "ttl_seconds": 10**9}, headers=admin
        )
        assert capped.status_code == 200
        max_ttl = s.settings.auth.max_token_ttl_seconds
        assert capped.json()["expires_at"] <= time.time() + max_ttl + 1

        bad_bodies: list[Any] = [
            b"not json",
            b"[]",
            b"",
            {},
            {"account_id": "bob"},
            {"account_id": 42},
            {"account_id": ACCT, "ttl_seconds": "60"},
            {"account_id": ACCT, "ttl_seconds": True},
            {"account_id": ACCT, "ttl_seconds": 0},
            {"account_id": ACCT, "events": "call.incoming"},
            {"account_id": ACCT, "events": [""]},
            {"account_id": ACCT, "user_id": 5},
            {"account_id": ACCT, "pad": "x" * 20_000},
        ]
        for bad in bad_bodies:
            options: dict[str, Any] = {"content": bad} if isinstance(bad, bytes) else {"json": bad}
            response = await http.post(url, headers=admin, **options)
            assert_json_error(response, 400)

    async with stack(auth={"admin_key": None}) as s:
        for path, method in (("/v1/tokens", "POST"), ("/v1/status", "GET")):
            response = await http.request(
                method, f"{s.relay_url}{path}", json={"account_id": ACCT}, headers=bearer("x" * 43)
            )
            assert_json_error(response, 403)


async def test_status_is_admin_only_and_shows_upstreams_and_clients(
    http: httpx.AsyncClient,
) -> None:
    async with stack() as s:
        url = f"{s.relay_url}/v1/status"
        assert_unauthorized(await http.get(url))
        assert_unauthorized(await http.get(url, headers=bearer(s.token())))
        async with (
            open_stream(http, f"{s.relay_url}/v1/events", token=s.token()) as first,
            open_stream(http, f"{s.relay_url}/v1/events", token=s.token()) as second,
        ):
            await first.wait_for(upstream_connected)
            await s.simulator.inject(ACCT, "call.incoming", {"n": 1})
            await second.wait_count("call.incoming", 1)
            response = await http.get(url, headers=bearer(admin_key_of(s)))
        assert response.status_code == 200
        status = response.json()
        assert status["clients"] == 2
        accounts = {a["account_id"]: a for a in status["accounts"]}
        assert accounts[ACCT]["upstream"] == "connected"
        assert accounts[ACCT]["clients"] == 2
        assert accounts[ACCT]["events_relayed"] == 1
        assert accounts[ACCT]["since"] <= time.time()
        assert accounts[OTHER]["clients"] == 0
        assert accounts[OTHER]["upstream"] in ("connecting", "connected")


async def test_health_readiness_and_prometheus_metrics(http: httpx.AsyncClient) -> None:
    async with stack() as s:
        assert (await http.get(f"{s.relay_url}/healthz")).status_code == 200
        assert (await http.get(f"{s.relay_url}/readyz")).status_code == 200
        async with open_stream(http, f"{s.relay_url}/v1/events", token=s.token()) as stream:
            await stream.wait_for(upstream_connected)
            await s.simulator.inject(ACCT, "call.incoming", {"n": 1}, id="evt_1")
            await s.simulator.inject(ACCT, "call.incoming", {"n": 1}, id="evt_1")
            await s.simulator.inject(ACCT, "call.end", {"n": 2})
            await stream.wait_count("call.end", 1)
            response = await http.get(f"{s.relay_url}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    metrics = response.text
    for line in (
        "relay_clients_connected 1.0",
        'relay_events_in_total{source="upstream"} 2.0',
        "relay_duplicates_dropped_total 1.0",
        "relay_events_out_total 2.0",
        "relay_slow_client_disconnects_total 0.0",
        'relay_upstreams{state="connected"}',
    ):
        assert re.search(rf"^{re.escape(line)}", metrics, re.M), line
    # Two events: one fan-out each, or one for both when they arrived in the same upstream read.
    assert re.search(r"^relay_fanout_seconds_count [12]\.0$", metrics, re.M)


def relay_config(path: Path, port: int, simulator_url: str, secret: str, admin_key: str) -> Path:
    path.write_text(
        f"""
[server]
host = "127.0.0.1"
port = {port}

[auth]
secret = "{secret}"
admin_key = "{admin_key}"

[upstream]
base_url = "{simulator_url}"
secret_key = "{DEFAULT_SECRET_KEY}"
backoff_initial_seconds = 0.2

[[accounts]]
id = "{ACCT}"
"""
    )
    return path


@contextlib.asynccontextmanager
async def relay_serve(config: Path, port: int) -> AsyncIterator[asyncio.subprocess.Process]:
    """`relay serve` in a subprocess, ready once /healthz answers; SIGTERM'd and reaped on exit."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relay",
        "serve",
        "--config",
        str(config),
        cwd=config.parent,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with httpx.AsyncClient() as client, asyncio.timeout(20):
            while True:
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200:
                        break
                assert process.returncode is None, "relay serve exited during start-up"
                await asyncio.sleep(0.05)
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_tokens_and_secrets_never_reach_the_logs(
    http: httpx.AsyncClient, tmp_path: Path, unused_port: int
) -> None:
    secret, admin_key = secrets.token_urlsafe(48), secrets.token_urlsafe(32)
    issuer = TokenIssuer(secret, 3600)
    simulator = Simulator(accounts=(ACCT,), call_interval_seconds=None)
    async with simulator.serve() as simulator_url:
        config = relay_config(
            tmp_path / "relay.toml", unused_port, simulator_url, secret, admin_key
        )
        async with relay_serve(config, unused_port) as process:
            base = f"http://127.0.0.1:{unused_port}"
            minted = await http.post(
                f"{base}/v1/tokens", json={"account_id": ACCT}, headers=bearer(admin_key)
            )
            tokens = [
                minted.json()["token"],
                *(issuer.issue(ACCT, 600, subject=f"usr_{i}")[0] for i in range(2)),
            ]
            forged = tampered(tokens[0], account_id="acct_else")
            assert_unauthorized(await http.get(f"{base}/v1/events", params={"token": forged}))
            for n, token in enumerate(tokens):
                headers, query = presentations(token)[n]
                async with open_stream(
                    http, f"{base}/v1/events", headers=headers, params=query
                ) as stream:
                    await stream.wait_for(upstream_connected)
                    await simulator.inject(ACCT, "call.incoming", {"n": n})
                    await stream.wait_count("call.incoming", 1)
            process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(15):
                stdout, stderr = await process.communicate()
            assert process.returncode == 0
    logs = (stdout + stderr).decode()
    assert "client disconnected" in logs  # INFO lines were written, so their absence below counts
    assert "/v1/events" in logs  # and the access log too
    for token in [*tokens, forged]:
        assert token not in logs
        assert token.rsplit(".", 1)[-1] not in logs  # nor its signature alone
    for value in (secret, admin_key, DEFAULT_SECRET_KEY):
        assert value not in logs
    assert not re.search(r"cs_[A-Za-z0-9_-]{16,}", logs), "a DialStack client secret was logged"
