"""Settings: file, environment and flag layering, validation messages, masking, and `relay check`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from relay.config import ConfigError, load_settings, masked, require_serving

ROOT = Path(__file__).resolve().parent.parent
SECRET = "s" * 40


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(text)
    return path


def run_relay(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=60,
        check=False,
    )


def test_example_config_is_valid() -> None:
    settings = load_settings(ROOT / "config.toml")
    assert settings.server.heartbeat_seconds == 15
    assert settings.broker.url == "memory://"
    assert settings.accounts[0].id == "acct_example"


def test_environment_overrides_file_and_flags_override_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, "[server]\nport = 7000\nhost = '127.0.0.1'\n")
    monkeypatch.setenv("RELAY_SERVER__PORT", "7100")
    monkeypatch.setenv("RELAY_AUTH__SECRET", SECRET)
    settings = load_settings(path)
    assert settings.server.port == 7100
    assert settings.auth.secret is not None
    assert settings.auth.secret.get_secret_value() == SECRET
    flagged = load_settings(path, {"server": {"port": 7200}})
    assert flagged.server.port == 7200
    assert flagged.server.host == "127.0.0.1"  # a flag replaces one key, not the whole section


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("[server]\nport = 70000\n", "server.port"),
        ("[server]\nheartbeat_seconds = 0\n", "server.heartbeat_seconds"),
        ("[server]\nprot = 1\n", "server.prot: unknown key"),
        ("[auth]\nsecret = 'short'\n", "auth.secret: must be at least 32 characters"),
        ("[upstream]\nsecret_key = 'pk_live_x'\n", "upstream.secret_key"),
        (
            "[upstream]\nbackoff_initial_seconds = 10\nbackoff_max_seconds = 1\n",
            "backoff_max_seconds",
        ),
        ("[broker]\nurl = 'kafka://x'\n", "broker.url"),
        ("[[accounts]]\nid = 'bob'\n", "accounts.0.id"),
        ("[webhooks]\nenabled = true\n", "webhooks.secret"),
        ("[server]\ncors_origins = ['https://a.example/path']\n", "server.cors_origins"),
        ("[server]\ntrusted_proxies = ['nginx.internal']\n", "server.trusted_proxies"),
        ("[server]\nmax_clients_per_ip = 0\n", "server.max_clients_per_ip"),
        ("[server\nport = 1\n", "not valid TOML"),
    ],
)
def test_invalid_settings_name_the_key(tmp_path: Path, text: str, named: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, text))
    assert named in str(caught.value)


def test_secrets_never_appear_in_validation_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, "[auth]\nsecret = 'tooshort-secret-value'\n"))
    assert "tooshort-secret-value" not in str(caught.value)


def test_masked_hides_every_secret(tmp_path: Path) -> None:
    text = f"""
[auth]
secret = "{SECRET}"
admin_key = "{"a" * 40}"
[upstream]
secret_key = "sk_test_{"k" * 30}"
[[accounts]]
id = "acct_1"
client_secret = "cs_static_value"
[broker]
url = "redis://:hunter2-password@127.0.0.1:6379/0"
[webhooks]
enabled = true
secret = "whsec_value_1234"
"""
    shown = json.dumps(masked(load_settings(write(tmp_path, text))))
    for secret in (
        SECRET,
        "a" * 40,
        "k" * 30,
        "cs_static_value",
        "hunter2-password",
        "whsec_value_1234",
    ):
        assert secret not in shown
    assert "127.0.0.1:6379" in shown


def test_serving_needs_a_secret_and_a_way_to_sessions() -> None:
    with pytest.raises(ConfigError) as caught:
        require_serving(load_settings(default_file=False))
    assert "auth.secret" in str(caught.value)
    assert "upstream.secret_key" in str(caught.value)
    static = load_settings(
        default_file=False,
        overrides={
            "auth": {"secret": SECRET},
            "accounts": [{"id": "acct_1", "client_secret": "cs_x"}],
        },
    )
    require_serving(static)


def test_serving_refuses_the_published_placeholder_secret() -> None:
    with pytest.raises(ConfigError) as caught:
        require_serving(
            load_settings(ROOT / "config.toml", {"upstream": {"secret_key": "sk_test_x"}})
        )
    assert "placeholder" in str(caught.value)


def test_webhook_secrets_may_rotate_but_not_be_blank(tmp_path: Path) -> None:
    rotating = load_settings(
        write(tmp_path, "[webhooks]\nenabled = true\nsecret = 'whsec_new,whsec_old'\n")
    )
    assert rotating.webhooks.secret is not None
    with pytest.raises(ConfigError, match=r"webhooks\.secret"):
        load_settings(write(tmp_path, "[webhooks]\nenabled = true\nsecret = 'whsec_new,'\n"))


def test_relay_check_accepts_the_example_and_masks_it() -> None:
    result = run_relay("check", "--config", "config.toml")
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["server"]["port"] == 8080
    assert "dev-only-placeholder" not in result.stdout
    assert shown["auth"]["secret"] == "**********"


def test_relay_check_rejects_a_broken_file_with_exit_2(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nmax_clients = -1\n")
    result = run_relay("check", "--config", str(path))
    assert result.returncode == 2
    assert "server.max_clients" in result.stderr
    assert "greater than or equal to 1" in result.stderr


def test_relay_check_reports_a_missing_file(tmp_path: Path) -> None:
    result = run_relay("check", "--config", str(tmp_path / "absent.toml"))
    assert result.returncode == 2
    assert "not found" in result.stderr
