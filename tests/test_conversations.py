"""1:1 DMs and group DMs: the send paths, membership, and the conversation reads."""

from __future__ import annotations

import threading
from typing import Any

import msgspec
import pytest
import trio

from broker.engine import conversations
from broker.engine.conversations import (
    AddParticipant,
    CreateGroupDm,
    RemoveParticipant,
    SendDm,
    SendGroupDm,
    dm_conversations,
    dm_messages,
)
from broker.engine.engine import Engine
from broker.engine.reads import MarkRead
from tests.helpers.engine import Gate, NewIds, Sql, World, query_refused, refused


def dm(world: World, sender: str, to: str, text: str = "hi", **kw: Any) -> SendDm:
    return SendDm(workspace_id=world.workspace_id, agent_id=world.agents[sender], to=to,
                  text=text, **kw)


def gsend(world: World, sender: str, conversation_id: str, text: str = "hi",
          **kw: Any) -> SendGroupDm:
    return SendGroupDm(workspace_id=world.workspace_id, agent_id=world.agents[sender],
                       conversation_id=conversation_id, text=text, **kw)


def group(world: World, creator: str, *names: str, name: str | None = None) -> CreateGroupDm:
    return CreateGroupDm(workspace_id=world.workspace_id, agent_id=world.agents[creator],
                         participants=list(names), name=name)


async def deliveries_of(engine: Engine, agent_id: int) -> list[tuple[Any, ...]]:
    return await engine.read(lambda c: c.execute(
        "SELECT d.seq, d.message_id, l.type, d.state FROM deliveries d"
        " JOIN message_log l ON l.id = d.log_id WHERE d.agent_id = ? ORDER BY d.seq",
        (agent_id,)).fetchall())


# -- 1:1 DMs -------------------------------------------------------------------------


async def test_send_dm_first_creates_conversation(
    engine: Engine, world: World
) -> None:
    """The first DM creates the conversation in the same command."""
    alice, bob = world.agents["alice"], world.agents["bob"]
    sent = await engine.submit(dm(world, "bob", "alice", "hello alice"))
    assert sent.conversation_id is not None and sent.channel_id is None
    cid = int(sent.conversation_id)
    row = await engine.read(lambda c: c.execute(
        "SELECT kind, agent_lo, agent_hi, workspace_id FROM conversations WHERE id = ?",
        (cid,)).fetchone())
    assert row == ("dm", min(alice, bob), max(alice, bob), world.workspace_id)
    parts = await engine.read(lambda c: c.execute(
        "SELECT agent_id, left_at FROM conversation_participants WHERE conversation_id = ?"
        " ORDER BY agent_id", (cid,)).fetchall())
    assert parts == [(min(alice, bob), None), (max(alice, bob), None)]
    assert await deliveries_of(engine, alice) == [(1, int(sent.id), "dm.received", "queued")]
    assert await deliveries_of(engine, bob) == []  # the sender gets no delivery
    log = await engine.read(lambda c: c.execute(
        "SELECT type, conversation_id, agent_id, message_id FROM message_log").fetchall())
    assert log == [("dm.received", cid, bob, int(sent.id))]

    # Either direction reuses the one conversation.
    back = await engine.submit(dm(world, "alice", "bob", "hello bob"))
    again = await engine.submit(dm(world, "bob", "alice", "again"))
    assert back.conversation_id == again.conversation_id == sent.conversation_id
    count = await engine.read(lambda c: c.execute(
        "SELECT (SELECT count(*) FROM conversations), (SELECT count(*) FROM"
        " conversation_participants)").fetchone())
    assert count == (1, 2)
    assert [d[0] for d in await deliveries_of(engine, alice)] == [1, 2]


async def test_send_dm_validation_writes_nothing(engine: Engine, world: World) -> None:
    """DM validation codes write nothing."""
    limits = engine.limits
    cases: list[tuple[SendDm, str]] = [
        (dm(world, "alice", "alice"), "cannot_dm_self"),
        (dm(world, "alice", "nobody"), "agent_not_found"),
        (dm(world, "alice", "bob", ""), "invalid_text"),
        (dm(world, "alice", "bob", "x" * (limits.max_text_bytes + 1)), "text_too_long"),
        (dm(world, "alice", "bob", mode="shout"), "invalid_mode"),
        (dm(world, "alice", "bob", data=[1, 2]), "invalid_data"),
        (dm(world, "alice", "bob", data={"k": "x" * limits.max_data_bytes}), "data_too_large"),
        (dm(world, "alice", "bob", attachments=["123"]), "file_not_found"),
        (dm(world, "alice", "bob", attachments=["not-an-id"]), "file_not_found"),
        (dm(world, "alice", "bob", idempotency_key=""), "invalid_idempotency_key"),
        (SendDm(workspace_id=world.workspace_id, agent_id=world.agents["alice"] + 999, to="bob",
                text="x"), "agent_not_found"),
    ]
    for command, code in cases:
        await refused(engine, command, code)


