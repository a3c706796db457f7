"""Workspaces and agents: the commands that create them and the lookups that authenticate.

A workspace key and an agent token are returned once, at creation (or
rotation); only their SHA-256 digests are stored.
"""

from __future__ import annotations

import json

import apsw
import msgspec

from broker.engine import secrets, validation
from broker.engine.errors import BrokerError
from broker.engine.lookups import require_workspace
from broker.engine.writer import Tx
from protocol.objects import AgentCreated, WorkspaceCreated, iso

GENERAL = "general"


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


# -- authentication (queries, run on the reader pool) ----------------------------


class Principal(msgspec.Struct, frozen=True):
    """Who a token belongs to: a workspace (its key) or an agent of it (its token)."""

    workspace_id: int
    agent_id: int | None = None
    agent_name: str | None = None


def workspace_by_key(conn: apsw.Connection, key: str) -> Principal | None:
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
