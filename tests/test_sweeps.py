"""Sweeps: TTL expiry with notices, retention that never reuses a seq, bounded steps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import apsw
import msgspec
import pytest

from broker.engine import maintenance as m
from broker.engine.config import EngineConfig, Limits, Retention
from broker.engine.database import open_writer
from broker.engine.engine import Engine
from broker.engine.ids import IdAllocator
from broker.engine.messages import SendChannelMessage
from broker.engine.writer import Tx
from broker.sweeps import Sweeper
from tests.helpers.engine import Sql, WallClock, World

DAY = m.DAY_MS


@pytest.fixture
def engine_config() -> EngineConfig:
    return EngineConfig(synchronous="NORMAL", retention=Retention(sweep_batch=2))


class SettleAll(msgspec.Struct, frozen=True):
    """Test command: mark every delivery of an agent acked, as a cumulative ack would."""

    agent_id: int

    def apply(self, tx: Tx) -> None:
        tx.conn.execute("UPDATE deliveries SET state = 'acked' WHERE agent_id = ?",
                        (self.agent_id,))
        tx.conn.execute("UPDATE mailboxes SET pending_count = 0, acked_seq = last_seq"
                        " WHERE agent_id = ?", (self.agent_id,))


def rows(conn: apsw.Connection, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in conn.execute(sql, args).fetchall()]


async def send(engine: Engine, world: World, text: str) -> int:
    msg = await engine.submit(SendChannelMessage(
        workspace_id=world.workspace_id, agent_id=world.agents["alice"], channel="general",
        text=text))
    return int(msg.id)


async def test_expiry_dead_letters_and_tells_the_sender_once(engine: Engine, world: World) -> None:
    clock = engine.writer.clock = WallClock()
    message_id = await send(engine, world, "will expire")
    sweeper = Sweeper(engine)
    later = int((await engine.read(lambda c: c.execute(
        "SELECT max(expires_at) FROM deliveries").fetchone()))[0]) + 1
    # The notices are stamped with the writer's clock; let it pass `later - TTL`,
    # so they expire after `later` and this sweep cannot also expire them.
    clock.advance(0.005)

    await sweeper.sweep_once(now_ms=later)
    conn = engine.writer.connection
    states = rows(conn, "SELECT agent_id, state, error FROM deliveries WHERE message_id = ?",
                  message_id)
    assert sorted(states) == sorted(
        (world.agents[n], "dead_lettered", "expired") for n in ("bob", "carol", "dave"))
    assert sweeper.stats.expired == 3  # in steps of 2: the sweep repeated a full step
    pending = rows(conn, "SELECT name, pending_count FROM agents JOIN mailboxes ON agent_id = id"
                   " WHERE name <> 'alice'")
    assert all(count == 0 for _, count in pending)
    notices = rows(conn, "SELECT l.type, l.payload, d.seq FROM deliveries d"
                   " JOIN message_log l ON l.id = d.log_id WHERE d.agent_id = ? ORDER BY d.seq",
                   world.agents["alice"])
    assert [n[0] for n in notices] == ["delivery.failed"] * 3
    assert rows(conn, "SELECT last_seq, acked_seq, pending_count FROM mailboxes"
                " WHERE agent_id = ?", world.agents["alice"]) == [(3, 0, 3)]
    assert [n[2] for n in notices] == [1, 2, 3]
    data = msgspec.json.decode(notices[0][1])["data"]
    assert data["message_id"] == str(message_id) and data["reason"] == "expired"

    # expiring the notices themselves produces no notice about a notice
    much_later = later + 2 * DAY
    await sweeper.sweep_once(now_ms=much_later)
    assert rows(conn, "SELECT count(*), max(state) FROM deliveries WHERE agent_id = ?",
                world.agents["alice"]) == [(3, "dead_lettered")]
    assert rows(conn, "SELECT count(*) FROM message_log WHERE type = 'delivery.failed'") == [(3,)]


async def test_retention_prunes_settled_rows_and_never_reuses_a_seq(
    engine: Engine, world: World
) -> None:
    bob = world.agents["bob"]
    for i in range(5):
        await send(engine, world, f"m{i}")
    await engine.submit(SettleAll(bob))
    sweeper = Sweeper(engine)
    await sweeper.sweep_once(now_ms=int(8 * DAY + 10**13))  # far beyond every retention
    conn = engine.writer.connection
    assert rows(conn, "SELECT count(*) FROM deliveries WHERE agent_id = ?", bob) == [(0,)]
    # carol never acked: her deliveries were expired, and are settled now
    assert rows(conn, "SELECT last_seq FROM mailboxes WHERE agent_id = ?", bob) == [(5,)]
    await send(engine, world, "after pruning")
    assert rows(conn, "SELECT seq FROM deliveries WHERE agent_id = ?", bob) == [(6,)]


async def test_message_log_prune_keeps_recent_rows(engine: Engine, world: World) -> None:
    await send(engine, world, "old")
    conn = engine.writer.connection
    (created,) = rows(conn, "SELECT created_at FROM message_log")[0]
    await engine.submit(m.PruneMessageLog(created, 10))  # strictly older only
    assert rows(conn, "SELECT count(*) FROM message_log") == [(1,)]
    assert await engine.submit(m.PruneMessageLog(created + 1, 10)) == 1
    assert rows(conn, "SELECT count(*) FROM message_log") == [(0,)]


async def test_prune_uses_the_settled_index(engine: Engine) -> None:
    plan = await engine.read(lambda c: c.execute(
        "EXPLAIN QUERY PLAN SELECT agent_id, seq FROM deliveries"
        " WHERE state IN ('acked', 'dead_lettered') AND created_at < ? LIMIT ?", (0, 1)
    ).fetchall())
    assert any("deliveries_settled" in str(step) for step in plan), plan


async def test_expiry_probes_each_mailbox_by_its_key(engine: Engine) -> None:
    """The expiry probe and walk search deliveries by (agent_id, seq), never scan them."""
    for sql, args in ((m._EXPIRED_MAILBOXES_SQL, (0, 0, 5)), (m._ABOVE_MARK_SQL, (1, 0))):
        plan = [str(step[-1]) for step in await engine.read(
            lambda c, sql=sql, args=args: c.execute("EXPLAIN QUERY PLAN " + sql, args).fetchall())]
        assert not [line for line in plan if line.startswith("SCAN d")], plan
        assert any(line.startswith("SEARCH d USING PRIMARY KEY (agent_id=? AND seq>?)")
                   for line in plan), plan
    # and the probe reads only the mailboxes of its range of agent ids
    plan = [str(step[-1]) for step in await engine.read(lambda c: c.execute(
        "EXPLAIN QUERY PLAN " + m._EXPIRED_MAILBOXES_SQL, (0, 0, 5)).fetchall())]
    assert "SEARCH m USING INTEGER PRIMARY KEY (rowid>? AND rowid<?)" in plan, plan


EXPIRED, LATER = 100, 10**12  # expiry times before and after the sweeps' now (1000)


def _seed(conn: apsw.Connection, agents: list[int], sender: int | None = None) -> None:
    """Workspace 1 with agents of these ids, and message-log row 1: message 7 by `sender`."""
    conn.execute("INSERT INTO workspaces(id, name, key_hash, created_at) VALUES (1, 'w', x'00', 0)")
    conn.executemany("INSERT INTO agents(id, workspace_id, name, token_hash, created_at)"
                     " VALUES (?, 1, ?, ?, 0)",
                     [(a, f"a{a}", a.to_bytes(4, "big")) for a in agents])
    conn.execute("INSERT INTO message_log(id, workspace_id, type, message_id, agent_id, payload,"
                 " created_at) VALUES (1, 1, 'message.created', 7, ?, x'7b7d', 0)", (sender,))


def _add_deliveries(conn: apsw.Connection, agent_id: int, expires: list[int]) -> None:
    """Deliveries of log row 1 with these expiry times, appended to the agent's mailbox."""
    (last,) = conn.execute("SELECT last_seq FROM mailboxes WHERE agent_id = ?",
                           (agent_id,)).fetchone()
    conn.executemany(
        "INSERT INTO deliveries(agent_id, seq, log_id, message_id, expires_at, created_at)"
        " VALUES (?, ?, 1, 7, ?, 0)",
        [(agent_id, last + i, at) for i, at in enumerate(expires, start=1)])
    conn.execute("UPDATE mailboxes SET last_seq = last_seq + ?1, pending_count = pending_count + ?1"
                 " WHERE agent_id = ?2", (len(expires), agent_id))


