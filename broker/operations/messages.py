"""Message operations: channel messages, thread replies, read receipts and reactions.

The writes are an agent's: what it may write or react to is decided by its
memberships. The reads take an agent token (the same rule) or the workspace
key, the workspace's owner, which reads every message of its workspace. The
sends carry the call's idempotency key into the command.
"""

from __future__ import annotations

from typing import Any

from broker.engine import channel_queries, messages, reactions, reads, threads
from broker.engine.engine import Engine
from broker.operations.registry import Call, agent_of, caller_of, operation
from protocol import objects as ob
from protocol import requests as rq
from protocol.objects import Message


@operation("message.send", rq.SendMessage, auth="agent", output=Message)
async def send_message(engine: Engine, call: Call, req: rq.SendMessage) -> Any:
    workspace_id, agent_id = agent_of(call)
    return await engine.submit(messages.SendChannelMessage(
        workspace_id=workspace_id, agent_id=agent_id, channel=req.channel, text=req.text,
        mode=req.mode, data=req.data, attachments=req.attachments,
        idempotency_key=call.idempotency_key))


@operation("message.list", rq.ListMessages, auth="any", output=list[Message])
async def list_messages(engine: Engine, call: Call, req: rq.ListMessages) -> Any:
    """A page of a channel's messages, newest first (an agent must be a member)."""
    workspace_id, agent_id = caller_of(call)
    return await engine.read(channel_queries.channel_messages, workspace_id, agent_id,
                             req.channel, req.before, req.after, req.limit)


@operation("message.get", rq.MessageRef, auth="any", output=Message)
async def get_message(engine: Engine, call: Call, req: rq.MessageRef) -> Any:
    """One message, of a channel or a conversation the caller may read."""
    workspace_id, agent_id = caller_of(call)
    return await engine.read(channel_queries.get_message, workspace_id, agent_id, req.message_id)


@operation("thread.reply", rq.ReplyToThread, auth="agent", output=Message)
async def reply_to_thread(engine: Engine, call: Call, req: rq.ReplyToThread) -> Any:
    workspace_id, agent_id = agent_of(call)
    return await engine.submit(threads.ReplyToThread(
        workspace_id=workspace_id, agent_id=agent_id, message_id=req.message_id, text=req.text,
        mode=req.mode, data=req.data, attachments=req.attachments,
        idempotency_key=call.idempotency_key))


@operation("thread.get", rq.GetThread, auth="any", output=ob.Thread)
async def get_thread(engine: Engine, call: Call, req: rq.GetThread) -> Any:
    """A thread: its root message and a page of its replies, oldest first."""
    workspace_id, agent_id = caller_of(call)
    return await engine.read(channel_queries.get_thread, workspace_id, agent_id, req.message_id,
                             req.before, req.after, req.limit)


@operation("message.read", rq.MessageRef, auth="agent", output=ob.ReadReceipt)
async def mark_read(engine: Engine, call: Call, req: rq.MessageRef) -> Any:
    workspace_id, agent_id = agent_of(call)
    return await engine.submit(reads.MarkRead(
        workspace_id=workspace_id, agent_id=agent_id, message_id=req.message_id))


@operation("message.readers", rq.MessageRef, auth="any", output=list[ob.ReaderInfo])
async def message_readers(engine: Engine, call: Call, req: rq.MessageRef) -> Any:
    """Who has read a message, first reader first."""
    workspace_id, agent_id = caller_of(call)
    return await engine.read(reads.readers, workspace_id, agent_id, req.message_id)


# -- reactions ---------------------------------------------------------------------------


@operation("reaction.add", rq.Reaction, auth="agent", output=ob.AddedReaction)
async def add_reaction(engine: Engine, call: Call, req: rq.Reaction) -> Any:
    workspace_id, agent_id = agent_of(call)
    return await engine.submit(reactions.AddReaction(
        workspace_id=workspace_id, agent_id=agent_id, message_id=req.message_id,
        emoji=req.emoji))


@operation("reaction.remove", rq.Reaction, auth="agent", output=None)
async def remove_reaction(engine: Engine, call: Call, req: rq.Reaction) -> Any:
    workspace_id, agent_id = agent_of(call)
    return await engine.submit(reactions.RemoveReaction(
        workspace_id=workspace_id, agent_id=agent_id, message_id=req.message_id,
        emoji=req.emoji))


@operation("reaction.list", rq.MessageRef, auth="any", output=list[ob.ReactionGroup])
async def list_reactions(engine: Engine, call: Call, req: rq.MessageRef) -> Any:
    """A message's reactions, grouped by emoji in order of first use."""
    workspace_id, agent_id = caller_of(call)
    return await engine.read(reactions.list_reactions, workspace_id, agent_id, req.message_id)
