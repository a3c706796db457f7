"""The reads a batch of sends shares (Tx.read_once): made once, never older than a
write that could change them."""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import apsw
import trio

import broker.engine
from broker.engine.agents import DeactivateAgent
from broker.engine.channels import (
    ArchiveChannel,
    CreateChannel,
    JoinChannel,
    LeaveChannel,
    MuteChannel,
)
from broker.engine.config import Limits
from broker.engine.conversations import CreateGroupDm, SendDm, SendGroupDm
from broker.engine.engine import Engine
from broker.engine.errors import BrokerError
from broker.engine.mailbox import AckUpTo, AgentReceipts, MarkDelivered, RecordReceipts
from broker.engine.messages import CheckedSend, Send, SendChannelMessage
from broker.engine.threads import ReplyToThread
from broker.engine.webhooks import CreateSubscription, DeleteSubscription
from protocol.objects import Message
from tests.helpers.engine import World, hold_writer, wait_queued

# The statements of a channel send that read who is where.
TOPOLOGY_READS = ("FROM agents WHERE id = ?", "coalesce(m.muted, 0) FROM channels c",
                  "FROM channel_members m")


def send(world: World, sender: str, text: str, channel: str = "room") -> SendChannelMessage:
    return SendChannelMessage(workspace_id=world.workspace_id, agent_id=world.agents[sender],
                              channel=channel, text=text)


async def room(engine: Engine, world: World, *members: str) -> None:
    """Channel `room`, created by alice, with `members` joined."""
    wid = world.workspace_id
    await engine.submit(CreateChannel(workspace_id=wid, agent_id=world.agents["alice"],
                                      name="room"))
    for name in members:
        await engine.submit(JoinChannel(workspace_id=wid, agent_id=world.agents[name],
                                        channel="room"))


async def one_batch(engine: Engine, commands: list[Any]) -> list[Any]:
    """Apply `commands` in this order in one batch; each one's result or BrokerError."""
    results: list[Any] = [None] * len(commands)

    async def submit(i: int, command: Any) -> None:
        try:
            results[i] = await engine.submit(command)
        except BrokerError as exc:
            results[i] = exc

    before = engine.writer.statistics().batches
    async with trio.open_nursery() as nursery:
        release = await hold_writer(engine, nursery)
        for i, command in enumerate(commands):
            nursery.start_soon(submit, i, command)
            await wait_queued(engine, i + 1)  # one at a time: the queue keeps this order
        release.set()
    assert engine.writer.statistics().batches == before + 2  # the gate's, then these
    return results


@contextmanager
def tracing(engine: Engine) -> Iterator[list[str]]:
    """Every statement the writer runs meanwhile, in order."""
    statements: list[str] = []

    def trace(cursor: apsw.Cursor, sql: str, bindings: Any) -> bool:
        statements.append(sql)
        return True

    engine.writer.connection.exec_trace = trace
    try:
        yield statements
    finally:
        engine.writer.connection.exec_trace = None


async def recipients(engine: Engine, message: Message) -> set[int]:
    rows = await engine.read(lambda c: c.execute(
        "SELECT agent_id FROM deliveries WHERE message_id = ?", (int(message.id),)).fetchall())
    return {r[0] for r in rows}


async def test_a_batch_of_sends_reads_the_channel_once(engine: Engine, world: World) -> None:
    await room(engine, world, "bob", "carol")
    with tracing(engine) as statements:
        sent = await one_batch(engine, [send(world, "alice", f"m{i}") for i in range(20)])
    for read in TOPOLOGY_READS:
        assert sum(read in sql for sql in statements) == 1, read
    assert all(isinstance(m, Message) for m in sent)
    expected = {world.agents["bob"], world.agents["carol"]}
    for message in sent:
        assert await recipients(engine, message) == expected
    # every recipient has all 20, in order, without a gap
    for name in ("bob", "carol"):
        seqs = await engine.read(lambda c, a=world.agents[name]: c.execute(
            "SELECT d.seq, m.text FROM deliveries d JOIN messages m ON m.id = d.message_id"
            " WHERE d.agent_id = ? ORDER BY d.seq", (a,)).fetchall())
        assert [text for _, text in seqs] == [f"m{i}" for i in range(20)]
        assert [seq for seq, _ in seqs] == list(range(seqs[0][0], seqs[0][0] + 20))


