"""`broker stats`: counts and sizes read from the database, read-only."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import apsw
import msgspec

from broker.engine.schema import check_version


class DatabaseStats(msgspec.Struct, frozen=True):
    path: str
    schema_version: int
    file_bytes: int
    wal_bytes: int
    workspaces: int
    agents: int
    active_agents: int
    channels: int
    conversations: int
    messages: int
    pending_deliveries: int
    dead_lettered_deliveries: int
    message_log_rows: int
    outbox_pending: int


def database_stats(path: Path) -> DatabaseStats:
    """Counts of the main tables; safe while the daemon runs (a read-only WAL reader)."""
    conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        version = check_version(conn)
        row = conn.execute(
            "SELECT (SELECT count(*) FROM workspaces), (SELECT count(*) FROM agents),"
            " (SELECT count(*) FROM agents WHERE deactivated_at IS NULL),"
            " (SELECT count(*) FROM channels), (SELECT count(*) FROM conversations),"
            " (SELECT count(*) FROM messages),"
            " (SELECT coalesce(sum(pending_count), 0) FROM mailboxes),"
            " (SELECT count(*) FROM deliveries WHERE state = 'dead_lettered'),"
            " (SELECT count(*) FROM message_log),"
            " (SELECT count(*) FROM outbox WHERE state = 'pending')"
        ).fetchone()
    finally:
        conn.close()
    assert row is not None
    counts = cast(tuple[int, ...], tuple(row))
    wal = Path(str(path) + "-wal")
    return DatabaseStats(
        str(path), version, path.stat().st_size, wal.stat().st_size if wal.exists() else 0,
        *counts,
    )
