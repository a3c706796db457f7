"""The writer actor: atomic commands, group commit, failure isolation, ack after COMMIT."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import apsw
import msgspec
import pytest
import trio
import trio.testing

from broker.engine.channels import CreateChannel, JoinChannel
from broker.engine.config import EngineConfig
from broker.engine.engine import DATABASE_FILE, Engine
from broker.engine.errors import BrokerError
from broker.engine.messages import SendChannelMessage
from broker.engine.writer import Tx, WriterActor, _OwnThread
from tests.helpers.engine import Gate, World, hold_writer, make_world, wait_queued

ROW_COUNTS = (
    "SELECT (SELECT count(*) FROM messages), (SELECT count(*) FROM deliveries),"
    " (SELECT count(*) FROM message_log), (SELECT count(*) FROM messages_fts),"
    " (SELECT sum(last_seq) FROM mailboxes), (SELECT sum(pending_count) FROM mailboxes)"
)


def counts(conn: apsw.Connection) -> tuple[Any, ...]:
    row = conn.execute(ROW_COUNTS).fetchone()
    assert row is not None
    return tuple(row)


class Note(msgspec.Struct, frozen=True):
    """A test command: writes one workspace row, optionally failing before or after writing."""

    name: str
    fail: str | None = None  # None, "before" or "after"

    def apply(self, tx: Tx) -> str:
        if self.fail == "before":
            raise BrokerError("refused", f"{self.name} refused before writing")
        tx.conn.execute(
            "INSERT INTO workspaces(id, name, key_hash, created_at) VALUES (?,?,?,?)",
            (tx.new_id(), self.name, self.name.encode(), tx.now_ms),
        )
        if self.fail == "after":
            raise BrokerError("refused", f"{self.name} refused after writing")
        return self.name


class Nap(msgspec.Struct, frozen=True):
    """A test command that sleeps in the writer thread: clock time without CPU time."""

    seconds: float

    def apply(self, tx: Tx) -> None:
        time.sleep(self.seconds)


def send(world: World, sender: str, text: str, channel: str = "general") -> SendChannelMessage:
    return SendChannelMessage(workspace_id=world.workspace_id, agent_id=world.agents[sender],
                              channel=channel, text=text)


async def test_writer_failing_statement_of_send_leaves_nothing(
    engine: Engine, world: World
) -> None:
    """Each failing statement of a send leaves nothing."""
    conn = engine.writer.connection
    statements: list[str] = []

    def record(cursor: apsw.Cursor, sql: str, bindings: Any) -> bool:
        statements.append(sql)
        return True

    conn.exec_trace = record
    await engine.submit(send(world, "alice", "count me @bob"))
    conn.exec_trace = None
    body = [s for s in statements if s not in ("BEGIN IMMEDIATE", "COMMIT")]
    assert len(body) >= 6  # lookups, message, recipients, log, seq allocation, deliveries

    for failing in range(len(body)):
        seen = 0

        def fail_nth(cursor: apsw.Cursor, sql: str, bindings: Any, n: int = failing) -> bool:
            nonlocal seen
            if sql in ("BEGIN IMMEDIATE", "COMMIT"):
                return True
            seen += 1
            return seen != n + 1

        before = counts(conn)
        conn.exec_trace = fail_nth
        with pytest.raises(apsw.ExecTraceAbort):
            await engine.submit(send(world, "alice", f"fail at {failing} @bob"))
        conn.exec_trace = None
        assert counts(conn) == before, f"statement {failing} ({body[failing]!r}) left rows"
        retried = await engine.submit(send(world, "alice", f"retry {failing}"))
        assert int(retried.id) > 0
        assert counts(conn) != before


async def test_writer_batch_failure_isolated(engine: Engine) -> None:
    """A batch with every seventh failing commits the rest."""
    results: dict[int, Any] = {}

    async def submit(i: int, command: Note) -> None:
        try:
            results[i] = await engine.submit(command)
        except BrokerError as exc:
            results[i] = exc

    before = engine.writer.statistics()
    batches_before, queued_before = before.batches, before.queue_wait.count
    async with trio.open_nursery() as nursery:
        release = await hold_writer(engine, nursery)
        for i in range(50):
            failing = i % 7 == 6
            # Alternate where the failure happens: one leaves nothing to undo,
            # the other forces the writer to roll back and replay the batch.
            fail = ("before" if i % 14 == 6 else "after") if failing else None
            nursery.start_soon(submit, i, Note(f"n{i}", fail))
        await wait_queued(engine, 50)
        release.set()
    stats = engine.writer.statistics()
    assert stats.batches == batches_before + 2  # the gate's batch, then all 50 together
    assert stats.replays >= 1
    # Each command's wait is counted once, each batch's apply and COMMIT once.
    assert stats.queue_wait.count == queued_before + 51
    assert stats.apply_time.count == stats.sync_time.count == stats.batches
    # The thread's CPU time in each stage is counted too, and a thread never
    # uses more CPU than the clock time it ran (1 ms of slack: the two
    # clocks are read one after the other).
    assert 0 < stats.apply_cpu_seconds <= stats.apply_time.sum + 0.001
    assert 0 < stats.sync_cpu_seconds <= stats.sync_time.sum + 0.001
    failed = sorted(i for i, r in results.items() if isinstance(r, BrokerError))
    assert failed == [i for i in range(50) if i % 7 == 6]
    assert all(results[i] == f"n{i}" for i in range(50) if i not in failed)
    names = await engine.read(lambda c: {r[0] for r in c.execute("SELECT name FROM workspaces")})
    assert names == {f"n{i}" for i in range(50) if i not in failed}


async def test_writer_thread_cpu_apart_from_clock(engine: Engine) -> None:
    """The writer counts its thread's CPU apart from the clock."""
    stats = engine.writer.statistics
    wall_before, cpu_before = stats().apply_time.sum, stats().apply_cpu_seconds
    await engine.submit(Nap(0.05))
    wall = stats().apply_time.sum - wall_before
    cpu = stats().apply_cpu_seconds - cpu_before
    # The 50 ms asleep are in the apply stage's clock time and not in its CPU
    # time; the process's CPU or another clock would count them in both.
    assert wall >= 0.05
    assert 0 < cpu < wall - 0.04