class Seed(msgspec.Struct, frozen=True):
    """Test command: `_seed`, then `_add_deliveries` for each agent in `deliveries`."""

    agents: list[int]
    deliveries: dict[int, list[int]]

    def apply(self, tx: Tx) -> None:
        if self.agents:
            _seed(tx.conn, self.agents)
        for agent_id, expires in self.deliveries.items():
            _add_deliveries(tx.conn, agent_id, expires)


def _expiry_steps(path: Path, backlog: int) -> int:
    """VM steps of one expiry step over a mailbox: 3 expired rows, `backlog` unexpired behind."""
    conn, lock = open_writer(path, EngineConfig(synchronous="OFF"))
    try:
        with conn:
            _seed(conn, [1, 2], sender=1)
            _add_deliveries(conn, 2, [EXPIRED] * 3 + [LATER] * backlog)
        steps: list[int] = []

        def profile(event: dict[str, Any]) -> None:
            if "deliveries" in event["sql"]:
                steps.append(event["stmt_status"]["SQLITE_STMTSTATUS_VM_STEP"])

        conn.trace_v2(apsw.SQLITE_TRACE_PROFILE, profile)
        tx = Tx(conn, IdAllocator(), Limits())
        tx.now_ms = 1000
        with conn:
            assert m.ExpireDeliveries(100, 1000).apply(tx) == m.ExpiryStep(3, None)
        conn.trace_v2(0, None)
        assert conn.execute("SELECT acked_seq, pending_count FROM mailboxes WHERE agent_id = 2"
                            ).fetchone() == (3, backlog)
        assert conn.execute("SELECT count(*) FROM deliveries WHERE agent_id = 2"
                            " AND state = 'dead_lettered'").fetchone() == (3,)
        return sum(steps)
    finally:
        conn.close()
        lock.release()


