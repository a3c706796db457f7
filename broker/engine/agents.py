"""Agents after registration: listing, reading, token rotation, presence, profile, deactivation.

Registration lives with the workspace (`broker.engine.workspaces`), because
it mints the token that authenticates everything else.

Commands name their target by id (`agent_id`): the caller's own id from its
token, or an id the HTTP layer resolved from a name for a workspace-key
caller. The lookup is scoped to the workspace, so an id of another workspace
is `agent_not_found`. Reads by name (`get_agent`) are what the REST routes
and the SDK use.

Deactivation is soft: the row stays, so messages keep their author and the
name stays taken (`agent_already_exists` on a new registration), but the
token stops working, every lookup of an active agent (`require_agent`,
`agent_by_name`) misses it, recipient queries skip it, and its unacked
deliveries are dead-lettered, since nobody can consume them any more.
"""

from __future__ import annotations

from typing import Any, Literal, cast

import apsw
import msgspec

from broker.engine import secrets, validation
from broker.engine.errors import BrokerError
from broker.engine.events import emit_ephemeral, notify_sessions
from broker.engine.lookups import AgentRow, require_agent
from broker.engine.writer import Tx
from protocol.objects import (
    Agent,
    AgentChannel,
    AgentDeactivated,
    AgentStatusChanged,
    TokenRotated,
    iso,
)

Status = Literal["online", "away", "offline"]
STATUSES: tuple[str, ...] = ("online", "away", "offline")
# The realtime event of each status: @relaycast/types names presence events
# agent.status.active / idle / offline, while REST statuses are online / away / offline.
EVENT_STATUS: dict[str, str] = {"online": "active", "away": "idle", "offline": "offline"}
# The ephemeral fact of a rotation (audience: the agent); the gateway closes
# the sockets opened with the old token when its grace ends.
TOKEN_ROTATED = "agent.token_rotated"

_metadata_decoder = msgspec.json.Decoder(dict[str, Any])
_encoder = msgspec.json.Encoder()

_AGENT_COLUMNS = (
    "SELECT id, name, type, status, persona, metadata, last_seen, created_at FROM agents"
)


def _agent(row: apsw.SQLiteValues) -> Agent:
    agent_id, name, type_, status, persona, metadata, last_seen, created_at = row
    return Agent(
        id=str(agent_id), name=cast(str, name), type=cast(str, type_),
        status=cast(str, status), persona=cast("str | None", persona),
        metadata=_metadata_decoder.decode(cast(str, metadata)),
        last_seen=iso(cast("int | None", last_seen)), created_at=iso(cast(int, created_at)) or "",
    )


def _channels_of(conn: apsw.Connection, agent_id: int) -> list[AgentChannel]:
    rows = conn.execute(
        "SELECT c.id, c.name, m.role, m.joined_at FROM channel_members m"
        " JOIN channels c ON c.id = m.channel_id"
        " WHERE m.agent_id = ? AND c.archived_at IS NULL ORDER BY c.name",
        (agent_id,),
    ).fetchall()
    return [
        AgentChannel(id=str(r[0]), name=cast(str, r[1]), role=cast(str, r[2]),
                     joined_at=iso(cast(int, r[3])) or "")
        for r in rows
    ]


# -- queries (run on the reader pool) ---------------------------------------------


def list_agents(
    conn: apsw.Connection, workspace_id: int, status: str | None = None
) -> list[Agent]:
    """The workspace's active agents by name, optionally only those with `status`.

    status: "online", "away", "offline", or None / "all" for every one.
    Raises invalid_status.
    """
    if status is not None and status != "all" and status not in STATUSES:
        raise BrokerError("invalid_status", "status must be 'online', 'away', 'offline' or 'all'")
    wanted = None if status == "all" else status
    rows = conn.execute(
        _AGENT_COLUMNS + " WHERE workspace_id = ? AND deactivated_at IS NULL"
        " AND (? IS NULL OR status = ?) ORDER BY name",
        (workspace_id, wanted, wanted),
    ).fetchall()
    return [_agent(r) for r in rows]


def get_agent(conn: apsw.Connection, workspace_id: int, name: str) -> Agent:
    """The active agent called `name`, with the (unarchived) channels it is in.

    Raises agent_not_found.
    """
    row = conn.execute(
        _AGENT_COLUMNS + " WHERE workspace_id = ? AND name = ? AND deactivated_at IS NULL",
        (workspace_id, name),
    ).fetchone()
    if row is None:
        raise BrokerError("agent_not_found", f"agent {name!r} not found")
    agent = _agent(row)
    agent.channels = _channels_of(conn, int(agent.id))
    return agent


