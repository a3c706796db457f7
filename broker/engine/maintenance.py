"""Maintenance commands run by the sweeps: expiry, retention, checkpoints.

Each command changes at most `limit` rows, so one sweep step holds the writer
for a bounded time; the sweeper repeats a step while it reports a full batch.

Expiry: a delivery still unsettled at its `expires_at` becomes dead_lettered,
and the agent that sent the message gets a durable `delivery.failed` notice
(only for events that carry a message, so notices never cascade).
"""

from __future__ import annotations

from typing import cast

import apsw
import msgspec

from broker.engine.events import record_event
from broker.engine.reads import MESSAGE_EVENTS
from broker.engine.writer import Maintenance, Tx

DAY_MS = 86_400_000


class DeliveryFailed(msgspec.Struct, frozen=True):
    """The data of a `delivery.failed` notice."""

    delivery_id: str
    message_id: str | None
    event_type: str
    agent_id: str
    agent_name: str
    reason: str


class ExpireDeliveries(msgspec.Struct, frozen=True):
    """Dead-letter up to `limit` deliveries past their TTL as of now_ms; returns how many."""

    limit: int
    now_ms: int | None = None  # default: the batch's time

    def apply(self, tx: Tx) -> int:
        conn = tx.conn
        now = tx.now_ms if self.now_ms is None else self.now_ms
        rows = cast(list[tuple[int, int, int | None, str, int | None, int, str]], conn.execute(
            "SELECT d.agent_id, d.seq, d.message_id, l.type, l.agent_id, l.workspace_id, a.name"
            " FROM deliveries d JOIN message_log l ON l.id = d.log_id"
            " JOIN agents a ON a.id = d.agent_id"
            " WHERE d.expires_at <= ? AND d.state IN ('queued', 'delivered', 'failed')"
            " ORDER BY d.expires_at LIMIT ?",
            (now, self.limit),
        ).fetchall())
        if not rows:
            return 0
        conn.executemany(
            "UPDATE deliveries SET state = 'dead_lettered', error = 'expired', updated_at = ?"
            " WHERE agent_id = ? AND seq = ?",
            [(now, agent_id, seq) for agent_id, seq, *_ in rows],
        )
        per_agent: dict[int, int] = {}
        for agent_id, *_ in rows:
            per_agent[agent_id] = per_agent.get(agent_id, 0) + 1
        conn.executemany(
            "UPDATE agents SET pending_count = max(pending_count - ?, 0) WHERE id = ?",
            [(n, agent_id) for agent_id, n in per_agent.items()],
        )
        for agent_id, seq, message_id, event_type, sender, workspace_id, name in rows:
            if event_type not in MESSAGE_EVENTS or sender is None or sender == agent_id:
                continue
            record_event(
                tx, workspace_id=workspace_id, event_type="delivery.failed",
                data=DeliveryFailed(
                    delivery_id=f"{agent_id}:{seq}",
                    message_id=None if message_id is None else str(message_id),
                    event_type=event_type, agent_id=str(agent_id), agent_name=name,
                    reason="expired",
                ),
                recipients=[sender], agent_id=agent_id,
            )
        return len(rows)


class PruneSettledDeliveries(msgspec.Struct, frozen=True):
    """Delete up to `limit` acked or dead-lettered deliveries created before `older_than_ms`."""

    older_than_ms: int
    limit: int

    def apply(self, tx: Tx) -> int:
        tx.conn.execute(
            "DELETE FROM deliveries WHERE (agent_id, seq) IN ("
            " SELECT agent_id, seq FROM deliveries"
            " WHERE state IN ('acked', 'dead_lettered') AND created_at < ? LIMIT ?)",
            (self.older_than_ms, self.limit),
        )
        return tx.conn.changes()


class PruneMessageLog(msgspec.Struct, frozen=True):
    """Delete up to `limit` message-log rows created before `older_than_ms`.

    Safe without a join: the configuration guarantees that every delivery
    pointing at such a row has expired and been pruned first.
    """

    older_than_ms: int
    limit: int

    def apply(self, tx: Tx) -> int:
        tx.conn.execute(
            "DELETE FROM message_log WHERE id IN ("
            " SELECT id FROM message_log WHERE created_at < ? LIMIT ?)",
            (self.older_than_ms, self.limit),
        )
        return tx.conn.changes()


class PruneIdempotencyKeys(msgspec.Struct, frozen=True):
    """Delete up to `limit` idempotency records created before `older_than_ms`."""

    older_than_ms: int
    limit: int

    def apply(self, tx: Tx) -> int:
        tx.conn.execute(
            "DELETE FROM idempotency_keys WHERE (agent_id, key) IN ("
            " SELECT agent_id, key FROM idempotency_keys WHERE created_at < ? LIMIT ?)",
            (self.older_than_ms, self.limit),
        )
        return tx.conn.changes()


class Checkpoint(Maintenance[tuple[int, int, int]]):
    """`PRAGMA wal_checkpoint(mode)`: returns (busy, wal frames, frames checkpointed)."""

    def __init__(self, mode: str = "PASSIVE") -> None:
        if mode not in ("PASSIVE", "FULL", "RESTART", "TRUNCATE"):
            raise ValueError(f"unknown checkpoint mode {mode!r}")
        self.mode = mode

    def run(self, conn: apsw.Connection) -> tuple[int, int, int]:
        row = conn.execute(f"PRAGMA wal_checkpoint({self.mode})").fetchone()
        assert row is not None
        return cast(tuple[int, int, int], tuple(row))


class Optimize(Maintenance[None]):
    """`PRAGMA optimize`: lets SQLite refresh the statistics its planner uses."""

    def run(self, conn: apsw.Connection) -> None:
        conn.execute("PRAGMA optimize")
