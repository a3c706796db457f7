"""The reader pool: read-only connections that run queries in worker threads.

Readers never block the writer (WAL) and never block the event loop: each
query runs in a worker thread under a capacity limiter of the pool's size.
A connection is opened read-only, so a write through it fails.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ParamSpec, TypeVar

import apsw
import trio

from broker.engine.config import EngineConfig
from broker.engine.database import open_reader

T = TypeVar("T")
P = ParamSpec("P")


@dataclass(frozen=True)
class ReaderPoolStatistics:
    """What `ReaderPool.statistics()` returns.

    size: connections in the pool. busy: queries running now. waiting:
    callers waiting for a free connection. queries: queries run since start.
    """

    size: int
    busy: int
    waiting: int
    queries: int


class ReaderPool:
    """N read-only connections; `await pool.run(fn, *args)` runs `fn(conn, *args)`.

    Open it after the writer has created and migrated the file.
    """

    def __init__(self, db_path: Path, config: EngineConfig | None = None) -> None:
        self.db_path = db_path
        self.config = config or EngineConfig()
        self._size = self.config.readers
        self._free: list[apsw.Connection] = []
        self._limiter = trio.CapacityLimiter(self._size)
        # Worker threads of its own: never queued behind trio's default
        # limiter (file I/O, the writer); at most `size` callers hold one.
        self._threads = trio.CapacityLimiter(self._size)
        self.queries = 0

    def open(self) -> None:
        if not self._free:
            self._free = [open_reader(self.db_path, self.config) for _ in range(self._size)]

    def close(self) -> None:
        for conn in self._free:
            conn.close()
        self._free = []

    async def __aenter__(self) -> ReaderPool:
        self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    async def run(
        self, fn: Callable[..., T], *args: object
    ) -> T:
        """Run `fn(conn, *args)` in a worker thread with a free read-only connection.

        The call holds one read transaction, so every statement in `fn` sees
        the same snapshot. Exceptions from `fn` propagate.
        """
        async with self._limiter:
            conn = self._free.pop()
            try:
                self.queries += 1
                return await trio.to_thread.run_sync(
                    _in_snapshot, conn, fn, args, limiter=self._threads)
            finally:
                self._free.append(conn)

    def statistics(self) -> ReaderPoolStatistics:
        """The pool's figures as of this call (see `ReaderPoolStatistics`)."""
        stats = self._limiter.statistics()
        return ReaderPoolStatistics(
            size=self._size, busy=stats.borrowed_tokens, waiting=stats.tasks_waiting,
            queries=self.queries,
        )


def _in_snapshot(conn: apsw.Connection, fn: Callable[..., T], args: tuple[object, ...]) -> T:
    with conn:
        result = fn(conn, *args)
    return result
