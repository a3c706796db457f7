"""The delivery mailbox of an agent: what it must still receive, and its acknowledgements.

A delivery row moves through these states:

    queued --(pushed: MarkDelivered)--> delivered --(ack)--> acked (final)
       ^  \\                              |
       |   `--(fail, retryable)--> failed <'   (a failed row is pushed again)
       `----(defer until T)---------'          (back to queued, not before T)
    any unacked state --(fail, not retryable)--> dead_lettered (final)

`pending_count` on the agent's `mailboxes` row counts its rows in queued, delivered or
failed; every transition into acked or dead_lettered decrements it, so the
mailbox limit in `record_event` stays exact without a count query.

The cumulative ack (`AckUpTo`) acks only rows the agent may be assumed to
have seen: `delivered` ones, and `queued` ones that were never deferred
(the gateway marks pushes in batches, so a pushed row can still read
queued when the ack lands). A row the agent gave back is **held**: a
`failed` (retryable) row, and a deferred row (`queued` with `available_at`
set: deferred and not pushed again since). A held row stays pending until
it is acked one by one (`AckDelivery`), pushed again and then acked (a push
makes it `delivered`), failed for good, or expired. Without the hold, the
Python client and the Relaycast SDK, which only ever ack cumulatively,
would silently settle every row the agent had just failed or deferred.
After a retryable fail or a defer, an ephemeral `mailbox.changed` fact
(`{"agent_id", "seq"}`, audience: the agent) tells the agent's live
sessions to catch up from the database.

A push mark can arrive after the agent gave the row back: the gateway's
recorder writes marks a little after the push, and the agent may fail or
defer the row it was just pushed in that time. So every mark carries the
time of its push (epoch ms), and a held row takes a mark only if that push
came after the fail or defer that put it back (`updated_at`, which nothing
else moves while a row is held): a push older than it is late and changes
nothing, or it would turn the row back to delivered and the next
cumulative ack would settle what the agent gave back. The gateway stamps a
push of a held row at least 1 ms after the `updated_at` it read the row
with, so a push that follows the fail in the same millisecond still counts.

The ack mark `mailboxes.acked_seq` (the replay mark) keeps one invariant that
makes acks and the replay cheap: every row with seq <= the mark is final
(acked or dead_lettered). An ack therefore only touches the rows between
the old mark and its target, and `list_pending` starts scanning after the
mark. An ack moves the mark to its target, or to just below the lowest row
it held, whichever is lower; it never moves back. So a held row stays above
the mark and comes again in every replay once due, and the mark moves on
past it when it settles (`AckDelivery` of the row right above the mark,
its expiry, or any later cumulative ack once it is final). An ack above
the highest seq ever allocated (`last_seq`) is clamped to it: the mark can
never cover a seq that does not exist yet, or a later delivery would be
born acknowledged.

A delivery is named on the wire `"<agent_id>:<seq>"`; a caller may only
name its own deliveries (any other is `delivery_not_found`). Every
transition reports whether it changed anything, so a duplicate ack is
visible as a no-op rather than an error: at-least-once delivery makes
duplicates normal.
"""

from __future__ import annotations

from typing import ClassVar, Literal, cast

import apsw
import msgspec

from broker.engine.errors import BrokerError
from broker.engine.events import notify_sessions
from broker.engine.history import page_limit
from broker.engine.validation import MAX_ID
from broker.engine.writer import Tx
from protocol.objects import (
    AckResult,
    DeliveriesMarked,
    DeliveryTransition,
    MailboxSummary,
    iso,
)

