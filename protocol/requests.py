"""Inputs of operations, as they arrive on the wire (REST body + path + query, or a WS request).

One Struct per operation; the REST binding merges path parameters, query
parameters and the JSON body into one object and converts it to this type,
and the WebSocket binding converts the request frame's fields the same way,
so both bindings share names, shapes and validation messages.

Names follow the Relaycast REST bodies and queries (`@relaycast/sdk@6.0.2`
sends snake_case): `text`, `to`, `agent_name`, `emoji`, `include_archived`,
`limit` / `before` / `after`. A path parameter has the name of the field it
fills (`channel`, `message_id`, `conversation_id`, `delivery_id`, `name`).
No input may use `v`, `type`, `id` or `idempotency_key` as a field of a
request that the WebSocket binding exposes: those belong to the frame
envelope (`RegisterAgent.type` is REST-only).

A field that may be left out to mean "keep as it is" is `UNSET` by default,
so `null` (clear it) and absent (keep it) stay distinct.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec
from msgspec import UNSET, UnsetType

from protocol.objects import SubscriptionFilter

Mode = Literal["wait", "steer"]


class Request(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    """Base of every operation input (unknown fields are ignored, as the SDK sends extras)."""


class Empty(Request):
    """An operation that takes nothing but its caller."""


class Page(Request):
    """History cursors: message ids (exclusive), and a page size."""

    before: str | None = None
    after: str | None = None
    limit: int | None = None


# -- workspaces --------------------------------------------------------------------------


class CreateWorkspace(Request):
    name: str


class WorkspaceByName(Request):
    name: str


class UpdateWorkspace(Request):
    name: str | UnsetType = UNSET
    system_prompt: str | None | UnsetType = UNSET


# -- agents ------------------------------------------------------------------------------


class RegisterAgent(Request):
    name: str
    type: Literal["agent", "human", "system"] = "agent"
    persona: str | None = None
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)


class ListAgents(Request):
    status: str | None = None


class AgentByName(Request):
    name: str


class UpdateAgent(Request):
    name: str
    status: Literal["online", "away", "offline"] | UnsetType = UNSET
    persona: str | None | UnsetType = UNSET
    metadata: dict[str, Any] | UnsetType = UNSET


# -- channels ----------------------------------------------------------------------------


class CreateChannel(Request):
    name: str
    topic: str | None = None
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)


class ListChannels(Request):
    include_archived: bool = False


class ChannelRef(Request):
    """An operation on one channel, named by `channel`."""

    channel: str


class JoinChannel(ChannelRef):
    pass


class UpdateChannel(ChannelRef):
    topic: str | None | UnsetType = UNSET
    metadata: dict[str, Any] | UnsetType = UNSET


class SetTopic(ChannelRef):
    topic: str | None


class InviteToChannel(ChannelRef):
    agent_name: str


# -- messages and threads -----------------------------------------------------------------


class SendMessage(Request):
    channel: str
    text: str
    mode: Mode = "wait"
    data: dict[str, Any] | None = None
    attachments: list[str] = msgspec.field(default_factory=list)


class ListMessages(Page, kw_only=True):
    channel: str


class MessageRef(Request):
    """An operation on one message, named by `message_id`."""

    message_id: str


class ReplyToThread(Request):
    message_id: str
    text: str
    mode: Mode = "wait"
    data: dict[str, Any] | None = None
    attachments: list[str] = msgspec.field(default_factory=list)


class GetThread(Page, kw_only=True):
    message_id: str


class Reaction(Request):
    message_id: str
    emoji: str


# -- DMs and group DMs ----------------------------------------------------------------------


class SendDm(Request):
    to: str
    text: str
    mode: Mode = "wait"
    data: dict[str, Any] | None = None
    attachments: list[str] = msgspec.field(default_factory=list)


class ListConversations(Request):
    """A page of conversations: `before` is an activity id (exclusive), no limit: all.

    agent: the workspace key's filter, only the conversations of this agent.
    """

    agent: str | None = None
    before: str | None = None
    limit: int | None = None


class DmMessages(Page, kw_only=True):
    conversation_id: str


class CreateGroupDm(Request):
    participants: list[str]
    name: str | None = None


class SendGroupDm(Request):
    conversation_id: str
    text: str
    mode: Mode = "wait"
    data: dict[str, Any] | None = None
    attachments: list[str] = msgspec.field(default_factory=list)


class Participant(Request):
    conversation_id: str
    agent_name: str


# -- inbox and search ------------------------------------------------------------------------


class Inbox(Request):
    limit: int | None = None


class Search(Request):
    q: str
    channel: str | None = None
    # The author's name; `from` on the wire.
    from_: str | None = msgspec.field(name="from", default=None)
    limit: int | None = None


# -- the delivery mailbox ----------------------------------------------------------------------


class ListDeliveries(Request):
    # No status, or an unacked one (queued, delivered, failed): the pending
    # rows in seq order, paged with after_seq. A final one (acked,
    # dead_lettered): those rows still kept, newest first, paged with
    # `before` (the id of the last delivery of the previous page).
    status: Literal["queued", "delivered", "acked", "failed", "dead_lettered"] | None = None
    limit: int | None = None
    after_seq: int | None = None
    before: str | None = None


class AgentDeliveries(ListDeliveries, kw_only=True):
    """The deliveries of the agent called `name` (the workspace key's read)."""

    name: str


class DeliveryRef(Request):
    delivery_id: str


class AckUpTo(Request):
    up_to_seq: int


class FailDelivery(Request):
    delivery_id: str
    error: str | None = None
    retryable: bool = True


class DeferDelivery(Request):
    delivery_id: str
    # ISO 8601 time (Relaycast `DeferDeliveryRequest`), e.g. "2025-01-01T12:00:00Z".
    available_at: str
    reason: str | None = None


# -- webhooks: outbound subscriptions and inbound hooks (workspace key) ------------------


class NewSubscription(Request):
    url: str
    events: list[str]
    filter: SubscriptionFilter | None = None
    headers: dict[str, str] | None = None
    secret: str | None = None


class SubscriptionRef(Request):
    subscription_id: str


class ListDeadLetters(Request):
    subscription_id: str
    limit: int | None = None
    before: str | None = None


class DeadLetterReplay(Request):
    # These dead letters (`ids`), or all of the subscription's when absent.
    subscription_id: str
    ids: list[str] | None = None


class NewInboundWebhook(Request):
    channel: str
    name: str | None = None


class InboundWebhookRef(Request):
    webhook_id: str


class InboundWebhookTrigger(Request):
    """Relaycast `WebhookTriggerRequest`, plus the hook's id and token."""

    webhook_id: str
    token: str | None = None
    text: str | None = None
    message: str | None = None
    source: str | None = None
    author: str | None = None
    payload: dict[str, Any] | None = None
    blocks: list[Any] | None = None
