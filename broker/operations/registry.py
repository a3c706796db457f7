"""The operation table: every operation defined once, bound twice (REST and WebSocket).

An `Operation` names its input Struct (protocol.requests), who may call it
(an agent token, a workspace key, either, or nobody authenticated) and its
handler, an async function of the engine, the caller and the input. The HTTP
layer maps a route to an operation name; the gateway maps a request `type`
to the same name. A third binding (an MCP tool surface, say) is another map.

Handlers are transport-neutral: they translate the input into one engine
command (`engine.submit`) or one query (`engine.read`) and return a wire
object; the bindings encode it. A handler that returns None has nothing to
say (REST answers 204). Reads of messages, threads, reactions, receipts,
DMs, the inbox, search and the mailbox are per agent (what an agent may see
is decided by its memberships), so they take an agent token; a workspace
key may read the workspace's channels and agents.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

import msgspec

from broker.engine import (
    agents,
    channel_queries,
    channels,
    conversations,
    files,
    inbox,
    mailbox,
    messages,
    reactions,
    reads,
    search,
    threads,
    workspaces,
)
from broker.engine.engine import Engine
from broker.engine.errors import BrokerError
from broker.engine.history import page_limit
from broker.engine.lookups import agent_by_name
from broker.engine.workspaces import Principal
from protocol import files as pf
from protocol import objects as ob
from protocol import requests as rq
from protocol.objects import Message, iso
from protocol.responses import (
    DeliveredMessage,
    DeliveryItem,
    DmSent,
    PresenceInfo,
    WorkspaceFound,
    WorkspaceLookup,
)

I = TypeVar("I", bound=rq.Request)  # noqa: E741

Auth = Literal["agent", "workspace", "any", "none"]


@dataclass(frozen=True)
class Call:
    """What a binding knows about the call besides its input."""

    principal: Principal | None
    idempotency_key: str | None = None
    # Where the caller reached this daemon (scheme://host[:port]), for the
    # URLs that operations hand out (file upload and download URLs).
    base_url: str | None = None


@dataclass(frozen=True)
class Operation(Generic[I]):
    """One operation: its input, who may call it, its handler and what the handler returns.

    output: the type of the handler's result, as a type expression (a Struct,
    `list[...]`, a union, or None for "nothing to say"); an `Existing[T]` in
    a union is the answer of a create that found what it would have made.
    The bindings describe their answers from it (the OpenAPI document, a
    tool surface's result schema), so it is declared, not inferred.
    """

    name: str
    input: type[I]
    auth: Auth
    handler: Callable[[Engine, Call, I], Awaitable[Any]]
    output: Any


OPERATIONS: dict[str, Operation[Any]] = {}

T = TypeVar("T")


@dataclass(frozen=True)
class Existing(Generic[T]):
    """What a create operation returns when it found what it would have made.

    Nothing was written; REST answers 200 instead of the route's 201. Only
    operations that sockets do not expose return it (the gateway replies
    with handler results as they are).
    """

    value: T

Handler = Callable[[Engine, Call, I], Awaitable[Any]]


def operation(
    name: str, input: type[I], auth: Auth, *, output: Any
) -> Callable[[Handler[I]], Handler[I]]:
    """Register the decorated handler as operation `name`.

    output: what the handler returns (see `Operation.output`); required, so
    no operation goes undescribed.
    """

    def register(handler: Handler[I]) -> Handler[I]:
        if name in OPERATIONS:
            raise RuntimeError(f"operation {name!r} registered twice")
        OPERATIONS[name] = Operation(name, input, auth, handler, output)
        return handler

    return register


def decode_input(op: Operation[I], fields: dict[str, Any]) -> I:
    """Convert merged wire fields to the operation's input; `invalid_request` names the field."""
    try:
        return msgspec.convert(fields, op.input, strict=False)
    except msgspec.ValidationError as exc:
        raise BrokerError("invalid_request", str(exc)) from None


async def invoke(engine: Engine, name: str, call: Call, fields: dict[str, Any]) -> Any:
    """Decode `fields` for operation `name` and run it (the caller checked auth)."""
    op = OPERATIONS[name]
    return await op.handler(engine, call, decode_input(op, fields))


def _agent(call: Call) -> tuple[int, int]:
    principal = call.principal
    if principal is None or principal.agent_id is None:
        raise BrokerError("forbidden", "this operation needs an agent token")
    return principal.workspace_id, principal.agent_id


def _workspace(call: Call) -> int:
    if call.principal is None:
        raise BrokerError("unauthorized", "this operation needs a token")
    return call.principal.workspace_id


def _caller(call: Call) -> tuple[int, int | None]:
    """(workspace, agent or None for the workspace key)."""
    principal = call.principal
    if principal is None:
        raise BrokerError("unauthorized", "this operation needs a token")
    return principal.workspace_id, principal.agent_id


async def _agent_id(engine: Engine, workspace_id: int, name: str) -> int:
    """The id of the active agent called `name`. Raises agent_not_found."""
    return (await engine.read(agent_by_name, workspace_id, name)).id


# -- workspaces ------------------------------------------------------------------------


@operation("workspace.create", rq.CreateWorkspace, auth="none",
           output=ob.WorkspaceCreated | Existing[WorkspaceFound])
async def create_workspace(engine: Engine, call: Call, req: rq.CreateWorkspace) -> Any:
    """Create a workspace; with that workspace's own key, an existing one is found instead.

    The second form is what the SDK's `ensureWorkspace` relies on (200, no key
    in the answer, instead of 201 with the new key).
    """
    try:
        return await engine.submit(workspaces.CreateWorkspace(req.name))
    except BrokerError as exc:
        principal = call.principal
        if (exc.code != "workspace_already_exists" or principal is None
                or principal.agent_id is not None):
            raise
        found = await engine.read(workspaces.get_workspace, principal.workspace_id)
        if found.name != req.name:
            raise
        return Existing(WorkspaceFound(
            workspace_id=found.id, name=found.name, created_at=found.created_at))


@operation("workspace.lookup", rq.WorkspaceByName, auth="none", output=WorkspaceLookup)
async def lookup_workspace(engine: Engine, call: Call, req: rq.WorkspaceByName) -> Any:
    found = await engine.read(workspaces.workspace_by_name, req.name)
    return WorkspaceLookup(id=found.id, name=found.name, created_at=found.created_at)


@operation("workspace.get", rq.Empty, auth="any", output=ob.Workspace)
async def get_workspace(engine: Engine, call: Call, req: rq.Empty) -> Any:
    return await engine.read(workspaces.get_workspace, _workspace(call))


@operation("workspace.update", rq.UpdateWorkspace, auth="workspace", output=ob.Workspace)
async def update_workspace(engine: Engine, call: Call, req: rq.UpdateWorkspace) -> Any:
    return await engine.submit(workspaces.UpdateWorkspace(
        workspace_id=_workspace(call), name=req.name, system_prompt=req.system_prompt))


@operation("workspace.delete", rq.Empty, auth="workspace", output=ob.WorkspaceDeleted)
async def delete_workspace(engine: Engine, call: Call, req: rq.Empty) -> Any:
    return await engine.submit(workspaces.DeleteWorkspace(workspace_id=_workspace(call)))


# -- agents ----------------------------------------------------------------------------


@operation("agent.register", rq.RegisterAgent, auth="workspace", output=ob.AgentCreated)
async def register_agent(engine: Engine, call: Call, req: rq.RegisterAgent) -> Any:
    return await engine.submit(workspaces.RegisterAgent(
        workspace_id=_workspace(call), name=req.name, type=req.type, persona=req.persona,
        metadata=req.metadata))


@operation("agent.list", rq.ListAgents, auth="any", output=list[ob.Agent])
async def list_agents(engine: Engine, call: Call, req: rq.ListAgents) -> Any:
    return await engine.read(agents.list_agents, _workspace(call), req.status)


@operation("agent.get", rq.AgentByName, auth="any", output=ob.Agent)
async def get_agent(engine: Engine, call: Call, req: rq.AgentByName) -> Any:
    return await engine.read(agents.get_agent, _workspace(call), req.name)


@operation("agent.me", rq.Empty, auth="agent", output=ob.Agent)
async def agent_me(engine: Engine, call: Call, req: rq.Empty) -> Any:
    workspace_id, agent_id = _agent(call)
    return await engine.read(agents.get_self, workspace_id, agent_id)


@operation("agent.presence", rq.Empty, auth="any", output=list[PresenceInfo])
async def agent_presence(engine: Engine, call: Call, req: rq.Empty) -> Any:
    listed = await engine.read(agents.list_agents, _workspace(call), None)
    return [PresenceInfo(agent_id=a.id, agent_name=a.name, status=a.status,
                         last_seen=a.last_seen) for a in listed]


@operation("agent.update", rq.UpdateAgent, auth="workspace", output=ob.Agent)
async def update_agent(engine: Engine, call: Call, req: rq.UpdateAgent) -> Any:
    workspace_id = _workspace(call)
    return await engine.submit(agents.UpdateAgent(
        workspace_id=workspace_id, agent_id=await _agent_id(engine, workspace_id, req.name),
        persona=req.persona, metadata=req.metadata))


@operation("agent.rotate_token", rq.AgentByName, auth="workspace", output=ob.TokenRotated)
async def rotate_token(engine: Engine, call: Call, req: rq.AgentByName) -> Any:
    workspace_id = _workspace(call)
    return await engine.submit(agents.RotateToken(
        workspace_id=workspace_id, agent_id=await _agent_id(engine, workspace_id, req.name)))


@operation("agent.deactivate", rq.AgentByName, auth="workspace", output=ob.AgentDeactivated)
async def deactivate_agent(engine: Engine, call: Call, req: rq.AgentByName) -> Any:
    workspace_id = _workspace(call)
    return await engine.submit(agents.DeactivateAgent(
        workspace_id=workspace_id, agent_id=await _agent_id(engine, workspace_id, req.name)))


@operation("agent.heartbeat", rq.Empty, auth="agent", output=ob.AgentStatusChanged)
async def heartbeat(engine: Engine, call: Call, req: rq.Empty) -> Any:
    workspace_id, agent_id = _agent(call)
    return await engine.submit(agents.SetAgentStatus(
        workspace_id=workspace_id, agent_id=agent_id, status="online"))


@operation("agent.disconnect", rq.Empty, auth="agent", output=ob.AgentStatusChanged)
async def disconnect(engine: Engine, call: Call, req: rq.Empty) -> Any:
    workspace_id, agent_id = _agent(call)
    return await engine.submit(agents.SetAgentStatus(
        workspace_id=workspace_id, agent_id=agent_id, status="offline"))


# -- channels --------------------------------------------------------------------------


@operation("channel.create", rq.CreateChannel, auth="any", output=ob.Channel)
async def create_channel(engine: Engine, call: Call, req: rq.CreateChannel) -> Any:
    workspace_id, agent_id = _caller(call)
    return await engine.submit(channels.CreateChannel(
        workspace_id=workspace_id, agent_id=agent_id, name=req.name,
        topic=req.topic, metadata=req.metadata))


@operation("channel.list", rq.ListChannels, auth="any", output=list[ob.Channel])
async def list_channels(engine: Engine, call: Call, req: rq.ListChannels) -> Any:
    return await engine.read(channel_queries.list_channels, _workspace(call), req.include_archived)


@operation("channel.get", rq.ChannelRef, auth="any", output=ob.Channel)
async def get_channel(engine: Engine, call: Call, req: rq.ChannelRef) -> Any:
    return await engine.read(channel_queries.get_channel, _workspace(call), req.channel)


@operation("channel.members", rq.ChannelRef, auth="any", output=list[ob.ChannelMember])
async def channel_members(engine: Engine, call: Call, req: rq.ChannelRef) -> Any:
    return await engine.read(channel_queries.channel_members, _workspace(call), req.channel)


@operation("channel.join", rq.JoinChannel, auth="agent", output=channels.JoinResult)
async def join_channel(engine: Engine, call: Call, req: rq.JoinChannel) -> Any:
    workspace_id, agent_id = _agent(call)
    return await engine.submit(channels.JoinChannel(
        workspace_id=workspace_id, agent_id=agent_id, channel=req.channel))


@operation("channel.leave", rq.ChannelRef, auth="agent", output=ob.LeaveResult)
async def leave_channel(engine: Engine, call: Call, req: rq.ChannelRef) -> Any:
    workspace_id, agent_id = _agent(call)
    return await engine.submit(channels.LeaveChannel(
        workspace_id=workspace_id, agent_id=agent_id, channel=req.channel))


@operation("channel.invite", rq.InviteToChannel, auth="any", output=ob.InviteResult)
async def invite_to_channel(engine: Engine, call: Call, req: rq.InviteToChannel) -> Any:
    workspace_id, agent_id = _caller(call)
    return await engine.submit(channels.InviteToChannel(
        workspace_id=workspace_id, agent_id=agent_id, channel=req.channel,
        agent_name=req.agent_name))


@operation("channel.update", rq.UpdateChannel, auth="any", output=ob.Channel)
async def update_channel(engine: Engine, call: Call, req: rq.UpdateChannel) -> Any:
    workspace_id, agent_id = _caller(call)
    return await engine.submit(channels.UpdateChannel(
        workspace_id=workspace_id, agent_id=agent_id, channel=req.channel, topic=req.topic,
        metadata=req.metadata))


@operation("channel.set_topic", rq.SetTopic, auth="any", output=ob.Channel)
async def set_topic(engine: Engine, call: Call, req: rq.SetTopic) -> Any:
    workspace_id, agent_id = _caller(call)
    return await engine.submit(channels.UpdateChannel(
        workspace_id=workspace_id, agent_id=agent_id, channel=req.channel, topic=req.topic))


@operation("channel.archive", rq.ChannelRef, auth="any", output=ob.Channel)
async def archive_channel(engine: Engine, call: Call, req: rq.ChannelRef) -> Any:
    workspace_id, agent_id = _caller(call)
    return await engine.submit(channels.ArchiveChannel(
        workspace_id=workspace_id, agent_id=agent_id, channel=req.channel))


@operation("channel.mute", rq.ChannelRef, auth="agent", output=ob.MuteResult)
async def mute_channel(engine: Engine, call: Call, req: rq.ChannelRef) -> Any:
    workspace_id, agent_id = _agent(call)
    return await engine.submit(channels.MuteChannel(
        workspace_id=workspace_id, agent_id=agent_id, channel=req.channel))


@operation("channel.unmute", rq.ChannelRef, auth="agent", output=ob.MuteResult)
async def unmute_channel(engine: Engine, call: Call, req: rq.ChannelRef) -> Any:
    workspace_id, agent_id = _agent(call)
    return await engine.submit(channels.UnmuteChannel(
        workspace_id=workspace_id, agent_id=agent_id, channel=req.channel))


@operation("channel.read_status", rq.ChannelRef, auth="agent",
           output=list[ob.ChannelReadStatus])
async def channel_read_status(engine: Engine, call: Call, req: rq.ChannelRef) -> Any:
    workspace_id, agent_id = _agent(call)
    return await engine.read(reads.channel_read_status, workspace_id, agent_id, req.channel)


# -- messages and threads ----------------------------------------------------------------


@operation("message.send", rq.SendMessage, auth="agent", output=Message)
async def send_message(engine: Engine, call: Call, req: rq.SendMessage) -> Any:
    workspace_id, agent_id = _agent(call)
    return await engine.submit(messages.SendChannelMessage(
        workspace_id=workspace_id, agent_id=agent_id, channel=req.channel, text=req.text,
        mode=req.mode, data=req.data, attachments=req.attachments,
        idempotency_key=call.idempotency_key))


@operation("message.list", rq.ListMessages, auth="agent", output=list[Message])
async def list_messages(engine: Engine, call: Call, req: rq.ListMessages) -> Any:
    workspace_id, agent_id = _agent(call)
    return await engine.read(channel_queries.channel_messages, workspace_id, agent_id,
                             req.channel, req.before, req.after, req.limit)


@operation("message.get", rq.MessageRef, auth="agent", output=Message)
async def get_message(engine: Engine, call: Call, req: rq.MessageRef) -> Any:
    workspace_id, agent_id = _agent(call)
    return await engine.read(channel_queries.get_message, workspace_id, agent_id, req.message_id)


@operation("thread.reply", rq.ReplyToThread, auth="agent", output=Message)
async def reply_to_thread(engine: Engine, call: Call, req: rq.ReplyToThread) -> Any:
    workspace_id, agent_id = _agent(call)
    return await engine.submit(threads.ReplyToThread(
        workspace_id=workspace_id, agent_id=agent_id, message_id=req.message_id, text=req.text,
        mode=req.mode, data=req.data, attachments=req.attachments,
        idempotency_key=call.idempotency_key))


@operation("thread.get", rq.GetThread, auth="agent", output=ob.Thread)
async def get_thread(engine: Engine, call: Call, req: rq.GetThread) -> Any:
    workspace_id, agent_id = _agent(call)
    return await engine.read(channel_queries.get_thread, workspace_id, agent_id, req.message_id,
                             req.before, req.after, req.limit)


@operation("message.read", rq.MessageRef, auth="agent", output=ob.ReadReceipt)
async def mark_read(engine: Engine, call: Call, req: rq.MessageRef) -> Any:
    workspace_id, agent_id = _agent(call)
    return await engine.submit(reads.MarkRead(
        workspace_id=workspace_id, agent_id=agent_id, message_id=req.message_id))


@operation("message.readers", rq.MessageRef, auth="agent", output=list[ob.ReaderInfo])
async def message_readers(engine: Engine, call: Call, req: rq.MessageRef) -> Any:
    workspace_id, agent_id = _agent(call)
    return await engine.read(reads.readers, workspace_id, agent_id, req.message_id)


# -- reactions ---------------------------------------------------------------------------


@operation("reaction.add", rq.Reaction, auth="agent", output=ob.AddedReaction)
async def add_reaction(engine: Engine, call: Call, req: rq.Reaction) -> Any:
    workspace_id, agent_id = _agent(call)
    return await engine.submit(reactions.AddReaction(
        workspace_id=workspace_id, agent_id=agent_id, message_id=req.message_id,
        emoji=req.emoji))


@operation("reaction.remove", rq.Reaction, auth="agent", output=None)
async def remove_reaction(engine: Engine, call: Call, req: rq.Reaction) -> Any:
    workspace_id, agent_id = _agent(call)
    return await engine.submit(reactions.RemoveReaction(
        workspace_id=workspace_id, agent_id=agent_id, message_id=req.message_id,
        emoji=req.emoji))


@operation("reaction.list", rq.MessageRef, auth="agent", output=list[ob.ReactionGroup])
async def list_reactions(engine: Engine, call: Call, req: rq.MessageRef) -> Any:
    workspace_id, agent_id = _agent(call)
    return await engine.read(reactions.list_reactions, workspace_id, agent_id, req.message_id)


# -- DMs and group DMs ---------------------------------------------------------------------


def _dm_sent(message: Message) -> DmSent:
    assert message.conversation_id is not None
    return DmSent(conversation_id=message.conversation_id, message=message,
                  created_at=message.created_at)


@operation("dm.send", rq.SendDm, auth="agent", output=DmSent)
async def send_dm(engine: Engine, call: Call, req: rq.SendDm) -> Any:
    workspace_id, agent_id = _agent(call)
    return _dm_sent(await engine.submit(conversations.SendDm(
        workspace_id=workspace_id, agent_id=agent_id, to=req.to, text=req.text, mode=req.mode,
        data=req.data, attachments=req.attachments, idempotency_key=call.idempotency_key)))


@operation("dm.conversations", rq.Empty, auth="agent", output=list[ob.DmConversationSummary])
async def dm_conversations(engine: Engine, call: Call, req: rq.Empty) -> Any:
    workspace_id, agent_id = _agent(call)
    return await engine.read(conversations.dm_conversations, workspace_id, agent_id)


@operation("dm.messages", rq.DmMessages, auth="agent", output=list[Message])
async def dm_messages(engine: Engine, call: Call, req: rq.DmMessages) -> Any:
    workspace_id, agent_id = _agent(call)
    return await engine.read(conversations.dm_messages, workspace_id, agent_id,
                             req.conversation_id, req.before, req.after, req.limit)


@operation("group_dm.create", rq.CreateGroupDm, auth="agent", output=ob.GroupDm)
async def create_group_dm(engine: Engine, call: Call, req: rq.CreateGroupDm) -> Any:
    workspace_id, agent_id = _agent(call)
    return await engine.submit(conversations.CreateGroupDm(
        workspace_id=workspace_id, agent_id=agent_id, participants=req.participants,
        name=req.name))


@operation("group_dm.send", rq.SendGroupDm, auth="agent", output=DmSent)
async def send_group_dm(engine: Engine, call: Call, req: rq.SendGroupDm) -> Any:
    workspace_id, agent_id = _agent(call)
    return _dm_sent(await engine.submit(conversations.SendGroupDm(
        workspace_id=workspace_id, agent_id=agent_id, conversation_id=req.conversation_id,
        text=req.text, mode=req.mode, data=req.data, attachments=req.attachments,
        idempotency_key=call.idempotency_key)))


@operation("group_dm.add_participant", rq.Participant, auth="agent", output=ob.ParticipantAdded)
async def add_participant(engine: Engine, call: Call, req: rq.Participant) -> Any:
    workspace_id, agent_id = _agent(call)
    return await engine.submit(conversations.AddParticipant(
        workspace_id=workspace_id, agent_id=agent_id, conversation_id=req.conversation_id,
        agent=req.agent_name))


@operation("group_dm.remove_participant", rq.Participant, auth="agent",
           output=ob.ParticipantRemoved)
async def remove_participant(engine: Engine, call: Call, req: rq.Participant) -> Any:
    workspace_id, agent_id = _agent(call)
    return await engine.submit(conversations.RemoveParticipant(
        workspace_id=workspace_id, agent_id=agent_id, conversation_id=req.conversation_id,
        agent=req.agent_name))


# -- inbox and search ------------------------------------------------------------------------


@operation("inbox.get", rq.Inbox, auth="agent", output=ob.Inbox)
async def get_inbox(engine: Engine, call: Call, req: rq.Inbox) -> Any:
    workspace_id, agent_id = _agent(call)
    return await engine.read(inbox.inbox, workspace_id, agent_id, req.limit)


@operation("search", rq.Search, auth="agent", output=list[ob.SearchResult])
async def search_messages(engine: Engine, call: Call, req: rq.Search) -> Any:
    workspace_id, agent_id = _agent(call)
    return await engine.read(search.search_messages, workspace_id, agent_id, req.q,
                             req.channel, req.from_, req.limit)


# -- the delivery mailbox -------------------------------------------------------------------

_payload_decoder = msgspec.json.Decoder(dict[str, Any])


def _delivery_item(pending: mailbox.PendingDelivery) -> DeliveryItem:
    message = None
    # Only an event whose data is the message itself carries one (not a notice about it).
    if pending.type in reads.MESSAGE_EVENTS:
        data = _payload_decoder.decode(pending.payload).get("data") or {}
        message = msgspec.convert(data, DeliveredMessage, strict=False)
    return DeliveryItem(
        id=pending.delivery_id, seq=pending.seq, agent_id=str(pending.agent_id),
        status=pending.state,
        type=pending.type,
        message_id=None if pending.message_id is None else str(pending.message_id),
        dispatch_attempts=pending.attempts, available_at=iso(pending.available_at),
        expires_at=iso(pending.expires_at) or "", created_at=iso(pending.created_at) or "",
        message=message, payload=pending.payload,
    )


@operation("delivery.list", rq.ListDeliveries, auth="agent", output=list[DeliveryItem])
async def list_deliveries(engine: Engine, call: Call, req: rq.ListDeliveries) -> Any:
    """The caller's deliveries: unacked ones in seq order, or final ones newest first.

    No status or an unacked one: the pending rows (of that state, paged
    through). acked or dead_lettered: those rows still kept (list_settled).
    Raises invalid_limit (1..mailbox.MAX_PAGE), invalid_seq, invalid_cursor (a
    malformed `before`, another agent's delivery, or a cursor of the other kind
    of list).
    """
    workspace_id, agent_id = _agent(call)
    if req.status in mailbox.SETTLED_STATES:
        if req.after_seq is not None:
            raise BrokerError("invalid_cursor", "acked and dead_lettered deliveries are listed "
                              "newest first: page them with before, not after_seq")
        return [_delivery_item(p) for p in await engine.read(
            mailbox.list_settled, workspace_id, agent_id, req.status, req.before, req.limit)]
    if req.before is not None:
        raise BrokerError("invalid_cursor", "unacked deliveries are listed in seq order: page "
                          "them with after_seq, not before")
    # Checked here too: the loop below would not run for a size of 0 or less.
    size = page_limit(req.limit, mailbox.DEFAULT_PAGE, mailbox.MAX_PAGE)
    items: list[DeliveryItem] = []
    after = req.after_seq
    while len(items) < size:
        page = await engine.read(mailbox.list_pending, workspace_id, agent_id, after, size)
        items.extend(_delivery_item(p) for p in page
                     if req.status is None or p.state == req.status)
        if len(page) < size or req.status is None:
            break
        after = page[-1].seq
    return items[:size]


@operation("delivery.ack_one", rq.DeliveryRef, auth="agent", output=ob.DeliveryTransition)
async def ack_delivery(engine: Engine, call: Call, req: rq.DeliveryRef) -> Any:
    workspace_id, agent_id = _agent(call)
    return await engine.submit(mailbox.AckDelivery(
        workspace_id=workspace_id, agent_id=agent_id, delivery_id=req.delivery_id))


@operation("delivery.ack_up_to", rq.AckUpTo, auth="agent", output=ob.AckResult)
async def ack_up_to(engine: Engine, call: Call, req: rq.AckUpTo) -> Any:
    workspace_id, agent_id = _agent(call)
    return await engine.submit(mailbox.AckUpTo(
        workspace_id=workspace_id, agent_id=agent_id, up_to_seq=req.up_to_seq))


@operation("delivery.fail", rq.FailDelivery, auth="agent", output=ob.DeliveryTransition)
async def fail_delivery(engine: Engine, call: Call, req: rq.FailDelivery) -> Any:
    workspace_id, agent_id = _agent(call)
    return await engine.submit(mailbox.FailDelivery(
        workspace_id=workspace_id, agent_id=agent_id, delivery_id=req.delivery_id,
        error=req.error, retryable=req.retryable))


def _epoch_ms(value: str, field: str) -> int:
    """An ISO 8601 time as milliseconds since the epoch (UTC when no offset is given)."""
    try:
        when = dt.datetime.fromisoformat(value.strip())
    except ValueError:
        raise BrokerError(f"invalid_{field}", f"{field} must be an ISO 8601 time") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp() * 1000)


