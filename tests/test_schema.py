"""Opening the database: migrations, foreign files, newer schemas, a second writer."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import apsw
import pytest

from broker.engine.config import EngineConfig
from broker.engine.database import open_writer
from broker.engine.engine import DATABASE_FILE, Engine
from broker.engine.errors import StartupError
from broker.engine.mailbox import list_settled
from broker.engine.maintenance import _PURGE_STATEMENTS
from broker.engine.schema import MIGRATIONS, SCHEMA_VERSION
from broker.engine.writer import WriterActor

CONFIG = EngineConfig(synchronous="NORMAL")


def schema_of(path: Path) -> tuple[int, list[tuple[str, str]]]:
    conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        version = conn.execute("pragma user_version").fetchone()
        rows = conn.execute(
            "SELECT name, sql FROM sqlite_schema WHERE sql IS NOT NULL ORDER BY name"
        ).fetchall()
    finally:
        conn.close()
    assert version is not None
    return int(version[0]), [(str(n), str(s)) for n, s in rows]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_open_writer_migrates_empty_file(tmp_path: Path) -> None:
    """An empty file migrates to the current version."""
    path = tmp_path / "b.db"
    conn, lock = open_writer(path, CONFIG)
    conn.close()
    lock.release()
    version, schema = schema_of(path)
    assert version == SCHEMA_VERSION == 4
    tables = {name for name, _ in schema}
    # version 4: expiry probes each mailbox (broker.engine.maintenance), no index on expires_at
    assert "deliveries_expiry" not in tables
    for table in ("workspaces", "agents", "channels", "channel_members", "messages",
                  "messages_fts", "files", "message_attachments", "deliveries", "message_log",
                  "read_receipts", "reactions", "conversations", "conversation_participants",
                  "idempotency_keys", "outbox", "mailboxes"):
        assert table in tables, table


def test_open_writer_migrates_version_1_deletion_mark(tmp_path: Path) -> None:
    """A version 1 file gains the workspace deletion mark.

    Version 2 adds workspaces.deleted_at (two-phase deletion); existing rows stay live.
    """
    path = tmp_path / "b.db"
    conn = apsw.Connection(str(path))
    with conn:
        conn.execute(MIGRATIONS[0])
        conn.execute("pragma user_version = 1")
        conn.execute("INSERT INTO workspaces(id, name, key_hash, created_at)"
                     " VALUES (1, 'old', x'00', 0)")
    conn.close()
    conn, lock = open_writer(path, CONFIG)
    try:
        assert conn.execute("pragma user_version").fetchone() == (SCHEMA_VERSION,)
        assert conn.execute("SELECT name, deleted_at FROM workspaces").fetchall() == [("old", None)]
    finally:
        conn.close()
        lock.release()


def _plan(conn: apsw.Connection, sql: str, bindings: tuple[object, ...]) -> list[str]:
    """The detail lines of `EXPLAIN QUERY PLAN sql` (foreign key actions included)."""
    return [str(row[-1]) for row in conn.execute("EXPLAIN QUERY PLAN " + sql, bindings)]


def test_schema_foreign_key_children_indexed(tmp_path: Path) -> None:
    """Every foreign key child column is indexed.

    Deleting a parent finds its children by an index, never by scanning the child table.

    For each foreign key of every table, SQLite looks up `child WHERE
    columns = ?` whenever a parent row is deleted; an unindexed child column
    made one purge step of 1000 agents scan all read receipts 1000 times.
    """
    conn, lock = open_writer(tmp_path / "b.db", CONFIG)
    try:
        tables = [str(r[0]) for r in conn.execute(
            "SELECT name FROM sqlite_schema WHERE type = 'table' AND sql NOT LIKE 'CREATE VIRTUAL%'"
            " AND name NOT LIKE 'sqlite_%' AND name NOT LIKE 'messages_fts_%'"
        )]
        unindexed = []
        for table in tables:
            keys: dict[int, list[str]] = {}
            for fk_id, _seq, _parent, column, *_ in conn.execute(
                f"pragma foreign_key_list({table})"
            ):
                keys.setdefault(int(fk_id), []).append(str(column))
            for columns in keys.values():
                where = " AND ".join(f"{c} = ?" for c in columns)
                plan = _plan(conn, f"SELECT 1 FROM {table} WHERE {where}", (1,) * len(columns))
                if any(line.startswith("SCAN") for line in plan):
                    unindexed.append(f"{table}({', '.join(columns)})")
        assert unindexed == []
    finally:
        conn.close()
        lock.release()


def test_workspace_purge_statements_scan_no_table(tmp_path: Path) -> None:
    """Every delete of a purge step, its cascades and foreign key checks included, is a search."""
    conn, lock = open_writer(tmp_path / "b.db", CONFIG)
    try:
        statements = [*(sql for _, sql in _PURGE_STATEMENTS),
                      "DELETE FROM workspaces WHERE id = ?1"]
        for sql in statements:
            plan = _plan(conn, sql, (1, 1000) if "?2" in sql else (1,))
            assert [line for line in plan if line.startswith("SCAN")] == [], (sql, plan)
    finally:
        conn.close()
        lock.release()


def test_open_writer_again_changes_nothing(tmp_path: Path) -> None:
    """Reopening changes nothing."""
    path = tmp_path / "b.db"
    for _ in range(2):
        conn, lock = open_writer(path, CONFIG)
        conn.execute("pragma wal_checkpoint(TRUNCATE)")
        conn.close()
        lock.release()
    first = schema_of(path), digest(path)
    conn, lock = open_writer(path, CONFIG)
    conn.execute("pragma wal_checkpoint(TRUNCATE)")
    conn.close()
    lock.release()
    assert (schema_of(path), digest(path)) == first


def test_open_writer_refuses_newer_schema(tmp_path: Path) -> None:
    """A newer schema is refused and untouched."""
    path = tmp_path / "b.db"
    conn = apsw.Connection(str(path))
    conn.execute(f"pragma user_version = {SCHEMA_VERSION + 1}")
    conn.execute("CREATE TABLE future(x)")
    conn.close()
    before = digest(path)
    with pytest.raises(StartupError, match="newer than this broker"):
        open_writer(path, CONFIG)
    assert digest(path) == before


@pytest.mark.parametrize("content", [b"hello, not a database\n" * 400, b"\x00\xff" * 3000])
def test_open_writer_refuses_foreign_file(tmp_path: Path, content: bytes) -> None:
    """A foreign file is refused and untouched."""
    path = tmp_path / "b.db"
    path.write_bytes(content)
    with pytest.raises(StartupError, match="not a SQLite database"):
        open_writer(path, CONFIG)
    assert path.read_bytes() == content
    assert not (tmp_path / "b.db-wal").exists()


async def test_open_writer_refuses_second_writer(tmp_path: Path) -> None:
    """A second writer on the same file is refused."""
    async with Engine.open(tmp_path, CONFIG):
        second = WriterActor(tmp_path / DATABASE_FILE, CONFIG)
        with pytest.raises(StartupError, match="already opened for writing"):
            second.open()
    # once the first has closed, the file opens again
    async with Engine.open(tmp_path, CONFIG) as engine:
        assert engine.writer.running


def _dead_letter_page_steps(path: Path, acked: int) -> int:
    """VM steps of the query behind one page of dead letters, with `acked` acked rows kept."""
    conn, lock = open_writer(path, CONFIG)
    try:
        with conn:
            conn.execute("INSERT INTO workspaces(id, name, key_hash, created_at)"
                         " VALUES (1, 'w', x'00', 0)")
            conn.execute("INSERT INTO agents(id, workspace_id, name, token_hash, created_at)"
                         " VALUES (1, 1, 'a', x'01', 0)")
            conn.execute("INSERT INTO message_log(id, workspace_id, type, payload, created_at)"
                         " VALUES (1, 1, 'message.created', x'7b7d', 0)")
            conn.executemany(
                "INSERT INTO deliveries(agent_id, seq, log_id, state, expires_at, created_at)"
                " VALUES (1, ?, 1, ?, 0, 0)",
                [(seq, "dead_lettered" if seq in (1, 2, acked + 3) else "acked")
                 for seq in range(1, acked + 4)])
        steps: list[int] = []

        def profile(event: dict[str, Any]) -> None:
            if "FROM deliveries d" in event["sql"]:
                steps.append(event["stmt_status"]["SQLITE_STMTSTATUS_VM_STEP"])

        conn.trace_v2(apsw.SQLITE_TRACE_PROFILE, profile)
        page = list_settled(conn, 1, 1, "dead_lettered")
        assert [d.seq for d in page] == [acked + 3, 2, 1]
        assert len(list_settled(conn, 1, 1, "acked", limit=5)) == 5
        return steps[0]
    finally:
        conn.close()
        lock.release()


def test_dead_letter_page_reads_no_kept_acked_row(tmp_path: Path) -> None:
    """A page of dead letters costs the same with 50 or 5000 acked rows kept in between."""
    assert _dead_letter_page_steps(tmp_path / "a.db", 50) == \
        _dead_letter_page_steps(tmp_path / "b.db", 5000)


def _version_2_file(path: Path) -> None:
    """A file as the previous broker left it: marks on the agents rows, deliveries pending."""
    conn = apsw.Connection(str(path))
    with conn:
        conn.execute(MIGRATIONS[0])
        conn.execute(MIGRATIONS[1])
        conn.execute("pragma user_version = 2")
        conn.execute("INSERT INTO workspaces(id, name, key_hash, created_at)"
                     " VALUES (1, 'old', x'00', 0)")
        # bob: 5 seqs allocated, 2 acked, 3 pending; carol: nothing yet; dave: deactivated
        conn.executemany(
            "INSERT INTO agents(id, workspace_id, name, token_hash, last_seq, acked_seq,"
            " pending_count, deactivated_at, created_at) VALUES (?, 1, ?, ?, ?, ?, ?, ?, 0)",
            [(10, "alice", b"\x01", 0, 0, 0, None), (11, "bob", b"\x02", 5, 2, 3, None),
             (12, "carol", b"\x03", 0, 0, 0, None), (13, "dave", b"\x04", 7, 7, 0, 5)])
        conn.execute("INSERT INTO channels(id, workspace_id, name, created_at)"
                     " VALUES (20, 1, 'general', 0)")
        conn.executemany("INSERT INTO channel_members(channel_id, agent_id, joined_at)"
                         " VALUES (20, ?, 0)", [(10,), (11,), (12,)])
        conn.execute("INSERT INTO message_log(id, workspace_id, type, payload, created_at)"
                     " VALUES (30, 1, 'message.created', x'7b7d', 0)")
        conn.executemany(
            "INSERT INTO deliveries(agent_id, seq, log_id, state, expires_at, created_at)"
            " VALUES (11, ?, 30, ?, 9999999999999, 0)",
            [(1, "acked"), (2, "acked"), (3, "queued"), (4, "delivered"), (5, "failed")])
    conn.close()


async def test_version_2_file_upgrades_its_marks_to_mailboxes(tmp_path: Path) -> None:
    """Version 3 moves each agent's marks to its `mailboxes` row; sends go on from them.

    The agents table loses the three columns; every agent, deactivated ones
    included, has its marks as they were; the next send gives bob seq 6
    (not 1: the high-water mark survived) and carol seq 1; the mailbox and
    its replay read the old rows; an agent registered after the upgrade has a
    mailbox row of its own.
    """
    from broker.engine.mailbox import AckUpTo, list_pending
    from broker.engine.messages import SendChannelMessage
    from broker.engine.workspaces import RegisterAgent

    path = tmp_path / DATABASE_FILE
    _version_2_file(path)
    async with Engine.open(tmp_path, CONFIG) as engine:
        conn = engine.writer.connection
        assert conn.execute("pragma user_version").fetchone() == (SCHEMA_VERSION,)
        columns = {str(r[1]) for r in conn.execute("pragma table_info(agents)")}
        assert not columns & {"last_seq", "acked_seq", "pending_count"}
        assert conn.execute(
            "SELECT agent_id, last_seq, acked_seq, pending_count FROM mailboxes ORDER BY agent_id"
        ).fetchall() == [(10, 0, 0, 0), (11, 5, 2, 3), (12, 0, 0, 0), (13, 7, 7, 0)]
        assert [d.seq for d in await engine.read(list_pending, 1, 11)] == [3, 4, 5]

        await engine.submit(SendChannelMessage(workspace_id=1, agent_id=10, channel="general",
                                               text="after the upgrade"))
        assert conn.execute(
            "SELECT agent_id, seq, state FROM deliveries WHERE seq > 2 OR agent_id <> 11"
            " ORDER BY agent_id, seq"
        ).fetchall() == [(11, 3, "queued"), (11, 4, "delivered"), (11, 5, "failed"),
                         (11, 6, "queued"), (12, 1, "queued")]
        ack = await engine.submit(AckUpTo(workspace_id=1, agent_id=11, up_to_seq=6))
        # seq 5 failed is held: the mark stops below it, 3 rows (3, 4, 6) are acked
        assert (ack.acked, ack.acked_seq) == (3, 4)
        assert conn.execute(
            "SELECT last_seq, acked_seq, pending_count FROM mailboxes WHERE agent_id = 11"
        ).fetchone() == (6, 4, 1)

        assert conn.execute("SELECT count(*) FROM sqlite_schema"
                            " WHERE name = 'deliveries_expiry'").fetchone() == (0,)

        erin = await engine.submit(RegisterAgent(workspace_id=1, name="erin"))
        assert conn.execute("SELECT last_seq, acked_seq, pending_count FROM mailboxes"
                            " WHERE agent_id = ?", (int(erin.id),)).fetchone() == (0, 0, 0)


def test_version_3_step_is_atomic(tmp_path: Path) -> None:
    """A version 3 step that fails leaves the file at version 2 with its marks on agents."""
    path = tmp_path / "b.db"
    _version_2_file(path)
    conn = apsw.Connection(str(path))
    # a table of that name in the way makes the step's first statement fail
    with conn:
        conn.execute("CREATE TABLE mailboxes(x)")
    conn.close()
    with pytest.raises(apsw.SQLError):
        open_writer(path, CONFIG)
    conn = apsw.Connection(str(path))
    try:
        assert conn.execute("pragma user_version").fetchone() == (2,)
        assert conn.execute("SELECT last_seq, acked_seq, pending_count FROM agents"
                            " WHERE id = 11").fetchone() == (5, 2, 3)
    finally:
        conn.close()
