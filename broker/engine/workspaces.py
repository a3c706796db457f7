"""Workspaces and agents: the commands that create them and the lookups that authenticate.

A workspace key and an agent token are returned once, at creation (or
rotation); only their SHA-256 digests are stored.

Deleting a workspace is one statement: every table that holds workspace
data reaches `workspaces` through an ON DELETE CASCADE chain (foreign keys
are on for the writer), and the FTS index follows its content table through
the delete trigger, so no row of the workspace can be forgotten by a list of
tables here going stale. The commands that change agents after registration
are in `broker.engine.agents`.
"""

from __future__ import annotations

import json
from typing import Any, cast

import apsw
import msgspec

from broker.engine import secrets, validation
from broker.engine.errors import BrokerError
from broker.engine.events import emit_ephemeral
from broker.engine.lookups import require_workspace
from broker.engine.writer import Tx
from protocol.objects import AgentCreated, Workspace, WorkspaceCreated, WorkspaceDeleted, iso

GENERAL = "general"
# Every workspace is on the one plan a self-hosted broker has.
PLAN = "free"
# Longest system prompt accepted, in bytes of UTF-8: it is handed to every
# agent of the workspace, so it is bounded like a message text.
SYSTEM_PROMPT_MAX_BYTES = 32 * 1024

_metadata_decoder = msgspec.json.Decoder(dict[str, Any])


class CreateWorkspace(msgspec.Struct, frozen=True):
    """Create a workspace, its key and its `general` channel."""

    name: str

    def apply(self, tx: Tx) -> WorkspaceCreated:
        name = validation.workspace_name(self.name)
        conn, now = tx.conn, tx.now_ms
        if conn.execute("SELECT 1 FROM workspaces WHERE name = ?", (name,)).fetchone():
            raise BrokerError("workspace_already_exists", f"workspace {name!r} already exists")
        key = secrets.mint(secrets.WORKSPACE_KEY_PREFIX)
        workspace_id = tx.new_id()
        conn.execute(
            "INSERT INTO workspaces(id, name, key_hash, created_at) VALUES (?,?,?,?)",
            (workspace_id, name, secrets.digest(key), now),
        )
        conn.execute(
            "INSERT INTO channels(id, workspace_id, name, topic, created_at) VALUES (?,?,?,?,?)",
            (tx.new_id(), workspace_id, GENERAL, "General discussion", now),
        )
        return WorkspaceCreated(
            workspace_id=str(workspace_id), name=name, api_key=key, created_at=iso(now) or ""
        )


class RegisterAgent(msgspec.Struct, frozen=True, kw_only=True):
    """Register an agent (name unique per workspace) and join it to `general`."""

    workspace_id: int
    name: str
    type: str = "agent"
    persona: str | None = None
    metadata: dict[str, object] = msgspec.field(default_factory=dict)

    def apply(self, tx: Tx) -> AgentCreated:
        conn, now = tx.conn, tx.now_ms
        name = validation.agent_name(self.name, tx.limits)
        if self.type not in ("agent", "human", "system"):
            raise BrokerError("invalid_agent_type", "type must be 'agent', 'human' or 'system'")
        require_workspace(conn, self.workspace_id)
        if conn.execute(
            "SELECT 1 FROM agents WHERE workspace_id = ? AND name = ?", (self.workspace_id, name)
        ).fetchone():
            raise BrokerError("agent_already_exists", f"agent {name!r} already exists")
        token = secrets.mint(secrets.AGENT_TOKEN_PREFIX)
        agent_id = tx.new_id()
        conn.execute(
            "INSERT INTO agents(id, workspace_id, name, type, persona, metadata, token_hash,"
            " created_at) VALUES (?,?,?,?,?,?,?,?)",
            (agent_id, self.workspace_id, name, self.type, self.persona,
             json.dumps(self.metadata), secrets.digest(token), now),
        )
        conn.execute(
            "INSERT INTO channel_members(channel_id, agent_id, joined_at)"
            " SELECT id, ?, ? FROM channels WHERE workspace_id = ? AND name = ?"
            " AND archived_at IS NULL",
            (agent_id, now, self.workspace_id, GENERAL),
        )
        return AgentCreated(
            id=str(agent_id), name=name, token=token, status="offline", created_at=iso(now) or ""
        )


