"""Issue 8, security: token confusion, isolation under concurrency, CORS, limits, the admin surface,
secrets in logs, oversized requests. Everything against real servers on loopback; the log scan
runs the relay as a process so it reads the log lines an operator would get.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import hmac
import json
import re
import time
from pathlib import Path
from typing import Any

import httpx
from streams import Stream, open_stream, upstream_connected

from bench.soak import RawClient, free_port, relay_process, toml
from relay.demo import DemoStack, demo_stack
from relay.simulator import DEFAULT_SECRET_KEY, Simulator

ACCT, OTHER = "acct_demo", "acct_other"
WEBHOOK_SECRET = "whsec_security_0123456789abcdef"
stack = functools.partial(demo_stack, call_interval_seconds=None)


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def forge(header: str | dict[str, Any], claims: str | dict[str, Any], key: bytes | None) -> str:
    """A JWT built by hand: header and claims as given (JSON text is kept as is, duplicates and
    all), signed with HMAC-SHA256 under `key`, or with an empty signature."""
    parts = [h if isinstance(h, str) else json.dumps(h) for h in (header, claims)]
    signing_input = ".".join(b64(part.encode()) for part in parts)
    mac = b"" if key is None else hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def secrets_of(s: DemoStack) -> tuple[str, str]:
    assert s.settings.auth.secret is not None
    assert s.settings.auth.admin_key is not None
    return s.settings.auth.secret.get_secret_value(), s.settings.auth.admin_key.get_secret_value()


def assert_json_error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    message: str = response.json()["error"]
    assert message
    return message


# -- token confusion -------------------------------------------------------------------------------


async def test_confused_forged_and_ambiguous_tokens_are_all_401(http: httpx.AsyncClient) -> None:
    async with stack(webhooks={"enabled": True, "secret": WEBHOOK_SECRET}) as s:
        secret, admin_key = secrets_of(s)
        key = secret.encode()
        now = int(time.time())
        claims = {"account_id": ACCT, "exp": now + 600}
        hs256 = {"alg": "HS256", "typ": "JWT"}
        cases: dict[str, str] = {
            **{
                f"alg {alg}, {'signed' if k else 'unsigned'}": forge({"alg": alg}, claims, k)
                for alg in ("none", "None", "NONE", "nOnE")
                for k in (None, key)
            },
            # The HS256 key presented as if it were a public key (the RS/ES/PS confusion).
            **{
                f"alg {alg} with the key as HMAC": forge({"alg": alg}, claims, key)
                for alg in ("RS256", "ES256", "PS256", "EdDSA", "HS384", "HS512")
            },
            "signed with the admin key": forge(hs256, claims, admin_key.encode()),
            "signed with the webhook secret": forge(hs256, claims, WEBHOOK_SECRET.encode()),
            "signed with the DialStack key": forge(hs256, claims, DEFAULT_SECRET_KEY.encode()),
            "signed with an empty key": forge(hs256, claims, b""),
            "signed with the key minus a byte": forge(hs256, claims, key[:-1]),
            "kid pointing at /dev/null, empty key": forge(
                {**hs256, "kid": "../../../../../../dev/null"}, claims, b""
            ),
            "kid injection, empty key": forge(
                {**hs256, "kid": "x' UNION SELECT ''--"}, claims, b""
            ),
            "embedded jwk of the attacker": forge(
                {**hs256, "jwk": {"kty": "oct", "k": b64(b"attacker")}}, claims, b"attacker"
            ),
            "jku to the attacker": forge(
                {**hs256, "jku": "https://evil.example/jwks"}, claims, b"attacker"
            ),
            "duplicate account_id, foreign last": forge(
                hs256,
                f'{{"account_id": "{ACCT}", "account_id": "{OTHER}", "exp": {now + 600}}}',
                key,
            ),
            "duplicate account_id, ours last": forge(
                hs256,
                f'{{"account_id": "{OTHER}", "account_id": "{ACCT}", "exp": {now + 600}}}',
                key,
            ),
            "duplicate exp": forge(
                hs256, f'{{"account_id": "{ACCT}", "exp": {now - 60}, "exp": {now + 600}}}', key
            ),
            "duplicate alg, none first": forge('{"alg": "none", "alg": "HS256"}', claims, key),
            "exp as a string": forge(hs256, {**claims, "exp": str(now + 600)}, key),
            "exp as a boolean": forge(hs256, {**claims, "exp": True}, key),
            "crit header": forge({**hs256, "crit": ["exp"]}, claims, key),
            "huge, 9000 characters": forge(hs256, {**claims, "pad": "x" * 6700}, key),
            "the admin key itself": admin_key,
        }
        valid = forge(hs256, claims, key)
        url = f"{s.relay_url}/v1/events"
        async with open_stream(http, url, token=valid) as control:
            assert control.status_code == 200  # so each 401 below is the token's doing
        for case, token in cases.items():
            response = await http.get(url, headers=bearer(token))
            assert response.status_code == 401, (case, response.text)
            assert_json_error(response, 401)
            assert response.headers["www-authenticate"].startswith("Bearer"), case
            assert token not in response.text
        huge = await http.get(url, headers={"Authorization": "Bearer " + "a" * 100_000})
        assert "too large" in assert_json_error(huge, 401)


# -- isolation -------------------------------------------------------------------------------------


async def test_accounts_stay_isolated_under_concurrent_connects_events_and_resumes(
    http: httpx.AsyncClient,
) -> None:
    accounts = [f"acct_iso_{n}" for n in range(6)]
    per_account, events = 5, 20
    async with stack(accounts=accounts) as s, contextlib.AsyncExitStack() as exits:
        url = f"{s.relay_url}/v1/events"

        async def subscribe(account: str, n: int, last_event_id: str | None = None) -> Stream:
            token = s.token(account)
            headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
            params = {}
            if n % 3 == 0:
                headers["Authorization"] = f"Bearer {token}"
            elif n % 3 == 1:
                headers["Cookie"] = f"relay_token={token}"
            else:
                params["token"] = token
            stream = await exits.enter_async_context(
                open_stream(http, url, headers=headers, params=params)
            )
            assert stream.status_code == 200
            return stream

        streams = await asyncio.gather(
            *(subscribe(a, n) for a in accounts for n in range(per_account))
        )
        for stream in streams:
            await stream.wait_for(upstream_connected)

        async def publish(account: str, numbers: range) -> None:
            for n in numbers:
                await s.simulator.inject(account, "call.incoming", {"account": account, "n": n})
                await asyncio.sleep(0)

        await asyncio.gather(*(publish(a, range(events)) for a in accounts))
        for stream in streams:
            await stream.wait_count("call.incoming", events)
        # A second round is published while one client per account resumes with an id that
        # another account's stream carried.
        foreign_ids = [
            streams[i * per_account].of_type("call.incoming")[5].id for i in range(len(accounts))
        ]
        resumed, _ = await asyncio.gather(
            asyncio.gather(
                *(subscribe(accounts[i - 1], 0, foreign_ids[i]) for i in range(len(accounts)))
            ),
            asyncio.gather(*(publish(a, range(events, 2 * events)) for a in accounts)),
        )
        for stream in [*streams, *resumed]:
            await stream.wait_for(
                lambda got: any(json.loads(e.data).get("n") == 2 * events - 1 for e in got)
            )

    for index, stream in enumerate(streams):
        account = accounts[index // per_account]
        calls = [json.loads(e.data) for e in stream.of_type("call.incoming")]
        assert calls == [{"account": account, "n": n} for n in range(2 * events)]
    for index, stream in enumerate(resumed):
        calls = [json.loads(e.data) for e in stream.of_type("call.incoming")]
        assert {call["account"] for call in calls} == {accounts[index - 1]}
        assert len({call["n"] for call in calls}) == len(calls)


# -- CORS ------------------------------------------------------------------------------------------

PREFLIGHT = {
    "Access-Control-Request-Method": "GET",
    "Access-Control-Request-Headers": "authorization",
}


async def test_cors_grants_only_exact_origins_and_credentials_only_without_a_wildcard(
    http: httpx.AsyncClient,
) -> None:
    allowed = "https://app.example"
    lookalikes = [
        "https://app.example.evil",
        "https://evil-app.example",
        "https://evil.example/https://app.example",
        "http://app.example",
        "https://app.example:8443",
        "null",
        "https://app.example%00.evil",
    ]
    async with stack(server={"cors_origins": [allowed]}) as s:
        url = f"{s.relay_url}/v1/events"
        for origin in lookalikes:
            preflight = await http.options(url, headers={"Origin": origin, **PREFLIGHT})
            assert "access-control-allow-origin" not in preflight.headers, origin
            for path in ("/v1/events", "/v1/status", "/healthz"):
                response = await http.get(f"{s.relay_url}{path}", headers={"Origin": origin})
                assert "access-control-allow-origin" not in response.headers, (origin, path)
        bad_header = await http.options(
            url,
            headers={"Origin": allowed, **PREFLIGHT, "Access-Control-Request-Headers": "x-evil"},
        )
        assert bad_header.status_code == 400
        refused = await http.get(url, headers={"Origin": allowed})  # no token: 401 ...
        assert refused.status_code == 401
        assert refused.headers["access-control-allow-origin"] == allowed  # ... readable by the page
    async with stack(server={"cors_origins": ["*"]}) as s:
        url = f"{s.relay_url}/v1/events"
        preflight = await http.options(url, headers={"Origin": "https://any.example", **PREFLIGHT})
        assert preflight.headers["access-control-allow-origin"] == "*"
        assert "access-control-allow-credentials" not in preflight.headers
        async with open_stream(
            http, url, token=s.token(), headers={"Origin": "https://any.example"}
        ) as stream:
            assert stream.response.headers["access-control-allow-origin"] == "*"
            assert "access-control-allow-credentials" not in stream.response.headers
    async with stack() as s:
        url = f"{s.relay_url}/v1/events"
        preflight = await http.options(url, headers={"Origin": allowed, **PREFLIGHT})
        assert "access-control-allow-origin" not in preflight.headers
        async with open_stream(http, url, token=s.token(), headers={"Origin": allowed}) as stream:
            assert "access-control-allow-origin" not in stream.response.headers


# -- limits ----------------------------------------------------------------------------------------


async def test_client_limits_hold_under_a_concurrent_rush_and_free_up_after(
    http: httpx.AsyncClient,
) -> None:
    async with stack(server={"max_clients_per_account": 10, "max_clients": 15}) as s:
        url = s.relay_url

        async def rush(account: str, count: int) -> list[RawClient]:
            clients = await asyncio.gather(
                *(RawClient.connect(url, s.token(account)) for _ in range(count))
            )
            for client in clients:
                if client.status == 429:
                    assert re.search(rb"\r\nretry-after: [1-9]", client.head, re.I), client.head
            return clients

        first = await rush(ACCT, 40)
        assert sorted(c.status for c in first) == [200] * 10 + [429] * 30
        second = await rush(OTHER, 10)
        assert sorted(c.status for c in second) == [200] * 5 + [429] * 5
        for client in first + second:
            client.close()
        async with asyncio.timeout(5):
            while True:  # the relay sees them go
                again = await rush(ACCT, 1)
                again[0].close()
                if again[0].status == 200:
                    break
                await asyncio.sleep(0.05)


async def test_one_address_cannot_take_every_client_slot() -> None:
    async with stack(server={"max_clients": 20, "max_clients_per_ip": 8}) as s:
        hog = await asyncio.gather(
            *(RawClient.connect(s.relay_url, s.token(), source="127.0.0.2") for _ in range(12))
        )
        others = []
        try:
            assert sorted(c.status for c in hog) == [200] * 8 + [429] * 4
            refused = next(c for c in hog if c.status == 429)
            assert b"retry-after: 5" in refused.head.lower()
            others = [
                await RawClient.connect(s.relay_url, s.token(), source=f"127.0.0.{n}")
                for n in (3, 4)
            ]
            assert [c.status for c in others] == [200, 200]
        finally:
            for client in hog + others:
                client.close()
        async with asyncio.timeout(5):  # the address's slots come back once its clients leave
            while True:
                again = await RawClient.connect(s.relay_url, s.token(), source="127.0.0.2")
                again.close()
                if again.status == 200:
                    break
                await asyncio.sleep(0.05)


async def test_the_per_address_limit_believes_x_forwarded_for_only_from_a_trusted_proxy() -> None:
    proxy, stranger = "127.0.0.5", "127.0.0.6"
    async with stack(server={"max_clients_per_ip": 2, "trusted_proxies": [proxy]}) as s:
        connect = functools.partial(RawClient.connect, s.relay_url)
        # Behind the proxy, each forwarded address has its own two slots ...
        behind = [
            await connect(s.token(), source=proxy, forwarded_for=f"203.0.113.{n % 3}")
            for n in range(6)
        ]
        # ... while a stranger's X-Forwarded-For is ignored: it is one address, whatever it claims.
        spoofed = [
            await connect(s.token(), source=stranger, forwarded_for=f"198.51.100.{n}")
            for n in range(4)
        ]
        try:
            assert [c.status for c in behind] == [200] * 6
            assert [c.status for c in spoofed] == [200, 200, 429, 429]
        finally:
            for client in behind + spoofed:
                client.close()


# -- injection through webhooks --------------------------------------------------------------------


def signed(body: bytes) -> dict[str, str]:
    t = int(time.time())
    digest = hmac.new(WEBHOOK_SECRET.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return {"X-DialStack-Signature": f"t={t},v1={digest}", "Content-Type": "application/json"}


async def test_webhook_types_and_ids_cannot_add_fields_to_the_client_stream(
    http: httpx.AsyncClient,
) -> None:
    hostile = [
        "call.x\ndata: forged",
        "call.x\rid: 1-1",
        "call.x\r\nretry: 0",
        "call.x\u2028y",
        "call.x\x85y",
        "call.x\x00",
        "relay.reset",
        "connected",
    ]
    async with (
        stack(webhooks={"enabled": True, "secret": WEBHOOK_SECRET}) as s,
        open_stream(http, f"{s.relay_url}/v1/events", token=s.token()) as client,
    ):
        url = f"{s.relay_url}/v1/webhooks/dialstack"
        for n, type in enumerate(hostile):
            for envelope in (
                {"id": f"evt_{n}", "type": type, "account_id": ACCT, "data": {}},
                {
                    "id": type.replace("call.x", f"evt_id_{n}"),
                    "type": "call.ok",
                    "account_id": ACCT,
                    "data": {},
                },
            ):
                body = json.dumps(envelope).encode()
                response = await http.post(url, content=body, headers=signed(body))
                assert response.status_code in (200, 400), response.text
                if response.status_code == 400:
                    assert_json_error(response, 400)
        marker = json.dumps({"id": "evt_end", "type": "call.end", "account_id": ACCT, "data": {}})
        assert (
            await http.post(url, content=marker, headers=signed(marker.encode()))
        ).status_code == 200
        await client.wait_count("call.end", 1)
    for line in bytes(client.raw).splitlines():
        name, _, value = line.partition(b":")
        if name in (b"id",):
            assert re.fullmatch(rb" \d+-\d+", value), line
        if name == b"retry":
            assert value == b" 3000", line
        if name == b"event":
            assert not value.startswith(b" relay.reset"), line
    assert not [e for e in client.events if e.type.startswith("relay.reset")]
    assert [e.type for e in client.events if e.type == "connected"] == ["connected"]


# -- the admin surface -----------------------------------------------------------------------------


async def test_admin_endpoints_open_to_the_exact_key_in_the_header_only(
    http: httpx.AsyncClient,
) -> None:
    async with stack() as s:
        secret, admin_key = secrets_of(s)
        routes = [("GET", "/v1/status", None), ("POST", "/v1/tokens", {"account_id": ACCT})]
        wrong: list[tuple[dict[str, str], dict[str, str]]] = [
            ({}, {}),
            ({"Cookie": f"relay_token={admin_key}"}, {}),
            ({}, {"token": admin_key}),
            (
                {
                    "Authorization": "Basic "
                    + base64.b64encode(f"admin:{admin_key}".encode()).decode()
                },
                {},
            ),
            ({"Authorization": admin_key}, {}),
            (bearer(admin_key[:-1]), {}),
            (bearer(admin_key + "x"), {}),
            (bearer(admin_key.upper() if admin_key.upper() != admin_key else admin_key + "A"), {}),
            (bearer(f"{admin_key} {admin_key}"), {}),
            (bearer(secret), {}),
            (bearer(s.token()), {}),
        ]
        for method, path, body in routes:
            for headers, params in wrong:
                response = await http.request(
                    method, f"{s.relay_url}{path}", headers=headers, params=params, json=body
                )
                assert_json_error(response, 401)
            for presented in (f"Bearer {admin_key}", f"bearer   {admin_key}"):
                response = await http.request(
                    method, f"{s.relay_url}{path}", headers={"Authorization": presented}, json=body
                )
                assert response.status_code == 200, (path, presented[:8])
        # The admin key is not a subscriber token either.
        refused = await http.get(f"{s.relay_url}/v1/events", headers=bearer(admin_key))
        assert_json_error(refused, 401)
    async with stack(auth={"admin_key": None}) as s:
        for method, path, body in routes:
            for presented in ("", "Bearer None", "Bearer null", f"Bearer {s.token()}"):
                response = await http.request(
                    method, f"{s.relay_url}{path}", headers={"Authorization": presented}, json=body
                )
                assert_json_error(response, 403)


# -- secrets in logs -------------------------------------------------------------------------------


async def test_webhook_signatures_admin_keys_and_tokens_never_reach_the_logs(
    http: httpx.AsyncClient, tmp_path: Path
) -> None:
    """Every refusal path that sees a secret, through the log lines of a relay process."""
    secret, admin_key = (
        "auth-secret-for-the-log-scan-0123456789abcdef",
        "admin-key-log-scan-0123456789abcdef",
    )
    simulator = Simulator(accounts=(ACCT,), call_interval_seconds=None)
    async with simulator.serve() as simulator_url:
        config = tmp_path / "relay.toml"
        config.write_text(
            toml(
                {
                    "server": {"port": free_port()},
                    "auth": {"secret": secret, "admin_key": admin_key},
                    "upstream": {"base_url": simulator_url, "secret_key": DEFAULT_SECRET_KEY},
                    "webhooks": {"enabled": True, "secret": WEBHOOK_SECRET},
                },
                [{"id": ACCT}],
            )
        )
        async with relay_process(config, tmp_path / "relay.log", log_level="INFO") as relay:
            token = forge(
                {"alg": "HS256"},
                {"account_id": ACCT, "exp": int(time.time()) + 600},
                secret.encode(),
            )
            presented = [
                token,
                token[:-2] + "xx",  # bad signature
                forge(
                    '{"alg": "HS256", "alg": "HS256"}',
                    {"account_id": ACCT, "exp": int(time.time()) + 600},
                    secret.encode(),
                ),
                forge({"alg": "none"}, {"account_id": ACCT, "exp": int(time.time()) + 600}, None),
            ]
            for value in presented:
                for headers, params in (
                    (bearer(value), {}),
                    ({"Cookie": f"relay_token={value}"}, {}),
                    ({}, {"token": value}),
                ):
                    async with open_stream(
                        http, f"{relay.url}/v1/events", headers=headers, params=params
                    ):
                        pass
            for key in (admin_key, admin_key + "x", secret):
                await http.get(f"{relay.url}/v1/status", headers=bearer(key))
                await http.post(
                    f"{relay.url}/v1/tokens", headers=bearer(key), json={"account_id": ACCT}
                )
            url = f"{relay.url}/v1/webhooks/dialstack"
            body = json.dumps(
                {"id": "evt_1", "type": "call.x", "account_id": ACCT, "data": {}}
            ).encode()
            good = signed(body)
            signatures = [good["X-DialStack-Signature"]]
            for variant in (
                good,  # accepted
                {
                    **good,
                    "X-DialStack-Signature": good["X-DialStack-Signature"][:-1] + "0",
                },  # wrong
                {
                    **good,
                    "X-DialStack-Signature": "t=1," + good["X-DialStack-Signature"].split(",")[1],
                },  # stale
                {
                    **good,
                    "X-DialStack-Signature": good["X-DialStack-Signature"]
                    + f",junk{WEBHOOK_SECRET}",
                },
            ):
                signatures.append(variant["X-DialStack-Signature"])
                await http.post(url, content=body, headers=variant)
            minted = await http.post(
                f"{relay.url}/v1/tokens", headers=bearer(admin_key), json={"account_id": ACCT}
            )
            presented.append(minted.json()["token"])
        logs = relay.logs()
    assert "webhook rejected" in logs  # the refusals were logged ...
    assert "client disconnected" in logs
    for value in [secret, admin_key, WEBHOOK_SECRET, DEFAULT_SECRET_KEY, *presented]:
        assert value not in logs  # ... without a secret
    for signature in signatures:
        assert signature.split("v1=")[1][:16] not in logs
    assert "eyJ" not in logs  # no JWT fragment at all


# -- oversized requests ----------------------------------------------------------------------------


async def send_head(url: str, head: str) -> tuple[int, bytes]:
    """Writes a raw request head; the status and body of the answer."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head.encode())
        async with asyncio.timeout(5):
            answer = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"content-length: (\d+)", answer.lower())
            body = await reader.readexactly(int(length[1])) if length else b""
    finally:
        writer.close()
    return int(answer.split(b" ")[1]), body


async def test_a_request_head_over_64_kib_is_refused_before_it_is_buffered() -> None:
    async with stack() as s:
        start = f"GET /v1/events HTTP/1.1\r\nHost: relay\r\nAuthorization: Bearer {s.token()}\r\n"
        oversized = {
            "one 1 MiB header": f"{start}X-Pad: {'x' * 2**20}\r\n\r\n",
            "20,000 small headers": start + "X-A: bbbbbbbbbbbbbbbb\r\n" * 20_000 + "\r\n",
            "a 1 MiB URL": f"GET /v1/events?{'a=1&' * 2**18} HTTP/1.1\r\nHost: relay\r\n\r\n",
            "a 1 MiB cookie": f"{start}Cookie: relay_token={'x' * 2**20}\r\n\r\n",
        }
        for name, head in oversized.items():
            status, body = await send_head(s.relay_url, head)
            assert status == 431, name
            assert "larger than 65536 bytes" in json.loads(body)["error"], name
        # A large but reasonable head (a 40 KB X-Forwarded-For chain) still opens the stream.
        client = await RawClient.connect(
            s.relay_url, s.token(), forwarded_for="203.0.113.1, " + "10.0.0.1, " * 4_000
        )
        client.close()
        assert client.status == 200