State = Literal["queued", "delivered", "acked", "failed", "dead_lettered"]
PENDING_STATES: tuple[State, ...] = ("queued", "delivered", "failed")
# Final states; such rows stay listable (`list_settled`) until the retention sweep.
SETTLED_STATES: tuple[State, ...] = ("acked", "dead_lettered")
# PENDING_STATES as an SQL list, for `state IN ...`.
PENDING_SQL = "('queued', 'delivered', 'failed')"
# What a cumulative ack settles: everything pending except the held rows
# (failed, or deferred and not pushed since; see the module docstring).
_CUMULATIVE_SQL = "(state = 'delivered' OR (state = 'queued' AND available_at IS NULL))"
# The ephemeral fact that tells an agent's live sessions to read its mailbox again.
MAILBOX_CHANGED = "mailbox.changed"
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
    """An unacked delivery with its event, as the gateway pushes it (or a settled one, listed).

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
    # The last change of state (a held row: when it was failed or deferred);
    # None for a row never changed since it was queued.
    updated_at: int | None = None


# -- delivery marks -------------------------------------------------------------------
# An agent's marks (`last_seq`, `acked_seq`): the highest seq allocated is
# where a (re)connecting session's replay from the database stops and live
# push takes over.


class SeqMarks(msgspec.Struct, frozen=True):
    """last_seq: the highest seq allocated; acked_seq: the cumulative ack mark."""

    last_seq: int
    acked_seq: int


def seq_marks(conn: apsw.Connection, workspace_id: int, agent_id: int) -> SeqMarks:
    """The active agent's delivery marks. Raises agent_not_found."""
    row = conn.execute(
        "SELECT m.last_seq, m.acked_seq FROM agents a JOIN mailboxes m ON m.agent_id = a.id"
        " WHERE a.id = ? AND a.workspace_id = ? AND a.deactivated_at IS NULL",
        (agent_id, workspace_id),
    ).fetchone()
    if row is None:
        raise BrokerError("agent_not_found", f"agent {agent_id} not found")
    return SeqMarks(int(row[0]), int(row[1]))

def delivery_id(agent_id: int, seq: int) -> str:
    """The wire id of a delivery: `"<agent_id>:<seq>"`."""
    return f"{agent_id}:{seq}"


def parse_delivery_id(agent_id: int, value: str) -> int:
    """The seq of the caller's delivery named `value`. Raises delivery_not_found."""
    owner, sep, seq = value.partition(":")
    if (
        sep and owner.isascii() and owner.isdigit() and seq.isascii() and seq.isdigit()
        and len(owner) <= 19 and len(seq) <= 19 and int(owner) == agent_id
        and int(seq) <= MAX_ID
    ):
        return int(seq)
    raise BrokerError("delivery_not_found", f"delivery {value!r} not found")


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
    # A seq past any SQLite integer has nothing after it (and must not overflow the binding).
    after = 0 if after_seq is None else min(_seq(after_seq, "after_seq"), MAX_ID)
    marks = seq_marks(conn, workspace_id, agent_id)
    rows = conn.execute(
        "SELECT d.seq, d.state, d.attempts, l.type, d.message_id, d.log_id, l.payload,"
        " d.available_at, d.expires_at, d.created_at, d.updated_at"
        " FROM deliveries d JOIN message_log l ON l.id = d.log_id"
        f" WHERE d.agent_id = ? AND d.seq > ? AND d.state IN {PENDING_SQL}"
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
            created_at=cast(int, created_at), updated_at=cast("int | None", updated_at),
        )
        for (seq, state, attempts, type_, message_id, log_id, payload, available_at, expires_at,
             created_at, updated_at) in rows
    ]


# How a page of settled rows finds them, by state. Acked: the primary key
# (agent_id, seq) walked backwards, reading the pending rows in between
# (bounded by the mailbox depth), as most kept rows are acked. Dead letters
# are few among many acked rows: their partial index, named because without
# statistics the planner prefers the primary key (the state is a literal so
# that the index's condition is seen to hold).
_SETTLED_ROWS: dict[State, tuple[str, str]] = {
    "acked": ("deliveries d", "d.state = 'acked'"),
    "dead_lettered": ("deliveries d INDEXED BY deliveries_dead_lettered",
                      "d.state = 'dead_lettered'"),
}