def get_self(conn: apsw.Connection, workspace_id: int, agent_id: int) -> Agent:
    """The calling agent itself, with its channels. Raises agent_not_found."""
    row = conn.execute(
        _AGENT_COLUMNS + " WHERE id = ? AND workspace_id = ? AND deactivated_at IS NULL",
        (agent_id, workspace_id),
    ).fetchone()
    if row is None:
        raise BrokerError("agent_not_found", f"agent {agent_id} not found")
    agent = _agent(row)
    agent.channels = _channels_of(conn, agent_id)
    return agent


# -- commands ----------------------------------------------------------------------


class RotateToken(msgspec.Struct, frozen=True, kw_only=True):
    """Give the agent a new token, returned once; the old one works for the grace period.

    The grace is `limits.token_grace_seconds` (0: the old token dies at once).
    Only the token just replaced is kept for the grace: rotating twice in a
    row ends the grace of the token before it, which is what a caller that
    rotates because a token leaked wants. The agent's node tokens (minted
    with an agent token, possibly the leaked one) stop working when the
    grace ends too. Emits the ephemeral TOKEN_ROTATED to the agent (never
    the token itself), so open sockets, native and node, can follow.
    Raises agent_not_found.
    """

    workspace_id: int
    agent_id: int

    def apply(self, tx: Tx) -> TokenRotated:
        conn, now = tx.conn, tx.now_ms
        agent = require_agent(conn, self.workspace_id, self.agent_id)
        token = secrets.mint(secrets.AGENT_TOKEN_PREFIX)
        expires = now + tx.limits.token_grace_seconds * 1000
        conn.execute(
            "UPDATE agents SET prev_token_hash = token_hash, prev_token_expires_at = ?,"
            " token_hash = ? WHERE id = ?",
            (expires, secrets.digest(token), agent.id),
        )
        conn.execute(
            "UPDATE node_tokens SET expires_at = ?1 WHERE agent_id = ?2 AND expires_at > ?1",
            (expires, agent.id),
        )
        notify_sessions(
            tx, workspace_id=self.workspace_id, event_type=TOKEN_ROTATED, audience=(agent.id,),
            data={"agent_id": str(agent.id), "name": agent.name,
                  "previous_token_expires_at": iso(expires)},
        )
        return TokenRotated(name=agent.name, token=token, previous_token_expires_at=iso(expires))


class SetAgentStatus(msgspec.Struct, frozen=True, kw_only=True):
    """Set the agent's presence (the gateway calls it on connect, idle and disconnect).

    last_seen moves to now on every call, so a heartbeat is this command with
    the same status; the ephemeral `agent.status.<event status>` event is
    emitted only when the status changes, under the Relaycast realtime names
    (EVENT_STATUS: online -> active, away -> idle, offline -> offline).
    Raises agent_not_found, invalid_status.
    """

    workspace_id: int
    agent_id: int
    status: str

    def apply(self, tx: Tx) -> AgentStatusChanged:
        _check_status(self.status)
        agent = require_agent(tx.conn, self.workspace_id, self.agent_id)
        changed = _set_status(tx, self.workspace_id, agent, self.status)
        return AgentStatusChanged(agent_id=str(agent.id), name=agent.name, status=self.status,
                                  last_seen=iso(tx.now_ms), changed=changed)


def _check_status(status: str) -> None:
    if status not in STATUSES:
        raise BrokerError("invalid_status", "status must be 'online', 'away' or 'offline'")


def _set_status(tx: Tx, workspace_id: int, agent: AgentRow, status: str) -> bool:
    """Set a checked status and last_seen; emit the `agent.status.*` event if the status
    changed. Returns whether it changed."""
    conn = tx.conn
    row = conn.execute("SELECT status FROM agents WHERE id = ?", (agent.id,)).fetchone()
    changed = row is not None and row[0] != status
    conn.execute("UPDATE agents SET status = ?, last_seen = ? WHERE id = ?",
                 (status, tx.now_ms, agent.id))
    if changed:
        _status_event(tx, workspace_id, agent.name, status)
    return changed


