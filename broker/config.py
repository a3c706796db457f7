"""Daemon settings: one msgspec Struct tree, read from a TOML file.

The engine's own settings (`EngineConfig`) nest under `[engine]`, the HTTP
server's under `[http]`. Unknown keys and bad values are refused with a
message that names them, so a typo never silently falls back to a default.
Command-line options override the file (the CLI applies them).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated

import msgspec

from broker.engine.config import EngineConfig
from broker.gateway.settings import GatewaySettings
from broker.webhooks.settings import ALLOW_HOSTS_ENV, WebhookSettings, with_environment

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8787
DEFAULT_DATA_DIR = "./data"
# Largest request body the REST API reads (larger ones get 413 before they are read whole).
DEFAULT_MAX_BODY_BYTES = 1024 * 1024
# How long in-flight requests may run after a stop was asked, before they are cancelled.
DEFAULT_SHUTDOWN_GRACE_S = 10.0
# /readyz waits at most this long for the writer to commit an empty transaction.
DEFAULT_READY_TIMEOUT_S = 2.0


class HttpSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Where the server listens and how it treats requests."""

    host: str = DEFAULT_HOST
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = DEFAULT_PORT
    max_body_bytes: Annotated[int, msgspec.Meta(ge=1)] = DEFAULT_MAX_BODY_BYTES
    shutdown_grace_seconds: Annotated[float, msgspec.Meta(ge=0)] = DEFAULT_SHUTDOWN_GRACE_S
    ready_timeout_seconds: Annotated[float, msgspec.Meta(gt=0)] = DEFAULT_READY_TIMEOUT_S


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Everything the daemon needs to run."""

    data_dir: str = DEFAULT_DATA_DIR
    engine: EngineConfig = msgspec.field(default_factory=EngineConfig)
    http: HttpSettings = msgspec.field(default_factory=HttpSettings)
    gateway: GatewaySettings = msgspec.field(default_factory=GatewaySettings)
    webhooks: WebhookSettings = msgspec.field(default_factory=WebhookSettings)


class ConfigError(Exception):
    """The configuration cannot be used; the message names the file and the key."""


def load_settings(path: Path | None) -> Settings:
    """Settings from a TOML file (defaults when `path` is None).

    Raises ConfigError for an unreadable file, invalid TOML, an unknown key or a bad value.
    """
    if path is None:
        return with_webhook_environment(Settings())
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return with_webhook_environment(settings_from_dict(raw, source=str(path)))


def with_webhook_environment(settings: Settings) -> Settings:
    """`settings` plus the webhook allow list's BROKER_WEBHOOKS_ALLOW_HOSTS entries."""
    try:
        webhooks = with_environment(settings.webhooks)
    except ValueError as exc:
        raise ConfigError(f"{ALLOW_HOSTS_ENV}: {exc}") from None
    return msgspec.structs.replace(settings, webhooks=webhooks)


def settings_from_dict(raw: dict[str, object], source: str = "configuration") -> Settings:
    """Validate a plain dict (from TOML, or built by a caller) as Settings."""
    try:
        return msgspec.convert(raw, Settings)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {exc}") from None
