"""Wire objects returned by operations, shared by REST and WebSocket bindings.

Field names and shapes follow the Relaycast wire contract
(`@relaycast/types@6.0.2`): snake_case keys, ids as decimal strings, times
as ISO 8601 UTC strings. `omit_defaults` is off on purpose: nullable fields
are sent as null, as the SDK's schemas expect.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any, Literal

import msgspec

Mode = Literal["wait", "steer"]


def iso(ms: int | None) -> str | None:
    """Milliseconds since the epoch as an ISO 8601 UTC string (None stays None)."""
    if ms is None:
        return None
    return (
        _dt.datetime.fromtimestamp(ms / 1000, tz=_dt.UTC).isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def sid(id_: int | None) -> str | None:
    """An integer id as its decimal wire string (None stays None)."""
    return None if id_ is None else str(id_)


class Workspace(msgspec.Struct, kw_only=True):
    id: str
    name: str
    system_prompt: str | None
    plan: str
    created_at: str
    metadata: dict[str, Any]


class WorkspaceCreated(msgspec.Struct, kw_only=True):
    workspace_id: str
    name: str
    api_key: str
    created_at: str


class AgentChannel(msgspec.Struct, kw_only=True):
    id: str
    name: str
    role: str
    joined_at: str


class Agent(msgspec.Struct, kw_only=True):
    id: str
    name: str
    type: str
    status: str
    persona: str | None
    metadata: dict[str, Any]
    last_seen: str | None
    created_at: str
    channels: list[AgentChannel] | None = None


class AgentCreated(msgspec.Struct, kw_only=True):
    id: str
    name: str
    token: str
    status: str
    created_at: str


class ChannelMember(msgspec.Struct, kw_only=True):
    agent_id: str
    agent_name: str
    role: str
    joined_at: str
    is_muted: bool


class Channel(msgspec.Struct, kw_only=True):
    id: str
    name: str
    topic: str | None
    metadata: dict[str, Any]
    created_by: str | None
    created_at: str
    is_archived: bool
    member_count: int
    members: list[ChannelMember] | None = None


class Attachment(msgspec.Struct, kw_only=True):
    file_id: str
    filename: str
    content_type: str
    size_bytes: int


class ReactionGroup(msgspec.Struct, kw_only=True):
    emoji: str
    count: int
    agents: list[str]


class Message(msgspec.Struct, kw_only=True):
    """A message as reads and sends return it (Relaycast `MessageWithMeta`).

    Exactly one of channel_id / conversation_id is set.
    """

    id: str
    channel_id: str | None
    channel_name: str | None = None
    conversation_id: str | None = None
    agent_id: str | None
    agent_name: str | None
    text: str
    data: dict[str, Any] | None = None
    thread_id: str | None = None
    attachments: list[Attachment] = msgspec.field(default_factory=list)
    has_attachments: bool = False
    mentions: list[str] = msgspec.field(default_factory=list)
    injection_mode: Mode = "wait"
    reply_count: int = 0
    reactions: list[ReactionGroup] = msgspec.field(default_factory=list)
    read_by_count: int = 0
    created_at: str
    # Recipients whose mailbox was over the limit and who got no delivery.
    mailbox_full: list[str] = msgspec.field(default_factory=list)

# -- channel membership, threads, reactions and read receipts ------------------------


class InviteResult(msgspec.Struct, kw_only=True):
    """Relaycast `InviteChannelResponse`, plus whether the agent was already a member."""

    channel: str
    agent: str
    already_member: bool


class LeaveResult(msgspec.Struct, kw_only=True):
    channel: str
    agent_id: str


class MuteResult(msgspec.Struct, kw_only=True):
    """Relaycast `MuteChannelResponse`, plus whether the setting changed."""

    channel: str
    agent_id: str
    muted: bool
    changed: bool


class Thread(msgspec.Struct, kw_only=True):
    """A thread root and a page of its replies, oldest first."""

    parent: Message
    replies: list[Message]


class AddedReaction(msgspec.Struct, kw_only=True):
    """Relaycast `AddedReaction`, plus whether this call created it (False: already there)."""

    id: str
    message_id: str
    agent_name: str
    emoji: str
    created_at: str
    created: bool


class ReactionNotice(msgspec.Struct, kw_only=True):
    """The data of a `message.reacted` event (Relaycast `MessageReactedEvent` fields)."""

    message_id: str
    emoji: str
    agent_id: str
    agent_name: str
    action: Literal["added", "removed"]
    channel: str | None
    conversation_id: str | None


class ReadReceipt(msgspec.Struct, kw_only=True):
    """Relaycast `ReadReceipt`; read_at is the first read; already_read tells a repeat."""

    message_id: str
    agent_id: str
    read_at: str
    already_read: bool


class ReadNotice(msgspec.Struct, kw_only=True):
    """The data of a `message.read` event (Relaycast `MessageReadEvent` fields)."""

    message_id: str
    agent_id: str
    agent_name: str
    read_at: str
    channel: str | None
    conversation_id: str | None


class ReaderInfo(msgspec.Struct, kw_only=True):
    agent_id: str
    agent_name: str
    read_at: str


class ChannelReadStatus(msgspec.Struct, kw_only=True):
    agent_name: str
    last_read_id: str | None
    last_read_at: str | None