async def test_writer_commit_failure_fails_whole_batch(engine: Engine, world: World) -> None:
    """Commit failure fails the whole batch."""
    conn = engine.writer.connection
    before = counts(conn)
    errors: list[BaseException] = []

    async def submit(command: Any) -> None:
        try:
            await engine.submit(command)
        except BrokerError as exc:
            errors.append(exc)

    commits = 0

    def refuse_second_commit(cursor: apsw.Cursor, sql: str, bindings: Any) -> bool:
        # The first COMMIT is the gate's own batch; the second holds the doomed ones.
        nonlocal commits
        if sql == "COMMIT":
            commits += 1
            return commits != 2
        return True

    async with trio.open_nursery() as nursery:
        release = await hold_writer(engine, nursery)
        conn.exec_trace = refuse_second_commit
        for i in range(5):
            nursery.start_soon(submit, send(world, "alice", f"doomed {i}"))
        nursery.start_soon(submit, Note("doomed-workspace"))
        await wait_queued(engine, 6)
        release.set()
    conn.exec_trace = None
    assert len(errors) == 6
    assert {e.code for e in errors if isinstance(e, BrokerError)} == {"commit_failed"}
    assert counts(conn) == before
    assert await engine.read(
        lambda c: c.execute("SELECT count(*) FROM workspaces WHERE name = 'doomed-workspace'")
        .fetchone()[0]) == 0
    # and the writer is still alive
    assert (await engine.submit(send(world, "alice", "after the failure"))).text


