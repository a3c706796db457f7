"""Conversation operations: DMs and group DMs (create, send, list, participants)."""

from __future__ import annotations

from typing import Any

from broker.engine import conversations
from broker.engine.engine import Engine
from broker.operations.registry import Call, agent_of, operation
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


@operation("dm.conversations", rq.Empty, auth="agent", output=list[ob.DmConversationSummary])
async def dm_conversations(engine: Engine, call: Call, req: rq.Empty) -> Any:
    workspace_id, agent_id = agent_of(call)
    return await engine.read(conversations.dm_conversations, workspace_id, agent_id)


@operation("dm.messages", rq.DmMessages, auth="agent", output=list[Message])
async def dm_messages(engine: Engine, call: Call, req: rq.DmMessages) -> Any:
    workspace_id, agent_id = agent_of(call)
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
