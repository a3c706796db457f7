"""Mark read (receipt + delivery ack + forward-only pointer), readers, channel read status."""

from __future__ import annotations

from typing import Any

import msgspec

from broker.engine.channels import ArchiveChannel
from broker.engine.engine import Engine
from broker.engine.reactions import AddReaction
from broker.engine.reads import MarkRead, channel_read_status, readers
from broker.engine.threads import ReplyToThread
from broker.engine.writer import Tx
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


def mark(world: World, who: str, message_id: str | int) -> MarkRead:
    return MarkRead(workspace_id=world.workspace_id, agent_id=world.agents[who],
                    message_id=str(message_id))


async def pending(engine: Engine, agent_id: int) -> int:
    return int((await rows(engine, "SELECT pending_count FROM mailboxes WHERE agent_id = ?",
                           agent_id))[0][0])


async def channel_pointer(engine: Engine, agent_id: int, channel: str = "general") -> Any:
    return (await rows(
        engine, "SELECT m.last_read_id, m.last_read_at IS NOT NULL FROM channel_members m"
        " JOIN channels c ON c.id = m.channel_id WHERE c.name = ? AND m.agent_id = ?",
        channel, agent_id))[0]


async def read_notices(engine: Engine, message_id: str | int) -> list[tuple[int, Any]]:
    return [
        (int(a), msgspec.json.decode(p)["data"])
        for a, p in await rows(
            engine, "SELECT d.agent_id, l.payload FROM deliveries d"
            " JOIN message_log l ON l.id = d.log_id"
            " WHERE d.message_id = ? AND l.type = 'message.read'", int(message_id))
    ]


async def test_mark_read_writes_receipt_acks_delivery_and_moves_pointer(
    engine: Engine, world: World
) -> None:
    bob = world.agents["bob"]
    message = await send(engine, world, "alice", "general", "read me")
    assert await pending(engine, bob) == 1
    receipt = await engine.submit(mark(world, "bob", message))
    assert (receipt.message_id, receipt.agent_id, receipt.already_read) == (
        message, str(bob), False)
    assert await rows(engine, "SELECT agent_id FROM read_receipts WHERE message_id = ?",
                      int(message)) == [(bob,)]
    states = {a: s for a, _, s in await deliveries_of(engine, message)}
    assert states[bob] == "acked"
    assert {s for a, s in states.items() if a != bob} == {"queued"}
    assert await rows(engine, "SELECT acked_at IS NOT NULL FROM deliveries WHERE agent_id = ?",
                      bob) == [(1,)]
    assert await pending(engine, bob) == 0
    assert await channel_pointer(engine, bob) == (int(message), 1)
    ((author, data),) = await read_notices(engine, message)
    assert author == world.agents["alice"]
    assert (data["agent_name"], data["message_id"], data["channel"]) == ("bob", message,
                                                                         "general")


async def test_mark_read_pointer_only_moves_forward(engine: Engine, world: World) -> None:
    """The pointer only moves forward."""
    bob = world.agents["bob"]
    older = await send(engine, world, "alice", "general", "older")
    newer = await send(engine, world, "alice", "general", "newer")
    await engine.submit(mark(world, "bob", newer))
    await engine.submit(mark(world, "bob", older))
    assert await channel_pointer(engine, bob) == (int(newer), 1)
    # Both were still read: two receipts, both deliveries acked.
    assert await rows(engine, "SELECT count(*) FROM read_receipts WHERE agent_id = ?",
                      bob) == [(2,)]
    assert await pending(engine, bob) == 0


async def test_mark_read_is_idempotent(engine: Engine, world: World) -> None:
    message = await send(engine, world, "alice", "general", "once")
    first = await engine.submit(mark(world, "bob", message))
    before = await engine.read(snapshot)
    again = await engine.submit(mark(world, "bob", message))
    assert again.already_read is True
    assert again.read_at == first.read_at
    assert await engine.read(snapshot) == before
    assert len(await read_notices(engine, message)) == 1


