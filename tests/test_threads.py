"""Thread replies: where they go, who receives them, the root's counters, and the thread read."""

from __future__ import annotations

from typing import Any

import msgspec

from broker.engine.channel_queries import get_message, get_thread
from broker.engine.channels import ArchiveChannel, MuteChannel
from broker.engine.engine import Engine
from broker.engine.errors import BrokerError
from broker.engine.threads import ReplyToThread
from tests.helpers.channels import (
    LeaveConversation,
    OpenConversation,
    PostInConversation,
    deliveries_of,
    expect_query_refused,
    expect_refused,
    new_channel,
    rows,
    send,
    snapshot,
)
from tests.helpers.engine import World, make_world


def reply(world: World, who: str, message_id: str, text: str = "a reply",
          **kw: Any) -> ReplyToThread:
    return ReplyToThread(workspace_id=world.workspace_id, agent_id=world.agents[who],
                         message_id=message_id, text=text, **kw)


async def test_reply_reaches_every_member_but_sender(engine: Engine, world: World) -> None:
    """A reply reaches every member but its sender."""
    root = await send(engine, world, "alice", "general", "root")
    replied = await engine.submit(reply(world, "bob", root, "on it"))
    assert (replied.thread_id, replied.channel_name, replied.agent_name) == (
        root, "general", "bob")
    got = await deliveries_of(engine, replied.id)
    assert got == sorted((world.agents[n], "thread.reply", "queued")
                         for n in ("alice", "carol", "dave"))
    stored = await rows(engine, "SELECT channel_id IS NOT NULL, thread_id FROM messages"
                        " WHERE id = ?", int(replied.id))
    assert stored == [(1, int(root))]
    payload = (await rows(engine, "SELECT payload FROM message_log WHERE message_id = ?"
                          " AND type = 'thread.reply'", int(replied.id)))[0][0]
    assert msgspec.json.decode(payload)["data"]["thread_id"] == root


async def test_reply_to_reply_joins_roots_thread(engine: Engine, world: World) -> None:
    """A reply to a reply joins the root's thread."""
    root = await send(engine, world, "alice", "general", "root")
    first = await engine.submit(reply(world, "bob", root, "first"))
    second = await engine.submit(reply(world, "carol", first.id, "second"))
    assert second.thread_id == root
    counters = await rows(engine, "SELECT id, reply_count, last_reply_at IS NOT NULL"
                          " FROM messages ORDER BY id")
    assert counters == [(int(root), 2, 1), (int(first.id), 0, 0), (int(second.id), 0, 0)]
    assert (await engine.read(get_message, world.workspace_id, world.agents["dave"],
                              root)).reply_count == 2


async def test_reply_reaches_muted_only_when_mentioned(engine: Engine, world: World) -> None:
    """Muted members get a reply only when mentioned."""
    await engine.submit(MuteChannel(workspace_id=world.workspace_id,
                                    agent_id=world.agents["dave"], channel="general"))
    root = await send(engine, world, "alice", "general", "root")
    plain = await engine.submit(reply(world, "bob", root, "plain"))
    mention = await engine.submit(reply(world, "bob", root, "cc @dave"))
    dave = world.agents["dave"]
    assert dave not in [a for a, _, _ in await deliveries_of(engine, plain.id)]
    assert dave in [a for a, _, _ in await deliveries_of(engine, mention.id)]


async def test_reply_in_dm_reaches_other_participant(engine: Engine, world: World) -> None:
    """Replies in a DM reach the other participant."""
    ws, alice, bob = world.workspace_id, world.agents["alice"], world.agents["bob"]
    dm = await engine.submit(OpenConversation(ws, "dm", (alice, bob)))
    root = await engine.submit(PostInConversation(ws, alice, dm, "psst"))
    replied = await engine.submit(reply(world, "bob", str(root), "yes?"))
    assert (replied.conversation_id, replied.channel_id, replied.thread_id) == (
        str(dm), None, str(root))
    assert await deliveries_of(engine, replied.id) == [(alice, "thread.reply", "queued")]
    back = await engine.submit(reply(world, "alice", replied.id, "this"))
    assert await deliveries_of(engine, back.id) == [(bob, "thread.reply", "queued")]
    thread = await engine.read(get_thread, ws, bob, str(root))
    assert [m.id for m in thread.replies] == [replied.id, back.id]
    assert thread.parent.reply_count == 2
    # Someone outside the conversation cannot see, so cannot reply.
    await expect_refused(engine, "message_not_found", reply(world, "carol", str(root)))


async def test_reply_in_group_dm_skips_those_who_left(engine: Engine, world: World) -> None:
    """Replies in a group DM skip those who left."""
    ws = world.workspace_id
    a, b, c, d = (world.agents[n] for n in ("alice", "bob", "carol", "dave"))
    group = await engine.submit(OpenConversation(ws, "group", (a, b, c, d)))
    root = await engine.submit(PostInConversation(ws, a, group, "team"))
    await engine.submit(LeaveConversation(group, d))
    replied = await engine.submit(reply(world, "bob", str(root)))
    assert [x for x, _, _ in await deliveries_of(engine, replied.id)] == sorted([a, c])
    await expect_refused(engine, "message_not_found", reply(world, "dave", str(root)))
    await expect_query_refused(engine, "message_not_found", get_thread, ws, d, str(root),
                               None, None, None)