@operation("delivery.defer", rq.DeferDelivery, auth="agent", output=ob.DeliveryTransition)
async def defer_delivery(engine: Engine, call: Call, req: rq.DeferDelivery) -> Any:
    workspace_id, agent_id = _agent(call)
    return await engine.submit(mailbox.DeferDelivery(
        workspace_id=workspace_id, agent_id=agent_id, delivery_id=req.delivery_id,
        until_ms=_epoch_ms(req.available_at, "available_at")))


# -- files -------------------------------------------------------------------------------


@operation("file.upload", pf.UploadFile, auth="agent", output=pf.UploadTicket)
async def upload_file(engine: Engine, call: Call, req: pf.UploadFile) -> Any:
    workspace_id, agent_id = _agent(call)
    return await engine.submit(files.CreateUpload(
        workspace_id=workspace_id, agent_id=agent_id, filename=req.filename,
        content_type=req.content_type, size_bytes=req.size_bytes, base_url=call.base_url))


@operation("file.complete", pf.FileRef, auth="agent", output=pf.UploadCompleted)
async def complete_file(engine: Engine, call: Call, req: pf.FileRef) -> Any:
    workspace_id, agent_id = _agent(call)
    return await engine.submit(files.CompleteUpload(
        workspace_id=workspace_id, agent_id=agent_id, file_id=req.file_id,
        base_url=call.base_url))


@operation("file.get", pf.FileRef, auth="any", output=pf.FileInfo)
async def get_file(engine: Engine, call: Call, req: pf.FileRef) -> Any:
    return await engine.read(files.get_file, _workspace(call), req.file_id, call.base_url,
                             engine.limits.file_url_ttl_seconds * 1000)


@operation("file.list", pf.ListFiles, auth="any", output=list[pf.FileInfo])
async def list_files(engine: Engine, call: Call, req: pf.ListFiles) -> Any:
    return await engine.read(files.list_files, _workspace(call), req.uploaded_by, req.limit,
                             req.before, call.base_url, engine.limits.file_url_ttl_seconds * 1000)


@operation("file.delete", pf.FileRef, auth="agent", output=None)
async def delete_file(engine: Engine, call: Call, req: pf.FileRef) -> Any:
    workspace_id, agent_id = _agent(call)
    return await engine.submit(files.DeleteFile(
        workspace_id=workspace_id, agent_id=agent_id, file_id=req.file_id))


# The webhook operations live with the webhook code; importing registers them
# (at the end: that module imports `operation` from this one).
from broker.webhooks import operations as _webhook_operations  # noqa: E402,F401