async def test_mark_read_own_message_tells_nobody(engine: Engine, world: World) -> None:
    """Reading one's own message tells nobody."""
    alice = world.agents["alice"]
    message = await send(engine, world, "alice", "general", "mine")
    await engine.submit(mark(world, "alice", message))
    assert await read_notices(engine, message) == []
    assert await channel_pointer(engine, alice) == (int(message), 1)


async def test_mark_read_acks_message_not_its_notices(
    engine: Engine, world: World
) -> None:
    """A read acks the message, not the notices about it."""
    alice = world.agents["alice"]
    message = await send(engine, world, "alice", "general", "react to me")
    await engine.submit(AddReaction(workspace_id=world.workspace_id, agent_id=world.agents["bob"],
                                    message_id=message, emoji="👍"))
    assert await pending(engine, alice) == 1
    await engine.submit(mark(world, "alice", message))
    mine = [(t, s) for a, t, s in await deliveries_of(engine, message) if a == alice]
    assert mine == [("message.reacted", "queued")]
    assert await pending(engine, alice) == 1


class FailDelivery(msgspec.Struct, frozen=True):
    """Test-only: put one agent's deliveries of a message in a given state."""

    agent_id: int
    message_id: int
    state: str

    def apply(self, tx: Tx) -> None:
        tx.conn.execute("UPDATE deliveries SET state = ? WHERE agent_id = ? AND message_id = ?",
                        (self.state, self.agent_id, self.message_id))


async def test_mark_read_acks_failed_leaves_dead_letters(
    engine: Engine, world: World
) -> None:
    """Failed deliveries are acked; dead letters are left."""
    bob, carol = world.agents["bob"], world.agents["carol"]
    message = await send(engine, world, "alice", "general", "x")
    await engine.submit(FailDelivery(bob, int(message), "failed"))
    await engine.submit(FailDelivery(carol, int(message), "dead_lettered"))
    await engine.submit(mark(world, "bob", message))
    await engine.submit(mark(world, "carol", message))
    states = {a: s for a, _, s in await deliveries_of(engine, message)}
    assert (states[bob], states[carol]) == ("acked", "dead_lettered")
    assert await pending(engine, bob) == 0
    # Only rows that changed count: carol's dead letter was not decremented here.
    assert await pending(engine, carol) == 1


async def test_mark_read_thread_reply_leaves_channel_pointer(
    engine: Engine, world: World
) -> None:
    """Reading a thread reply leaves the channel pointer."""
    bob = world.agents["bob"]
    root = await send(engine, world, "alice", "general", "root")
    await engine.submit(mark(world, "bob", root))
    unread = await send(engine, world, "carol", "general", "top-level, unread")
    replied = await engine.submit(ReplyToThread(
        workspace_id=world.workspace_id, agent_id=world.agents["alice"], message_id=root,
        text="reply"))
    await engine.submit(mark(world, "bob", replied.id))
    assert await channel_pointer(engine, bob) == (int(root), 1)
    assert [s for a, _, s in await deliveries_of(engine, replied.id) if a == bob] == ["acked"]
    assert [s for a, _, s in await deliveries_of(engine, unread) if a == bob] == ["queued"]


async def test_mark_read_in_a_dm_moves_the_conversation_pointer_forward_only(
    engine: Engine, world: World
) -> None:
    ws, alice, bob = world.workspace_id, world.agents["alice"], world.agents["bob"]
    dm = await engine.submit(OpenConversation(ws, "dm", (alice, bob)))
    older = await engine.submit(PostInConversation(ws, alice, dm, "one"))
    newer = await engine.submit(PostInConversation(ws, alice, dm, "two"))

    async def pointer() -> Any:
        return (await rows(engine, "SELECT last_read_id, last_read_at IS NOT NULL"
                           " FROM conversation_participants WHERE conversation_id = ?"
                           " AND agent_id = ?", dm, bob))[0]

    assert await pointer() == (None, 0)
    await engine.submit(mark(world, "bob", newer))
    await engine.submit(mark(world, "bob", older))
    assert await pointer() == (newer, 1)
    assert [s for a, _, s in await deliveries_of(engine, older) if a == bob] == ["acked"]
    assert await pending(engine, bob) == 0
    ((author, data),) = await read_notices(engine, newer)
    assert (author, data["conversation_id"]) == (alice, str(dm))
    before = await engine.read(snapshot)
    assert (await engine.submit(mark(world, "bob", newer))).already_read
    assert await engine.read(snapshot) == before


