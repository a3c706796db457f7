"""Opening the database file: the one write connection and read-only connections.

The write connection takes an exclusive advisory lock on `<file>-writer.lock`
before it touches the file, so a second daemon on the same file stops with a
clear error instead of contending for SQLite's lock. The file is checked
(it must be SQLite, with a schema version this broker knows) before any
pragma that could write to it.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import apsw

from broker.engine.config import EngineConfig
from broker.engine.errors import StartupError
from broker.engine.schema import check_version, migrate


class WriterLock:
    """An exclusive `flock` held for as long as the write connection is open."""

    def __init__(self, db_path: Path) -> None:
        self.path = db_path.with_name(db_path.name + "-writer.lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StartupError(
                f"{self.path.with_name(self.path.name.removesuffix('-writer.lock'))} is already "
                f"opened for writing by another broker (pid {holder})"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def open_writer(path: Path, config: EngineConfig) -> tuple[apsw.Connection, WriterLock]:
    """Open, lock, check and migrate the database file for writing.

    Raises StartupError when the file is not SQLite, has a newer schema, or is
    held by another writer; the file is left untouched in each case.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = WriterLock(path)
    lock.acquire()
    try:
        conn = apsw.Connection(
            str(path), flags=apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE
        )
        try:
            conn.set_busy_timeout(config.busy_timeout_ms)
            check_version(conn)  # refuses foreign or newer files before anything writes
            mode = conn.execute("pragma journal_mode = WAL").fetchone()
            if mode is None or str(mode[0]).lower() != "wal":
                raise StartupError(f"{path}: could not switch to WAL mode (got {mode!r})")
            conn.execute(f"pragma synchronous = {config.synchronous}")
            conn.execute("pragma foreign_keys = ON")
            conn.execute("pragma temp_store = MEMORY")
            migrate(conn)
        except BaseException:
            conn.close()
            raise
    except BaseException:
        lock.release()
        raise
    return conn, lock


def open_reader(path: Path, config: EngineConfig) -> apsw.Connection:
    """A read-only connection: any write through it fails with apsw.ReadOnlyError."""
    conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    conn.set_busy_timeout(config.busy_timeout_ms)
    conn.execute("pragma query_only = ON")
    return conn
