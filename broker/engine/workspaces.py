"""Workspaces and agents: the commands that create them and the lookups that authenticate.

A workspace key and an agent token are returned once, at creation (or
rotation); only their SHA-256 digests are stored.

Deleting a workspace is two-phase, so it never holds the writer for as long
as a big workspace takes to delete. `DeleteWorkspace` is one small command:
it marks the row (`deleted_at`) and renames it to a tombstone name, so from
its commit on every token of the workspace (its key, its agents' tokens,
node tokens, inbound hook tokens) is refused like an unknown one, its name
is free for a new workspace, and its sessions are closed (the
`workspace.deleted` event). The sweeper then purges its rows in bounded
steps (`broker.engine.maintenance.PurgeWorkspace`), resuming after a
restart; the last step deletes the workspace row, whose ON DELETE CASCADE
chain takes anything written meanwhile. The commands that change agents
after registration are in `broker.engine.agents`.
"""

from __future__ import annotations

from typing import Any, cast

import apsw
import msgspec

from broker.engine import secrets, validation
from broker.engine.errors import BrokerError
from broker.engine.events import emit_ephemeral
from broker.engine.lookups import require_workspace
from broker.engine.validation import WORKSPACE_NAME_MAX
from broker.engine.writer import Tx
from protocol.objects import AgentCreated, Workspace, WorkspaceCreated, WorkspaceDeleted, iso

GENERAL = "general"
# Every workspace is on the one plan a self-hosted broker has.
PLAN = "free"
# Longest system prompt accepted, in bytes of UTF-8: it is handed to every
# agent of the workspace, so it is bounded like a message text.
SYSTEM_PROMPT_MAX_BYTES = 32 * 1024
# The commit signal of a deletion: the sweeper starts the purge at once.
WORKSPACE_DELETED = "workspace_deleted"

_metadata_decoder = msgspec.json.Decoder(dict[str, Any])


class CreateWorkspace(msgspec.Struct, frozen=True):
    """Create a workspace, its key and its `general` channel."""

    name: str

    def apply(self, tx: Tx) -> WorkspaceCreated:
        name = validation.workspace_name(self.name)
        conn, now = tx.conn, tx.now_ms
        # A deleted workspace holds a tombstone name (see DeleteWorkspace), so
        # its old name is free here, even while its rows are being purged.
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
        # the bounds an update has (before, a create took any size)
        persona = validation.persona(self.persona)
        metadata = validation.agent_metadata(self.metadata)
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
            (agent_id, self.workspace_id, name, self.type, persona, metadata,
             secrets.digest(token), now),
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


def tombstone_name(name: str, workspace_id: int) -> str:
    """The name a deleted workspace holds until its purge ends.

    Longer than any valid name (so no new workspace can collide with it),
    unique by the id, and still readable for an operator looking at the file.
    """
    return f"{name} (deleted {workspace_id})".ljust(WORKSPACE_NAME_MAX + 1, ".")


class DeleteWorkspace(msgspec.Struct, frozen=True, kw_only=True):
    """Delete a workspace and everything in it (agents, channels, messages, deliveries, ...).

    One small write: the workspace is marked deleted and renamed out of the
    way. From this commit on its key and every token of it are refused, its
    name can be taken by a new workspace, and its sessions close; its rows
    are purged afterwards by the sweeper in bounded steps. Raises
    workspace_not_found.
    """

    workspace_id: int

    def apply(self, tx: Tx) -> WorkspaceDeleted:
        conn = tx.conn
        row = conn.execute(
            "SELECT name FROM workspaces WHERE id = ? AND deleted_at IS NULL",
            (self.workspace_id,),
        ).fetchone()
        if row is None:
            raise BrokerError("workspace_not_found", f"workspace {self.workspace_id} not found")
        name = cast(str, row[0])
        conn.execute(
            "UPDATE workspaces SET deleted_at = ?, updated_at = ?, name = ? WHERE id = ?",
            (tx.now_ms, tx.now_ms, tombstone_name(name, self.workspace_id), self.workspace_id),
        )
        # Its agents too (one row each, few beside the rows the purge takes):
        # every read and command that checks for an active agent then refuses
        # a caller resolved before this commit (a session between its
        # handshake and its replay, a request in flight), as it did when the
        # delete removed the agents at once.
        conn.execute(
            "UPDATE agents SET deactivated_at = ?"
            " WHERE workspace_id = ? AND deactivated_at IS NULL",
            (tx.now_ms, self.workspace_id),
        )
        tx.signal(WORKSPACE_DELETED)
        deleted = WorkspaceDeleted(workspace_id=str(self.workspace_id), name=name)
        # The gateway closes the workspace's sessions on this event.
        emit_ephemeral(tx, workspace_id=self.workspace_id, event_type="workspace.deleted",
                       data=deleted)
        return deleted


# -- queries (run on the reader pool) ---------------------------------------------

_WORKSPACE_COLUMNS = "SELECT id, name, system_prompt, metadata, created_at FROM workspaces"
_LIVE = " AND deleted_at IS NULL"


def _workspace(row: apsw.SQLiteValues) -> Workspace:
    workspace_id, name, prompt, metadata, created_at = row
    return Workspace(
        id=str(workspace_id), name=cast(str, name), system_prompt=cast("str | None", prompt),
        plan=PLAN, created_at=iso(cast(int, created_at)) or "",
        metadata=_metadata_decoder.decode(cast(str, metadata)),
    )


def get_workspace(conn: apsw.Connection, workspace_id: int) -> Workspace:
    """The workspace `workspace_id`. Raises workspace_not_found."""
    row = conn.execute(_WORKSPACE_COLUMNS + " WHERE id = ?" + _LIVE, (workspace_id,)).fetchone()
    if row is None:
        raise BrokerError("workspace_not_found", f"workspace {workspace_id} not found")
    return _workspace(row)


def workspace_by_name(conn: apsw.Connection, name: str) -> Workspace:
    """The workspace called `name` (names are unique). Raises workspace_not_found."""
    row = conn.execute(_WORKSPACE_COLUMNS + " WHERE name = ?" + _LIVE, (name,)).fetchone()
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
    """The workspace whose key is `key`, or None (also when the workspace is deleted)."""
    row = conn.execute(
        "SELECT id FROM workspaces WHERE key_hash = ?" + _LIVE, (secrets.digest(key),)
    ).fetchone()
    return None if row is None else Principal(int(row[0]))


def agent_by_token(conn: apsw.Connection, token: str, now_ms: int) -> Principal | None:
    """The active agent holding `token` (current, or rotated out less than the grace ago).

    None also when the agent's workspace is deleted.
    """
    digest = secrets.digest(token)
    live = " AND a.deactivated_at IS NULL AND w.deleted_at IS NULL"
    columns = "SELECT a.workspace_id, a.id, a.name FROM agents a JOIN workspaces w" \
        " ON w.id = a.workspace_id"
    row = conn.execute(columns + " WHERE a.token_hash = ?" + live, (digest,)).fetchone()
    if row is None:
        row = conn.execute(
            columns + " WHERE a.prev_token_hash = ? AND a.prev_token_expires_at > ?" + live,
            (digest, now_ms),
        ).fetchone()
    return None if row is None else Principal(int(row[0]), int(row[1]), row[2])
