"""The sweeper: background maintenance that writes through the writer in bounded steps.

Every `sweep_interval_seconds` it expires deliveries past their TTL, prunes
settled deliveries, old message-log rows and idempotency records, each step
at most `sweep_batch` rows and repeated while a step comes back full; a
WAL checkpoint and `PRAGMA optimize` run on their own intervals. Nothing
here touches SQL: it only submits maintenance commands.

Deleted workspaces are purged by a task of their own: woken by the commit
of a `DeleteWorkspace` (the writer's `WORKSPACE_DELETED` signal) and once at
start, so a purge cut short by a restart resumes. It submits one
`PurgeWorkspace` step after another (each at most `purge_step_rows` rows,
so the commands queued meanwhile interleave with it) until the workspace
row is gone; the bytes of its files are removed after the step that
deleted their rows committed, and its directory after the last step, as
the file sweep does for deleted files.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import trio

from broker.engine import maintenance as m
from broker.engine.engine import Engine
from broker.engine.errors import BrokerError
from broker.engine.workspaces import WORKSPACE_DELETED
from broker.engine.writer import Command
from broker.filestore import FileStore

log = logging.getLogger(__name__)

# A step that keeps coming back full is cut off after this many rounds per
# sweep, so a large backlog is worked off over several intervals instead of
# monopolising the writer.
MAX_ROUNDS_PER_STEP = 20


@dataclass(frozen=True)
class SweepStatistics:
    """What `Sweeper.statistics()` returns: counts since start, frozen as of the call.

    sweeps: row sweeps run. expired: deliveries expired past their TTL.
    pruned_deliveries, pruned_log, pruned_idempotency: settled deliveries,
    message-log rows and idempotency records deleted. checkpoints: WAL
    checkpoints run; last_checkpoint: the last one's (busy, log frames,
    checkpointed frames). optimizations: `PRAGMA optimize` runs. The
    others are described beside them.
    """

    sweeps: int = 0
    expired: int = 0
    pruned_deliveries: int = 0
    pruned_log: int = 0
    pruned_idempotency: int = 0
    checkpoints: int = 0
    optimizations: int = 0
    last_checkpoint: tuple[int, int, int] | None = None
    # sweeps that skipped log pruning because expiry had a backlog left
    log_prunes_deferred: int = 0
    # deleted workspaces whose purge finished, the steps and rows it took
    workspaces_purged: int = 0
    purge_steps: int = 0
    purged_rows: int = 0


class Sweeper:
    """Runs the sweeps for the engine's lifetime: `await nursery.start(sweeper.run)`.

    store: where uploaded bytes live (None: the purge leaves them to the
    file sweep's orphan scan). purge_step_rows: rows per purge step.
    """

    def __init__(self, engine: Engine, store: FileStore | None = None, *,
                 purge_step_rows: int = m.PURGE_STEP_ROWS) -> None:
        self.engine = engine
        self.store = store
        self.purge_step_rows = purge_step_rows
        self.retention = engine.config.retention
        self.stats = SweepStatistics()
        self._purge_wanted = trio.Event()
        # The agent id the next sweep's expiry starts at: after the mailbox
        # where the last sweep ran out of rounds, so that one busy mailbox
        # cannot keep the later ones from their turn (see `_expire`).
        self._expiry_from = 0

    def statistics(self) -> SweepStatistics:
        """The counts so far (see `SweepStatistics`); frozen, so safe to keep."""
        return self.stats

    def _count(self, **added: int) -> None:
        # The figures are a frozen value, replaced whole: a snapshot handed
        # out earlier never changes under its holder.
        self.stats = replace(self.stats, **{
            name: getattr(self.stats, name) + value for name, value in added.items()})

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self._run_purges)
            task_status.started()
            await self._run_sweeps()

    async def _run_sweeps(self) -> None:
        clock = trio.current_time
        next_checkpoint = clock() + self.retention.checkpoint_interval_seconds
        next_optimize = clock() + self.retention.optimize_interval_seconds
        while True:
            await trio.sleep(self.retention.sweep_interval_seconds)
            await self.sweep_once()
            if clock() >= next_checkpoint:
                await self.checkpoint()
                next_checkpoint = clock() + self.retention.checkpoint_interval_seconds
            if clock() >= next_optimize:
                await self.engine.submit(m.Optimize())
                self._count(optimizations=1)
                next_optimize = clock() + self.retention.optimize_interval_seconds

    # -- purging deleted workspaces ---------------------------------------------------

    def _want_purge(self) -> None:
        self._purge_wanted.set()

    async def _run_purges(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        remove = self.engine.writer.on_commit(WORKSPACE_DELETED, self._want_purge)
        try:
            task_status.started()
            while True:
                # A fresh event before the look, so a deletion during it is not lost.
                self._purge_wanted = trio.Event()
                try:
                    await self.purge_deleted_workspaces()
                except BrokerError as exc:
                    # A failed commit: the marks are durable, try again later.
                    log.warning("sweeper: purging deleted workspaces failed: %s", exc)
                    with trio.move_on_after(self.retention.sweep_interval_seconds):
                        await self._purge_wanted.wait()
                    continue
                await self._purge_wanted.wait()
        finally:
            remove()

    async def purge_deleted_workspaces(self) -> int:
        """Purge every workspace marked deleted, step by step, to the end; returns the rows.

        Raises BrokerError when a step cannot be committed (the rest waits for
        the next call; the steps already committed stay done).
        """
        total = 0
        for workspace_id in await self.engine.read(m.deleted_workspaces):
            total += await self.purge_workspace(workspace_id)
        return total

    async def purge_workspace(self, workspace_id: int) -> int:
        """Run `PurgeWorkspace` steps for one deleted workspace until its row is gone."""
        rows = steps = 0
        while True:
            # Shielded like the file sweep: a step's bytes are removed once
            # its rows are committed, never left for a cancellation to skip.
            with trio.CancelScope(shield=True):
                step = await self.engine.submit(
                    m.PurgeWorkspace(workspace_id, self.purge_step_rows))
                if step.storage_keys and self.store is not None:
                    await self.store.remove(step.storage_keys)
            rows += step.rows
            steps += 1
            self._count(purge_steps=1, purged_rows=step.rows)
            if step.done:
                break
        if self.store is not None:
            await trio.to_thread.run_sync(partial(
                shutil.rmtree, self.store.objects / str(workspace_id), ignore_errors=True))
        self._count(workspaces_purged=1)
        log.info("sweeper: purged deleted workspace %d: %d rows in %d steps",
                 workspace_id, rows, steps)
        return rows

    async def checkpoint(self, mode: str = "PASSIVE") -> tuple[int, int, int]:
        result = await self.engine.submit(m.Checkpoint(mode))
        self._count(checkpoints=1)
        self.stats = replace(self.stats, last_checkpoint=result)
        return result

    async def sweep_once(self, now_ms: int | None = None) -> SweepStatistics:
        """One pass of every row sweep as of `now_ms` (default: now); returns the totals."""
        now = int(time.time() * 1000) if now_ms is None else now_ms
        r, day = self.retention, m.DAY_MS
        batch = r.sweep_batch
        ttl_idem = self.engine.limits.idempotency_ttl_seconds * 1000
        expired, backlog = await self._expire(now)
        self._count(expired=expired)
        self._count(pruned_deliveries=(await self._repeat(
            "prune_deliveries",
            lambda: m.PruneSettledDeliveries(now - int(r.settled_delivery_days * day), batch)))[0])
        if backlog:
            # Old log rows are safe to drop only once every delivery pointing
            # at them has expired; with expiry behind, wait for a later sweep.
            self._count(log_prunes_deferred=1)
        else:
            self._count(pruned_log=(await self._repeat(
                "prune_log",
                lambda: m.PruneMessageLog(now - int(r.message_log_days * day), batch)))[0])
        self._count(pruned_idempotency=(await self._repeat(
            "prune_idempotency", lambda: m.PruneIdempotencyKeys(now - ttl_idem, batch)))[0])
        self._count(sweeps=1)
        return self.stats

    async def _expire(self, now: int) -> tuple[int, bool]:
        """Expiry steps round the mailboxes in agent id order, each probing on from the last.

        Returns (deliveries expired, whether some were left). A sweep starts
        after the mailbox where the previous one ran out of rounds, goes to
        the last agent id, then wraps round from the first up to where it
        started; so each mailbox is probed once per sweep (the one a step
        stops in again by the next), and a mailbox that gains expired rows
        faster than a sweep's rounds can take them delays the others by at
        most a sweep, never for good.
        """
        total, start = 0, self._expiry_from
        until: int | None = None
        backlog = True
        for _ in range(MAX_ROUNDS_PER_STEP):
            step = await self.engine.submit(m.ExpireDeliveries(
                self.retention.sweep_batch, now, from_agent=start, until_agent=until))
            total += step.expired
            if step.resume_from is not None:
                start = step.resume_from
            elif until is None and self._expiry_from > 0:
                start, until = 0, self._expiry_from  # the wrap: the mailboxes before the start
            else:
                backlog = False
                break
        self._expiry_from = start + 1 if backlog else 0
        _log_step("expire", total, backlog)
        return total, backlog

    async def _repeat(self, name: str, make: Callable[[], Command[int]]) -> tuple[int, bool]:
        """Run a step until it comes back short; (rows changed, whether rows were left)."""
        total = 0
        backlog = True
        for _ in range(MAX_ROUNDS_PER_STEP):
            changed = await self.engine.submit(make())
            total += changed
            if changed < self.retention.sweep_batch:
                backlog = False
                break
        _log_step(name, total, backlog)
        return total, backlog


def _log_step(name: str, total: int, backlog: bool) -> None:
    if total:
        log.info("sweeper: %s changed %d rows%s", name, total,
                 " (more left for the next sweep)" if backlog else "")
