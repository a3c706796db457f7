"""The delivery mailbox of an agent: what it must still receive, and its acknowledgements.

A delivery row moves through these states:

    queued --(pushed: MarkDelivered)--> delivered --(ack)--> acked (final)
       ^  \\                              |
       |   `--(fail, retryable)--> failed <'   (a failed row is pushed again)
       `----(defer until T)---------'          (back to queued, not before T)
    any unacked state --(fail, not retryable)--> dead_lettered (final)

`pending_count` on the agent counts its rows in queued, delivered or
failed; every transition into acked or dead_lettered decrements it, so the
mailbox limit in `record_event` stays exact without a count query.

The cumulative ack (`AckUpTo`) keeps one invariant that makes it and the
replay cheap: every row with seq <= `agents.acked_seq` is final (acked or
dead_lettered). An ack therefore only touches the rows between the old mark
and the new one, and `list_pending` starts scanning after the mark. An ack
above the highest seq ever allocated (`last_seq`) is clamped to it: the mark
can never cover a seq that does not exist yet, or a later delivery would be
born acknowledged.

A delivery is named on the wire `"<agent_id>:<seq>"`; a caller may only
name its own deliveries (any other is `delivery_not_found`). Every
transition reports whether it changed anything, so a duplicate ack is
visible as a no-op rather than an error: at-least-once delivery makes
duplicates normal.
"""

from __future__ import annotations

from typing import Literal, cast

import apsw
import msgspec

from broker.engine.errors import BrokerError
from broker.engine.history import page_limit
from broker.engine.writer import Tx
from protocol.objects import AckResult, DeliveriesMarked, DeliveryTransition

State = Literal["queued", "delivered", "acked", "failed", "dead_lettered"]
PENDING_STATES: tuple[State, ...] = ("queued", "delivered", "failed")
_PENDING_SQL = "('queued', 'delivered', 'failed')"
# Replay pages: the default and the largest (a reconnecting agent may have
# thousands of unacked rows; the gateway pages through them in seq order).
DEFAULT_PAGE = 100
MAX_PAGE = 1000
# Seqs one MarkDelivered may name (the gateway marks what it pushed in one go).
MAX_MARK = 1000
# Longest error text kept for a failed delivery, in characters.
ERROR_MAX_CHARS = 4096

_encoder = msgspec.json.Encoder()


class PendingDelivery(msgspec.Struct, frozen=True, kw_only=True):
    """An unacked delivery with its event, as the gateway pushes it.

    payload: the event's `{"type": ..., "data": ...}` JSON, passed through as is.
    Times are milliseconds since the epoch.
    """

    delivery_id: str
    agent_id: int
    seq: int
    state: State
    attempts: int
    type: str
    message_id: int | None
    log_id: int
    payload: msgspec.Raw
    available_at: int | None
    expires_at: int
    created_at: int


def delivery_id(agent_id: int, seq: int) -> str:
    """The wire id of a delivery: `"<agent_id>:<seq>"`."""
    return f"{agent_id}:{seq}"


def parse_delivery_id(agent_id: int, value: str) -> int:
    """The seq of the caller's delivery named `value`. Raises delivery_not_found."""
    owner, sep, seq = value.partition(":")
    if (
        sep and owner.isascii() and owner.isdigit() and seq.isascii() and seq.isdigit()
        and len(owner) <= 19 and len(seq) <= 19 and int(owner) == agent_id
    ):
        return int(seq)
    raise BrokerError("delivery_not_found", f"delivery {value!r} not found")


class _Marks(msgspec.Struct, frozen=True):
    last_seq: int
    acked_seq: int


def _marks(conn: apsw.Connection, workspace_id: int, agent_id: int) -> _Marks:
    """The active agent's seq marks. Raises agent_not_found."""
    row = conn.execute(
        "SELECT last_seq, acked_seq FROM agents"
        " WHERE id = ? AND workspace_id = ? AND deactivated_at IS NULL",
        (agent_id, workspace_id),
    ).fetchone()
    if row is None:
        raise BrokerError("agent_not_found", f"agent {agent_id} not found")
    return _Marks(int(row[0]), int(row[1]))


def _seq(value: int, what: str) -> int:
    if value < 0:
        raise BrokerError("invalid_seq", f"{what} must be 0 or more")
    return value


# -- queries (run on the reader pool) ---------------------------------------------


