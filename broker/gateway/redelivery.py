"""Deliveries the agent gave back, as a live session pushes them again.

A delivery the agent failed as retryable (`delivery.fail`) or deferred
(`delivery.defer`) is *held* (see `broker.engine.mailbox`): a cumulative
ack does not settle it, and it must be pushed again once due. A live
session has usually pushed it already, so its seq is at or below the
session's cursor and below what the client has seen; the ordinary stream
(seq above the cursor) never brings it back. The engine tells the agent's
sessions with an ephemeral `mailbox.changed` fact; a session then reads
the held, due deliveries up to its cursor (`held_deliveries`) and pushes
them again as `deliver` frames flagged `redelivery`, which tells a client
that deduplicates by seq to take it anyway. The same read says when the
next deferred one falls due, so the session can come back for it.

A session remembers the version of each held delivery it pushed (`Held`:
state, attempts, available_at, updated_at): the push is marked `delivered`
by the recorder a little later, and until then the row still reads as
held; a new fail or defer changes the version (its `updated_at` at least),
so it is pushed again. The push is stamped after the `updated_at` it was
read with: a mark whose push came before the row's last fail or defer is
late, and the engine leaves the row held (see `broker.engine.mailbox`).
"""

from __future__ import annotations

from typing import cast

import apsw
import msgspec

from broker.engine.mailbox import seq_marks


class HeldDelivery(msgspec.Struct, frozen=True, kw_only=True):
    """A held delivery that is due: its event and the version of its row."""

    seq: int
    state: str
    attempts: int
    available_at: int | None
    type: str
    message_id: int | None
    payload: bytes
    updated_at: int | None = None  # when it was failed or deferred

    @property
    def version(self) -> Held:
        return (self.state, self.attempts, self.available_at, self.updated_at)


# What a held row looked like when a session pushed it:
# (state, attempts, available_at, updated_at).
Held = tuple[str, int, "int | None", "int | None"]


class HeldPage(msgspec.Struct, frozen=True, kw_only=True):
    """Held deliveries due now (in seq order), and when the next deferred one is due (ms)."""

    rows: list[HeldDelivery]
    next_due: int | None


def is_held(state: str, available_at: int | None) -> bool:
    """Whether a pending row is one the agent gave back (failed, or deferred, not pushed since)."""
    return state == "failed" or (state == "queued" and available_at is not None)


def held_deliveries(
    conn: apsw.Connection, workspace_id: int, agent_id: int, after_seq: int, up_to_seq: int,
    now_ms: int, limit: int,
) -> HeldPage:
    """The agent's held deliveries due at `now_ms` with after_seq < seq <= up_to_seq.

    next_due: the earliest `available_at` after now of a deferred one (any seq).
    Raises agent_not_found.
    """
    marks = seq_marks(conn, workspace_id, agent_id)
    after = max(after_seq, marks.acked_seq)
    rows = conn.execute(
        "SELECT d.seq, d.state, d.attempts, d.available_at, l.type, d.message_id, l.payload,"
        " d.updated_at"
        " FROM deliveries d JOIN message_log l ON l.id = d.log_id"
        " WHERE d.agent_id = ? AND d.seq > ? AND d.seq <= ?"
        " AND (d.state = 'failed'"
        " OR (d.state = 'queued' AND d.available_at IS NOT NULL AND d.available_at <= ?))"
        " ORDER BY d.seq LIMIT ?",
        (agent_id, after, up_to_seq, now_ms, limit),
    ).fetchall()
    due = conn.execute(
        "SELECT min(available_at) FROM deliveries WHERE agent_id = ? AND seq > ?"
        " AND state = 'queued' AND available_at > ?",
        (agent_id, marks.acked_seq, now_ms),
    ).fetchone()
    return HeldPage(
        rows=[
            HeldDelivery(seq=cast(int, seq), state=cast(str, state),
                         attempts=cast(int, attempts),
                         available_at=cast("int | None", available_at), type=cast(str, type_),
                         message_id=cast("int | None", message_id),
                         payload=bytes(cast(bytes, payload)),
                         updated_at=cast("int | None", updated_at))
            for seq, state, attempts, available_at, type_, message_id, payload, updated_at
            in rows
        ],
        next_due=None if due is None or due[0] is None else int(due[0]),
    )
