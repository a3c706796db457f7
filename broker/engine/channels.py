"""Channels and their membership."""

from __future__ import annotations

import msgspec

from broker.engine import validation
from broker.engine.errors import BrokerError
from broker.engine.events import emit_ephemeral
from broker.engine.lookups import require_agent, require_channel, require_workspace
from broker.engine.writer import Tx
from protocol.objects import Channel, iso


class CreateChannel(msgspec.Struct, frozen=True, kw_only=True):
    """Create a channel; an agent that creates it joins it as its owner.

    agent_id is None when a workspace key creates the channel.
    """

    workspace_id: int
    agent_id: int | None
    name: str
    topic: str | None = None
    metadata: dict[str, object] = msgspec.field(default_factory=dict)

    def apply(self, tx: Tx) -> Channel:
        conn, now = tx.conn, tx.now_ms
        name = validation.channel_name(self.name)
        require_workspace(conn, self.workspace_id)
        if self.agent_id is not None:
            require_agent(conn, self.workspace_id, self.agent_id)
        if conn.execute(
            "SELECT 1 FROM channels WHERE workspace_id = ? AND name = ?", (self.workspace_id, name)
        ).fetchone():
            raise BrokerError("channel_already_exists", f"channel {name!r} already exists")
        channel_id = tx.new_id()
        metadata = msgspec.json.encode(self.metadata).decode()
        conn.execute(
            "INSERT INTO channels(id, workspace_id, name, topic, metadata, created_by, created_at)"
            " VALUES (?,?,?,?,?,?,?)",
            (channel_id, self.workspace_id, name, self.topic, metadata, self.agent_id, now),
        )
        if self.agent_id is not None:
            conn.execute(
                "INSERT INTO channel_members(channel_id, agent_id, role, joined_at)"
                " VALUES (?,?,'owner',?)",
                (channel_id, self.agent_id, now),
            )
        channel = Channel(
            id=str(channel_id), name=name, topic=self.topic, metadata=self.metadata,
            created_by=None if self.agent_id is None else str(self.agent_id),
            created_at=iso(now) or "", is_archived=False,
            member_count=0 if self.agent_id is None else 1,
        )
        emit_ephemeral(
            tx, workspace_id=self.workspace_id, event_type="channel.created", data=channel,
            channel_id=channel_id,
        )
        return channel


class JoinResult(msgspec.Struct, frozen=True):
    channel: str
    agent_id: str
    already_member: bool


class JoinChannel(msgspec.Struct, frozen=True, kw_only=True):
    """Join a channel (idempotent: joining twice reports already_member)."""

    workspace_id: int
    agent_id: int
    channel: str

    def apply(self, tx: Tx) -> JoinResult:
        conn = tx.conn
        agent = require_agent(conn, self.workspace_id, self.agent_id)
        channel = require_channel(conn, self.workspace_id, self.channel, self.agent_id)
        if channel.archived:
            raise BrokerError("channel_archived", f"channel {channel.name!r} is archived")
        if not channel.is_member:
            conn.execute(
                "INSERT INTO channel_members(channel_id, agent_id, joined_at) VALUES (?,?,?)",
                (channel.id, self.agent_id, tx.now_ms),
            )
            emit_ephemeral(
                tx, workspace_id=self.workspace_id, event_type="member.joined",
                data={"channel": channel.name, "agent_id": str(agent.id), "agent_name": agent.name},
                channel_id=channel.id,
            )
        return JoinResult(channel.name, str(self.agent_id), channel.is_member)
