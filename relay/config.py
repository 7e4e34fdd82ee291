"""Settings: a TOML file, overridden by `RELAY_<SECTION>__<KEY>` environment variables, overridden by flags.

Everything is validated up front so a bad config never starts half a server: `load_settings` raises
`ConfigError` whose message names each offending key, what was wrong and what is allowed.
"""

from __future__ import annotations

import contextvars
import ipaddress
import os
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import (
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

DEFAULT_CONFIG_PATH = Path("config.toml")
MIN_SECRET_LENGTH = 32
# config.toml's published value: fine for `check`, refused by `serve`.
EXAMPLE_SECRET_PREFIX = "dev-only-placeholder"  # noqa: S105
_GENERATE_HINT = "generate one with: python -c 'import secrets; print(secrets.token_urlsafe(48))'"


class ConfigError(Exception):
    """The configuration cannot be used; the message says which key and what to do."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    cors_origins: list[str] = Field(default_factory=list)
    heartbeat_seconds: float = Field(default=15.0, gt=0, le=3600)
    max_clients: int = Field(default=10_000, ge=1)
    max_clients_per_account: int = Field(default=1_000, ge=1)
    max_clients_per_ip: int = Field(default=1_000, ge=1)
    # Proxies whose X-Forwarded-For / X-Forwarded-Proto are believed (uvicorn's forwarded_allow_ips):
    # behind them, the client address that max_clients_per_ip counts is the forwarded one.
    trusted_proxies: list[str] = Field(default_factory=lambda: ["127.0.0.1"])
    client_retry_ms: int = Field(default=3_000, ge=0, le=600_000)
    client_buffer_events: int = Field(default=256, ge=1, le=1_000_000)

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies_are_addresses(cls, proxies: list[str]) -> list[str]:
        for proxy in proxies:
            if proxy == "*":
                continue
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                raise ValueError(
                    f"{proxy!r} is not an IP address or network; use e.g. 10.0.0.5, 10.0.0.0/8 or '*'"
                ) from None
        return proxies

    @field_validator("cors_origins")
    @classmethod
    def _origins_are_origins(cls, origins: list[str]) -> list[str]:
        for origin in origins:
            if origin == "*":
                continue
            parts = urlsplit(origin)
            if parts.scheme not in ("http", "https") or not parts.netloc or parts.path:
                raise ValueError(
                    f"{origin!r} is not an origin; use scheme://host[:port] without a path, or '*'"
                )
        return origins


class AuthSettings(_Section):
    secret: SecretStr | None = None
    max_token_ttl_seconds: int = Field(default=86_400, ge=1)
    allow_query_token: bool = True
    admin_key: SecretStr | None = None

    @field_validator("secret", "admin_key")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < MIN_SECRET_LENGTH:
            raise ValueError(f"must be at least {MIN_SECRET_LENGTH} characters; {_GENERATE_HINT}")
        return value


class UpstreamSettings(_Section):
    base_url: AnyHttpUrl = AnyHttpUrl("https://api.dialstack.ai")
    secret_key: SecretStr | None = None
    session_url: AnyHttpUrl | None = None
    linger_seconds: float = Field(default=30.0, ge=0)
    backoff_initial_seconds: float = Field(default=1.0, gt=0)
    backoff_max_seconds: float = Field(default=30.0, gt=0)
    refresh_before_expiry_seconds: float = Field(default=300.0, ge=0)
    connect_timeout_seconds: float = Field(default=10.0, gt=0)
    idle_timeout_seconds: float = Field(default=0.0, ge=0)

    @field_validator("secret_key")
    @classmethod
    def _is_dialstack_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().startswith(("sk_live_", "sk_test_")):
            raise ValueError("must be a DialStack secret key starting with sk_live_ or sk_test_")
        return value

    @model_validator(mode="after")
    def _backoff_ordered(self) -> UpstreamSettings:
        if self.backoff_max_seconds < self.backoff_initial_seconds:
            raise ValueError("backoff_max_seconds must be >= backoff_initial_seconds")
        return self

    @property
    def events_url(self) -> str:
        return str(self.base_url).rstrip("/") + "/v1/events"

    @property
    def account_sessions_url(self) -> str:
        return str(self.base_url).rstrip("/") + "/v1/account_sessions"


class AccountSettings(_Section):
    id: str = Field(pattern=r"^acct_[A-Za-z0-9_]+$")
    client_secret: SecretStr | None = None
    always_on: bool = False


class ReplaySettings(_Section):
    max_events: int = Field(default=1_000, ge=0, le=1_000_000)
    max_age_seconds: float = Field(default=3_600.0, ge=0)


class BrokerSettings(_Section):
    url: str = "memory://"
    # Redis only: an instance that dies has its upstreams taken over within this.
    lease_seconds: float = Field(default=10.0, gt=0)

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, url: str) -> str:
        scheme = urlsplit(url).scheme
        if scheme not in ("memory", "redis", "rediss"):
            raise ValueError(
                f"scheme {scheme!r} is not supported; use memory:// or redis://host:port/db"
            )
        return url


class WebhookSettings(_Section):
    enabled: bool = False
    secret: SecretStr | None = None
    tolerance_seconds: int = Field(default=300, ge=1)
    max_body_bytes: int = Field(default=256 * 1024, ge=1024)

    @model_validator(mode="after")
    def _secret_when_enabled(self) -> WebhookSettings:
        if self.enabled and self.secret is None:
            raise ValueError(
                "webhooks.enabled needs webhooks.secret (the DialStack webhook secret)"
            )
        return self

    @field_validator("secret")
    @classmethod
    def _secrets_not_blank(cls, value: SecretStr | None) -> SecretStr | None:
        # Several secrets, comma-separated, while rotating: each must be non-blank.
        if value is not None and any(not p.strip() for p in value.get_secret_value().split(",")):
            raise ValueError(
                "must be one signing secret, or several separated by commas, none blank"
            )
        return value


_file_data: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("_file_data")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="RELAY_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    server: ServerSettings = ServerSettings()
    auth: AuthSettings = AuthSettings()
    upstream: UpstreamSettings = UpstreamSettings()
    accounts: list[AccountSettings] = Field(default_factory=list)
    replay: ReplaySettings = ReplaySettings()
    broker: BrokerSettings = BrokerSettings()
    webhooks: WebhookSettings = WebhookSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        file_source = InitSettingsSource(settings_cls, _file_data.get({}))
        return (init_settings, env_settings, file_source)

    @model_validator(mode="after")
    def _accounts_unique(self) -> Settings:
        seen: set[str] = set()
        for account in self.accounts:
            if account.id in seen:
                raise ValueError(f"account {account.id} is listed twice in [[accounts]]")
            seen.add(account.id)
        return self

    def account(self, account_id: str) -> AccountSettings | None:
        return next((a for a in self.accounts if a.id == account_id), None)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(
            f"config file {path} not found; pass --config PATH or create it"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None


def _describe(error: Any) -> str:
    where = ".".join(str(part) for part in error["loc"]) or "(top level)"
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown key; check the spelling against config.toml"
    elif error["type"] == "missing":
        message = "is required"
    given = error.get("input")
    shown = "" if isinstance(given, dict | list) or "secret" in where or "key" in where else given
    return f"  {where}: {message}" + (f" (got {shown!r})" if shown not in ("", None) else "")


def load_settings(
    path: Path | None = None, overrides: dict[str, Any] | None = None, *, default_file: bool = True
) -> Settings:
    """Settings from `path` (else ./config.toml if present and `default_file`), the environment and `overrides`."""
    if path is None and default_file:
        path = DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None
    data = _read_toml(path) if path is not None else {}
    token = _file_data.set(data)
    try:
        return Settings(**(overrides or {}))
    except ValidationError as exc:
        source = f"{path}" if path is not None else "the environment"
        lines = [_describe(error) for error in exc.errors()]
        env_hint = (
            ""
            if not any(k.startswith("RELAY_") for k in os.environ)
            else (" (RELAY_* environment variables also apply)")
        )
        raise ConfigError(
            f"invalid configuration in {source}{env_hint}:\n" + "\n".join(lines)
        ) from None
    finally:
        _file_data.reset(token)


def require_serving(settings: Settings) -> None:
    """What `relay serve` needs beyond a well-formed file; raises ConfigError naming the key."""
    problems: list[str] = []
    if settings.auth.secret is None:
        problems.append(f"  auth.secret: is required to verify subscriber tokens; {_GENERATE_HINT}")
    elif settings.auth.secret.get_secret_value().startswith(EXAMPLE_SECRET_PREFIX):
        problems.append(
            "  auth.secret: is still the published placeholder of config.toml; anyone could sign "
            f"tokens with it. Set RELAY_AUTH__SECRET; {_GENERATE_HINT}"
        )
    upstream = settings.upstream
    static_only = bool(settings.accounts) and all(a.client_secret for a in settings.accounts)
    if upstream.secret_key is None and upstream.session_url is None and not static_only:
        problems.append(
            "  upstream.secret_key: set it (sk_live_...), or upstream.session_url, or a static "
            "client_secret for every [[accounts]] entry"
        )
    if problems:
        raise ConfigError("configuration cannot serve:\n" + "\n".join(problems))


def mask_url_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":********@", 1)
    return parts._replace(netloc=netloc).geturl()


def masked(settings: Settings) -> dict[str, Any]:
    """The effective settings as plain data, every secret (SecretStr, URL password) masked."""
    dumped: dict[str, Any] = settings.model_dump(mode="json")
    dumped["broker"]["url"] = mask_url_password(settings.broker.url)
    return dumped
