"""Online backup while the writer commits, and the integrity check."""

from __future__ import annotations

from pathlib import Path

import apsw
import pytest
import trio

from broker.engine.backup import backup, check
from broker.engine.engine import DATABASE_FILE, Engine
from broker.engine.messages import SendChannelMessage
from tests.helpers.engine import World


async def test_backup_while_sending_is_consistent(
    tmp_path: Path, engine: Engine, world: World
) -> None:
    for i in range(200):
        await engine.submit(SendChannelMessage(
            workspace_id=world.workspace_id, agent_id=world.agents["alice"], channel="general",
            text=f"before {i}"))
    target = tmp_path / "copy.db"
    progress: list[tuple[int, int]] = []
    sent_during = 0

    async def keep_sending() -> None:
        nonlocal sent_during
        while True:
            await engine.submit(SendChannelMessage(
                workspace_id=world.workspace_id, agent_id=world.agents["bob"],
                channel="general", text="during"))
            sent_during += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(keep_sending)
        pages = await trio.to_thread.run_sync(
            lambda: backup(tmp_path / DATABASE_FILE, target,
                           lambda r, t: progress.append((r, t))))
        nursery.cancel_scope.cancel()

    assert pages > 0 and progress[-1][0] == 0
    report = check(target)
    assert report.ok, report
    copy = apsw.Connection(str(target), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        messages, orphans, before = copy.execute(
            "SELECT (SELECT count(*) FROM messages),"
            " (SELECT count(*) FROM messages m WHERE NOT EXISTS"
            "   (SELECT 1 FROM deliveries d WHERE d.message_id = m.id)),"
            " (SELECT count(*) FROM messages WHERE text LIKE 'before %')").fetchone() or ()
    finally:
        copy.close()
    assert before == 200
    assert orphans == 0  # a snapshot: never a message without its deliveries
    assert messages >= 200
    assert not (tmp_path / ".copy.db.partial").exists()


def test_backup_refuses_to_overwrite(tmp_path: Path) -> None:
    source = tmp_path / "s.db"
    apsw.Connection(str(source)).close()
    target = tmp_path / "t.db"
    target.write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        backup(source, target)
    assert target.read_bytes() == b"precious"


def test_check_reports_corruption(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    conn = apsw.Connection(str(path))
    conn.execute("CREATE TABLE t(x); CREATE INDEX t_x ON t(x)")
    with conn:
        conn.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(2000)])
    conn.execute("PRAGMA writable_schema = ON")
    # point the index at the table's root page: a classic, detectable corruption
    conn.execute("UPDATE sqlite_schema SET rootpage = (SELECT rootpage FROM sqlite_schema"
                 " WHERE name = 't') WHERE name = 't_x'")
    conn.close()
    report = check(path)
    assert not report.ok
    assert report.integrity != ["ok"]