def test_expiry_reads_no_unexpired_row_behind_the_first(tmp_path: Path) -> None:
    """An expiry step costs the same with 50 or 5,000 unexpired deliveries waiting.

    With no index on expires_at, the sweep relies on expiry times rising
    with seq in a mailbox: it stops at the first row not yet expired.
    """
    assert _expiry_steps(tmp_path / "a.db", 50) == _expiry_steps(tmp_path / "b.db", 5000)


async def test_expiry_moves_the_mark_and_resumes_inside_a_mailbox(
    engine: Engine, world: World
) -> None:
    """Steps of 2 go through the mailboxes in agent order and each in seq order.

    A step that stops inside a mailbox names it for the next step to start
    from; each step moves the ack mark past the rows it dead-lettered, so
    the next probe starts at the next pending row.
    """
    clock = engine.writer.clock = WallClock()
    for i in range(3):
        await send(engine, world, f"old {i}")
    clock.advance(10)  # the notices expire 10 s after the deliveries they report
    conn = engine.writer.connection
    later = rows(conn, "SELECT max(expires_at) FROM deliveries")[0][0] + 1
    bob, carol, dave = (world.agents[n] for n in ("bob", "carol", "dave"))
    assert bob < carol < dave
    dead = ("SELECT agent_id, seq FROM deliveries WHERE state = 'dead_lettered'"
            " ORDER BY agent_id, seq")
    assert await engine.submit(m.ExpireDeliveries(0, later)) == m.ExpiryStep(0, None)
    # the mailboxes below bob's: alice's, with nothing in it
    assert await engine.submit(m.ExpireDeliveries(2, later, until_agent=bob)) == \
        m.ExpiryStep(0, None)
    assert rows(conn, dead) == []
    assert await engine.submit(m.ExpireDeliveries(2, later)) == m.ExpiryStep(2, bob)
    assert rows(conn, dead) == [(bob, 1), (bob, 2)]
    assert await engine.submit(m.ExpireDeliveries(2, later, from_agent=bob)) == \
        m.ExpiryStep(2, carol)
    assert await engine.submit(m.ExpireDeliveries(2, later, from_agent=carol)) == \
        m.ExpiryStep(2, carol)
    assert await engine.submit(m.ExpireDeliveries(2, later, from_agent=carol)) == \
        m.ExpiryStep(2, dave)
    assert await engine.submit(m.ExpireDeliveries(2, later, from_agent=dave)) == \
        m.ExpiryStep(1, None)
    assert len(rows(conn, dead)) == 9
    assert rows(conn, "SELECT agent_id, acked_seq, pending_count FROM mailboxes"
                " WHERE agent_id IN (?, ?, ?) ORDER BY agent_id", bob, carol, dave) == [
        (bob, 3, 0), (carol, 3, 0), (dave, 3, 0)]
    # the notices to alice expire 10 s later, not now
    assert await engine.submit(m.ExpireDeliveries(2, later)) == m.ExpiryStep(0, None)


