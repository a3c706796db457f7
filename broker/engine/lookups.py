"""Finding a workspace, agent or channel by what the caller names it, or failing with *_not_found.

Every lookup is scoped to the caller's workspace: an id or name that exists
only in another workspace is simply not found, so nothing of that workspace
leaks through an error.
"""

from __future__ import annotations

import apsw
import msgspec

from broker.engine.errors import BrokerError


class AgentRow(msgspec.Struct, frozen=True):
    id: int
    name: str
    type: str
    workspace_id: int


class ChannelRow(msgspec.Struct, frozen=True):
    id: int
    name: str
    archived: bool
    is_member: bool
    muted: bool


def require_workspace(conn: apsw.Connection, workspace_id: int) -> None:
    """Raises workspace_not_found unless the workspace exists and is not deleted."""
    if conn.execute(
        "SELECT 1 FROM workspaces WHERE id = ? AND deleted_at IS NULL", (workspace_id,)
    ).fetchone() is None:
        raise BrokerError("workspace_not_found", f"workspace {workspace_id} not found")


def require_agent(conn: apsw.Connection, workspace_id: int, agent_id: int) -> AgentRow:
    """The active agent `agent_id` of this workspace."""
    row = conn.execute(
        "SELECT id, name, type, workspace_id FROM agents"
        " WHERE id = ? AND workspace_id = ? AND deactivated_at IS NULL",
        (agent_id, workspace_id),
    ).fetchone()
    if row is None:
        raise BrokerError("agent_not_found", f"agent {agent_id} not found")
    return AgentRow(*row)


def agent_by_name(conn: apsw.Connection, workspace_id: int, name: str) -> AgentRow:
    """The active agent called `name` in this workspace."""
    row = conn.execute(
        "SELECT id, name, type, workspace_id FROM agents"
        " WHERE workspace_id = ? AND name = ? AND deactivated_at IS NULL",
        (workspace_id, name),
    ).fetchone()
    if row is None:
        raise BrokerError("agent_not_found", f"agent {name!r} not found")
    return AgentRow(*row)


def require_channel(
    conn: apsw.Connection, workspace_id: int, name: str, agent_id: int | None = None
) -> ChannelRow:
    """The channel called `name`, with the membership of `agent_id` (if given)."""
    row = conn.execute(
        "SELECT c.id, c.name, c.archived_at IS NOT NULL, m.agent_id IS NOT NULL,"
        " coalesce(m.muted, 0) FROM channels c"
        " LEFT JOIN channel_members m ON m.channel_id = c.id AND m.agent_id = ?"
        " WHERE c.workspace_id = ? AND c.name = ?",
        (agent_id, workspace_id, name),
    ).fetchone()
    if row is None:
        raise BrokerError("channel_not_found", f"channel {name!r} not found")
    return ChannelRow(int(row[0]), row[1], bool(row[2]), bool(row[3]), bool(row[4]))