async def test_send_dm_with_pending_file_refused(engine: Engine, world: World) -> None:
    """DM with a pending file is refused."""
    (file_id,) = await engine.submit(NewIds(1))
    await engine.submit(Sql(
        "INSERT INTO files(id, workspace_id, filename, content_type, size_bytes, state,"
        " created_at) VALUES (?,?,'a','text/plain',1,'pending',0)",
        (file_id, world.workspace_id)))
    await refused(engine, dm(world, "alice", "bob", attachments=[str(file_id)]),
                  "file_not_complete")
    await engine.submit(Sql("UPDATE files SET state = 'complete' WHERE id = ?", (file_id,)))
    sent = await engine.submit(dm(world, "alice", "bob", attachments=[str(file_id)]))
    assert [a.file_id for a in sent.attachments] == [str(file_id)]


async def test_send_dm_payload_is_the_message(engine: Engine, world: World) -> None:
    """DM payload is the message."""
    sent = await engine.submit(dm(world, "alice", "bob", "hi @carol", mode="steer",
                                  data={"x": 1}))
    payload = await engine.read(lambda c: c.execute(
        "SELECT payload FROM message_log").fetchone()[0])
    event = msgspec.json.decode(payload)
    assert event["type"] == "dm.received"
    assert event["data"]["id"] == sent.id
    assert event["data"]["conversation_id"] == sent.conversation_id
    assert (event["data"]["injection_mode"], event["data"]["data"]) == ("steer", {"x": 1})
    assert sent.mentions == ["carol"]


# -- group DMs -----------------------------------------------------------------------


async def test_create_group_dm_includes_the_creator(engine: Engine, world: World) -> None:
    created = await engine.submit(group(world, "alice", "bob", "carol", "bob", "alice",
                                        name="trio"))
    assert created.dm_type == "group" and created.name == "trio"
    assert [p.agent_name for p in created.participants] == ["alice", "bob", "carol"]
    assert created.created_by == str(world.agents["alice"])
    rows = await engine.read(lambda c: c.execute(
        "SELECT c.kind, c.name, count(p.agent_id) FROM conversations c"
        " JOIN conversation_participants p ON p.conversation_id = c.id"
        " WHERE c.id = ? AND p.left_at IS NULL", (int(created.id),)).fetchone())
    assert rows == ("group", "trio", 3)


