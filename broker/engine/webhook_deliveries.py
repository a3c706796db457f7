"""The webhook dispatcher's side of the outbox table: what is due, and each attempt's outcome.

Each outbox row is the delivery state of one (event, subscription) pair:
`pending` -> `delivered`, or -> `dead` (dead letter) after a final answer or
the last allowed attempt; `attempts`, `next_attempt_at`, `last_status` and
`last_error` say where it stands. The dispatcher (broker.webhooks) reads
due rows through the reader pool (`due_deliveries`) and reports each
attempt with `RecordDeliveryAttempt`, a writer command; delivered rows are
pruned by `PruneDeliveredWebhooks`. The rows are written by
broker.engine.outbox; subscriptions, dead letters and their replay are
broker.engine.webhooks. Nothing here performs I/O.
"""

from __future__ import annotations

from typing import Literal, cast

import apsw
import msgspec

from broker.engine.writer import Tx

DeliveryOutcome = Literal["delivered", "retry", "dead"]

_encoder = msgspec.json.Encoder()
_headers_decoder = msgspec.json.Decoder(dict[str, str])


# -- what the dispatcher writes -------------------------------------------------------


class RecordDeliveryAttempt(msgspec.Struct, frozen=True, kw_only=True):
    """The dispatcher's report of one attempt at an outbox row.

    outcome: delivered (final), retry (pending again after retry_delay_ms),
    dead (dead letter). attempts: the row's attempt count when the dispatcher
    read it; if it changed since (a replay, a deletion), nothing is written.
    Returns the row's new state, or None when nothing was written.
    """

    outbox_id: int
    attempts: int
    outcome: DeliveryOutcome
    status: int | None = None
    error: str | None = None
    retry_delay_ms: int = 0

    def apply(self, tx: Tx) -> str | None:
        state = "pending" if self.outcome == "retry" else self.outcome
        changed = tx.conn.execute(
            "UPDATE outbox SET state = ?, attempts = attempts + 1, next_attempt_at = ?,"
            " last_status = ?, last_error = ?, updated_at = ?"
            " WHERE id = ? AND state = 'pending' AND attempts = ? RETURNING state",
            (state, tx.now_ms + max(0, self.retry_delay_ms), self.status,
             None if self.error is None else self.error[:1000], tx.now_ms,
             self.outbox_id, self.attempts),
        ).fetchall()
        return state if changed else None



class PruneDeliveredWebhooks(msgspec.Struct, frozen=True, kw_only=True):
    """Delete up to `limit` delivered outbox rows settled before `before_ms`; returns how many."""

    before_ms: int
    limit: int = 1000

    def apply(self, tx: Tx) -> int:
        rows = tx.conn.execute(
            "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE state = 'delivered'"
            " AND updated_at < ? LIMIT ?) RETURNING id",
            (self.before_ms, self.limit),
        ).fetchall()
        return len(rows)



# -- what the dispatcher reads --------------------------------------------------------


class DueDelivery(msgspec.Struct, frozen=True, kw_only=True):
    """A pending outbox row that is due, with what it takes to send it."""

    id: int
    subscription_id: int
    workspace_id: int
    type: str
    payload: bytes
    attempts: int
    created_at: int
    url: str
    headers: dict[str, str]
    secret: str | None


class DueBatch(msgspec.Struct, frozen=True):
    """Due rows (oldest due first), and when the next not-yet-due row falls due (ms)."""

    rows: list[DueDelivery]
    next_due_ms: int | None


def due_deliveries(
    conn: apsw.Connection, now_ms: int, busy_ids: list[int], busy_subscriptions: list[int],
    limit: int,
) -> DueBatch:
    """Pending rows due at `now_ms`, except those in flight and those of saturated subscriptions.

    Skipping saturated subscriptions in SQL is what keeps one endpoint's
    backlog from filling every batch and starving the other subscriptions.
    """
    rows = conn.execute(
        "SELECT o.id, o.subscription_id, o.workspace_id, o.type, o.payload, o.attempts,"
        " o.created_at, s.url, s.headers, s.secret"
        " FROM outbox o JOIN webhook_subscriptions s ON s.id = o.subscription_id"
        # A deleted workspace's rows wait for its purge, never for delivery.
        " JOIN workspaces w ON w.id = o.workspace_id AND w.deleted_at IS NULL"
        " WHERE o.state = 'pending' AND o.next_attempt_at <= ? AND s.active"
        " AND o.id NOT IN (SELECT value FROM json_each(?))"
        " AND o.subscription_id NOT IN (SELECT value FROM json_each(?))"
        " ORDER BY o.next_attempt_at, o.id LIMIT ?",
        (now_ms, _encoder.encode(busy_ids).decode(),
         _encoder.encode(busy_subscriptions).decode(), limit),
    ).fetchall()
    upcoming = conn.execute(
        "SELECT min(next_attempt_at) FROM outbox WHERE state = 'pending' AND next_attempt_at > ?",
        (now_ms,),
    ).fetchone()
    return DueBatch(
        [
            DueDelivery(
                id=cast(int, r[0]), subscription_id=cast(int, r[1]), workspace_id=cast(int, r[2]),
                type=cast(str, r[3]), payload=bytes(cast(bytes, r[4])), attempts=cast(int, r[5]),
                created_at=cast(int, r[6]), url=cast(str, r[7]),
                headers=_headers_decoder.decode(cast(str, r[8])),
                secret=cast("str | None", r[9]),
            )
            for r in rows
        ],
        None if upcoming is None or upcoming[0] is None else int(cast(int, upcoming[0])),
    )


class OutboxBacklog(msgspec.Struct, frozen=True):
    """Pending outbox rows over every workspace, and when the oldest was written (ms)."""

    pending: int
    oldest_created_at: int | None


def outbox_backlog(conn: apsw.Connection) -> OutboxBacklog:
    """The dispatcher's queue as the table holds it (for metrics)."""
    row = conn.execute(
        "SELECT count(*), min(created_at) FROM outbox WHERE state = 'pending'"
    ).fetchone()
    assert row is not None
    return OutboxBacklog(int(cast(int, row[0])), cast("int | None", row[1]))
