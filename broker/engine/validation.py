"""Input rules shared by the commands; each failure is a BrokerError with a stable code."""

from __future__ import annotations

import re
import unicodedata
from typing import Any

import msgspec

from broker.engine.config import Limits
from broker.engine.errors import BrokerError

CHANNEL_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,79}")
AGENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
WORKSPACE_NAME_MAX = 128
# Longest persona accepted, in bytes of UTF-8 (it is a prompt, bounded like a message).
PERSONA_MAX_BYTES = 32 * 1024
# Largest agent metadata object, in bytes of JSON (the same bound as message data).
METADATA_MAX_BYTES = 64 * 1024
# `@name` not preceded by a word character or another @ (so e-mail addresses
# do not count as mentions).
MENTION = re.compile(r"(?<![\w@])@([A-Za-z0-9][A-Za-z0-9_.-]*)")

# The largest id or seq SQLite stores (a signed 64-bit integer); a larger
# number in a cursor or an id would overflow the binding, so it is refused
# (or simply not found) before any query.
MAX_ID = 2**63 - 1
# Unicode categories an emoji may not contain: controls, surrogates, line and
# paragraph separators, and format characters (bidi overrides, zero-width
# spaces, the BOM), except the two that real emoji sequences are made of.
_EMOJI_REFUSED_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp", "Cf"})
_ZERO_WIDTH_JOINER = "\u200d"  # family and profession sequences
_TAGS = range(0xE0020, 0xE0080)  # subdivision flags (England, Scotland, Wales)

_json_encoder = msgspec.json.Encoder()


def channel_name(name: str) -> str:
    if not CHANNEL_NAME.fullmatch(name):
        raise BrokerError(
            "invalid_channel_name",
            "a channel name is 1-80 characters: lowercase letters, digits and '-', "
            "starting with a letter or digit",
        )
    return name


def agent_name(name: str, limits: Limits) -> str:
    if not (1 <= len(name) <= limits.max_agent_name_chars) or not AGENT_NAME.fullmatch(name):
        raise BrokerError(
            "invalid_agent_name",
            f"an agent name is 1-{limits.max_agent_name_chars} characters: letters, digits, "
            "'_', '.' and '-', starting with a letter or digit",
        )
    return name


def persona(value: str | None) -> str | None:
    """An agent's persona: at most PERSONA_MAX_BYTES of UTF-8. Raises invalid_persona."""
    if value is not None and len(value.encode("utf-8", "surrogatepass")) > PERSONA_MAX_BYTES:
        raise BrokerError(
            "invalid_persona", f"a persona is at most {PERSONA_MAX_BYTES} bytes of UTF-8")
    return value


def agent_metadata(value: Any) -> str:
    """An agent's metadata: a JSON object of at most METADATA_MAX_BYTES, returned encoded.
    Raises invalid_metadata."""
    return _json_object("metadata", value, METADATA_MAX_BYTES,
                        "invalid_metadata", "invalid_metadata")


def _json_object(what: str, value: Any, limit: int, not_object: str, too_large: str) -> str:
    """`value`, a JSON object of at most `limit` bytes as JSON, encoded; else the error
    `not_object` or `too_large`, naming it `what`."""
    if not isinstance(value, dict):
        raise BrokerError(not_object, f"{what} must be a JSON object")
    encoded = _json_encoder.encode(value)
    if len(encoded) > limit:
        raise BrokerError(
            too_large, f"{what} is {len(encoded)} bytes as JSON; the limit is {limit}")
    return encoded.decode()


def workspace_name(name: str) -> str:
    """1..WORKSPACE_NAME_MAX characters, printable, without surrounding spaces and without
    '/' (the name is a path segment of /v1/workspaces/by-name/). Raises invalid_workspace_name."""
    if not name.strip() or len(name) > WORKSPACE_NAME_MAX or name.strip() != name:
        raise BrokerError(
            "invalid_workspace_name",
            f"a workspace name is 1-{WORKSPACE_NAME_MAX} characters, not blank and without "
            "surrounding spaces",
        )
    for char in name:
        if char == "/":
            raise BrokerError("invalid_workspace_name", "a workspace name may not contain '/'")
        if _unprintable(char) or (char.isspace() and char != " "):
            raise BrokerError(
                "invalid_workspace_name",
                f"a workspace name may not contain the control or format character "
                f"U+{ord(char):04X}",
            )
    return name


def text(value: str, limits: Limits) -> str:
    size = len(value.encode("utf-8", errors="surrogatepass"))
    if size == 0:
        raise BrokerError("invalid_text", "text must not be empty")
    if size > limits.max_text_bytes:
        raise BrokerError(
            "text_too_long",
            f"text is {size} bytes of UTF-8; the limit is {limits.max_text_bytes}",
        )
    return value


def data(value: Any, limits: Limits) -> str | None:
    """Structured message data: a JSON object of at most max_data_bytes, returned encoded."""
    if value is None:
        return None
    return _json_object("data", value, limits.max_data_bytes, "invalid_data", "data_too_large")


def mode(value: str) -> str:
    if value not in ("wait", "steer"):
        raise BrokerError("invalid_mode", "mode must be 'wait' or 'steer'")
    return value


def emoji(value: str, limits: Limits) -> str:
    """A reaction: a short name (`rocket`) or the emoji itself, printable.

    1..limits.max_emoji_chars code points, no surrounding spaces, and no
    control, surrogate, separator or format character (except the zero-width
    joiner and the tag characters that emoji sequences use). Raises invalid_emoji.
    """
    if not value or len(value) > limits.max_emoji_chars or value.strip() != value:
        raise BrokerError(
            "invalid_emoji",
            f"an emoji is 1-{limits.max_emoji_chars} characters without surrounding spaces",
        )
    for char in value:
        if _unprintable(char):
            raise BrokerError(
                "invalid_emoji",
                f"an emoji may not contain the control or format character U+{ord(char):04X}",
            )
    return value


def _unprintable(char: str) -> bool:
    if char == _ZERO_WIDTH_JOINER or ord(char) in _TAGS:
        return False
    # Noncharacters (U+FFFE, U+FFFF, U+1FFFE, ...) are never text either.
    return (unicodedata.category(char) in _EMOJI_REFUSED_CATEGORIES
            or (ord(char) & 0xFFFE) == 0xFFFE or 0xFDD0 <= ord(char) <= 0xFDEF)


def mention_candidates(body: str) -> list[str]:
    """Names that `@name` tokens in body may refer to (trailing '.', '-', '_' also tried)."""
    names: list[str] = []
    if "@" not in body:
        return names  # most texts: no scan at all
    for match in MENTION.finditer(body):
        raw = match.group(1)
        names.append(raw)
        stripped = raw.rstrip("._-")
        if stripped and stripped != raw:
            names.append(stripped)
    return names


def parse_id(value: str | int, code: str, what: str) -> int:
    """A wire id (decimal string) as an int; a malformed id is simply not found."""
    if isinstance(value, int):
        if 0 <= value <= MAX_ID:
            return value
    elif value.isascii() and value.isdigit() and len(value) <= 19 and int(value) <= MAX_ID:
        return int(value)
    raise BrokerError(code, f"{what} {value!r} not found")