def list_pending(
    conn: apsw.Connection, workspace_id: int, agent_id: int, after_seq: int | None = None,
    limit: int | None = None, now_ms: int | None = None,
) -> list[PendingDelivery]:
    """The agent's unacked deliveries (queued, delivered, failed) after `after_seq`, in seq order.

    now_ms: if given, deliveries deferred past it are left out (a replay
    that honours DeferDelivery); None lists them too.
    Raises agent_not_found, invalid_seq, invalid_limit (1..MAX_PAGE).
    """
    size = page_limit(limit, DEFAULT_PAGE, MAX_PAGE)
    after = 0 if after_seq is None else _seq(after_seq, "after_seq")
    marks = _marks(conn, workspace_id, agent_id)
    rows = conn.execute(
        "SELECT d.seq, d.state, d.attempts, l.type, d.message_id, d.log_id, l.payload,"
        " d.available_at, d.expires_at, d.created_at"
        " FROM deliveries d JOIN message_log l ON l.id = d.log_id"
        f" WHERE d.agent_id = ? AND d.seq > ? AND d.state IN {_PENDING_SQL}"
        " AND (? IS NULL OR d.available_at IS NULL OR d.available_at <= ?)"
        " ORDER BY d.seq LIMIT ?",
        (agent_id, max(after, marks.acked_seq), now_ms, now_ms, size),
    ).fetchall()
    return [
        PendingDelivery(
            delivery_id=delivery_id(agent_id, cast(int, seq)), agent_id=agent_id,
            seq=cast(int, seq), state=cast(State, state), attempts=cast(int, attempts),
            type=cast(str, type_), message_id=cast("int | None", message_id),
            log_id=cast(int, log_id), payload=msgspec.Raw(cast(bytes, payload)),
            available_at=cast("int | None", available_at), expires_at=cast(int, expires_at),
            created_at=cast(int, created_at),
        )
        for (seq, state, attempts, type_, message_id, log_id, payload, available_at, expires_at,
             created_at) in rows
    ]


# -- commands ----------------------------------------------------------------------


class AckUpTo(msgspec.Struct, frozen=True, kw_only=True):
    """Cumulative ack: every unacked delivery with seq <= up_to_seq becomes acked.

    up_to_seq above the agent's last allocated seq is clamped to it; at or
    below the current mark it changes nothing (changed=False).
    Raises agent_not_found, invalid_seq (negative).
    """

    workspace_id: int
    agent_id: int
    up_to_seq: int

    def apply(self, tx: Tx) -> AckResult:
        conn, now = tx.conn, tx.now_ms
        up_to = _seq(self.up_to_seq, "up_to_seq")
        marks = _marks(conn, self.workspace_id, self.agent_id)
        target = min(up_to, marks.last_seq)
        if target <= marks.acked_seq:
            return AckResult(acked=0, acked_seq=marks.acked_seq, changed=False)
        # Rows at or below the old mark are final (the module's invariant),
        # so the range starts after it.
        conn.execute(
            "UPDATE deliveries SET state = 'acked', acked_at = ?, updated_at = ?"
            f" WHERE agent_id = ? AND seq > ? AND seq <= ? AND state IN {_PENDING_SQL}",
            (now, now, self.agent_id, marks.acked_seq, target),
        )
        acked = conn.changes()
        conn.execute(
            "UPDATE agents SET acked_seq = ?, pending_count = pending_count - ? WHERE id = ?",
            (target, acked, self.agent_id),
        )
        return AckResult(acked=acked, acked_seq=target, changed=True)


class _Row(msgspec.Struct, frozen=True):
    seq: int
    state: State
    error: str | None
    retryable: bool | None
    available_at: int | None
    expires_at: int


def _delivery(tx: Tx, workspace_id: int, agent_id: int, value: str) -> _Row:
    """The caller's delivery named `value`. Raises agent_not_found, delivery_not_found."""
    _marks(tx.conn, workspace_id, agent_id)
    seq = parse_delivery_id(agent_id, value)
    row = tx.conn.execute(
        "SELECT seq, state, error, retryable, available_at, expires_at FROM deliveries"
        " WHERE agent_id = ? AND seq = ?",
        (agent_id, seq),
    ).fetchone()
    if row is None:
        raise BrokerError("delivery_not_found", f"delivery {value!r} not found")
    return _Row(int(row[0]), cast(State, row[1]), cast("str | None", row[2]),
                None if row[3] is None else bool(row[3]), cast("int | None", row[4]),
                int(row[5]))


def _transition(agent_id: int, row: _Row, state: State, changed: bool) -> DeliveryTransition:
    return DeliveryTransition(delivery_id=delivery_id(agent_id, row.seq), seq=row.seq,
                              state=state, changed=changed)


def _finish(tx: Tx, agent_id: int, row: _Row, state: State, error: str | None,
            retryable: bool | None) -> None:
    """Move a pending row to a final state and release its mailbox slot."""
    now = tx.now_ms
    tx.conn.execute(
        "UPDATE deliveries SET state = ?, error = ?, retryable = ?, updated_at = ?,"
        " acked_at = CASE WHEN ? = 'acked' THEN ? ELSE acked_at END"
        " WHERE agent_id = ? AND seq = ?",
        (state, error, retryable, now, state, now, agent_id, row.seq),
    )
    tx.conn.execute(
        "UPDATE agents SET pending_count = pending_count - 1 WHERE id = ?", (agent_id,)
    )


