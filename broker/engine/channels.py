"""Channels and their membership: create, join, leave, invite, update, archive, mute.

Membership changes are single-row writes whose events are ephemeral (no
delivery rows): a member who misses `member.joined` loses nothing durable,
and the next send reads membership inside its own transaction anyway, so
who receives a message is always decided at commit time.

Commands that administer a channel (invite, update, archive) take
`agent_id=None` for a caller holding the workspace key; an agent must be a
member of the channel to administer it. Reads of channels are in
`broker.engine.channel_queries`.
"""

from __future__ import annotations

from typing import Any

import msgspec

from broker.engine import validation
from broker.engine.channel_queries import channel_by_id
from broker.engine.errors import BrokerError
from broker.engine.events import emit_ephemeral
from broker.engine.lookups import (
    AgentRow,
    ChannelRow,
    agent_by_name,
    require_agent,
    require_channel,
    require_workspace,
)
from broker.engine.workspaces import GENERAL
from broker.engine.writer import Tx
from protocol.objects import Channel, InviteResult, LeaveResult, MuteResult, iso

# Longest topic accepted, in characters (Relaycast sets none; an unbounded
# topic would ride along in every channel listing).
TOPIC_MAX_CHARS = 1024


def channel_topic(topic: str | None) -> str | None:
    """A topic (None clears it); raises invalid_topic when longer than TOPIC_MAX_CHARS."""
    if topic is not None and len(topic) > TOPIC_MAX_CHARS:
        raise BrokerError("invalid_topic", f"a topic is at most {TOPIC_MAX_CHARS} characters")
    return topic


def _administered(
    tx: Tx, workspace_id: int, agent_id: int | None, name: str, *, writable: bool = True
) -> ChannelRow:
    """The channel `name`, if the caller may administer it (a member, or the workspace key).

    Raises agent_not_found, channel_not_found, channel_archived (when
    `writable`), not_a_member.
    """
    if agent_id is not None:
        require_agent(tx.conn, workspace_id, agent_id)
    channel = require_channel(tx.conn, workspace_id, name, agent_id)
    if writable and channel.archived:
        raise BrokerError("channel_archived", f"channel {channel.name!r} is archived")
    if agent_id is not None and not channel.is_member:
        raise BrokerError("not_a_member", f"you are not a member of channel {channel.name!r}")
    return channel


def _membership_event(tx: Tx, event_type: str, workspace_id: int, channel: ChannelRow,
                      agent: AgentRow, **extra: Any) -> None:
    emit_ephemeral(
        tx, workspace_id=workspace_id, event_type=event_type,
        data={"channel": channel.name, "agent_id": str(agent.id), "agent_name": agent.name,
              **extra},
        channel_id=channel.id,
    )


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
        channel_topic(self.topic)
        # the bound an update has (before, a create took any size)
        metadata = validation.data(self.metadata, tx.limits) or "{}"
        require_workspace(conn, self.workspace_id)
        if self.agent_id is not None:
            require_agent(conn, self.workspace_id, self.agent_id)
        if conn.execute(
            "SELECT 1 FROM channels WHERE workspace_id = ? AND name = ?", (self.workspace_id, name)
        ).fetchone():
            raise BrokerError("channel_already_exists", f"channel {name!r} already exists")
        channel_id = tx.new_id()
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


class LeaveChannel(msgspec.Struct, frozen=True, kw_only=True):
    """Leave a channel. Raises not_a_member when the agent is not in it.

    Leaving an archived channel is allowed: it is the caller's own membership.
    Deliveries already written stay; the agent gets no new ones.
    """

    workspace_id: int
    agent_id: int
    channel: str

    def apply(self, tx: Tx) -> LeaveResult:
        conn = tx.conn
        agent = require_agent(conn, self.workspace_id, self.agent_id)
        channel = require_channel(conn, self.workspace_id, self.channel, self.agent_id)
        if not channel.is_member:
            raise BrokerError("not_a_member", f"you are not a member of channel {channel.name!r}")
        conn.execute(
            "DELETE FROM channel_members WHERE channel_id = ? AND agent_id = ?",
            (channel.id, agent.id),
        )
        _membership_event(tx, "member.left", self.workspace_id, channel, agent)
        return LeaveResult(channel=channel.name, agent_id=str(agent.id))


