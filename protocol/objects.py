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


class Agent(msgspec.Struct, kw_only=True, omit_defaults=True):
    """An agent; `channels` is present only where a read asks for it (omitted, not null)."""

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


class Channel(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A channel; `members` is present only where a read asks for it (omitted, not null)."""

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


# Event types whose payload data is the message itself (a `Message`): the
# deliveries a read acks, and the events a session's views re-encode.
MESSAGE_EVENTS = ("message.created", "thread.reply", "dm.received", "group_dm.received")

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


# -- agents, DMs and group DMs, the delivery mailbox, inbox, search ------------------


class TokenRotated(msgspec.Struct, kw_only=True):
    """Relaycast `TokenRotateResponse`: the new token, returned once, and when the old one dies."""

    name: str
    token: str
    previous_token_expires_at: str | None


class AgentStatusChanged(msgspec.Struct, kw_only=True):
    """What setting an agent's presence did; changed is False when the status was already so."""

    agent_id: str
    name: str
    status: str
    last_seen: str | None
    changed: bool


class AgentDeactivated(msgspec.Struct, kw_only=True):
    agent_id: str
    name: str
    deactivated_at: str
    # Unacked deliveries moved to dead_lettered (nobody can consume them any more).
    dead_lettered: int


class WorkspaceDeleted(msgspec.Struct, kw_only=True):
    workspace_id: str
    name: str


class ConversationParticipant(msgspec.Struct, kw_only=True):
    """Relaycast `DmConversationParticipant`."""

    agent_id: str
    agent_name: str


class DmLastMessage(msgspec.Struct, kw_only=True):
    """Relaycast `DmLastMessage`, plus the author's name."""

    id: str
    text: str
    agent_id: str | None
    agent_name: str | None
    created_at: str


class DmConversationSummary(msgspec.Struct, kw_only=True):
    """Relaycast `DmConversationSummary`: one 1:1 or group conversation of the caller."""

    id: str
    type: Literal["1:1", "group"]
    name: str | None
    participants: list[ConversationParticipant]
    last_message: DmLastMessage | None
    unread_count: int
    created_at: str


class GroupDm(msgspec.Struct, kw_only=True):
    """Relaycast `CreateGroupDmResponse` (conversations are not channels here: no channel_id)."""

    id: str
    dm_type: Literal["group"] = "group"
    name: str | None
    participants: list[ConversationParticipant]
    created_by: str | None
    created_at: str


class ParticipantAdded(msgspec.Struct, kw_only=True):
    """Relaycast `GroupDmParticipantResponse`."""

    conversation_id: str
    agent: str
    already_member: bool


class ParticipantRemoved(msgspec.Struct, kw_only=True):
    conversation_id: str
    agent: str
    # False when the agent was not an active participant (nothing changed).
    removed: bool


class AckResult(msgspec.Struct, kw_only=True):
    """A cumulative ack: rows moved to acked, the agent's ack mark after it, whether it moved."""

    acked: int
    acked_seq: int
    changed: bool


class DeliveryTransition(msgspec.Struct, kw_only=True):
    """One delivery's state after an ack, fail or defer; changed is False for a no-op."""

    delivery_id: str
    seq: int
    state: Literal["queued", "delivered", "acked", "failed", "dead_lettered"]
    changed: bool


class DeliveriesMarked(msgspec.Struct, kw_only=True):
    """The seqs for which a delivery attempt was recorded (acked and dead ones are skipped)."""

    seqs: list[int]


class MailboxSummary(msgspec.Struct, kw_only=True):
    """One agent's mailbox as its workspace's owner sees it: presence and delivery counts.

    pending: unacked rows (queued + delivered + failed); deferred: the queued
    ones held until a later time; dead_lettered: dead letters still kept
    (until the retention sweep). oldest_unacked_*: the oldest pending row
    (null when none). last_seq / acked_seq: the highest seq allocated and the
    cumulative ack mark.
    """

    agent_id: str
    agent_name: str
    status: str
    last_seen: str | None
    pending: int
    queued: int
    delivered: int
    failed: int
    deferred: int
    dead_lettered: int
    oldest_unacked_at: str | None
    oldest_unacked_age_ms: int | None
    last_seq: int
    acked_seq: int


class UnreadChannel(msgspec.Struct, kw_only=True):
    channel_id: str
    channel_name: str
    unread_count: int


class InboxMention(msgspec.Struct, kw_only=True):
    id: str
    channel_name: str
    agent_name: str | None
    text: str
    created_at: str


class UnreadDm(msgspec.Struct, kw_only=True):
    conversation_id: str
    type: Literal["1:1", "group"]
    name: str | None
    # The author of the newest unread message (in a 1:1, the other agent).
    from_: str | None = msgspec.field(name="from")
    unread_count: int
    last_message: DmLastMessage | None


class InboxReaction(msgspec.Struct, kw_only=True):
    message_id: str
    channel_name: str | None
    conversation_id: str | None
    emoji: str
    agent_name: str
    created_at: str


class Inbox(msgspec.Struct, kw_only=True):
    """Relaycast `InboxResponse`."""

    unread_channels: list[UnreadChannel]
    mentions: list[InboxMention]
    unread_dms: list[UnreadDm]
    recent_reactions: list[InboxReaction]


class SearchResult(Message, kw_only=True):
    """A message found by search (Relaycast `SearchMessageResult` is a subset of it).

    relevance_score: the negated bm25 rank; higher is a better match.
    """

    relevance_score: float


# -- webhooks --------------------------------------------------------------------------


class SubscriptionFilter(msgspec.Struct, kw_only=True, omit_defaults=True,
                         forbid_unknown_fields=True):
    """Only events of this channel (by name) and/or that mention this agent (by name)."""

    channel: str | None = None
    mentions: str | None = None
