"""Online backup and integrity check of the database file.

`backup` copies the live database through SQLite's backup API from a
read-only connection, so the daemon keeps writing meanwhile: the copy is
consistent as of one instant (the API restarts a step when the source
changes under it, which one read transaction held for the whole copy
avoids). It writes to a temporary file beside the target, fsyncs
it and renames it into place, so a backup interrupted half way never leaves
a file that looks complete.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import apsw
import msgspec

from broker.engine.schema import SCHEMA_VERSION, check_version

# Pages copied per backup step; between steps the writer may commit.
BACKUP_PAGES_PER_STEP = 1024


class CheckReport(msgspec.Struct, frozen=True):
    path: str
    schema_version: int
    expected_version: int
    integrity: list[str]
    foreign_key_violations: int

    @property
    def ok(self) -> bool:
        return (self.integrity == ["ok"] and self.foreign_key_violations == 0
                and self.schema_version == self.expected_version)


def backup(
    source: Path, target: Path, progress: Callable[[int, int], None] | None = None
) -> int:
    """Copy `source` to `target` while it is in use; returns the page count copied.

    progress(remaining, total) is called after each step.
    """
    target = Path(target)
    if target.exists():
        raise FileExistsError(f"{target} already exists; refusing to overwrite it")
    tmp = target.with_name(f".{target.name}.partial")
    tmp.unlink(missing_ok=True)
    src = apsw.Connection(str(source), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        check_version(src)
        # One read transaction for the whole copy: every step reads the same
        # WAL snapshot, so writers carry on and the copy never restarts.
        src.execute("BEGIN")
        src.execute("SELECT count(*) FROM sqlite_schema").fetchone()
        dest = apsw.Connection(str(tmp))
        try:
            with dest.backup("main", src, "main") as job:
                while not job.done:
                    job.step(BACKUP_PAGES_PER_STEP)
                    if progress is not None:
                        progress(job.remaining, job.page_count)
                pages = job.page_count
            # a self-contained file: no WAL beside the copy
            dest.execute("PRAGMA journal_mode = DELETE")
        finally:
            dest.close()
    finally:
        src.close()
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, target)
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return pages


def check(path: Path) -> CheckReport:
    """Integrity check, foreign-key check and schema version of the file, read-only."""
    conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        version = check_version(conn)
        try:
            integrity = [str(r[0]) for r in conn.execute("PRAGMA integrity_check")]
            violations = len(conn.execute("PRAGMA foreign_key_check").fetchall())
        except apsw.CorruptError as exc:
            # damage bad enough that the check itself cannot walk the file
            integrity, violations = [f"corrupt: {exc}"], 0
    finally:
        conn.close()
    return CheckReport(str(path), version, SCHEMA_VERSION, integrity, violations)
