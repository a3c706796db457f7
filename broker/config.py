"""Daemon settings: one msgspec Struct tree from a TOML file, the environment and flags.

The engine's own settings (`EngineConfig`) nest under `[engine]`, the HTTP
server's under `[http]`, and so on. Precedence, lowest first: the defaults,
the TOML file (`--config`), environment variables, command-line options
(the CLI applies those): `[server] workers` is `BROKER_SERVER_WORKERS` and
`broker serve --workers`. An environment variable is `BROKER_` followed by
the setting's path in upper case with `_` between the parts, matched
against the Struct tree: `BROKER_HTTP_PORT=9000`,
`BROKER_ENGINE_LIMITS_MAILBOX_DEPTH=500`, `BROKER_WEBHOOKS_ALLOW_HOSTS=a,b`
(a list is comma-separated). Unknown keys, unknown `BROKER_` variables and
bad values are refused with a message that names them, so a typo never
silently falls back to a default.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import msgspec

from broker.engine.config import EngineConfig
from broker.gateway.settings import GatewaySettings
from broker.mcp.settings import McpSettings
from broker.ratelimit import RateLimitSettings
from broker.webhooks.settings import WebhookSettings
from protocol.nesting import MAX_NESTING_DEPTH, NestingTooDeep, check_nesting

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8787
DEFAULT_DATA_DIR = "./data"
# Largest request body the REST API and /mcp read (larger ones get 413 before they are read
# whole).
DEFAULT_MAX_BODY_BYTES = 1024 * 1024
# How long in-flight requests may run after a stop was asked, before they are cancelled.
DEFAULT_SHUTDOWN_GRACE_S = 10.0
# /readyz waits at most this long for the writer to commit an empty transaction.
DEFAULT_READY_TIMEOUT_S = 2.0
# Gateway processes at most: each holds its own reader connections and memory.
MAX_WORKERS = 64


class TlsSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """TLS on the daemon's own port (`[http.tls]`; docs/operations.md, "Serving beyond
    loopback"). Off unless certfile and keyfile are both set.

    certfile: PEM certificate chain, the server's certificate first; keyfile:
    its unencrypted PEM private key; client_cafile: PEM CA certificates that
    client certificates must chain to (set: every client must present one).
    The files are read when the daemon starts: a missing, unreadable or
    mismatched one stops it with one line naming the file.
    """

    certfile: str | None = None
    keyfile: str | None = None
    client_cafile: str | None = None

    def __post_init__(self) -> None:
        if bool(self.certfile) != bool(self.keyfile):
            raise ValueError("certfile and keyfile go together: set both or neither")
        if self.client_cafile and not self.certfile:
            raise ValueError("client_cafile needs certfile and keyfile")

    @property
    def enabled(self) -> bool:
        return bool(self.certfile and self.keyfile)


class HttpSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Where the server listens and how it treats requests.

    tls: TLS on this port. trusted_proxies: addresses or networks (CIDR) of
    reverse proxies whose `Forwarded` / `X-Forwarded-For` /
    `X-Forwarded-Proto` are believed (broker.http.proxies); from anyone
    else those headers are ignored. public_url: the URL clients reach the
    daemon at (`https://broker.example.com`, maybe with a path prefix), used
    for every absolute URL it hands out; unset, those are built from the request.
    """

    host: str = DEFAULT_HOST
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = DEFAULT_PORT
    tls: TlsSettings = msgspec.field(default_factory=TlsSettings)
    trusted_proxies: list[str] = msgspec.field(default_factory=list)
    public_url: str | None = None
    max_body_bytes: Annotated[int, msgspec.Meta(ge=1)] = DEFAULT_MAX_BODY_BYTES
    shutdown_grace_seconds: Annotated[float, msgspec.Meta(ge=0)] = DEFAULT_SHUTDOWN_GRACE_S
    ready_timeout_seconds: Annotated[float, msgspec.Meta(gt=0)] = DEFAULT_READY_TIMEOUT_S

    def __post_init__(self) -> None:
        for entry in self.trusted_proxies:
            try:
                ipaddress.ip_network(entry.strip(), strict=False)
            except ValueError:
                raise ValueError(f"trusted_proxies: {entry!r} is not an address or a network"
                                 " (CIDR)") from None
        if self.public_url is not None:
            url = urlsplit(self.public_url)
            if url.scheme not in ("http", "https") or not url.hostname or url.query \
                    or url.fragment or self.public_url != self.public_url.strip():
                raise ValueError(f"public_url: {self.public_url!r} is not an http:// or"
                                 " https:// URL without query or fragment")

    @property
    def base_url(self) -> str | None:
        """public_url without its trailing slash (None when unset)."""
        return None if self.public_url is None else self.public_url.rstrip("/")


class ServerSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How the daemon spreads over processes (docs/operations.md, "Processes").

    workers: gateway processes serving the port beside the writer process;
    unset means the number of cores; 0 or 1 runs everything in one process.
    """

    workers: Annotated[int, msgspec.Meta(ge=0, le=MAX_WORKERS)] | None = None

    def gateway_processes(self) -> int:
        """The gateway processes to start: 0 when everything runs in one process."""
        count = self.workers if self.workers is not None else (os.cpu_count() or 1)
        return count if count > 1 else 0


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Everything the daemon needs to run."""

    data_dir: str = DEFAULT_DATA_DIR
    server: ServerSettings = msgspec.field(default_factory=ServerSettings)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    engine: EngineConfig = msgspec.field(default_factory=EngineConfig)
    http: HttpSettings = msgspec.field(default_factory=HttpSettings)
    gateway: GatewaySettings = msgspec.field(default_factory=GatewaySettings)
    webhooks: WebhookSettings = msgspec.field(default_factory=WebhookSettings)
    rate_limits: RateLimitSettings = msgspec.field(default_factory=RateLimitSettings)
    mcp: McpSettings = msgspec.field(default_factory=McpSettings)


class ConfigError(Exception):
    """The configuration cannot be used; the message names the file and the key."""


ENV_PREFIX = "BROKER_"
# Variables of the client commands (`broker mcp`), not settings of the daemon.
CLIENT_VARIABLES = frozenset({"BROKER_URL", "BROKER_TOKEN"})
# Setting names whose values `broker config show` masks.
SECRET_NAME = re.compile(r"secret|password|(^|_)(token|key)$")


def load_settings(path: Path | None, environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from the defaults, a TOML file (if `path`) and BROKER_* environment variables.

    Raises ConfigError for an unreadable file, invalid TOML, TOML nested
    deeper than MAX_NESTING_DEPTH, an unknown key or variable, or a bad
    value; the message names the file or the variable.
    """
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
            check_nesting(raw)
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        except (RecursionError, NestingTooDeep):
            # tomllib parses nested arrays and inline tables by recursion.
            raise ConfigError(
                f"{path}: arrays or tables nested deeper than {MAX_NESTING_DEPTH} levels"
            ) from None
    overrides = environment_overrides(os.environ if environ is None else environ)
    for keys, (_, value) in overrides.items():
        section = raw
        for key in keys[:-1]:
            inner = section.setdefault(key, {})
            if not isinstance(inner, dict):
                raise ConfigError(f"{source}: {'.'.join(keys[:-1])} is not a table")
            section = inner
        section[keys[-1]] = value
    try:
        return msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as exc:
        message = str(exc)
        # Name the variables the failing path covers (`$.http.port`, or
        # `$.webhooks` when a whole section's check failed).
        at = re.search(r"at `\$\.([^`]*)`$", message)
        where = tuple(at.group(1).split(".")) if at else ()
        blamed = [variable for keys, (variable, _) in overrides.items()
                  if where and keys[:len(where)] == where]
        raise ConfigError(f"{', '.join(blamed) or source}: {message}") from None


def environment_overrides(
    environ: Mapping[str, str],
) -> dict[tuple[str, ...], tuple[str, str | list[str]]]:
    """The settings named by BROKER_* variables: {path: (variable, value)}.

    Raises ConfigError for a BROKER_* variable that names no setting.
    """
    found: dict[tuple[str, ...], tuple[str, str | list[str]]] = {}
    for variable, value in environ.items():
        if not variable.startswith(ENV_PREFIX) or variable in CLIENT_VARIABLES:
            continue
        match = _setting_path(Settings, variable[len(ENV_PREFIX):].lower())
        if match is None:
            raise ConfigError(f"{variable}: no such setting (see `broker config show`)")
        keys, is_list = match
        found[keys] = (variable, [v.strip() for v in value.split(",") if v.strip()]
                       if is_list else value)
    return found


def _setting_path(struct: type, name: str) -> tuple[tuple[str, ...], bool] | None:
    """Match `name` (e.g. "engine_limits_mailbox_depth") to a leaf field of `struct`."""
    for field in msgspec.structs.fields(struct):
        kind = _unwrap(field.type)
        nested = isinstance(kind, type) and issubclass(kind, msgspec.Struct)
        if name == field.name and not nested:
            return (field.name,), typing.get_origin(kind) in (list, tuple)
        if nested and name.startswith(field.name + "_"):
            inner = _setting_path(kind, name[len(field.name) + 1:])
            if inner is not None:
                return (field.name, *inner[0]), inner[1]
    return None


def _unwrap(kind: Any) -> Any:
    while typing.get_origin(kind) is Annotated:
        kind = typing.get_args(kind)[0]
    return kind


def masked(settings: Settings) -> dict[str, Any]:
    """The settings as plain data, with the values of secret-looking names replaced by ***."""

    def mask(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: "***" if SECRET_NAME.search(k) and isinstance(v, str) and v else mask(v)
                    for k, v in value.items()}
        if isinstance(value, list):
            return [mask(v) for v in value]
        return value

    result: dict[str, Any] = mask(msgspec.to_builtins(settings))
    return result