async def test_reply_never_reaches_its_sender(engine: Engine, world: World) -> None:
    """The sender never gets its own reply."""
    root = await send(engine, world, "alice", "general", "root")
    own = await engine.submit(reply(world, "alice", root, "replying to myself @alice"))
    assert world.agents["alice"] not in [a for a, _, _ in await deliveries_of(engine, own.id)]


async def test_thread_pages_oldest_first(engine: Engine, world: World) -> None:
    ws, bob = world.workspace_id, world.agents["bob"]
    root = await send(engine, world, "alice", "general", "root")
    ids = [(await engine.submit(reply(world, "carol", root, f"r{i}"))).id for i in range(5)]

    async def page(of: str = root, **kw: Any) -> tuple[str, list[str]]:
        thread = await engine.read(get_thread, ws, bob, of, kw.get("before"), kw.get("after"),
                                   kw.get("limit"))
        return thread.parent.id, [m.id for m in thread.replies]

    assert await page() == (root, ids)
    assert await page(ids[3]) == (root, ids)  # asked through a reply: the same thread
    assert await page(limit=2) == (root, ids[:2])
    assert await page(after=ids[1], limit=2) == (root, ids[2:4])
    assert await page(before=ids[3], limit=2) == (root, ids[1:3])
    assert await page(after=ids[0], before=ids[3]) == (root, ids[1:3])
    for limit in (0, 101):
        await expect_query_refused(engine, "invalid_limit", get_thread, ws, bob, root,
                                   None, None, limit)


async def test_reply_validation_refuses_and_writes_nothing(engine: Engine, world: World) -> None:
    root = await send(engine, world, "alice", "general", "root")
    await expect_refused(engine, "invalid_text", reply(world, "bob", root, ""))
    await expect_refused(engine, "text_too_long", reply(world, "bob", root, "é" * 16_385))
    await expect_refused(engine, "invalid_mode", reply(world, "bob", root, mode="now"))
    await expect_refused(engine, "invalid_data", reply(world, "bob", root, data=[1]))
    await expect_refused(engine, "data_too_large",
                         reply(world, "bob", root, data={"k": "x" * 70_000}))
    await expect_refused(engine, "message_not_found", reply(world, "bob", "999"))
    await expect_refused(engine, "message_not_found", reply(world, "bob", "not-an-id"))
    await expect_refused(engine, "file_not_found", reply(world, "bob", root, attachments=["1"]))
    # The limit is exact: 32 KiB of UTF-8 is still accepted.
    assert (await engine.submit(reply(world, "bob", root, "x" * 32 * 1024))).id


async def test_reply_refused_to_non_member(engine: Engine, world: World) -> None:
    """A non-member cannot see, so cannot reply."""
    await new_channel(engine, world, "alice", "ops")
    root = await send(engine, world, "alice", "ops", "root")
    await expect_refused(engine, "message_not_found", reply(world, "bob", root))


async def test_reply_refused_in_archived_channel(engine: Engine, world: World) -> None:
    """An archived channel refuses replies."""
    await new_channel(engine, world, "alice", "ops", ("bob",))
    root = await send(engine, world, "alice", "ops", "root")
    await engine.submit(ArchiveChannel(workspace_id=world.workspace_id, agent_id=None,
                                       channel="ops"))
    await expect_refused(engine, "channel_archived", reply(world, "bob", root))


async def test_reply_replayed_returns_first(
    engine: Engine, world: World
) -> None:
    """A replayed reply returns the first and writes nothing."""
    root = await send(engine, world, "alice", "general", "root")
    first = await engine.submit(reply(world, "bob", root, "once", idempotency_key="k1"))
    before = await engine.read(snapshot)
    again = await engine.submit(reply(world, "bob", root, "once", idempotency_key="k1"))
    assert again.id == first.id
    assert await engine.read(snapshot) == before
    error = await expect_refused(engine, "idempotency_key_reused",
                                 reply(world, "bob", root, "twice", idempotency_key="k1"))
    assert isinstance(error, BrokerError)


async def test_threads_never_reach_another_workspace(engine: Engine, world: World) -> None:
    other = await make_world(engine, "other", ("zed", "yan"))
    theirs = await send(engine, other, "zed", "general", "theirs")
    await engine.submit(reply(other, "yan", theirs))
    ws, alice = world.workspace_id, world.agents["alice"]
    await expect_refused(engine, "message_not_found", reply(world, "alice", theirs))
    # An agent of A presented with B's workspace id is not found there.
    await expect_refused(engine, "agent_not_found", ReplyToThread(
        workspace_id=other.workspace_id, agent_id=alice, message_id=theirs, text="x"))
    await expect_query_refused(engine, "message_not_found", get_thread, ws, alice, theirs,
                               None, None, None)
    await expect_query_refused(engine, "message_not_found", get_message, ws, alice, theirs)
    await expect_query_refused(engine, "message_not_found", get_thread,
                               other.workspace_id, alice, theirs, None, None, None)
