"""Relaycast node tokens: the credential of the SDK's agent realtime socket.

`POST /v1/agent/node-token` mints one for the calling agent;
`/v1/node/ws?token=nt_live_...` resolves it. The SDK asks for a fresh token
before every (re)connect, so tokens are short-lived and an agent's expired
ones are deleted whenever it gets a new one. Only the SHA-256 digest is
stored. A node is the agent's "direct" node: its id and name are derived
from the agent, so every token of an agent names the same node. A node
token never outlives the agent token that minted it (see `IssueNodeToken`).
"""

from __future__ import annotations

import apsw
import msgspec

from broker.engine import secrets
from broker.engine.errors import BrokerError
from broker.engine.lookups import require_agent
from broker.engine.writer import Tx

# How long a node token opens sockets after it was minted.
DEFAULT_NODE_TOKEN_TTL_S = 24 * 3600
# The end of a current agent token, which has none until a rotation.
_NEVER = 2**63 - 1


def node_id(agent_id: int) -> str:
    """The id of an agent's direct node."""
    return f"node_{agent_id}"


def node_name(agent_name: str) -> str:
    """The name of an agent's direct node."""
    return f"{agent_name}-direct"


class IssuedNodeToken(msgspec.Struct, frozen=True, kw_only=True):
    node_id: str
    node_name: str
    token: str
    expires_at: int


class IssueNodeToken(msgspec.Struct, frozen=True, kw_only=True):
    """Mint a node token for the agent; its expired tokens are deleted.

    minted_with: the digest of the agent token the caller presented (None:
    not checked, as in tests that mint directly). A node token never
    outlives that agent token: minted with a token rotated out and still in
    its grace, it expires when the grace ends, as a rotation cuts the node
    tokens that existed before it (`RotateToken`). Otherwise a leaked old
    token could mint, during the grace, a node token that outlives it by a
    day. The check runs here, in the transaction, so a rotation committed
    between the caller's authentication and this command is seen.
    Raises agent_not_found, invalid_token (the agent token is neither the
    current one nor the previous one within its grace).
    """

    workspace_id: int
    agent_id: int
    ttl_seconds: int = DEFAULT_NODE_TOKEN_TTL_S
    minted_with: bytes | None = None

    def apply(self, tx: Tx) -> IssuedNodeToken:
        conn, now = tx.conn, tx.now_ms
        agent = require_agent(conn, self.workspace_id, self.agent_id)
        expires = now + self.ttl_seconds * 1000
        if self.minted_with is not None:
            expires = min(expires, _agent_token_end(conn, agent.id, self.minted_with, now))
        conn.execute(
            "DELETE FROM node_tokens WHERE agent_id = ? AND expires_at <= ?", (agent.id, now)
        )
        token = secrets.mint(secrets.NODE_TOKEN_PREFIX)
        conn.execute(
            "INSERT INTO node_tokens(token_hash, workspace_id, agent_id, expires_at, created_at)"
            " VALUES (?,?,?,?,?)",
            (secrets.digest(token), self.workspace_id, agent.id, expires, now),
        )
        return IssuedNodeToken(
            node_id=node_id(agent.id), node_name=node_name(agent.name), token=token,
            expires_at=expires,
        )


def _agent_token_end(conn: apsw.Connection, agent_id: int, token_digest: bytes,
                     now_ms: int) -> int:
    """When the agent token with this digest stops working (epoch ms; far future: current).

    Raises invalid_token when it no longer works.
    """
    row = conn.execute(
        "SELECT token_hash, prev_token_hash, prev_token_expires_at FROM agents WHERE id = ?",
        (agent_id,),
    ).fetchone()
    if row is not None and row[0] == token_digest:
        return _NEVER
    if row is not None and row[1] == token_digest and row[2] is not None and row[2] > now_ms:
        return int(row[2])
    raise BrokerError("invalid_token", "the agent token was rotated out and its grace ended")


class NodeIdentity(msgspec.Struct, frozen=True, kw_only=True):
    """Who a node token belongs to."""

    workspace_id: int
    agent_id: int
    agent_name: str
    node_id: str
    node_name: str


def agent_by_node_token(conn: apsw.Connection, token: str, now_ms: int) -> NodeIdentity | None:
    """The active agent whose unexpired node token this is, or None."""
    row = conn.execute(
        "SELECT a.workspace_id, a.id, a.name FROM node_tokens t JOIN agents a ON a.id = t.agent_id"
        " JOIN workspaces w ON w.id = a.workspace_id"
        " WHERE t.token_hash = ? AND t.expires_at > ? AND a.deactivated_at IS NULL"
        " AND w.deleted_at IS NULL",
        (secrets.digest(token), now_ms),
    ).fetchone()
    if row is None:
        return None
    workspace_id, agent_id, name = int(row[0]), int(row[1]), str(row[2])
    return NodeIdentity(
        workspace_id=workspace_id, agent_id=agent_id, agent_name=name,
        node_id=node_id(agent_id), node_name=node_name(name),
    )
