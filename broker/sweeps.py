"""The sweeper: background maintenance that writes through the writer in bounded steps.

Every `sweep_interval_seconds` it expires deliveries past their TTL, prunes
settled deliveries, old message-log rows and idempotency records, each step
at most `sweep_batch` rows and repeated while a step comes back full; a
WAL checkpoint and `PRAGMA optimize` run on their own intervals. Nothing
here touches SQL: it only submits maintenance commands.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import trio

from broker.engine import maintenance as m
from broker.engine.engine import Engine
from broker.engine.writer import Command

log = logging.getLogger(__name__)

# A step that keeps coming back full is cut off after this many rounds per
# sweep, so a large backlog is worked off over several intervals instead of
# monopolising the writer.
MAX_ROUNDS_PER_STEP = 20


@dataclass
class SweepStatistics:
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


class Sweeper:
    """Runs the sweeps for the engine's lifetime: `await nursery.start(sweeper.run)`."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.retention = engine.config.retention
        self.stats = SweepStatistics()

    def statistics(self) -> SweepStatistics:
        return self.stats

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
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
                self.stats.optimizations += 1
                next_optimize = clock() + self.retention.optimize_interval_seconds

    async def checkpoint(self, mode: str = "PASSIVE") -> tuple[int, int, int]:
        result = await self.engine.submit(m.Checkpoint(mode))
        self.stats.checkpoints += 1
        self.stats.last_checkpoint = result
        return result

    async def sweep_once(self, now_ms: int | None = None) -> SweepStatistics:
        """One pass of every row sweep as of `now_ms` (default: now); returns the totals."""
        now = int(time.time() * 1000) if now_ms is None else now_ms
        r, day = self.retention, m.DAY_MS
        batch = r.sweep_batch
        ttl_idem = self.engine.limits.idempotency_ttl_seconds * 1000
        expired, backlog = await self._repeat("expire", lambda: m.ExpireDeliveries(batch, now))
        self.stats.expired += expired
        self.stats.pruned_deliveries += (await self._repeat(
            "prune_deliveries",
            lambda: m.PruneSettledDeliveries(now - int(r.settled_delivery_days * day), batch)))[0]
        if backlog:
            # Old log rows are safe to drop only once every delivery pointing
            # at them has expired; with expiry behind, wait for a later sweep.
            self.stats.log_prunes_deferred += 1
        else:
            self.stats.pruned_log += (await self._repeat(
                "prune_log",
                lambda: m.PruneMessageLog(now - int(r.message_log_days * day), batch)))[0]
        self.stats.pruned_idempotency += (await self._repeat(
            "prune_idempotency", lambda: m.PruneIdempotencyKeys(now - ttl_idem, batch)))[0]
        self.stats.sweeps += 1
        return self.stats

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
        if total:
            log.info("sweeper: %s changed %d rows%s", name, total,
                     " (more left for the next sweep)" if backlog else "")
        return total, backlog
