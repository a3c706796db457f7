"""Opening the database: migrations, foreign files, newer schemas, a second writer."""

from __future__ import annotations

import hashlib
from pathlib import Path

import apsw
import pytest

from broker.engine.config import EngineConfig
from broker.engine.database import open_writer
from broker.engine.engine import DATABASE_FILE, Engine
from broker.engine.errors import StartupError
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


def test_empty_file_migrates_to_current_version(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    conn, lock = open_writer(path, CONFIG)
    conn.close()
    lock.release()
    version, schema = schema_of(path)
    assert version == SCHEMA_VERSION == 2
    tables = {name for name, _ in schema}
    for table in ("workspaces", "agents", "channels", "channel_members", "messages",
                  "messages_fts", "files", "message_attachments", "deliveries", "message_log",
                  "read_receipts", "reactions", "conversations", "conversation_participants",
                  "idempotency_keys", "outbox"):
        assert table in tables, table


def test_a_version_1_file_gains_the_workspace_deletion_mark(tmp_path: Path) -> None:
    """Version 2 adds workspaces.deleted_at (two-phase deletion); existing rows stay live."""
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
        assert conn.execute("pragma user_version").fetchone() == (2,)
        assert conn.execute("SELECT name, deleted_at FROM workspaces").fetchall() == [("old", None)]
    finally:
        conn.close()
        lock.release()


def test_reopening_changes_nothing(tmp_path: Path) -> None:
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


def test_newer_schema_is_refused_and_untouched(tmp_path: Path) -> None:
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
def test_foreign_file_is_refused_and_untouched(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "b.db"
    path.write_bytes(content)
    with pytest.raises(StartupError, match="not a SQLite database"):
        open_writer(path, CONFIG)
    assert path.read_bytes() == content
    assert not (tmp_path / "b.db-wal").exists()


async def test_second_writer_on_the_same_file_is_refused(tmp_path: Path) -> None:
    async with Engine.open(tmp_path, CONFIG):
        second = WriterActor(tmp_path / DATABASE_FILE, CONFIG)
        with pytest.raises(StartupError, match="already opened for writing"):
            second.open()
    # once the first has closed, the file opens again
    async with Engine.open(tmp_path, CONFIG) as engine:
        assert engine.writer.running