def list_settled(
    conn: apsw.Connection, workspace_id: int, agent_id: int, state: State,
    before: str | None = None, limit: int | None = None,
) -> list[PendingDelivery]:
    """The agent's deliveries in a final state (acked or dead_lettered), newest (highest seq) first.

    Only rows the retention sweep has not pruned yet are listed.
    before: the id of one of the caller's deliveries; the page starts below its seq.
    Raises agent_not_found, invalid_cursor (a malformed id, or another agent's),
    invalid_limit (1..MAX_PAGE), invalid_status (a state that is not final).
    """
    if state not in SETTLED_STATES:
        raise BrokerError("invalid_status", f"{state!r} is not a final delivery state")
    size = page_limit(limit, DEFAULT_PAGE, MAX_PAGE)
    below = MAX_ID
    if before is not None:
        try:
            below = parse_delivery_id(agent_id, before)
        except BrokerError:
            raise BrokerError(
                "invalid_cursor", f"before must be the id of one of your deliveries, not {before!r}"
            ) from None
    seq_marks(conn, workspace_id, agent_id)  # the agent exists in this workspace
    rows_of, in_state = _SETTLED_ROWS[state]
    rows = conn.execute(
        "SELECT d.seq, d.attempts, l.type, d.message_id, d.log_id, l.payload,"
        " d.available_at, d.expires_at, d.created_at, d.updated_at"
        f" FROM {rows_of} JOIN message_log l ON l.id = d.log_id"
        f" WHERE {in_state} AND d.agent_id = ? AND d.seq < ? ORDER BY d.seq DESC LIMIT ?",
        (agent_id, below, size),
    ).fetchall()
    return [
        PendingDelivery(
            delivery_id=delivery_id(agent_id, cast(int, seq)), agent_id=agent_id,
            seq=cast(int, seq), state=state, attempts=cast(int, attempts),
            type=cast(str, type_), message_id=cast("int | None", message_id),
            log_id=cast(int, log_id), payload=msgspec.Raw(cast(bytes, payload)),
            available_at=cast("int | None", available_at), expires_at=cast(int, expires_at),
            created_at=cast(int, created_at), updated_at=cast("int | None", updated_at),
        )
        for (seq, attempts, type_, message_id, log_id, payload, available_at, expires_at,
             created_at, updated_at) in rows
    ]


# The pending rows of each agent are those above its ack mark (the mark's
# invariant), a range of the primary key as deep as the mailbox; dead letters
# (below the mark too) are counted in their partial index.
_SUMMARY_SQL = (
    "SELECT a.id, a.name, a.status, a.last_seen, m.last_seq, m.acked_seq,"
    " count(d.seq), coalesce(sum(d.state = 'queued'), 0),"
    " coalesce(sum(d.state = 'delivered'), 0), coalesce(sum(d.state = 'failed'), 0),"
    " coalesce(sum(d.state = 'queued' AND d.available_at > ?3), 0), min(d.created_at),"
    " (SELECT count(*) FROM deliveries x INDEXED BY deliveries_dead_lettered"
    "  WHERE x.agent_id = a.id AND x.state = 'dead_lettered')"
    " FROM agents a JOIN mailboxes m ON m.agent_id = a.id"
    " LEFT JOIN deliveries d ON d.agent_id = a.id AND d.seq > m.acked_seq"
    f" AND d.state IN {PENDING_SQL}"
    " WHERE a.workspace_id = ?1 AND a.deactivated_at IS NULL AND (?2 IS NULL OR a.name = ?2)"
    " GROUP BY a.id ORDER BY a.name"
)


def mailbox_summaries(
    conn: apsw.Connection, workspace_id: int, now_ms: int, name: str | None = None
) -> list[MailboxSummary]:
    """Each active agent's mailbox (only the agent called `name`, if given), by agent name.

    now_ms: the time the ages and the deferred count are taken at (epoch ms).
    Raises agent_not_found when `name` names no active agent of the workspace.
    """
    rows = conn.execute(_SUMMARY_SQL, (workspace_id, name, now_ms)).fetchall()
    if name is not None and not rows:
        raise BrokerError("agent_not_found", f"agent {name!r} not found")
    return [
        MailboxSummary(
            agent_id=str(agent_id), agent_name=cast(str, agent_name), status=cast(str, status),
            last_seen=iso(cast("int | None", last_seen)), pending=cast(int, pending),
            queued=cast(int, queued), delivered=cast(int, delivered), failed=cast(int, failed),
            deferred=cast(int, deferred), dead_lettered=cast(int, dead),
            oldest_unacked_at=iso(cast("int | None", oldest)),
            oldest_unacked_age_ms=None if oldest is None else max(0, now_ms - cast(int, oldest)),
            last_seq=cast(int, last_seq), acked_seq=cast(int, acked_seq),
        )
        for (agent_id, agent_name, status, last_seen, last_seq, acked_seq, pending, queued,
             delivered, failed, deferred, oldest, dead) in rows
    ]


# -- commands ----------------------------------------------------------------------


class AckUpTo(msgspec.Struct, frozen=True, kw_only=True):
    """Cumulative ack: every delivered or queued delivery with seq <= up_to_seq becomes acked.

    Failed and deferred rows are held (see the module docstring): they stay
    pending, and the mark stops just below the lowest of them. up_to_seq
    above the agent's last allocated seq is clamped to it; an ack that
    neither acks a row nor moves the mark reports changed=False.
    Raises agent_not_found, invalid_seq (negative).
    """

    # writes deliveries and marks only (Tx.read_once)
    keeps_topology: ClassVar[bool] = True

    workspace_id: int
    agent_id: int
    up_to_seq: int

    def apply(self, tx: Tx) -> AckResult:
        up_to = _seq(self.up_to_seq, "up_to_seq")
        marks = seq_marks(tx.conn, self.workspace_id, self.agent_id)
        return _ack_up_to(tx, self.agent_id, marks, up_to)