async def test_membership_changes_inside_a_batch_are_seen(engine: Engine, world: World) -> None:
    """Each send of the batch delivers to the members as they are when it runs."""
    await room(engine, world, "bob")
    wid, ids = world.workspace_id, world.agents
    results = await one_batch(engine, [
        send(world, "alice", "before carol"),
        JoinChannel(workspace_id=wid, agent_id=ids["carol"], channel="room"),
        send(world, "alice", "after carol joined"),
        LeaveChannel(workspace_id=wid, agent_id=ids["bob"], channel="room"),
        send(world, "alice", "after bob left"),
        MuteChannel(workspace_id=wid, agent_id=ids["carol"], channel="room"),
        send(world, "alice", "carol muted"),
        send(world, "alice", "@carol muted but mentioned"),
        JoinChannel(workspace_id=wid, agent_id=ids["dave"], channel="room"),
        DeactivateAgent(workspace_id=wid, agent_id=ids["dave"]),
        send(world, "alice", "dave gone"),
    ])
    sent = [r for r in results if isinstance(r, Message)]
    assert [m.text for m in sent] == [
        "before carol", "after carol joined", "after bob left", "carol muted",
        "@carol muted but mentioned", "dave gone"]
    assert [await recipients(engine, m) for m in sent] == [
        {ids["bob"]}, {ids["bob"], ids["carol"]}, {ids["carol"]}, set(), {ids["carol"]}, set()]


async def test_a_sender_who_left_or_went_inside_a_batch_is_refused(
    engine: Engine, world: World
) -> None:
    await room(engine, world, "bob", "carol")
    wid, ids = world.workspace_id, world.agents
    results = await one_batch(engine, [
        send(world, "bob", "still here"),
        LeaveChannel(workspace_id=wid, agent_id=ids["bob"], channel="room"),
        send(world, "bob", "left"),
        send(world, "carol", "still here"),
        DeactivateAgent(workspace_id=wid, agent_id=ids["carol"]),
        send(world, "carol", "gone"),
        send(world, "alice", "still open"),
        ArchiveChannel(workspace_id=wid, agent_id=ids["alice"], channel="room"),
        send(world, "alice", "archived"),
    ])
    codes = [r.code if isinstance(r, BrokerError) else type(r).__name__ for r in results]
    assert codes == ["Message", "LeaveResult", "not_a_member", "Message", "AgentDeactivated",
                     "agent_not_found", "Message", "Channel", "channel_archived"]
    texts = await engine.read(lambda c: [r[0] for r in c.execute(
        "SELECT text FROM messages ORDER BY id").fetchall()])
    assert texts == ["still here", "still here", "still open"]


async def test_receipts_and_thread_replies_keep_the_reads(engine: Engine, world: World) -> None:
    """Commands that change no membership keep what the batch read; a reply reads its own."""
    await room(engine, world, "bob")
    wid, ids = world.workspace_id, world.agents
    root = await engine.submit(send(world, "alice", "root"))
    with tracing(engine) as statements:
        results = await one_batch(engine, [
            send(world, "alice", "one"),
            AckUpTo(workspace_id=wid, agent_id=ids["bob"], up_to_seq=1),
            send(world, "alice", "two"),
            ReplyToThread(workspace_id=wid, agent_id=ids["bob"], message_id=root.id,
                          text="reply"),
            send(world, "alice", "three"),
        ])
    assert not any(isinstance(r, BrokerError) for r in results)
    assert sum(TOPOLOGY_READS[1] in sql for sql in statements) == 1
    assert sum("FROM channel_members m" in sql for sql in statements) == 2  # alice's, bob's reply
    assert await recipients(engine, results[3]) == {ids["alice"]}
    for i in (0, 2, 4):
        assert await recipients(engine, results[i]) == {ids["bob"]}


async def test_subscriptions_made_or_deleted_inside_a_batch_are_seen(
    engine: Engine, world: World
) -> None:
    """A batch's sends probe for subscriptions once, and again after one is made or deleted."""
    await room(engine, world, "bob")
    with tracing(engine) as statements:
        results = await one_batch(engine, [
            send(world, "alice", "nobody subscribed"),
            send(world, "alice", "still nobody"),
            CreateSubscription(workspace_id=world.workspace_id,
                               url="https://hooks.example.invalid/x", events=["*"]),
            send(world, "alice", "subscribed"),
        ])
    assert sum("FROM webhook_subscriptions WHERE workspace_id = ? AND active LIMIT 1" in sql
               for sql in statements) == 2  # the batch's first send, and after the create
    outbox = await engine.read(lambda c: c.execute(
        "SELECT o.type, json_extract(CAST(o.payload AS TEXT), '$.data.text') FROM outbox o"
        " ORDER BY o.id").fetchall())
    assert outbox == [("message.created", "subscribed")]
    # A deleted subscription: the probe runs again (a stale "subscribed" would
    # cost an INSERT that matches nothing; a stale "none" would lose rows).
    with tracing(engine) as statements:
        await one_batch(engine, [
            send(world, "alice", "one"),
            DeleteSubscription(workspace_id=world.workspace_id, subscription_id=results[2].id),
            send(world, "alice", "two"),
        ])
    probes = [sql for sql in statements
              if "FROM webhook_subscriptions WHERE workspace_id = ? AND active LIMIT 1" in sql]
    assert len(probes) == 2
    assert sum(sql.startswith("INSERT INTO outbox") for sql in statements) == 1  # "one"'s