async def test_create_group_dm_refusals(
    engine: Engine, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Group DM creation refusals."""
    await refused(engine, group(world, "alice"), "too_few_participants")
    await refused(engine, group(world, "alice", "bob"), "too_few_participants")
    await refused(engine, group(world, "alice", "bob", "alice", "bob"), "too_few_participants")
    await refused(engine, group(world, "alice", "bob", "nobody"), "agent_not_found")
    await refused(engine, group(world, "alice", "bob", "carol", name=" "),
                  "invalid_conversation_name")
    await refused(engine, group(world, "alice", "bob", "carol", name="n" * 81),
                  "invalid_conversation_name")
    monkeypatch.setattr(conversations, "MAX_GROUP_PARTICIPANTS", 3)
    await refused(engine, group(world, "alice", "bob", "carol", "dave"), "too_many_participants")
    assert len((await engine.submit(group(world, "alice", "bob", "carol"))).participants) == 3


async def test_group_send_reaches_other_active_participants(
    engine: Engine, world: World
) -> None:
    """A group send reaches every other active participant."""
    a = world.agents
    g = await engine.submit(group(world, "alice", "bob", "carol"))
    sent = await engine.submit(gsend(world, "bob", g.id, "hello group"))
    assert sent.conversation_id == g.id
    for name in ("alice", "carol"):
        assert await deliveries_of(engine, a[name]) == [
            (1, int(sent.id), "group_dm.received", "queued")]
    assert await deliveries_of(engine, a["bob"]) == []
    assert await deliveries_of(engine, a["dave"]) == []


async def test_group_send_refusals(engine: Engine, world: World) -> None:
    g = await engine.submit(group(world, "alice", "bob", "carol"))
    one = await engine.submit(dm(world, "alice", "bob"))
    assert one.conversation_id is not None
    await refused(engine, gsend(world, "dave", g.id), "not_a_participant")
    await refused(engine, gsend(world, "alice", one.conversation_id), "not_a_group_dm")
    await refused(engine, gsend(world, "alice", "12345"), "conversation_not_found")
    await refused(engine, gsend(world, "alice", "nope"), "conversation_not_found")
    await refused(engine, gsend(world, "alice", g.id, ""), "invalid_text")
    await refused(engine, gsend(world, "alice", g.id, mode="x"), "invalid_mode")
    await refused(engine, gsend(world, "alice", g.id, data={"k": "x" * 70_000}),
                  "data_too_large")
    await refused(engine, gsend(world, "alice", g.id, attachments=["1"]), "file_not_found")


async def test_add_and_remove_participants(engine: Engine, world: World) -> None:
    a, wid = world.agents, world.workspace_id
    g = await engine.submit(group(world, "alice", "bob", "carol"))
    added = await engine.submit(AddParticipant(workspace_id=wid, agent_id=a["bob"],
                                               conversation_id=g.id, agent="dave"))
    assert (added.agent, added.already_member) == ("dave", False)
    again = await engine.submit(AddParticipant(workspace_id=wid, agent_id=a["bob"],
                                               conversation_id=g.id, agent="dave"))
    assert again.already_member is True
    first = await engine.submit(gsend(world, "alice", g.id, "to four"))
    assert [d[1] for d in await deliveries_of(engine, a["dave"])] == [int(first.id)]

    removed = await engine.submit(RemoveParticipant(workspace_id=wid, agent_id=a["alice"],
                                                    conversation_id=g.id, agent="dave"))
    assert (removed.agent, removed.removed) == ("dave", True)
    left = await engine.read(lambda c: c.execute(
        "SELECT left_at IS NOT NULL FROM conversation_participants"
        " WHERE conversation_id = ? AND agent_id = ?", (int(g.id), a["dave"])).fetchone())
    assert left == (1,)  # soft: the row stays
    noop = await engine.submit(RemoveParticipant(workspace_id=wid, agent_id=a["alice"],
                                                 conversation_id=g.id, agent="dave"))
    assert noop.removed is False
    await engine.submit(gsend(world, "alice", g.id, "to three"))
    assert len(await deliveries_of(engine, a["dave"])) == 1
    await refused(engine, gsend(world, "dave", g.id), "not_a_participant")
    await query_refused(engine, "not_a_participant", dm_messages, wid, a["dave"], g.id)

    # Rejoining reuses the row; a participant may remove itself (leave).
    back = await engine.submit(AddParticipant(workspace_id=wid, agent_id=a["carol"],
                                              conversation_id=g.id, agent="dave"))
    assert back.already_member is False
    rows = await engine.read(lambda c: c.execute(
        "SELECT count(*), sum(left_at IS NULL) FROM conversation_participants"
        " WHERE conversation_id = ?", (int(g.id),)).fetchone())
    assert rows == (4, 4)
    await engine.submit(RemoveParticipant(workspace_id=wid, agent_id=a["carol"],
                                          conversation_id=g.id, agent="carol"))
    await refused(engine, AddParticipant(workspace_id=wid, agent_id=a["carol"],
                                         conversation_id=g.id, agent="carol"),
                  "not_a_participant")


async def test_participants_refusals(
    engine: Engine, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Membership refusals."""
    a, wid = world.agents, world.workspace_id
    g = await engine.submit(group(world, "alice", "bob", "carol"))
    one = await engine.submit(dm(world, "alice", "bob"))
    assert one.conversation_id is not None
    await refused(engine, AddParticipant(workspace_id=wid, agent_id=a["dave"],
                                         conversation_id=g.id, agent="dave"),
                  "not_a_participant")
    await refused(engine, RemoveParticipant(workspace_id=wid, agent_id=a["dave"],
                                            conversation_id=g.id, agent="bob"),
                  "not_a_participant")
    await refused(engine, AddParticipant(workspace_id=wid, agent_id=a["alice"],
                                         conversation_id=one.conversation_id, agent="dave"),
                  "not_a_group_dm")
    await refused(engine, RemoveParticipant(workspace_id=wid, agent_id=a["alice"],
                                            conversation_id=one.conversation_id, agent="bob"),
                  "not_a_group_dm")
    await refused(engine, AddParticipant(workspace_id=wid, agent_id=a["alice"],
                                         conversation_id=g.id, agent="nobody"),
                  "agent_not_found")
    await refused(engine, AddParticipant(workspace_id=wid, agent_id=a["alice"],
                                         conversation_id="999", agent="dave"),
                  "conversation_not_found")
    monkeypatch.setattr(conversations, "MAX_GROUP_PARTICIPANTS", 3)
    await refused(engine, AddParticipant(workspace_id=wid, agent_id=a["alice"],
                                         conversation_id=g.id, agent="dave"),
                  "too_many_participants")


# -- recipients at commit time ----------------------------------------------------------


async def test_dm_recipients_decided_at_commit_time(engine: Engine, world: World) -> None:
    """Recipients are decided at commit time."""
    a, wid = world.agents, world.workspace_id
    g = await engine.submit(group(world, "alice", "bob", "carol"))
    results: dict[str, Any] = {}
    entered, release = threading.Event(), threading.Event()

    async def run(key: str, command: Any) -> None:
        results[key] = await engine.submit(command)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(engine.submit, Gate(entered, release))
        await trio.to_thread.run_sync(entered.wait, 30)
        # Queued in this order behind the gate: remove bob, add dave, then send.
        nursery.start_soon(run, "remove", RemoveParticipant(
            workspace_id=wid, agent_id=a["alice"], conversation_id=g.id, agent="bob"))
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(run, "add", AddParticipant(
            workspace_id=wid, agent_id=a["alice"], conversation_id=g.id, agent="dave"))
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(run, "send", gsend(world, "alice", g.id, "who gets this"))
        await trio.testing.wait_all_tasks_blocked()
        release.set()
    sent = results["send"]
    got = await engine.read(lambda c: c.execute(
        "SELECT agent_id FROM deliveries WHERE message_id = ? ORDER BY agent_id",
        (int(sent.id),)).fetchall())
    assert got == sorted([(a["carol"],), (a["dave"],)])


# -- reads -------------------------------------------------------------------------------


async def test_dm_conversations_summaries(engine: Engine, world: World) -> None:
    a, wid = world.agents, world.workspace_id
    first = await engine.submit(dm(world, "alice", "bob", "one"))
    g = await engine.submit(group(world, "carol", "bob", "dave", name="g"))
    await engine.submit(dm(world, "alice", "bob", "two"))
    await engine.submit(dm(world, "bob", "alice", "mine"))
    empty = await engine.submit(group(world, "dave", "bob", "alice"))

    listed = await engine.read(dm_conversations, wid, a["bob"])
    assert [c.id for c in listed] == [empty.id, first.conversation_id, g.id]
    newest, one, grp = listed
    assert (newest.type, newest.last_message, newest.unread_count) == ("group", None, 0)
    assert one.type == "1:1" and one.name is None
    assert sorted(p.agent_name for p in one.participants) == ["alice", "bob"]
    assert one.last_message is not None and one.last_message.text == "mine"
    assert one.unread_count == 2  # "one" and "two"; bob's own "mine" does not count
    assert (grp.name, grp.unread_count) == ("g", 0)
    # Participants by joining time, then name.
    assert [p.agent_name for p in grp.participants] == ["bob", "carol", "dave"]

    # Reading moves the pointer: the unread count follows it.
    await engine.submit(MarkRead(workspace_id=wid, agent_id=a["bob"], message_id=first.id))
    listed = await engine.read(dm_conversations, wid, a["bob"])
    assert [c.unread_count for c in listed if c.id == first.conversation_id] == [1]
    assert await engine.read(dm_conversations, wid, a["alice"]) != []
    await query_refused(engine, "agent_not_found", dm_conversations, wid, a["bob"] + 999)


async def test_dm_messages_pages_newest_first(engine: Engine, world: World) -> None:
    a, wid = world.agents, world.workspace_id
    sent = [await engine.submit(dm(world, "alice" if i % 2 else "bob",
                                   "bob" if i % 2 else "alice", f"m{i}")) for i in range(7)]
    cid = sent[0].conversation_id
    assert cid is not None
    texts = [m.text for m in await engine.read(dm_messages, wid, a["alice"], cid)]
    assert texts == [f"m{i}" for i in reversed(range(7))]
    page = await engine.read(dm_messages, wid, a["alice"], cid, sent[5].id, None, 2)
    assert [m.text for m in page] == ["m4", "m3"]
    page = await engine.read(dm_messages, wid, a["alice"], cid, None, sent[1].id, 2)
    assert [m.text for m in page] == ["m3", "m2"]
    page = await engine.read(dm_messages, wid, a["bob"], cid, sent[5].id, sent[2].id, 10)
    assert [m.text for m in page] == ["m4", "m3"]
    await query_refused(engine, "invalid_limit", dm_messages, wid, a["alice"], cid, None, None, 0)
    await query_refused(engine, "invalid_limit", dm_messages, wid, a["alice"], cid, None, None,
                        101)
    await query_refused(engine, "invalid_cursor", dm_messages, wid, a["alice"], cid, "x")
    await query_refused(engine, "not_a_participant", dm_messages, wid, a["carol"], cid)
    await query_refused(engine, "conversation_not_found", dm_messages, wid, a["alice"], "42")