def _status_event(tx: Tx, workspace_id: int, name: str, status: str) -> None:
    """The ephemeral `agent.status.<event status>` event of a changed status."""
    shown = EVENT_STATUS[status]
    emit_ephemeral(
        tx, workspace_id=workspace_id, event_type=f"agent.status.{shown}",
        data={"agent": {"name": name}, "status": shown},
    )


class SetPresence(msgspec.Struct, frozen=True, kw_only=True):
    """Set the presence of many agents in one command (the gateway's connects and disconnects).

    changes: (agent_id, status) pairs, one per agent. Each agent is handled
    as `SetAgentStatus` handles one: last_seen moves to now, and the
    `agent.status.*` event is emitted only when its status changes (in the
    order of `changes`). Agents gone or deactivated since their socket
    opened are skipped, not an error: a refusal would fail the whole batch
    for the others. Returns the ids of the agents whose status changed.
    Raises invalid_status (nothing written).
    """

    changes: tuple[tuple[int, str], ...]

    def apply(self, tx: Tx) -> list[int]:
        conn, now = tx.conn, tx.now_ms
        by_status: dict[str, list[int]] = {}
        for agent_id, status in self.changes:
            _check_status(status)
            by_status.setdefault(status, []).append(agent_id)
        changed: dict[int, tuple[int, str, str]] = {}
        # Two set-based statements per status, not two per agent: each
        # sqlite call hands the GIL to the event loop (see record_event).
        for status, ids in by_status.items():
            wanted = _encoder.encode(ids).decode()
            rows = conn.execute(
                "UPDATE agents SET status = ?1, last_seen = ?2"
                " WHERE id IN (SELECT value FROM json_each(?3)) AND deactivated_at IS NULL"
                " AND status <> ?1 RETURNING id, workspace_id, name",
                (status, now, wanted),
            ).fetchall()
            for row in rows:
                changed[int(cast(int, row[0]))] = (int(cast(int, row[1])), cast(str, row[2]),
                                                   status)
            conn.execute(
                "UPDATE agents SET last_seen = ?2 WHERE id IN (SELECT value FROM json_each(?3))"
                " AND deactivated_at IS NULL AND status = ?1 AND last_seen IS NOT ?2",
                (status, now, wanted),
            )
        order = [agent_id for agent_id, _ in self.changes if agent_id in changed]
        for agent_id in order:
            _status_event(tx, *changed[agent_id])
        return order


class ResetPresence(msgspec.Struct, frozen=True):
    """Mark every agent offline; returns how many were not.

    Run when the daemon starts: no socket survives a restart, so a status
    left online by a crash would otherwise stay until the agent's next
    connect and disconnect. Agents that heartbeat over REST are online
    again with their next heartbeat.
    """

    def apply(self, tx: Tx) -> int:
        tx.conn.execute("UPDATE agents SET status = 'offline' WHERE status <> 'offline'")
        return tx.conn.changes()


class StalePresence(msgspec.Struct, frozen=True, kw_only=True):
    """What `stale_presence` read: the agents to time out, and the next one that could be.

    agents: (workspace_id, agent_id) of every active agent not offline whose
    last_seen is at or before the cutoff, in id order (those with a live
    socket among them too: only the gateway knows its sockets).
    next_seen: the earliest last_seen after the cutoff of an agent not
    offline (ms since the epoch), None when there is none.
    """

    agents: list[tuple[int, int]]
    next_seen: int | None


def stale_presence(conn: apsw.Connection, cutoff_ms: int) -> StalePresence:
    """The agents not offline and not seen since `cutoff_ms`, and the next one to watch."""
    rows = conn.execute(
        "SELECT workspace_id, id FROM agents WHERE status <> 'offline'"
        " AND deactivated_at IS NULL AND COALESCE(last_seen, 0) <= ? ORDER BY id",
        (cutoff_ms,),
    ).fetchall()
    row = conn.execute(
        "SELECT MIN(last_seen) FROM agents WHERE status <> 'offline'"
        " AND deactivated_at IS NULL AND last_seen > ?",
        (cutoff_ms,),
    ).fetchone()
    next_seen = None if row is None or row[0] is None else int(cast(int, row[0]))
    return StalePresence(agents=[(int(cast(int, w)), int(cast(int, a))) for w, a in rows],
                         next_seen=next_seen)