class AckDelivery(msgspec.Struct, frozen=True, kw_only=True):
    """Acknowledge one delivery. An acked or dead-lettered one is left as it is (changed=False).

    Raises agent_not_found, delivery_not_found.
    """

    workspace_id: int
    agent_id: int
    delivery_id: str

    def apply(self, tx: Tx) -> DeliveryTransition:
        row = _delivery(tx, self.workspace_id, self.agent_id, self.delivery_id)
        if row.state not in PENDING_STATES:
            return _transition(self.agent_id, row, row.state, False)
        _finish(tx, self.agent_id, row, "acked", row.error, row.retryable)
        return _transition(self.agent_id, row, "acked", True)


class FailDelivery(msgspec.Struct, frozen=True, kw_only=True):
    """Report that the agent could not process a delivery.

    retryable: the row becomes `failed` and is pushed again; otherwise it is
    dead-lettered (final) and leaves the mailbox. An acked or dead-lettered
    row is left as it is (changed=False); failing a failed row again only
    reports a change if the error or the retryable flag differ.
    Raises agent_not_found, delivery_not_found, invalid_error (longer than
    ERROR_MAX_CHARS).
    """

    workspace_id: int
    agent_id: int
    delivery_id: str
    error: str | None = None
    retryable: bool = True

    def apply(self, tx: Tx) -> DeliveryTransition:
        if self.error is not None and len(self.error) > ERROR_MAX_CHARS:
            raise BrokerError("invalid_error",
                              f"an error text is at most {ERROR_MAX_CHARS} characters")
        row = _delivery(tx, self.workspace_id, self.agent_id, self.delivery_id)
        if row.state not in PENDING_STATES:
            return _transition(self.agent_id, row, row.state, False)
        if not self.retryable:
            _finish(tx, self.agent_id, row, "dead_lettered", self.error, False)
            return _transition(self.agent_id, row, "dead_lettered", True)
        if row.state == "failed" and row.error == self.error and row.retryable is True:
            return _transition(self.agent_id, row, "failed", False)
        tx.conn.execute(
            "UPDATE deliveries SET state = 'failed', error = ?, retryable = 1, updated_at = ?"
            " WHERE agent_id = ? AND seq = ?",
            (self.error, tx.now_ms, self.agent_id, row.seq),
        )
        return _transition(self.agent_id, row, "failed", True)


class DeferDelivery(msgspec.Struct, frozen=True, kw_only=True):
    """Put an unacked delivery back in the queue, not to be pushed before `until_ms`.

    A time already past makes it available at once. An acked or
    dead-lettered row is left as it is (changed=False).
    Raises agent_not_found, delivery_not_found, invalid_until (negative, or
    after the delivery expires).
    """

    workspace_id: int
    agent_id: int
    delivery_id: str
    until_ms: int

    def apply(self, tx: Tx) -> DeliveryTransition:
        if self.until_ms < 0:
            raise BrokerError("invalid_until", "until must be a time after the epoch")
        row = _delivery(tx, self.workspace_id, self.agent_id, self.delivery_id)
        if row.state not in PENDING_STATES:
            return _transition(self.agent_id, row, row.state, False)
        if self.until_ms > row.expires_at:
            raise BrokerError("invalid_until", "a delivery cannot be deferred past its expiry")
        if row.state == "queued" and row.available_at == self.until_ms:
            return _transition(self.agent_id, row, "queued", False)
        tx.conn.execute(
            "UPDATE deliveries SET state = 'queued', available_at = ?, updated_at = ?"
            " WHERE agent_id = ? AND seq = ?",
            (self.until_ms, tx.now_ms, self.agent_id, row.seq),
        )
        return _transition(self.agent_id, row, "queued", True)


class MarkDelivered(msgspec.Struct, frozen=True, kw_only=True):
    """Record that the gateway pushed these deliveries: state delivered, attempts + 1.

    Every push counts as an attempt, a re-push of a delivered or failed row
    too (the expiry and dead-letter sweeps read `attempts`); acked and
    dead-lettered rows, and seqs that do not exist, are skipped.
    Raises agent_not_found, too_many_seqs (over MAX_MARK).
    """

    workspace_id: int
    agent_id: int
    seqs: list[int]

    def apply(self, tx: Tx) -> DeliveriesMarked:
        if len(self.seqs) > MAX_MARK:
            raise BrokerError("too_many_seqs", f"at most {MAX_MARK} seqs at once")
        _marks(tx.conn, self.workspace_id, self.agent_id)
        if not self.seqs:
            return DeliveriesMarked(seqs=[])
        now = tx.now_ms
        rows = tx.conn.execute(
            "UPDATE deliveries SET state = 'delivered', attempts = attempts + 1,"
            " delivered_at = ?, updated_at = ?"
            " WHERE agent_id = ? AND seq IN (SELECT value FROM json_each(?))"
            f" AND state IN {_PENDING_SQL} RETURNING seq",
            (now, now, self.agent_id, _encoder.encode(self.seqs).decode()),
        ).fetchall()
        return DeliveriesMarked(seqs=sorted(cast(int, r[0]) for r in rows))