def _ack_up_to(tx: Tx, agent_id: int, marks: SeqMarks, up_to: int, folded: int = 0) -> AckResult:
    """The cumulative ack of AckUpTo; `folded` rows of the range were acked already by the caller.

    (RecordReceipts acks the pushes it marks in the same statement, and
    counts them here, so that pending_count and the result stay exact.)
    """
    conn, now = tx.conn, tx.now_ms
    target = min(up_to, marks.last_seq)
    if target <= marks.acked_seq:
        return AckResult(acked=0, acked_seq=marks.acked_seq, changed=False)
    if folded == target - marks.acked_seq:
        # The caller acked every seq of the range (distinct rows, all in
        # it): nothing else to ack, nothing held.
        acked, mark = folded, target
    else:
        # Rows at or below the old mark are final (the module's invariant),
        # so the range starts after it.
        conn.execute(
            "UPDATE deliveries SET state = 'acked', acked_at = ?, updated_at = ?"
            f" WHERE agent_id = ? AND seq > ? AND seq <= ? AND {_CUMULATIVE_SQL}",
            (now, now, agent_id, marks.acked_seq, target),
        )
        acked = conn.changes() + folded
        mark = final_up_to(tx, agent_id, marks.acked_seq, target)
    if acked == 0 and mark == marks.acked_seq:
        return AckResult(acked=0, acked_seq=mark, changed=False)
    conn.execute(
        "UPDATE mailboxes SET acked_seq = ?, pending_count = pending_count - ? WHERE agent_id = ?",
        (mark, acked, agent_id),
    )
    return AckResult(acked=acked, acked_seq=mark, changed=True)


def final_up_to(tx: Tx, agent_id: int, mark: int, ceiling: int) -> int:
    """The highest seq <= ceiling below which every row above `mark` is final."""
    row = tx.conn.execute(
        "SELECT min(seq) FROM deliveries"
        f" WHERE agent_id = ? AND seq > ? AND seq <= ? AND state IN {PENDING_SQL}",
        (agent_id, mark, ceiling),
    ).fetchone()
    return ceiling if row is None or row[0] is None else int(row[0]) - 1


class _Row(msgspec.Struct, frozen=True):
    seq: int
    state: State
    error: str | None
    retryable: bool | None
    available_at: int | None
    expires_at: int
    marks: SeqMarks  # the agent's, as the command found them


def _delivery(tx: Tx, workspace_id: int, agent_id: int, value: str) -> _Row:
    """The caller's delivery named `value`. Raises agent_not_found, delivery_not_found."""
    marks = seq_marks(tx.conn, workspace_id, agent_id)
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
                int(row[5]), marks)


def _transition(agent_id: int, row: _Row, state: State, changed: bool) -> DeliveryTransition:
    return DeliveryTransition(delivery_id=delivery_id(agent_id, row.seq), seq=row.seq,
                              state=state, changed=changed)


def _finish(tx: Tx, agent_id: int, row: _Row, state: State, error: str | None,
            retryable: bool | None) -> None:
    """Move a pending row to a final state and release its mailbox slot.

    The row right above the ack mark (typically one a cumulative ack held)
    lets the mark move on, up to the next row still pending.
    """
    now = tx.now_ms
    tx.conn.execute(
        "UPDATE deliveries SET state = ?, error = ?, retryable = ?, updated_at = ?,"
        " acked_at = CASE WHEN ? = 'acked' THEN ? ELSE acked_at END"
        " WHERE agent_id = ? AND seq = ?",
        (state, error, retryable, now, state, now, agent_id, row.seq),
    )
    mark = row.marks.acked_seq
    if row.seq == mark + 1:
        mark = final_up_to(tx, agent_id, mark, row.marks.last_seq)
    tx.conn.execute(
        "UPDATE mailboxes SET pending_count = pending_count - 1, acked_seq = ? WHERE agent_id = ?",
        (mark, agent_id),
    )