class InviteToChannel(msgspec.Struct, frozen=True, kw_only=True):
    """Add the agent called `agent_name` to a channel (idempotent: already_member).

    agent_id is the inviter (a member), or None for the workspace key.
    Raises channel_not_found, channel_archived, not_a_member, agent_not_found.
    """

    workspace_id: int
    agent_id: int | None
    channel: str
    agent_name: str

    def apply(self, tx: Tx) -> InviteResult:
        conn = tx.conn
        channel = _administered(tx, self.workspace_id, self.agent_id, self.channel)
        invitee = agent_by_name(conn, self.workspace_id, self.agent_name)
        already = conn.execute(
            "SELECT 1 FROM channel_members WHERE channel_id = ? AND agent_id = ?",
            (channel.id, invitee.id),
        ).fetchone() is not None
        if not already:
            conn.execute(
                "INSERT INTO channel_members(channel_id, agent_id, joined_at) VALUES (?,?,?)",
                (channel.id, invitee.id, tx.now_ms),
            )
            _membership_event(
                tx, "member.joined", self.workspace_id, channel, invitee,
                invited_by=None if self.agent_id is None else str(self.agent_id),
            )
        return InviteResult(channel=channel.name, agent=invitee.name, already_member=already)


class UpdateChannel(msgspec.Struct, frozen=True, kw_only=True):
    """Set a channel's topic and/or metadata (a field left UNSET is kept; topic None clears).

    Raises invalid_topic, invalid_data, data_too_large, channel_not_found,
    channel_archived, not_a_member.
    """

    workspace_id: int
    agent_id: int | None
    channel: str
    topic: str | None | msgspec.UnsetType = msgspec.UNSET
    metadata: dict[str, Any] | msgspec.UnsetType = msgspec.UNSET

    def apply(self, tx: Tx) -> Channel:
        conn = tx.conn
        topic = self.topic
        if topic is not msgspec.UNSET:
            channel_topic(topic)
        metadata = (
            None if self.metadata is msgspec.UNSET else validation.data(self.metadata, tx.limits)
        )
        channel = _administered(tx, self.workspace_id, self.agent_id, self.channel)
        if topic is not msgspec.UNSET:
            conn.execute("UPDATE channels SET topic = ? WHERE id = ?", (topic, channel.id))
        if metadata is not None:
            conn.execute("UPDATE channels SET metadata = ? WHERE id = ?", (metadata, channel.id))
        updated = channel_by_id(conn, channel.id)
        emit_ephemeral(
            tx, workspace_id=self.workspace_id, event_type="channel.updated", data=updated,
            channel_id=channel.id,
        )
        return updated


class ArchiveChannel(msgspec.Struct, frozen=True, kw_only=True):
    """Archive a channel: it keeps its history and members but takes no new writes.

    Archiving an archived channel changes nothing and returns it.
    Raises cannot_archive_general, channel_not_found, not_a_member.
    """

    workspace_id: int
    agent_id: int | None
    channel: str

    def apply(self, tx: Tx) -> Channel:
        conn = tx.conn
        channel = _administered(tx, self.workspace_id, self.agent_id, self.channel,
                                writable=False)
        if channel.name == GENERAL:
            raise BrokerError("cannot_archive_general", "the general channel cannot be archived")
        if not channel.archived:
            conn.execute(
                "UPDATE channels SET archived_at = ? WHERE id = ?", (tx.now_ms, channel.id)
            )
        archived = channel_by_id(conn, channel.id)
        if not channel.archived:
            emit_ephemeral(
                tx, workspace_id=self.workspace_id, event_type="channel.archived",
                data=archived, channel_id=channel.id,
            )
        return archived


def _set_muted(tx: Tx, workspace_id: int, agent_id: int, name: str, muted: bool) -> MuteResult:
    conn = tx.conn
    agent = require_agent(conn, workspace_id, agent_id)
    # A mute is the caller's own setting, so an archived channel may be muted too.
    channel = require_channel(conn, workspace_id, name, agent_id)
    if not channel.is_member:
        raise BrokerError("not_a_member", f"you are not a member of channel {channel.name!r}")
    changed = channel.muted != muted
    if changed:
        conn.execute(
            "UPDATE channel_members SET muted = ? WHERE channel_id = ? AND agent_id = ?",
            (int(muted), channel.id, agent.id),
        )
        emit_ephemeral(
            tx, workspace_id=workspace_id,
            event_type="member.channel_muted" if muted else "member.channel_unmuted",
            data={"channel": channel.name, "agent_id": str(agent.id), "agent_name": agent.name},
            audience=(agent.id,), channel_id=channel.id,
        )
    return MuteResult(channel=channel.name, agent_id=str(agent.id), muted=muted, changed=changed)


class MuteChannel(msgspec.Struct, frozen=True, kw_only=True):
    """Mute a channel for the caller: its messages reach the caller only when they mention it.

    Raises channel_not_found, not_a_member.
    """

    workspace_id: int
    agent_id: int
    channel: str

    def apply(self, tx: Tx) -> MuteResult:
        return _set_muted(tx, self.workspace_id, self.agent_id, self.channel, True)


class UnmuteChannel(msgspec.Struct, frozen=True, kw_only=True):
    """Unmute a channel for the caller. Raises channel_not_found, not_a_member."""

    workspace_id: int
    agent_id: int
    channel: str

    def apply(self, tx: Tx) -> MuteResult:
        return _set_muted(tx, self.workspace_id, self.agent_id, self.channel, False)
