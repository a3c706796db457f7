"""Conversation operations: DMs and group DMs (create, send, list, participants).

The writes are an agent's; the reads (the conversation list, a
conversation's messages) also take the workspace key, the workspace's
owner, which reads every conversation of its workspace.
"""

from __future__ import annotations

from typing import Any

from broker.engine import conversations
from broker.engine.engine import Engine
from broker.engine.errors import BrokerError
from broker.operations.registry import Call, agent_of, caller_of, operation
from protocol import objects as ob
from protocol import requests as rq
from protocol.objects import Message
from protocol.responses import DmSent


def _dm_sent(message: Message) -> DmSent:
    assert message.conversation_id is not None
    return DmSent(conversation_id=message.conversation_id, message=message,
                  created_at=message.created_at)


@operation("dm.send", rq.SendDm, auth="agent", output=DmSent)
async def send_dm(engine: Engine, call: Call, req: rq.SendDm) -> Any:
    workspace_id, agent_id = agent_of(call)
    return _dm_sent(await engine.submit(conversations.SendDm(
        workspace_id=workspace_id, agent_id=agent_id, to=req.to, text=req.text, mode=req.mode,
        data=req.data, attachments=req.attachments, idempotency_key=call.idempotency_key)))


@operation("dm.conversations", rq.ListConversations, auth="any",
           output=list[ob.DmConversationSummary])
async def dm_conversations(engine: Engine, call: Call, req: rq.ListConversations) -> Any:
    """DMs and group DMs, most recent activity first (the workspace key: all of the workspace).

    With the workspace key, `agent` keeps only that agent's conversations. Paged with
    `limit` and `before` (the last item's `last_message.id`, or its `id` when it has no
    message). Raises forbidden (`agent` with an agent token), agent_not_found,
    invalid_limit, invalid_cursor.
    """
    workspace_id, agent_id = caller_of(call)
    if agent_id is not None and req.agent is not None:
        raise BrokerError("forbidden", "only the workspace key lists another agent's "
                          "conversations (agent=...)")
    return await engine.read(conversations.dm_conversations, workspace_id, agent_id, req.agent,
                             req.before, req.limit)


@operation("dm.messages", rq.DmMessages, auth="any", output=list[Message])
async def dm_messages(engine: Engine, call: Call, req: rq.DmMessages) -> Any:
    """A page of a DM or group DM's messages, newest first (the workspace key: any of them)."""
    workspace_id, agent_id = caller_of(call)
    return await engine.read(conversations.dm_messages, workspace_id, agent_id,
                             req.conversation_id, req.before, req.after, req.limit)


@operation("group_dm.create", rq.CreateGroupDm, auth="agent", output=ob.GroupDm)
async def create_group_dm(engine: Engine, call: Call, req: rq.CreateGroupDm) -> Any:
    workspace_id, agent_id = agent_of(call)
    return await engine.submit(conversations.CreateGroupDm(
        workspace_id=workspace_id, agent_id=agent_id, participants=req.participants,
        name=req.name))


@operation("group_dm.send", rq.SendGroupDm, auth="agent", output=DmSent)
async def send_group_dm(engine: Engine, call: Call, req: rq.SendGroupDm) -> Any:
    workspace_id, agent_id = agent_of(call)
    return _dm_sent(await engine.submit(conversations.SendGroupDm(
        workspace_id=workspace_id, agent_id=agent_id, conversation_id=req.conversation_id,
        text=req.text, mode=req.mode, data=req.data, attachments=req.attachments,
        idempotency_key=call.idempotency_key)))


@operation("group_dm.add_participant", rq.Participant, auth="agent", output=ob.ParticipantAdded)
async def add_participant(engine: Engine, call: Call, req: rq.Participant) -> Any:
    workspace_id, agent_id = agent_of(call)
    return await engine.submit(conversations.AddParticipant(
        workspace_id=workspace_id, agent_id=agent_id, conversation_id=req.conversation_id,
        agent=req.agent_name))


@operation("group_dm.remove_participant", rq.Participant, auth="agent",
           output=ob.ParticipantRemoved)
async def remove_participant(engine: Engine, call: Call, req: rq.Participant) -> Any:
    workspace_id, agent_id = agent_of(call)
    return await engine.submit(conversations.RemoveParticipant(
        workspace_id=workspace_id, agent_id=agent_id, conversation_id=req.conversation_id,
        agent=req.agent_name))