def _mailbox_changed(tx: Tx, workspace_id: int, agent_id: int, seq: int) -> None:
    """Tell the agent's live sessions that a row went back to pending (they read it again)."""
    notify_sessions(tx, workspace_id=workspace_id, event_type=MAILBOX_CHANGED,
                    data={"agent_id": str(agent_id), "seq": seq}, audience=(agent_id,))


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

    retryable: the row becomes `failed`, held from cumulative acks and pushed
    again (the agent's sessions are told with `mailbox.changed`); otherwise it
    is dead-lettered (final) and leaves the mailbox. An acked or dead-lettered
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
        _mailbox_changed(tx, self.workspace_id, self.agent_id, row.seq)
        return _transition(self.agent_id, row, "failed", True)


class DeferDelivery(msgspec.Struct, frozen=True, kw_only=True):
    """Put an unacked delivery back in the queue, not to be pushed before `until_ms`.

    A time already past makes it available at once. Either way the row is
    held from cumulative acks until it is pushed again, and the agent's
    sessions are told with `mailbox.changed`. An acked or dead-lettered row
    is left as it is (changed=False).
    Raises agent_not_found, delivery_not_found, invalid_available_at
    (negative, or after the delivery expires).
    """

    workspace_id: int
    agent_id: int
    delivery_id: str
    until_ms: int

    def apply(self, tx: Tx) -> DeliveryTransition:
        if self.until_ms < 0:
            raise BrokerError("invalid_available_at",
                              "available_at must be a time after the epoch")
        row = _delivery(tx, self.workspace_id, self.agent_id, self.delivery_id)
        if row.state not in PENDING_STATES:
            return _transition(self.agent_id, row, row.state, False)
        if self.until_ms > row.expires_at:
            raise BrokerError("invalid_available_at",
                              "a delivery cannot be deferred past its expiry")
        if row.state == "queued" and row.available_at == self.until_ms:
            return _transition(self.agent_id, row, "queued", False)
        tx.conn.execute(
            "UPDATE deliveries SET state = 'queued', available_at = ?, updated_at = ?"
            " WHERE agent_id = ? AND seq = ?",
            (self.until_ms, tx.now_ms, self.agent_id, row.seq),
        )
        _mailbox_changed(tx, self.workspace_id, self.agent_id, row.seq)
        return _transition(self.agent_id, row, "queued", True)


class MarkDelivered(msgspec.Struct, frozen=True, kw_only=True):
    """Record that these deliveries were pushed at `pushed_at`: state delivered, attempts + 1.

    One agent's marks alone, as a held row's redelivery is marked by the
    gateway's RecordReceipts (the same statement). Every push counts as an
    attempt, a re-push of a delivered or failed row too (the expiry and
    dead-letter sweeps read `attempts`); acked and dead-lettered rows, and
    seqs that do not exist, are skipped. So is a late mark: a held row
    (failed, or deferred) failed or deferred at or after `pushed_at` (see
    the module docstring), and a row deferred past now (nothing pushes it
    before its time). Either must not release the row to the next
    cumulative ack.
    pushed_at: when the pushes were written to the socket, epoch ms.
    Raises agent_not_found, too_many_seqs (over MAX_MARK).
    """

    # writes deliveries and marks only (Tx.read_once)
    keeps_topology: ClassVar[bool] = True

    workspace_id: int
    agent_id: int
    seqs: list[int]
    pushed_at: int

    def apply(self, tx: Tx) -> DeliveriesMarked:
        if len(self.seqs) > MAX_MARK:
            raise BrokerError("too_many_seqs", f"at most {MAX_MARK} seqs at once")
        seq_marks(tx.conn, self.workspace_id, self.agent_id)
        if not self.seqs:
            return DeliveriesMarked(seqs=[])
        rows = tx.conn.execute(
            _MARK_AGAIN_SQL + " RETURNING seq",
            (tx.now_ms, self.agent_id, _encoder.encode(self.seqs).decode(), self.pushed_at),
        ).fetchall()
        return DeliveriesMarked(seqs=sorted(cast(int, r[0]) for r in rows))


class AgentReceipts(msgspec.Struct, frozen=True, kw_only=True):
    """One agent's pushes and cumulative ack, as the gateway's recorder collected them.

    pushed: seqs pushed as ordinary deliveries (never as a redelivery of a
    held row); pushed_again: held rows pushed again (`redelivery`), as
    (seq, push time in epoch ms) pairs, for the late-mark rule of
    MarkDelivered; up_to_seq: the highest cumulative ack received, if any.
    """

    workspace_id: int
    agent_id: int
    pushed: list[int] = []
    pushed_again: list[tuple[int, int]] = []
    up_to_seq: int | None = None


class RecordReceipts(msgspec.Struct, frozen=True):
    """The recorder's flush: every agent's push marks and ack in one command.

    Per agent, in this order:
    - `pushed_again` rows are marked as MarkDelivered marks them (a held row
      becomes delivered unless the mark is late), so that the ack below
      finds them settled-able;
    - `pushed` rows at or below the ack's target are marked and acked in one
      statement (the fold: a row is written once, not twice), the others are
      marked delivered. An ordinary push never releases a held row: if the
      agent failed or deferred it after the push, the mark leaves it alone;
    - the cumulative ack, exactly as AckUpTo.

    An agent that is gone (agent_not_found) or an invalid ack (invalid_seq)
    fails that agent alone: its result is the BrokerError, nothing of it is
    written, and the other agents' receipts commit. Each result is the
    agent's AckResult (None without an ack), in the order of `agents`.
    """

    # writes deliveries and marks only (Tx.read_once)
    keeps_topology: ClassVar[bool] = True

    agents: tuple[AgentReceipts, ...]

    def apply(self, tx: Tx) -> list[AckResult | BrokerError | None]:
        results: list[AckResult | BrokerError | None] = []
        for receipts in self.agents:
            try:
                results.append(_record(tx, receipts))
            except BrokerError as exc:
                results.append(exc)
        return results


def _record(tx: Tx, receipts: AgentReceipts) -> AckResult | None:
    """One agent's part of RecordReceipts; its BrokerErrors are raised before it writes."""
    conn, now, agent_id = tx.conn, tx.now_ms, receipts.agent_id
    up_to = None if receipts.up_to_seq is None else _seq(receipts.up_to_seq, "up_to_seq")
    marks = seq_marks(conn, receipts.workspace_id, agent_id)
    if receipts.pushed_again:
        # Few rows (only what the agent gave back), each with its own push time.
        conn.executemany(_MARK_ONE_AGAIN_SQL,
                         [(now, agent_id, seq, at) for seq, at in receipts.pushed_again])
    target = marks.acked_seq if up_to is None else min(up_to, marks.last_seq)
    fold = [seq for seq in receipts.pushed if marks.acked_seq < seq <= target]
    later = [seq for seq in receipts.pushed if seq > target]
    folded = 0
    if fold:
        conn.execute(
            "UPDATE deliveries SET state = 'acked', attempts = attempts + 1,"
            " delivered_at = ?, acked_at = ?, updated_at = ?"
            " WHERE agent_id = ? AND seq IN (SELECT value FROM json_each(?))"
            f" AND {_CUMULATIVE_SQL}",
            (now, now, now, agent_id, _encoder.encode(fold).decode()),
        )
        folded = conn.changes()
    if later:
        _mark(tx, agent_id, later)
    if up_to is None:
        return None
    return _ack_up_to(tx, agent_id, marks, up_to, folded)


_MARK_SQL = (
    "UPDATE deliveries SET state = 'delivered', attempts = attempts + 1,"
    " delivered_at = ?1, updated_at = ?1"
    " WHERE agent_id = ?2 AND seq IN (SELECT value FROM json_each(?3)) AND "
)
# What the agent gave back and has not been pushed since (see the module docstring).
_HELD_SQL = "(state = 'failed' OR (state = 'queued' AND available_at IS NOT NULL))"
# A held row pushed again at ?4: any pending row that is due, except a held
# one given back at or after the push (a late mark; as MarkDelivered).
_MARK_AGAIN_SQL = (
    _MARK_SQL + f"state IN {PENDING_SQL} AND (available_at IS NULL OR available_at <= ?1)"
    f" AND NOT ({_HELD_SQL} AND coalesce(updated_at, 0) >= ?4)")
# The same for one seq (?3).
_MARK_ONE_AGAIN_SQL = _MARK_AGAIN_SQL.replace("IN (SELECT value FROM json_each(?3))", "= ?3")
# An ordinary push: never a held row (failed or deferred after the push).
_MARK_PUSHED_SQL = _MARK_SQL + _CUMULATIVE_SQL


def _mark(tx: Tx, agent_id: int, seqs: list[int]) -> None:
    tx.conn.execute(_MARK_PUSHED_SQL, (tx.now_ms, agent_id, _encoder.encode(seqs).decode()))
