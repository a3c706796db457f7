"""The bytes of uploaded files on local disk, and the sweep that removes what no row needs.

Layout, under the data directory:

    files/tmp/                          uploads in progress: never served,
                                        emptied at every start
    files/objects/<workspace>/<file>.<random>
                                        uploaded bytes, written once

An upload streams into a new temporary file while it counts: a byte past
the declared size stops it at once, a short body is refused at the end.
The file is then fsynced, renamed to a fresh name under objects/ and the
directory fsynced; only then does the caller record that name (the storage
key) on the row, and only a row with a storage key can be completed. So a
daemon killed at any point leaves either a temporary file (removed at the
next start) or bytes that no row names yet (removed at the next start, see
`remove_orphans`), never a complete file without its bytes.

Removal is the other way round: a sweep command first clears the rows'
storage keys (or drops expired pending rows) and commits; the bytes are
unlinked after that. A crash in between again only leaves orphans.

This module sits beside `broker.engine`, not in it: the database is the
engine's, the bytes are not, and the writer never waits on file I/O.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import time
from collections.abc import AsyncIterable, Iterator
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import trio

from broker.engine import files
from broker.engine.engine import Engine
from broker.engine.errors import BrokerError

log = logging.getLogger(__name__)

FILES_DIR = "files"
TMP_DIR = "tmp"
OBJECTS_DIR = "objects"
# Received bytes are written in pieces of at least this size (one thread hop each).
WRITE_CHUNK = 1024 * 1024
# How often the server runs the file sweep.
FILE_SWEEP_INTERVAL_S = 60.0
# Storage keys checked against the database per query during the orphan scan.
ORPHAN_SCAN_BATCH = 500
# A sweep step that keeps coming back full is repeated at most this often per
# sweep, so a backlog is worked off over several intervals.
MAX_SWEEP_ROUNDS = 20


@dataclass(frozen=True)
class FileStoreStatistics:
    """What `FileStore.statistics()` returns: counts since start, frozen as of the call.

    uploads, uploaded_bytes: uploads placed and their bytes. refused_uploads:
    uploads that failed or were cut short (nothing placed). removed: objects
    unlinked; orphans_removed: objects no row named, and directories of
    deleted workspaces, removed by the orphan scan.
    temp_files_removed: unfinished uploads cleared from `tmp/` at open.
    """

    uploads: int = 0
    uploaded_bytes: int = 0
    refused_uploads: int = 0
    removed: int = 0
    orphans_removed: int = 0
    temp_files_removed: int = 0


class FileStore:
    """Bytes of files under `<data_dir>/files`; call `open()` once before use."""

    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir) / FILES_DIR
        self.tmp = self.root / TMP_DIR
        self.objects = self.root / OBJECTS_DIR
        self.stats = FileStoreStatistics()

    def statistics(self) -> FileStoreStatistics:
        """The counts so far (see `FileStoreStatistics`); frozen, so safe to keep."""
        return self.stats

    def count(self, **added: int) -> None:
        """Add to the counts named (the fields of `FileStoreStatistics`)."""
        # A frozen value replaced whole: a snapshot handed out earlier never
        # changes under its holder.
        self.stats = replace(self.stats, **{
            name: getattr(self.stats, name) + value for name, value in added.items()})

    # -- lifecycle ---------------------------------------------------------------------

    def open(self) -> int:
        """Create the directories and empty `tmp/` (nothing is uploading yet); blocking.

        Returns how many temporary files were removed.
        """
        for path in (self.root, self.tmp, self.objects):
            if _mkdir(path):
                _fsync_dir(path.parent)
        removed = 0
        for entry in os.scandir(self.tmp):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed += 1
        if removed:
            log.info("file store %s: removed %d unfinished uploads", self.root, removed)
        self.count(temp_files_removed=removed)
        return removed

    # -- writing -----------------------------------------------------------------------

    async def receive(
        self, workspace_id: int, file_id: int, chunks: AsyncIterable[bytes], size: int
    ) -> str:
        """Store exactly `size` bytes from `chunks` durably; returns the new storage key.

        Raises BrokerError("file_size_mismatch") as soon as more bytes arrive
        than declared, or at the end when fewer did; nothing is left behind.
        """
        key = f"{workspace_id}/{file_id}.{secrets.token_hex(8)}"
        tmp = self.tmp / f"{file_id}.{secrets.token_hex(8)}.part"
        fd = await trio.to_thread.run_sync(
            os.open, tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
        )
        placed = False
        try:
            received = 0
            buffer = bytearray()
            async for chunk in chunks:
                received += len(chunk)
                if received > size:
                    raise BrokerError(
                        "file_size_mismatch",
                        f"the upload sent more than the declared size_bytes ({size})",
                    )
                buffer += chunk
                if len(buffer) >= WRITE_CHUNK:
                    await trio.to_thread.run_sync(_write_all, fd, bytes(buffer))
                    buffer.clear()
            if received != size:
                raise BrokerError(
                    "file_size_mismatch",
                    f"the upload sent {received} bytes; size_bytes declared {size}",
                )
            if buffer:
                await trio.to_thread.run_sync(_write_all, fd, bytes(buffer))
            await trio.to_thread.run_sync(self._place, fd, tmp, key)
            placed = True
        except BaseException:
            self.count(refused_uploads=1)
            raise
        finally:
            os.close(fd)
            if not placed:
                tmp.unlink(missing_ok=True)
        self.count(uploads=1, uploaded_bytes=size)
        return key

    def _place(self, fd: int, tmp: Path, key: str) -> None:
        """In a worker thread: make the bytes durable, then give them their final name."""
        os.fsync(fd)
        final = self.path_of(key)
        if _mkdir(final.parent):
            _fsync_dir(final.parent.parent)
        os.rename(tmp, final)
        _fsync_dir(final.parent)

    # -- reading -----------------------------------------------------------------------

    def path_of(self, key: str) -> Path:
        """Where the bytes of a storage key live (ValueError for anything not a key)."""
        if not files.is_storage_key(key):
            raise ValueError(f"{key!r} is not a storage key")
        return self.objects / key

    # -- removing ----------------------------------------------------------------------

    async def remove(self, keys: list[str]) -> int:
        """Unlink the bytes of `keys` (already gone is fine); returns how many were removed."""
        if not keys:
            return 0
        removed = await trio.to_thread.run_sync(self._remove, keys)
        self.count(removed=removed)
        return removed

    def discard(self, key: str) -> None:
        """Unlink one object now, from the event loop: for error paths, where awaiting
        could be cancelled before the bytes are gone (an unlink is quick)."""
        self.path_of(key).unlink(missing_ok=True)

    def _remove(self, keys: list[str]) -> int:
        removed = 0
        for key in keys:
            try:
                self.path_of(key).unlink()
            except FileNotFoundError:
                continue
            removed += 1
        return removed

    def workspace_dirs(self) -> list[int]:
        """Workspaces that have a directory of bytes."""
        return [int(e.name) for e in os.scandir(self.objects)
                if e.name.isdigit() and e.is_dir(follow_symlinks=False)]

    def object_keys(self) -> Iterator[str]:
        """Every storage key that has bytes on disk (blocking: run it in a thread)."""
        for workspace_id in self.workspace_dirs():
            for entry in os.scandir(self.objects / str(workspace_id)):
                key = f"{workspace_id}/{entry.name}"
                if files.is_storage_key(key):
                    yield key


async def remove_orphans(engine: Engine, store: FileStore) -> int:
    """Remove bytes that no row names: what a crash between disk and database left behind.

    Safe only while no upload is running (the server runs it before it
    listens): an upload's bytes are orphans until its row records them.
    Returns how many objects (and directories of deleted workspaces) were removed.
    """
    removed = await _remove_dead_workspaces(engine, store)
    keys = await trio.to_thread.run_sync(lambda: list(store.object_keys()))
    for start in range(0, len(keys), ORPHAN_SCAN_BATCH):
        batch = keys[start:start + ORPHAN_SCAN_BATCH]
        kept = await engine.read(files.kept_storage_keys, batch)
        removed += await store.remove([k for k in batch if k not in kept])
    if removed:
        log.info("file store %s: removed %d orphaned objects", store.root, removed)
    store.count(orphans_removed=removed)
    return removed


async def _remove_dead_workspaces(engine: Engine, store: FileStore) -> int:
    """Remove the directories of deleted workspaces (their rows went with the workspace)."""
    on_disk = await trio.to_thread.run_sync(store.workspace_dirs)
    alive = await engine.read(files.existing_workspaces, on_disk)
    dead = [w for w in on_disk if w not in alive]
    for workspace_id in dead:
        await trio.to_thread.run_sync(
            partial(shutil.rmtree, store.objects / str(workspace_id), ignore_errors=True)
        )
        log.info("file store %s: removed the files of deleted workspace %d", store.root,
                 workspace_id)
    return len(dead)


@dataclass
class FileSweepReport:
    expired_uploads: int = 0
    purged_deletions: int = 0
    removed_objects: int = 0


async def sweep_files(
    engine: Engine, store: FileStore, now_ms: int | None = None
) -> FileSweepReport:
    """One pass: drop expired uploads and release deleted files' bytes, then remove the bytes.

    Each step's bytes are removed only after its command committed; the
    pair runs shielded, so a cancelled sweep never commits without removing.
    """
    report = FileSweepReport()
    retention_ms = engine.limits.deleted_file_retention_seconds * 1000
    for _ in range(MAX_SWEEP_ROUNDS):
        with trio.CancelScope(shield=True):
            swept = await engine.submit(
                files.SweepFiles(retention_ms=retention_ms, now_ms=now_ms)
            )
            report.removed_objects += await store.remove(swept.storage_keys)
        report.expired_uploads += swept.expired_uploads
        report.purged_deletions += swept.purged_deletions
        if max(swept.expired_uploads, swept.purged_deletions) < files.SWEEP_BATCH:
            break
    report.removed_objects += await _remove_dead_workspaces(engine, store)
    if report.expired_uploads or report.purged_deletions or report.removed_objects:
        log.info("file sweep: %d expired uploads, %d deleted files released, %d objects removed",
                 report.expired_uploads, report.purged_deletions, report.removed_objects)
    return report


async def run_file_sweep(
    engine: Engine, store: FileStore, interval: float, *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Prepare the store (empty tmp/, remove orphans), report started, then sweep every `interval`.

    Start it before the server listens: the start-up cleanup assumes no upload is running.
    """
    started = time.perf_counter()
    await trio.to_thread.run_sync(store.open)
    await remove_orphans(engine, store)
    log.info("file store %s: ready in %.3fs", store.root, time.perf_counter() - started)
    task_status.started()
    while True:
        try:
            await sweep_files(engine, store)
        except (BrokerError, OSError) as exc:
            # A failed commit or an unreadable directory: nothing is lost by
            # trying again at the next interval.
            log.warning("file sweep failed, retrying in %ss: %s", interval, exc)
        await trio.sleep(interval)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _mkdir(path: Path) -> bool:
    """Create `path` (mode 0700); True if it did not exist."""
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        return False
    return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