async def test_a_sweeps_expiry_steps_probe_each_mailbox_once(engine: Engine) -> None:
    """Ten steps working off one mailbox's backlog probe the 200 others once, not ten times.

    The sweeper starts each step's probe at the mailbox the previous step
    stopped in (steps of 2 here).
    """
    # 200 mailboxes waiting (2 unexpired rows each), then agent 1000 with 20 expired
    waiting = list(range(100, 300))
    await engine.submit(Seed([*waiting, 1000], {
        **{a: [LATER] * 2 for a in waiting}, 1000: [EXPIRED] * 20}))
    conn = engine.writer.connection
    probes: list[int] = []

    def profile(event: dict[str, Any]) -> None:
        if "FROM mailboxes m" in event["sql"]:
            probes.append(event["stmt_status"]["SQLITE_STMTSTATUS_VM_STEP"])

    conn.trace_v2(apsw.SQLITE_TRACE_PROFILE, profile)
    try:
        sweeper = Sweeper(engine)
        await sweeper.sweep_once(now_ms=1000)
    finally:
        conn.trace_v2(0, None)
    assert sweeper.stats.expired == 20
    assert rows(conn, "SELECT acked_seq, pending_count FROM mailboxes WHERE agent_id = 1000"
                ) == [(20, 0)]
    assert rows(conn, "SELECT count(*) FROM deliveries WHERE state = 'dead_lettered'") == [(20,)]
    # the first probe walks past the 200 waiting mailboxes; the next ten start at 1000
    assert len(probes) == 11
    assert sum(probes[1:]) < probes[0] / 4, probes