class ExpirePresence(msgspec.Struct, frozen=True, kw_only=True):
    """Set offline each listed agent that is still not seen for `timeout_ms` at commit time.

    The presence reporter's timeout for agents that heartbeat over REST: the
    same status change and `agent.status.offline` event as when an agent's
    last socket closes. The cutoff is taken again inside the transaction
    (now - timeout_ms), so a heartbeat (or a socket's connect, which moves
    last_seen too) committed after the reporter's read keeps its agent
    online. last_seen stays the agent's last sign of life. Returns the ids
    of the agents set offline; agents gone or offline already are skipped.
    """

    agents: tuple[tuple[int, int], ...]
    timeout_ms: int

    def apply(self, tx: Tx) -> list[int]:
        conn, cutoff = tx.conn, tx.now_ms - self.timeout_ms
        expired: list[int] = []
        for workspace_id, agent_id in self.agents:
            row = conn.execute(
                "UPDATE agents SET status = 'offline' WHERE id = ? AND workspace_id = ?"
                " AND status <> 'offline' AND deactivated_at IS NULL"
                " AND COALESCE(last_seen, 0) <= ? RETURNING name",
                (agent_id, workspace_id, cutoff),
            ).fetchone()
            if row is None:
                continue
            _status_event(tx, workspace_id, cast(str, row[0]), "offline")
            expired.append(agent_id)
        return expired


class UpdateAgent(msgspec.Struct, frozen=True, kw_only=True):
    """Set the agent's persona (None clears it), replace its metadata and/or set its
    status (as `SetAgentStatus`); unset fields stay.

    Raises agent_not_found, invalid_persona (over PERSONA_MAX_BYTES),
    invalid_metadata (not an object, or over METADATA_MAX_BYTES as JSON),
    invalid_status.
    """

    workspace_id: int
    agent_id: int
    persona: str | None | msgspec.UnsetType = msgspec.UNSET
    metadata: dict[str, Any] | msgspec.UnsetType = msgspec.UNSET
    status: str | msgspec.UnsetType = msgspec.UNSET

    def apply(self, tx: Tx) -> Agent:
        conn = tx.conn
        assignments: list[str] = []
        values: list[object] = []
        if not isinstance(self.status, msgspec.UnsetType):
            _check_status(self.status)
        if not isinstance(self.persona, msgspec.UnsetType):
            assignments.append("persona = ?")
            values.append(validation.persona(self.persona))
        if not isinstance(self.metadata, msgspec.UnsetType):
            assignments.append("metadata = ?")
            values.append(validation.agent_metadata(self.metadata))
        agent = require_agent(conn, self.workspace_id, self.agent_id)
        if assignments:
            conn.execute(
                f"UPDATE agents SET {', '.join(assignments)} WHERE id = ?", (*values, agent.id)
            )
        if not isinstance(self.status, msgspec.UnsetType):
            _set_status(tx, self.workspace_id, agent, self.status)
        updated = get_self(conn, self.workspace_id, agent.id)
        if assignments:
            emit_ephemeral(tx, workspace_id=self.workspace_id, event_type="agent.updated",
                           data=updated)
        return updated


class DeactivateAgent(msgspec.Struct, frozen=True, kw_only=True):
    """Deactivate an agent: its token stops working and it receives nothing more.

    Its unacked deliveries are dead-lettered (error "agent deactivated") and
    its pending count drops to zero. Deactivating twice is agent_not_found,
    as for any inactive agent. Raises agent_not_found.
    """

    workspace_id: int
    agent_id: int

    def apply(self, tx: Tx) -> AgentDeactivated:
        conn, now = tx.conn, tx.now_ms
        agent = require_agent(conn, self.workspace_id, self.agent_id)
        conn.execute(
            "UPDATE deliveries SET state = 'dead_lettered', error = 'agent deactivated',"
            " retryable = 0, updated_at = ?"
            " WHERE agent_id = ? AND state IN ('queued', 'delivered', 'failed')",
            (now, agent.id),
        )
        dead_count = conn.changes()
        conn.execute(
            "UPDATE agents SET deactivated_at = ?, status = 'offline',"
            " prev_token_hash = NULL, prev_token_expires_at = NULL WHERE id = ?",
            (now, agent.id),
        )
        conn.execute("UPDATE mailboxes SET pending_count = 0 WHERE agent_id = ?", (agent.id,))
        result = AgentDeactivated(agent_id=str(agent.id), name=agent.name,
                                  deactivated_at=iso(now) or "", dead_lettered=dead_count)
        emit_ephemeral(tx, workspace_id=self.workspace_id, event_type="agent.deactivated",
                       data=result)
        return result
