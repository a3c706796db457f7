"""Channel operations: create, list, read, membership (join, leave, invite), topic, archive, mute.

Creating and changing a channel takes either token kind (`caller_of`: with
the workspace key there is no acting agent); joining, leaving, muting and
read status are the calling agent's own.
"""

from __future__ import annotations

from typing import Any

from broker.engine import channel_queries, channels, reads
from broker.engine.engine import Engine
from broker.operations.registry import Call, agent_of, caller_of, operation, workspace_of
from protocol import objects as ob
from protocol import requests as rq


@operation("channel.create", rq.CreateChannel, auth="any", output=ob.Channel)
async def create_channel(engine: Engine, call: Call, req: rq.CreateChannel) -> Any:
    workspace_id, agent_id = caller_of(call)
    return await engine.submit(channels.CreateChannel(
        workspace_id=workspace_id, agent_id=agent_id, name=req.name,
        topic=req.topic, metadata=req.metadata))


@operation("channel.list", rq.ListChannels, auth="any", output=list[ob.Channel])
async def list_channels(engine: Engine, call: Call, req: rq.ListChannels) -> Any:
    return await engine.read(channel_queries.list_channels, workspace_of(call),
                             req.include_archived)


@operation("channel.get", rq.ChannelRef, auth="any", output=ob.Channel)
async def get_channel(engine: Engine, call: Call, req: rq.ChannelRef) -> Any:
    return await engine.read(channel_queries.get_channel, workspace_of(call), req.channel)


@operation("channel.members", rq.ChannelRef, auth="any", output=list[ob.ChannelMember])
async def channel_members(engine: Engine, call: Call, req: rq.ChannelRef) -> Any:
    return await engine.read(channel_queries.channel_members, workspace_of(call), req.channel)


@operation("channel.join", rq.JoinChannel, auth="agent", output=channels.JoinResult)
async def join_channel(engine: Engine, call: Call, req: rq.JoinChannel) -> Any:
    workspace_id, agent_id = agent_of(call)
    return await engine.submit(channels.JoinChannel(
        workspace_id=workspace_id, agent_id=agent_id, channel=req.channel))


@operation("channel.leave", rq.ChannelRef, auth="agent", output=ob.LeaveResult)
async def leave_channel(engine: Engine, call: Call, req: rq.ChannelRef) -> Any:
    workspace_id, agent_id = agent_of(call)
    return await engine.submit(channels.LeaveChannel(
        workspace_id=workspace_id, agent_id=agent_id, channel=req.channel))


@operation("channel.invite", rq.InviteToChannel, auth="any", output=ob.InviteResult)
async def invite_to_channel(engine: Engine, call: Call, req: rq.InviteToChannel) -> Any:
    workspace_id, agent_id = caller_of(call)
    return await engine.submit(channels.InviteToChannel(
        workspace_id=workspace_id, agent_id=agent_id, channel=req.channel,
        agent_name=req.agent_name))


@operation("channel.update", rq.UpdateChannel, auth="any", output=ob.Channel)
async def update_channel(engine: Engine, call: Call, req: rq.UpdateChannel) -> Any:
    workspace_id, agent_id = caller_of(call)
    return await engine.submit(channels.UpdateChannel(
        workspace_id=workspace_id, agent_id=agent_id, channel=req.channel, topic=req.topic,
        metadata=req.metadata))


@operation("channel.set_topic", rq.SetTopic, auth="any", output=ob.Channel)
async def set_topic(engine: Engine, call: Call, req: rq.SetTopic) -> Any:
    workspace_id, agent_id = caller_of(call)
    return await engine.submit(channels.UpdateChannel(
        workspace_id=workspace_id, agent_id=agent_id, channel=req.channel, topic=req.topic))


@operation("channel.archive", rq.ChannelRef, auth="any", output=ob.Channel)
async def archive_channel(engine: Engine, call: Call, req: rq.ChannelRef) -> Any:
    workspace_id, agent_id = caller_of(call)
    return await engine.submit(channels.ArchiveChannel(
        workspace_id=workspace_id, agent_id=agent_id, channel=req.channel))


@operation("channel.mute", rq.ChannelRef, auth="agent", output=ob.MuteResult)
async def mute_channel(engine: Engine, call: Call, req: rq.ChannelRef) -> Any:
    workspace_id, agent_id = agent_of(call)
    return await engine.submit(channels.MuteChannel(
        workspace_id=workspace_id, agent_id=agent_id, channel=req.channel))


@operation("channel.unmute", rq.ChannelRef, auth="agent", output=ob.MuteResult)
async def unmute_channel(engine: Engine, call: Call, req: rq.ChannelRef) -> Any:
    workspace_id, agent_id = agent_of(call)
    return await engine.submit(channels.UnmuteChannel(
        workspace_id=workspace_id, agent_id=agent_id, channel=req.channel))


@operation("channel.read_status", rq.ChannelRef, auth="any",
           output=list[ob.ChannelReadStatus])
async def channel_read_status(engine: Engine, call: Call, req: rq.ChannelRef) -> Any:
    """Each member's last-read message in a channel (an agent must be a member)."""
    workspace_id, agent_id = caller_of(call)
    return await engine.read(reads.channel_read_status, workspace_id, agent_id, req.channel)