async def test_a_busy_mailbox_cannot_keep_a_later_one_from_expiring(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mailbox that gains more expired rows than a sweep takes (3 steps of 2 here)
    delays the mailboxes after it by at most a sweep: the next sweep starts after it,
    and wraps round to it."""
    import broker.sweeps

    monkeypatch.setattr(broker.sweeps, "MAX_ROUNDS_PER_STEP", 3)
    await engine.submit(Seed([10, 20], {10: [EXPIRED] * 8, 20: [EXPIRED]}))
    conn = engine.writer.connection
    state = "SELECT agent_id, count(*) FROM deliveries WHERE state = 'dead_lettered' GROUP BY 1"
    sweeper = Sweeper(engine)
    await sweeper.sweep_once(now_ms=1000)
    assert rows(conn, state) == [(10, 6)]
    await engine.submit(Seed([], {10: [EXPIRED] * 8}))  # busier than the sweeps
    await sweeper.sweep_once(now_ms=1000)
    assert rows(conn, state) == [(10, 10), (20, 1)]
    # with no new rows the busy mailbox is worked off too, and the round starts over
    await sweeper.sweep_once(now_ms=1000)
    await sweeper.sweep_once(now_ms=1000)
    assert rows(conn, state) == [(10, 16), (20, 1)]
    assert rows(conn, "SELECT agent_id, last_seq, acked_seq, pending_count FROM mailboxes"
                " ORDER BY agent_id") == [(10, 16, 16, 0), (20, 1, 1, 0)]
    assert sweeper.stats.log_prunes_deferred == 3  # the fourth sweep had nothing left
    assert sweeper.stats.expired == 17


async def test_expiry_waits_behind_a_later_expiring_row(engine: Engine, world: World) -> None:
    """Expiry times that do not rise with seq (a lowered TTL): the later row waits for the first."""
    clock = engine.writer.clock = WallClock()
    for i in range(2):
        await send(engine, world, f"old {i}")
    clock.advance(10)  # the notices expire 10 s after the deliveries they report
    conn = engine.writer.connection
    bob = world.agents["bob"]
    (first, second), = rows(conn, "SELECT min(expires_at), max(expires_at) FROM deliveries"
                            " WHERE agent_id = ?", bob)
    expiry = "UPDATE deliveries SET expires_at = ? WHERE agent_id = ? AND seq = ?"
    await engine.submit(Sql(expiry, (second + 1000, bob, 1)))
    await engine.submit(Sql(expiry, (first, bob, 2)))
    # carol's and dave's
    assert await engine.submit(m.ExpireDeliveries(100, second + 1)) == m.ExpiryStep(4, None)
    assert rows(conn, "SELECT seq, state FROM deliveries WHERE agent_id = ? ORDER BY seq",
                bob) == [(1, "queued"), (2, "queued")]
    assert await engine.submit(m.ExpireDeliveries(100, second + 1001)) == m.ExpiryStep(2, None)
    assert rows(conn, "SELECT acked_seq, pending_count FROM mailboxes WHERE agent_id = ?",
                bob) == [(2, 0)]


async def test_checkpoint_and_optimize_run_outside_a_transaction(
    engine: Engine, world: World
) -> None:
    await send(engine, world, "fill the wal")
    busy, frames, done = await Sweeper(engine).checkpoint("TRUNCATE")
    assert busy == 0 and frames == done == 0  # TRUNCATE leaves an empty WAL
    assert await engine.submit(m.Optimize()) is None
    assert engine.writer.connection.get_autocommit()


def test_config_refuses_a_log_retention_shorter_than_deliveries() -> None:
    with pytest.raises(msgspec.ValidationError, match="message_log_days"):
        msgspec.convert({"retention": {"message_log_days": 2, "settled_delivery_days": 7}},
                        EngineConfig)


async def test_message_log_prune_waits_for_expiry_backlog(
    engine: Engine, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The log is not pruned while expiry has a backlog."""
    import broker.sweeps

    for i in range(3):
        await send(engine, world, f"old {i}")  # 9 deliveries, expiry takes 2 per round
    monkeypatch.setattr(broker.sweeps, "MAX_ROUNDS_PER_STEP", 1)
    sweeper = Sweeper(engine)
    far = int(10**13)  # beyond every TTL and retention
    await sweeper.sweep_once(now_ms=far)
    conn = engine.writer.connection
    assert sweeper.stats.log_prunes_deferred == 1
    assert rows(conn, "SELECT count(*) FROM message_log WHERE type = 'message.created'") == [(3,)]
    # every unsettled delivery still has its log row, so it can still expire
    assert rows(conn, "SELECT count(*) FROM deliveries d WHERE NOT EXISTS"
                " (SELECT 1 FROM message_log l WHERE l.id = d.log_id)") == [(0,)]
    monkeypatch.setattr(broker.sweeps, "MAX_ROUNDS_PER_STEP", 100)
    await sweeper.sweep_once(now_ms=far)
    assert rows(conn, "SELECT count(*) FROM deliveries WHERE state <> 'dead_lettered'"
                " AND log_id IN (SELECT id FROM message_log WHERE type = 'message.created')"
                ) == [(0,)]