class UpdateWorkspace(msgspec.Struct, frozen=True, kw_only=True):
    """Rename a workspace and/or set its system prompt (None clears it); unset fields stay.

    Raises workspace_not_found, invalid_workspace_name, workspace_already_exists
    (another workspace has the name), invalid_system_prompt (over
    SYSTEM_PROMPT_MAX_BYTES).
    """

    workspace_id: int
    name: str | msgspec.UnsetType = msgspec.UNSET
    system_prompt: str | None | msgspec.UnsetType = msgspec.UNSET

    def apply(self, tx: Tx) -> Workspace:
        conn = tx.conn
        require_workspace(conn, self.workspace_id)
        assignments: list[str] = []
        values: list[object] = []
        if not isinstance(self.name, msgspec.UnsetType):
            name = validation.workspace_name(self.name)
            if conn.execute(
                "SELECT 1 FROM workspaces WHERE name = ? AND id <> ?", (name, self.workspace_id)
            ).fetchone():
                raise BrokerError("workspace_already_exists", f"workspace {name!r} already exists")
            assignments.append("name = ?")
            values.append(name)
        if not isinstance(self.system_prompt, msgspec.UnsetType):
            prompt = self.system_prompt
            if prompt is not None and len(prompt.encode("utf-8", "surrogatepass")) > (
                SYSTEM_PROMPT_MAX_BYTES
            ):
                raise BrokerError(
                    "invalid_system_prompt",
                    f"a system prompt is at most {SYSTEM_PROMPT_MAX_BYTES} bytes of UTF-8",
                )
            assignments.append("system_prompt = ?")
            values.append(prompt)
        if assignments:
            conn.execute(
                f"UPDATE workspaces SET {', '.join(assignments)}, updated_at = ? WHERE id = ?",
                (*values, tx.now_ms, self.workspace_id),
            )
        workspace = get_workspace(conn, self.workspace_id)
        if assignments:
            emit_ephemeral(tx, workspace_id=self.workspace_id, event_type="workspace.updated",
                           data=workspace)
        return workspace


class DeleteWorkspace(msgspec.Struct, frozen=True, kw_only=True):
    """Delete a workspace and everything in it (agents, channels, messages, deliveries, ...).

    The key and every agent token of the workspace stop working at once.
    Raises workspace_not_found.
    """

    workspace_id: int

    def apply(self, tx: Tx) -> WorkspaceDeleted:
        conn = tx.conn
        row = conn.execute(
            "SELECT name FROM workspaces WHERE id = ?", (self.workspace_id,)
        ).fetchone()
        if row is None:
            raise BrokerError("workspace_not_found", f"workspace {self.workspace_id} not found")
        conn.execute("DELETE FROM workspaces WHERE id = ?", (self.workspace_id,))
        deleted = WorkspaceDeleted(workspace_id=str(self.workspace_id), name=cast(str, row[0]))
        # The gateway closes the workspace's sessions on this event.
        emit_ephemeral(tx, workspace_id=self.workspace_id, event_type="workspace.deleted",
                       data=deleted)
        return deleted


# -- queries (run on the reader pool) ---------------------------------------------

_WORKSPACE_COLUMNS = "SELECT id, name, system_prompt, metadata, created_at FROM workspaces"


def _workspace(row: apsw.SQLiteValues) -> Workspace:
    workspace_id, name, prompt, metadata, created_at = row
    return Workspace(
        id=str(workspace_id), name=cast(str, name), system_prompt=cast("str | None", prompt),
        plan=PLAN, created_at=iso(cast(int, created_at)) or "",
        metadata=_metadata_decoder.decode(cast(str, metadata)),
    )


def get_workspace(conn: apsw.Connection, workspace_id: int) -> Workspace:
    """The workspace `workspace_id`. Raises workspace_not_found."""
    row = conn.execute(_WORKSPACE_COLUMNS + " WHERE id = ?", (workspace_id,)).fetchone()
    if row is None:
        raise BrokerError("workspace_not_found", f"workspace {workspace_id} not found")
    return _workspace(row)


def workspace_by_name(conn: apsw.Connection, name: str) -> Workspace:
    """The workspace called `name` (names are unique). Raises workspace_not_found."""
    row = conn.execute(_WORKSPACE_COLUMNS + " WHERE name = ?", (name,)).fetchone()
    if row is None:
        raise BrokerError("workspace_not_found", f"workspace {name!r} not found")
    return _workspace(row)


# -- authentication (queries, run on the reader pool) ----------------------------


class Principal(msgspec.Struct, frozen=True):
    """Who a token belongs to: a workspace (its key) or an agent of it (its token)."""

    workspace_id: int
    agent_id: int | None = None
    agent_name: str | None = None


def workspace_by_key(conn: apsw.Connection, key: str) -> Principal | None:
    """The workspace whose key is `key`, or None."""
    row = conn.execute(
        "SELECT id FROM workspaces WHERE key_hash = ?", (secrets.digest(key),)
    ).fetchone()
    return None if row is None else Principal(int(row[0]))


def agent_by_token(conn: apsw.Connection, token: str, now_ms: int) -> Principal | None:
    """The active agent holding `token` (current, or rotated out less than the grace ago)."""
    digest = secrets.digest(token)
    row = conn.execute(
        "SELECT workspace_id, id, name FROM agents WHERE token_hash = ? AND deactivated_at IS NULL",
        (digest,),
    ).fetchone()
    if row is None:
        row = conn.execute(
            "SELECT workspace_id, id, name FROM agents WHERE prev_token_hash = ?"
            " AND prev_token_expires_at > ? AND deactivated_at IS NULL",
            (digest, now_ms),
        ).fetchone()
    return None if row is None else Principal(int(row[0]), int(row[1]), row[2])