async def test_submit_returns_after_commit(tmp_path: Path, engine: Engine, world: World) -> None:
    msg = await engine.submit(send(world, "alice", "durable"))
    fresh = apsw.Connection(str(tmp_path / DATABASE_FILE), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        row = fresh.execute(
            "SELECT (SELECT count(*) FROM messages WHERE id = ?),"
            " (SELECT count(*) FROM deliveries WHERE message_id = ?)",
            (int(msg.id), int(msg.id)),
        ).fetchone()
    finally:
        fresh.close()
    assert row == (1, 3)


async def test_writer_concurrent_sends_gap_free_seqs(engine: Engine) -> None:
    """Concurrent sends give gap free seqs in commit order."""
    names = tuple(f"a{i}" for i in range(10))
    world = await make_world(engine, "busy", names)
    await engine.submit(CreateChannel(workspace_id=world.workspace_id, agent_id=world.agents["a0"],
                                      name="room"))
    for name in names[1:]:
        await engine.submit(JoinChannel(workspace_id=world.workspace_id,
                                        agent_id=world.agents[name], channel="room"))
    sent: dict[int, list[int]] = {}

    async def sender(task: int) -> None:
        who = names[task % 10]
        for i in range(10):
            msg = await engine.submit(send(world, who, f"{task}-{i}", "room"))
            sent.setdefault(task, []).append(int(msg.id))

    async with trio.open_nursery() as nursery:
        for task in range(20):
            nursery.start_soon(sender, task)

    assert sum(len(v) for v in sent.values()) == 200
    for ids in sent.values():
        assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert engine.writer.statistics().mean_batch_size > 1

    def mailboxes(conn: apsw.Connection) -> dict[int, list[tuple[int, int]]]:
        out: dict[int, list[tuple[int, int]]] = {}
        for agent_id, seq, message_id in conn.execute(
            "SELECT d.agent_id, d.seq, d.message_id FROM deliveries d"
            " JOIN messages m ON m.id = d.message_id JOIN channels c ON c.id = m.channel_id"
            " WHERE c.name = 'room' ORDER BY d.agent_id, d.seq"
        ):
            out.setdefault(agent_id, []).append((seq, message_id))
        return out

    boxes = await engine.read(mailboxes)
    assert len(boxes) == 10
    for agent_id, rows in boxes.items():
        seqs = [s for s, _ in rows]
        # every agent is in `general` too but got nothing there: room seqs are 1..N
        assert seqs == list(range(1, len(seqs) + 1)), agent_id
        message_ids = [m for _, m in rows]
        assert message_ids == sorted(message_ids)  # seq order is commit order is id order
        own = 20 if agent_id in {world.agents[n] for n in names} else 0
        assert len(rows) == 200 - own


async def test_reader_connections_are_read_only(engine: Engine) -> None:
    def write(conn: apsw.Connection) -> None:
        conn.execute(
            "INSERT INTO workspaces(id, name, key_hash, created_at) VALUES (1, 'x', x'00', 0)"
        )

    with pytest.raises(apsw.ReadOnlyError):
        await engine.read(write)


@pytest.mark.parametrize(
    ("command", "code"),
    [
        (lambda w: SendChannelMessage(workspace_id=w.workspace_id + 1, agent_id=w.agents["alice"],
                                      channel="general", text="x"), "agent_not_found"),
        (lambda w: SendChannelMessage(workspace_id=w.workspace_id, agent_id=12345,
                                      channel="general", text="x"), "agent_not_found"),
        (lambda w: SendChannelMessage(workspace_id=w.workspace_id, agent_id=w.agents["alice"],
                                      channel="nope", text="x"), "channel_not_found"),
        (lambda w: JoinChannel(workspace_id=w.workspace_id, agent_id=w.agents["alice"],
                               channel="nope"), "channel_not_found"),
        (lambda w: CreateChannel(workspace_id=w.workspace_id + 1, agent_id=None, name="x"),
         "workspace_not_found"),
        (lambda w: CreateChannel(workspace_id=w.workspace_id, agent_id=999, name="x"),
         "agent_not_found"),
    ],
)
async def test_writer_unknown_ids_refused(
    engine: Engine, world: World, command: Any, code: str
) -> None:
    """Unknown ids are refused and write nothing."""
    conn = engine.writer.connection
    before = conn.total_changes()
    with pytest.raises(BrokerError) as info:
        await engine.submit(command(world))
    assert info.value.code == code
    assert conn.total_changes() == before


async def test_writer_batches_under_concurrency(tmp_path: Path) -> None:
    """Batching happens under concurrency."""
    config = EngineConfig(synchronous="FULL")
    async with Engine.open(tmp_path, config) as engine:
        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(engine.submit, Note(f"w{i}"))
        stats = engine.writer.statistics()
    assert stats.commands == 200
    assert stats.mean_batch_size > 1
    assert stats.batches < 200


async def test_writer_thread_token_refuses_a_second_borrower() -> None:
    """The writer's own thread token is taken without a schedule point, one borrower at a time."""
    token = _OwnThread()
    first, second = object(), object()
    await token.acquire_on_behalf_of(first)
    with pytest.raises(RuntimeError, match="one thread at a time"):
        await token.acquire_on_behalf_of(second)
    with pytest.raises(RuntimeError, match="not held by this borrower"):
        token.release_on_behalf_of(second)
    token.release_on_behalf_of(first)
    await token.acquire_on_behalf_of(second)
    token.release_on_behalf_of(second)


async def test_writer_closes_after_draining_queue(tmp_path: Path) -> None:
    writer = WriterActor(tmp_path / "w.db")
    done: list[str] = []

    async def submit(i: int) -> None:
        done.append(await writer.submit(Note(f"q{i}")))

    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        entered, release = threading.Event(), threading.Event()
        nursery.start_soon(writer.submit, Gate(entered, release))
        await trio.to_thread.run_sync(entered.wait, 30)
        for i in range(20):
            nursery.start_soon(submit, i)
        while writer.statistics().queue_depth < 20:  # noqa: ASYNC110
            await trio.sleep(0.001)
        await writer.aclose()  # closing stops new submits; the 20 queued still commit
        release.set()
    assert sorted(done) == sorted(f"q{i}" for i in range(20))
    with pytest.raises(BrokerError) as info:
        await writer.submit(Note("late"))
    assert info.value.code == "shutting_down"


class RollsBackItself(msgspec.Struct, frozen=True):
    """A test command whose statement makes SQLite end the transaction on its own."""

    def apply(self, tx: Tx) -> None:
        tx.conn.execute(
            "INSERT INTO workspaces(id, name, key_hash, created_at) VALUES (?, 'w', x'01', 0)",
            (tx.new_id(),))
        # a conflict with OR ROLLBACK aborts the whole transaction, as an I/O
        # error or a full disk would
        tx.conn.execute(
            "INSERT OR ROLLBACK INTO workspaces(id, name, key_hash, created_at)"
            " VALUES (?, 'w', x'02', 0)", (tx.new_id(),))


async def test_writer_sqlite_rollback_fails_only_its_command(engine: Engine) -> None:
    """A transaction SQLite rolled back fails only its command."""
    results: dict[str, Any] = {}

    async def submit(name: str, command: Any) -> None:
        try:
            results[name] = await engine.submit(command)
        except Exception as exc:
            results[name] = exc

    async with trio.open_nursery() as nursery:
        release = await hold_writer(engine, nursery)
        nursery.start_soon(submit, "before", Note("kept-1"))
        await wait_queued(engine, 1)
        nursery.start_soon(submit, "bad", RollsBackItself())
        await wait_queued(engine, 2)
        nursery.start_soon(submit, "after", Note("kept-2"))
        await wait_queued(engine, 3)
        release.set()
    assert isinstance(results["bad"], apsw.ConstraintError)
    assert results["before"] == "kept-1" and results["after"] == "kept-2"
    names = await engine.read(lambda c: sorted(r[0] for r in c.execute(
        "SELECT name FROM workspaces")))
    assert names == ["kept-1", "kept-2"]
    assert engine.writer.running  # the writer survived
    assert await engine.submit(Note("still-writing")) == "still-writing"


async def test_submit_cancelled_caller_still_commits(engine: Engine) -> None:
    """A command in the queue commits even if its caller is cancelled meanwhile (see submit)."""
    cancelled = trio.CancelScope()
    outcome: list[str] = []

    async def abandoned() -> None:
        with cancelled:
            outcome.append(await engine.submit(Note("abandoned")))

    async with trio.open_nursery() as nursery:
        release = await hold_writer(engine, nursery)
        nursery.start_soon(abandoned)
        await wait_queued(engine, 1)
        cancelled.cancel()
        await trio.testing.wait_all_tasks_blocked()
        release.set()
    assert cancelled.cancelled_caught and outcome == []
    assert await engine.submit(Note("after")) == "after"
    names = await engine.read(lambda c: [r[0] for r in c.execute(
        "SELECT name FROM workspaces WHERE name IN ('abandoned', 'after')")])
    assert sorted(names) == ["abandoned", "after"]


async def test_send_input_refused_before_the_queue(engine: Engine, world: World) -> None:
    """A send's input checks run in the submitting task: refused input is never a writer
    command and writes nothing; the same send, valid, is applied by the writer."""
    wid, alice = world.workspace_id, world.agents["alice"]
    before = engine.writer.statistics().commands
    rows_before = counts(engine.writer.connection)
    for bad, code in ((dict(text=""), "invalid_text"),
                      (dict(text="x" * (engine.limits.max_text_bytes + 1)), "text_too_long"),
                      (dict(text="hi", mode="loud"), "invalid_mode"),
                      (dict(text="hi", data={"x": "y" * engine.limits.max_data_bytes}),
                       "data_too_large")):
        with pytest.raises(BrokerError) as refused:
            await engine.submit(SendChannelMessage(workspace_id=wid, agent_id=alice,
                                                   channel="general", **bad))
        assert refused.value.code == code
    assert engine.writer.statistics().commands == before
    assert counts(engine.writer.connection) == rows_before
    sent = await engine.submit(SendChannelMessage(workspace_id=wid, agent_id=alice,
                                                  channel="general", text="hi @bob"))
    assert (sent.text, sent.mentions) == ("hi @bob", ["bob"])
    assert engine.writer.statistics().commands == before + 1
