"""Atomicity of the channel send, thread reply and mark read paths, by fault injection.

For each path: count the SQL statements the command runs (an exec tracer
that lets everything through), then, for every N, run the command with a
tracer that refuses its Nth statement (apsw raises ExecTraceAbort). After
each failure no row of any table has changed (message, attachments,
deliveries, log, receipts, pointers, mailboxes.last_seq / pending_count,
idempotency record, FTS index), and the same command without the fault
then succeeds and writes everything.

BEGIN / COMMIT / ROLLBACK are the writer's, not the command's, so they are
neither counted nor refused.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import apsw
import msgspec
import pytest

from broker.engine.engine import Engine
from broker.engine.messages import SendChannelMessage
from broker.engine.reads import MarkRead
from broker.engine.threads import ReplyToThread
from broker.engine.writer import Tx
from tests.helpers.channels import (
    OpenConversation,
    PostInConversation,
    deliveries_of,
    rows,
    send,
    snapshot,
)
from tests.helpers.engine import World

_WRITER_STATEMENTS = ("BEGIN", "COMMIT", "ROLLBACK")


class Fault:
    """An apsw exec tracer: counts the statements it sees and refuses the `fail_at`th."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.fail_at = fail_at
        self.seen = 0
        self.fired = False

    def __call__(self, cursor: apsw.Cursor, sql: str, bindings: Any) -> bool:
        if sql.lstrip().upper().startswith(_WRITER_STATEMENTS):
            return True
        self.seen += 1
        if self.seen == self.fail_at:
            self.fired = True
            return False
        return True


async def traced(engine: Engine, tracer: Fault, command: Any) -> Any:
    """Submit `command` with `tracer` on the write connection (the writer is idle meanwhile)."""
    conn = engine.writer.connection
    conn.exec_trace = tracer
    try:
        return await engine.submit(command)
    finally:
        conn.exec_trace = None


class CreateFile(msgspec.Struct, frozen=True):
    """Test-only: a completely uploaded file to attach."""

    workspace_id: int

    def apply(self, tx: Tx) -> str:
        file_id = tx.new_id()
        tx.conn.execute(
            "INSERT INTO files(id, workspace_id, filename, content_type, size_bytes, state,"
            " created_at, completed_at) VALUES (?,?,'a.txt','text/plain',3,'complete',?,?)",
            (file_id, self.workspace_id, tx.now_ms, tx.now_ms),
        )
        return str(file_id)


async def assert_atomic(
    engine: Engine,
    prepare: Callable[[], Awaitable[Any]],
    make: Callable[[Any, int], Any],
    check: Callable[[Any, Any], Awaitable[None]],
    at_least: int,
) -> int:
    """Fail every statement of `make(prepare(), n)` in turn; returns the statement count."""
    counter = Fault()
    target = await prepare()
    result = await traced(engine, counter, make(target, 0))
    await check(target, result)
    total = counter.seen
    assert total >= at_least, f"only {total} statements traced"
    for n in range(1, total + 1):
        target = await prepare()
        before = await engine.read(snapshot)
        fault = Fault(n)
        with pytest.raises(apsw.ExecTraceAbort):
            await traced(engine, fault, make(target, n))
        assert fault.fired
        assert await engine.read(snapshot) == before, f"statement {n} of {total} left rows"
        await check(target, await engine.submit(make(target, n)))
    return total


async def test_channel_send_is_atomic(engine: Engine, world: World) -> None:
    ws, alice = world.workspace_id, world.agents["alice"]
    file_id = await engine.submit(CreateFile(ws))
    others = sorted(world.agents[n] for n in ("bob", "carol", "dave"))

    async def prepare() -> None:
        return None

    def make(_: None, n: int) -> SendChannelMessage:
        return SendChannelMessage(workspace_id=ws, agent_id=alice, channel="general",
                                  text=f"send {n} @bob", attachments=[file_id],
                                  idempotency_key=f"send-{n}")

    async def check(_: None, message: Any) -> None:
        assert await deliveries_of(engine, message.id) == [
            (a, "message.created", "queued") for a in others]
        assert await rows(engine, "SELECT file_id FROM message_attachments WHERE message_id = ?",
                          int(message.id)) == [(int(file_id),)]
        assert await rows(engine, "SELECT count(*) FROM message_log WHERE message_id = ?",
                          int(message.id)) == [(1,)]
        assert await rows(engine, "SELECT rowid FROM messages_fts WHERE messages_fts MATCH ?",
                          f'"{message.text}"') == [(int(message.id),)]

    # validation reads, attachment, mentions, insert, link, recipients, log,
    # seq allocation, one insert per delivery, idempotency record
    await assert_atomic(engine, prepare, make, check, at_least=12)
    seqs = await rows(engine, "SELECT last_seq, pending_count FROM mailboxes WHERE agent_id = ?",
                      world.agents["bob"])
    # Failed attempts allocated no seq: one per successful send (count + retries).
    sends = await rows(engine, "SELECT count(*) FROM messages")
    assert seqs == [(sends[0][0], sends[0][0])]


