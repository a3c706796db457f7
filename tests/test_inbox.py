"""The inbox: unread counts per channel and conversation, unread mentions, recent reactions."""

from __future__ import annotations

from broker.engine.channels import CreateChannel, JoinChannel
from broker.engine.conversations import CreateGroupDm, SendDm, SendGroupDm
from broker.engine.engine import Engine
from broker.engine.inbox import inbox
from broker.engine.messages import SendChannelMessage
from broker.engine.reactions import AddReaction
from broker.engine.reads import MarkRead
from broker.engine.threads import ReplyToThread
from tests.helpers.engine import WallClock, World, query_refused


def post(world: World, sender: str, text: str, channel: str = "general") -> SendChannelMessage:
    return SendChannelMessage(workspace_id=world.workspace_id, agent_id=world.agents[sender],
                              channel=channel, text=text)


async def test_inbox_unread_channels_count_new_and_replies(
    engine: Engine, world: World
) -> None:
    """Unread channels count new messages and replies."""
    wid, a = world.workspace_id, world.agents
    first = await engine.submit(post(world, "alice", "one"))
    await engine.submit(post(world, "alice", "two"))
    await engine.submit(post(world, "bob", "bob's own"))
    await engine.submit(ReplyToThread(workspace_id=wid, agent_id=a["carol"],
                                      message_id=first.id, text="a reply"))
    box = await engine.read(inbox, wid, a["bob"])
    assert [(c.channel_name, c.unread_count) for c in box.unread_channels] == [("general", 3)]

    await engine.submit(MarkRead(workspace_id=wid, agent_id=a["bob"], message_id=first.id))
    box = await engine.read(inbox, wid, a["bob"])
    assert [c.unread_count for c in box.unread_channels] == [2]  # "two" and the reply


async def test_inbox_unread_starts_at_joining(engine: Engine, world: World) -> None:
    """Unread starts at joining."""
    wid, a = world.workspace_id, world.agents
    clock = engine.writer.clock = WallClock()
    await engine.submit(CreateChannel(workspace_id=wid, agent_id=a["alice"], name="ops"))
    await engine.submit(post(world, "alice", "before dave joined", "ops"))
    # The floor has millisecond resolution (joined_at); let the clock move on.
    clock.advance(0.005)
    await engine.submit(JoinChannel(workspace_id=wid, agent_id=a["dave"], channel="ops"))
    box = await engine.read(inbox, wid, a["dave"])
    assert [c.channel_name for c in box.unread_channels] == []
    await engine.submit(post(world, "alice", "after", "ops"))
    box = await engine.read(inbox, wid, a["dave"])
    assert [(c.channel_name, c.unread_count) for c in box.unread_channels] == [("ops", 1)]


async def test_inbox_unread_dms_and_groups(engine: Engine, world: World) -> None:
    """Unread DMs and groups."""
    wid, a = world.workspace_id, world.agents
    first = await engine.submit(SendDm(workspace_id=wid, agent_id=a["alice"], to="bob",
                                       text="dm one"))
    await engine.submit(SendDm(workspace_id=wid, agent_id=a["alice"], to="bob", text="dm two"))
    await engine.submit(SendDm(workspace_id=wid, agent_id=a["bob"], to="alice", text="reply"))
    group = await engine.submit(CreateGroupDm(workspace_id=wid, agent_id=a["carol"],
                                              participants=["bob", "dave"], name="g"))
    await engine.submit(SendGroupDm(workspace_id=wid, agent_id=a["dave"],
                                    conversation_id=group.id, text="group news"))
    box = await engine.read(inbox, wid, a["bob"])
    summary = [(d.type, d.name, d.from_, d.unread_count,
                d.last_message.text if d.last_message else None) for d in box.unread_dms]
    assert summary == [("group", "g", "dave", 1, "group news"),
                       ("1:1", None, "alice", 2, "dm two")]
    assert box.unread_dms[1].conversation_id == first.conversation_id

    await engine.submit(MarkRead(workspace_id=wid, agent_id=a["bob"], message_id=first.id))
    box = await engine.read(inbox, wid, a["bob"])
    assert [d.unread_count for d in box.unread_dms] == [1, 1]
    # Alice has bob's reply unread; carol nothing (her group is quiet for her but dave's post).
    alice = await engine.read(inbox, wid, a["alice"])
    assert [(d.from_, d.unread_count) for d in alice.unread_dms] == [("bob", 1)]


async def test_inbox_mentions_are_unread_in_my_channels(engine: Engine, world: World) -> None:
    """Mentions are unread mentions in my channels."""
    wid, a = world.workspace_id, world.agents
    await engine.submit(CreateChannel(workspace_id=wid, agent_id=a["alice"], name="private"))
    older = await engine.submit(post(world, "alice", "hey @bob look"))
    await engine.submit(post(world, "carol", "@bobby is someone else"))
    await engine.submit(post(world, "alice", "@bob in a channel bob is not in", "private"))
    await engine.submit(post(world, "bob", "talking to myself @bob"))
    newer = await engine.submit(post(world, "carol", "ping @bob."))
    box = await engine.read(inbox, wid, a["bob"])
    assert [(m.id, m.channel_name, m.agent_name) for m in box.mentions] == [
        (newer.id, "general", "carol"), (older.id, "general", "alice")]
    assert box.mentions[0].text == "ping @bob."

    one = await engine.read(inbox, wid, a["bob"], 1)
    assert [m.id for m in one.mentions] == [newer.id]
    await engine.submit(MarkRead(workspace_id=wid, agent_id=a["bob"], message_id=older.id))
    box = await engine.read(inbox, wid, a["bob"])
    assert [m.id for m in box.mentions] == [newer.id]
    await query_refused(engine, "invalid_limit", inbox, wid, a["bob"], 0)
    await query_refused(engine, "invalid_limit", inbox, wid, a["bob"], 101)


async def test_inbox_recent_reactions_to_my_messages(engine: Engine, world: World) -> None:
    """Recent reactions to my messages."""
    wid, a = world.workspace_id, world.agents
    mine = await engine.submit(post(world, "bob", "bob wrote this"))
    dm = await engine.submit(SendDm(workspace_id=wid, agent_id=a["bob"], to="alice",
                                    text="a dm by bob"))
    theirs = await engine.submit(post(world, "alice", "alice wrote this"))
    for agent, message, emoji in (("alice", mine, "eyes"), ("bob", mine, "self"),
                                  ("carol", theirs, "nope"), ("alice", dm, "ok")):
        await engine.submit(AddReaction(workspace_id=wid, agent_id=a[agent],
                                        message_id=message.id, emoji=emoji))
    box = await engine.read(inbox, wid, a["bob"])
    assert [(r.message_id, r.emoji, r.agent_name, r.channel_name, r.conversation_id)
            for r in box.recent_reactions] == [
        (dm.id, "ok", "alice", None, dm.conversation_id),
        (mine.id, "eyes", "alice", "general", None),
    ]
    await query_refused(engine, "agent_not_found", inbox, wid, a["bob"] + 999)