async def test_readers_and_channel_read_status(engine: Engine, world: World) -> None:
    ws, alice = world.workspace_id, world.agents["alice"]
    message = await send(engine, world, "alice", "general", "who read this?")
    await engine.submit(mark(world, "carol", message))
    await engine.submit(mark(world, "bob", message))
    got = await engine.read(readers, ws, alice, message)
    # First reader first (read_at has millisecond resolution; ties go by name).
    assert [(r.read_at, r.agent_name) for r in got] == sorted((r.read_at, r.agent_name)
                                                             for r in got)
    assert {r.agent_id for r in got} == {str(world.agents["bob"]), str(world.agents["carol"])}
    assert all(r.read_at for r in got)
    status = await engine.read(channel_read_status, ws, alice, "general")
    assert [(s.agent_name, s.last_read_id, s.last_read_at is not None) for s in status] == [
        ("alice", None, False), ("bob", message, True), ("carol", message, True),
        ("dave", None, False)]


async def test_mark_read_refusals_write_nothing(engine: Engine, world: World) -> None:
    """Read refusals write nothing."""
    ws, bob = world.workspace_id, world.agents["bob"]
    for missing in ("999", "not-an-id", ""):
        await expect_refused(engine, "message_not_found", mark(world, "bob", missing))
        await expect_query_refused(engine, "message_not_found", readers, ws, bob, missing)
    await new_channel(engine, world, "alice", "ops", ("carol",))
    hidden = await send(engine, world, "alice", "ops", "members only")
    await expect_refused(engine, "message_not_found", mark(world, "bob", hidden))
    await expect_query_refused(engine, "message_not_found", readers, ws, bob, hidden)
    await expect_query_refused(engine, "not_a_member", channel_read_status, ws, bob, "ops")
    await expect_query_refused(engine, "channel_not_found", channel_read_status, ws, bob, "nope")
    # Someone who left a group DM can no longer mark its messages read.
    group = await engine.submit(OpenConversation(ws, "group", (world.agents["alice"], bob,
                                                                 world.agents["carol"])))
    posted = await engine.submit(PostInConversation(ws, world.agents["alice"], group, "hi"))
    await engine.submit(LeaveConversation(group, bob))
    await expect_refused(engine, "message_not_found", mark(world, "bob", posted))
    # An archived channel's messages may still be marked read by members.
    await engine.submit(ArchiveChannel(workspace_id=ws, agent_id=None, channel="ops"))
    assert not (await engine.submit(mark(world, "carol", hidden))).already_read


async def test_reads_never_reach_another_workspace(engine: Engine, world: World) -> None:
    other = await make_world(engine, "other", ("zed", "yan"))
    theirs = await send(engine, other, "zed", "general", "theirs")
    await engine.submit(mark(other, "yan", theirs))
    ws, alice = world.workspace_id, world.agents["alice"]
    await expect_refused(engine, "message_not_found", mark(world, "alice", theirs))
    await expect_refused(engine, "agent_not_found", MarkRead(
        workspace_id=other.workspace_id, agent_id=alice, message_id=theirs))
    await expect_query_refused(engine, "message_not_found", readers, ws, alice, theirs)
    await expect_query_refused(engine, "agent_not_found", readers, other.workspace_id, alice,
                               theirs)
    await expect_query_refused(engine, "agent_not_found", channel_read_status,
                               other.workspace_id, alice, "general")
    # Workspace A's general shows A's members only.
    status = await engine.read(channel_read_status, ws, alice, "general")
    assert {s.agent_name for s in status} == {"alice", "bob", "carol", "dave"}