@pytest.mark.parametrize("where", ["channel", "dm"])
async def test_thread_reply_is_atomic(engine: Engine, world: World, where: str) -> None:
    ws, alice, bob = world.workspace_id, world.agents["alice"], world.agents["bob"]
    file_id = await engine.submit(CreateFile(ws))
    if where == "channel":
        root = await send(engine, world, "alice", "general", "root")
        expected = sorted(world.agents[n] for n in ("alice", "carol", "dave"))
    else:
        dm = await engine.submit(OpenConversation(ws, "dm", (alice, bob)))
        root = str(await engine.submit(PostInConversation(ws, alice, dm, "root")))
        expected = [alice]

    async def prepare() -> int:
        return int((await rows(engine, "SELECT reply_count FROM messages WHERE id = ?",
                               int(root)))[0][0])

    def make(_: int, n: int) -> ReplyToThread:
        return ReplyToThread(workspace_id=ws, agent_id=bob, message_id=root,
                             text=f"reply {n}", attachments=[file_id],
                             idempotency_key=f"reply-{n}")

    async def check(replies_before: int, message: Any) -> None:
        assert message.thread_id == root
        assert await deliveries_of(engine, message.id) == [
            (a, "thread.reply", "queued") for a in expected]
        assert await rows(engine, "SELECT reply_count, last_reply_at IS NOT NULL FROM messages"
                          " WHERE id = ?", int(root)) == [(replies_before + 1, 1)]
        assert await rows(engine, "SELECT count(*) FROM message_attachments"
                          " WHERE message_id = ?", int(message.id)) == [(1,)]

    await assert_atomic(engine, prepare, make, check, at_least=10)


@pytest.mark.parametrize("where", ["channel", "dm"])
async def test_mark_read_is_atomic(engine: Engine, world: World, where: str) -> None:
    ws, alice, bob = world.workspace_id, world.agents["alice"], world.agents["bob"]
    dm = await engine.submit(OpenConversation(ws, "dm", (alice, bob)))

    async def prepare() -> int:
        if where == "channel":
            return int(await send(engine, world, "alice", "general", "read me"))
        return int(await engine.submit(PostInConversation(ws, alice, dm, "read me")))

    def make(message_id: int, n: int) -> MarkRead:
        return MarkRead(workspace_id=ws, agent_id=bob, message_id=str(message_id))

    async def pointer() -> Any:
        if where == "channel":
            return (await rows(engine, "SELECT m.last_read_id FROM channel_members m"
                               " JOIN channels c ON c.id = m.channel_id"
                               " WHERE c.name = 'general' AND m.agent_id = ?", bob))[0][0]
        return (await rows(engine, "SELECT last_read_id FROM conversation_participants"
                           " WHERE conversation_id = ? AND agent_id = ?", dm, bob))[0][0]

    async def check(message_id: int, receipt: Any) -> None:
        assert receipt.already_read is False
        assert await rows(engine, "SELECT agent_id FROM read_receipts WHERE message_id = ?",
                          message_id) == [(bob,)]
        mine = [(t, s) for a, t, s in await deliveries_of(engine, message_id) if a == bob]
        assert mine == [("message.created" if where == "channel" else "dm.received", "acked")]
        assert await rows(engine, "SELECT pending_count FROM mailboxes WHERE agent_id = ?",
                          bob) == [(0,)]
        assert await pointer() == message_id
        notices = [a for a, t, _ in await deliveries_of(engine, message_id) if t == "message.read"]
        assert notices == [alice]

    # receipt, ack, pending_count, pointer, log, seq allocation, notice delivery
    await assert_atomic(engine, prepare, make, check, at_least=8)
