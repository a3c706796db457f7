"""MCP settings: the bounds of `/mcp` sessions, named and configurable (`[mcp]`)."""

from __future__ import annotations

from typing import Annotated

import msgspec


class McpSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Limits of the MCP endpoint (docs/mcp.md)."""

    # Serve /mcp at all.
    enabled: bool = True
    # Stateful sessions open at once (the 2025 revision's `mcp-session-id`);
    # one more is refused with 503 until one ends.
    max_sessions: Annotated[int, msgspec.Meta(ge=1)] = 1000
    # Sessions one agent (or workspace key) may hold; one more is refused with 429.
    max_sessions_per_agent: Annotated[int, msgspec.Meta(ge=1)] = 8
    # A session with no request in flight for this long is closed.
    session_idle_timeout_seconds: Annotated[float, msgspec.Meta(gt=0)] = 1800.0
    # A resource notification that a session does not take within this long is dropped.
    notify_timeout_seconds: Annotated[float, msgspec.Meta(gt=0)] = 5.0