class SendThenFail(SendChannelMessage, frozen=True, kw_only=True):
    """A send whose last statement fails after it wrote (a full disk, say)."""

    def apply_checked(self, tx: Any, checked: Any) -> Message:
        super().apply_checked(tx, checked)
        raise BrokerError("refused", "written, then refused")


async def test_a_replayed_batch_reads_again(engine: Engine, world: World) -> None:
    """A batch rolled back and replayed reads again: nothing read in the undone attempt is used.

    The undone attempt read the room with carol in it (the second send);
    the replay's first send comes before carol joins and must not see her.
    """
    await room(engine, world, "bob")
    wid, ids = world.workspace_id, world.agents
    replays = engine.writer.statistics().replays
    results = await one_batch(engine, [
        send(world, "alice", "before carol"),
        JoinChannel(workspace_id=wid, agent_id=ids["carol"], channel="room"),
        send(world, "alice", "after carol joined"),
        SendThenFail(workspace_id=wid, agent_id=ids["alice"], channel="room", text="undone"),
    ])
    assert engine.writer.statistics().replays == replays + 1
    assert isinstance(results[3], BrokerError) and results[3].code == "refused"
    assert await recipients(engine, results[0]) == {ids["bob"]}
    assert await recipients(engine, results[2]) == {ids["bob"], ids["carol"]}
    texts = await engine.read(lambda c: [r[0] for r in c.execute(
        "SELECT text FROM messages ORDER BY id").fetchall()])
    assert texts == ["before carol", "after carol joined"]


# A statement that changes what Tx.read_once remembers.
TOPOLOGY_WRITE = re.compile(
    r"^\s*(INSERT(\s+OR\s+\w+)?\s+INTO|REPLACE\s+INTO|UPDATE(\s+OR\s+\w+)?|DELETE\s+FROM)"
    r"\s+(agents|channels|channel_members|webhook_subscriptions)\b", re.IGNORECASE)


def _declared_keepers() -> set[type]:
    """Every command class of the engine that declares keeps_topology."""
    found: set[type] = set()
    for info in pkgutil.iter_modules(broker.engine.__path__, "broker.engine."):
        module = importlib.import_module(info.name)
        for value in vars(module).values():
            if isinstance(value, type) and value.__module__ == module.__name__ \
                    and getattr(value, "keeps_topology", False):
                found.add(value)
    return found


async def test_commands_that_keep_the_topology_write_none_of_it(
    engine: Engine, world: World
) -> None:
    """Each class declaring keeps_topology, run for real, writes no agent, channel, member
    or subscription row."""
    await room(engine, world, "bob", "carol")
    wid, ids = world.workspace_id, world.agents
    group = await engine.submit(CreateGroupDm(workspace_id=wid, agent_id=ids["alice"],
                                              participants=["bob", "carol"]))
    root = await engine.submit(send(world, "alice", "root"))
    commands: list[Any] = [
        send(world, "alice", "hello @bob"),
        ReplyToThread(workspace_id=wid, agent_id=ids["bob"], message_id=root.id, text="re"),
        SendDm(workspace_id=wid, agent_id=ids["alice"], to="dave", text="first dm"),
        SendGroupDm(workspace_id=wid, agent_id=ids["alice"], conversation_id=group.id,
                    text="group"),
        MarkDelivered(workspace_id=wid, agent_id=ids["bob"], seqs=[1, 2], pushed_at=0),
        RecordReceipts((AgentReceipts(workspace_id=wid, agent_id=ids["carol"], pushed=[1, 2],
                                      up_to_seq=2),)),
        AckUpTo(workspace_id=wid, agent_id=ids["bob"], up_to_seq=3),
    ]
    covered = {type(c) for c in commands} | {CheckedSend, Send}  # the base and its wrapper
    assert _declared_keepers() <= covered, "a command declares keeps_topology without a case here"
    for command in commands:
        with tracing(engine) as statements:
            result = await engine.submit(command)
        assert not isinstance(result, BrokerError)
        assert len(statements) > 2, type(command).__name__  # it did run
        writes = [sql for sql in statements if TOPOLOGY_WRITE.search(sql)]
        assert writes == [], type(command).__name__


def test_a_checked_send_keeps_the_topology_as_its_send_does() -> None:
    """The writer sees the wrapper `submit` makes (Send.prepare), not the send itself."""

    class Changing(SendChannelMessage, frozen=True, kw_only=True):
        keeps_topology = False

    kept = SendChannelMessage(workspace_id=1, agent_id=1, channel="room", text="x")
    changing = Changing(workspace_id=1, agent_id=1, channel="room", text="x")
    assert kept.prepare(Limits()).keeps_topology is True
    assert changing.prepare(Limits()).keeps_topology is False
