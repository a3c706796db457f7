"""Maintenance commands run by the sweeps: expiry, retention, workspace purges, checkpoints.

Each command changes at most `limit` rows, so one sweep step holds the writer
for a bounded time; the sweeper repeats a step while it reports a full batch.

Expiry: a delivery still unsettled at its `expires_at` becomes dead_lettered,
and the agent that sent the message gets a durable `delivery.failed` notice
(only for events that carry a message, so notices never cascade).

Expiry needs no index of its own. A delivery's `expires_at` is its creation
time plus the TTL, and seqs are allocated in creation order, so within one
mailbox the expiry times rise with seq: the earliest to expire is the
lowest pending seq (the first row above the ack mark, or a few rows
further when rows settled one by one sit in between). The sweep probes
that row in each mailbox with unsettled deliveries, in agent id order,
and walks on from it only while the rows have expired. (An index on
`expires_at` cost every delivery an entry when it was written, a rewrite
when it was pushed and a removal when it settled: BENCHMARKS.md, Tuning,
session 12.) Should the times not rise with seq, because the TTL was
lowered between two runs or the clock stepped back, a delivery behind a
later-expiring one expires with that one, late by at most the difference.
"""

from __future__ import annotations

import contextlib
from typing import cast

import apsw
import msgspec

from broker.engine.events import record_event
from broker.engine.mailbox import PENDING_SQL, PENDING_STATES, final_up_to
from broker.engine.validation import MAX_ID
from broker.engine.writer import Maintenance, Tx
from protocol.objects import MESSAGE_EVENTS

DAY_MS = 86_400_000


class DeliveryFailed(msgspec.Struct, frozen=True):
    """The data of a `delivery.failed` notice."""

    delivery_id: str
    message_id: str | None
    event_type: str
    agent_id: str
    agent_name: str
    reason: str


# The mailboxes whose lowest pending delivery has expired, with their marks
# and the agent's name: each probe is a search of the mailbox's rows from
# its ack mark up to its first pending one (every row at or below the mark
# is final, and expiry moves the mark past what it settles).
_EXPIRED_MAILBOXES_SQL = (
    "SELECT m.agent_id, m.acked_seq, m.last_seq, a.name FROM mailboxes m"
    " JOIN agents a ON a.id = m.agent_id"
    " WHERE m.agent_id >= ?2 AND m.agent_id <= ?3"
    " AND m.pending_count > 0 AND (SELECT d.expires_at FROM deliveries d"
    " WHERE d.agent_id = m.agent_id AND d.seq > m.acked_seq"
    f" AND d.state IN {PENDING_SQL} ORDER BY d.seq LIMIT 1) <= ?1"
    " ORDER BY m.agent_id"
)

# One mailbox's rows above its ack mark, in seq order, with their events.
_ABOVE_MARK_SQL = (
    "SELECT d.seq, d.state, d.expires_at, d.message_id, l.type, l.agent_id, l.workspace_id"
    " FROM deliveries d JOIN message_log l ON l.id = d.log_id"
    " WHERE d.agent_id = ? AND d.seq > ? ORDER BY d.seq"
)


def _expired_rows(
    conn: apsw.Connection, agent_id: int, mark: int, now: int, room: int
) -> list[tuple[int, int | None, str, int | None, int]]:
    """Up to `room` pending rows of one mailbox expired by `now`, in seq order from its mark.

    Each as (seq, message id, event type, event author, workspace id); the
    walk stops at the first row of any state not yet expired.
    """
    found: list[tuple[int, int | None, str, int | None, int]] = []
    with contextlib.closing(conn.execute(_ABOVE_MARK_SQL, (agent_id, mark))) as cursor:
        for seq, state, expires_at, message_id, event_type, sender, workspace_id in cursor:
            if expires_at > now:
                break
            if state in PENDING_STATES:
                found.append((seq, message_id, event_type, sender, workspace_id))
                if len(found) == room:
                    break
    return found


class ExpiryStep(msgspec.Struct, frozen=True):
    """What one `ExpireDeliveries` step did.

    expired: deliveries dead-lettered. resume_from: the agent id the next
    step of the same sweep starts its probe at, the mailbox in which this
    step reached its limit (it may hold more); None when this step's probe
    went through every mailbox of its range.
    """

    expired: int
    resume_from: int | None


class ExpireDeliveries(msgspec.Struct, frozen=True):
    """Dead-letter up to `limit` deliveries past their TTL as of now_ms.

    Mailbox by mailbox in agent id order, those of agents with ids from
    `from_agent` up to `until_agent` (excluded; None: no end), each in seq
    order (see the module docstring): each mailbox with unsettled
    deliveries costs one search at its lowest pending row; in those where
    it has expired, the rows read are the expired ones, the settled rows
    between them and one more, however many unexpired deliveries wait
    behind them. The probe goes only as far as the step's limit takes it,
    and the sweeper passes each step's `resume_from` to the next, so its
    steps together probe each mailbox once (broker.sweeps).
    """

    limit: int
    now_ms: int | None = None  # default: the batch's time
    from_agent: int = 0
    until_agent: int | None = None

    def apply(self, tx: Tx) -> ExpiryStep:
        if self.limit < 1:
            return ExpiryStep(0, None)
        conn = tx.conn
        now = tx.now_ms if self.now_ms is None else self.now_ms
        rows: list[tuple[int, int, int | None, str, int | None, int, str]] = []
        walked: list[tuple[int, int, int]] = []  # agent id, ack mark, last seq
        resume: int | None = None
        last_agent = MAX_ID if self.until_agent is None else self.until_agent - 1
        with contextlib.closing(conn.execute(
                _EXPIRED_MAILBOXES_SQL, (now, self.from_agent, last_agent))) as probe:
            for agent_id, mark, last, name in probe:
                walked.append((agent_id, mark, last))
                rows += [(agent_id, seq, *event, name) for seq, *event
                         in _expired_rows(conn, agent_id, mark, now, self.limit - len(rows))]
                if len(rows) == self.limit:
                    resume = agent_id
                    break
        if not rows:
            return ExpiryStep(0, resume)
        conn.executemany(
            "UPDATE deliveries SET state = 'dead_lettered', error = 'expired', updated_at = ?"
            " WHERE agent_id = ? AND seq = ?",
            [(now, agent_id, seq) for agent_id, seq, *_ in rows],
        )
        per_agent: dict[int, int] = {}
        for agent_id, *_ in rows:
            per_agent[agent_id] = per_agent.get(agent_id, 0) + 1
        # The mark moves on past what is final now, as after any settling at
        # the mark (broker.engine.mailbox), so the next probe starts at the
        # next pending row instead of walking the dead letters again.
        conn.executemany(
            "UPDATE mailboxes SET pending_count = max(pending_count - ?, 0), acked_seq = ?"
            " WHERE agent_id = ?",
            [(per_agent[agent_id], final_up_to(tx, agent_id, mark, last), agent_id)
             for agent_id, mark, last in walked if agent_id in per_agent],
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
        return ExpiryStep(len(rows), resume)


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


# Rows one purge step of a deleted workspace deletes at most. A step is one
# writer command, so this bounds how long a purge holds the writer before
# the commands queued behind it get their turn: about the cost of one large
# channel send (a delivery row per member), far below a commit's fsync.
PURGE_STEP_ROWS = 1000

# The order a deleted workspace's rows are purged in, children before their
# parents: so a parent's ON DELETE CASCADE finds nothing left to delete (its
# cost stays in the step's bound) and no row is refused by a foreign key
# (message_attachments must go before files). Outbox rows go first, so none
# is attempted while the rest is purged. Each statement deletes at most ?2
# rows of workspace ?1, found through an index on the workspace or on the
# parent. A step starts again at the top, so a row written into the
# workspace after its deletion (a send accepted just before) is purged in
# order too; whatever is left when the list is empty goes with the
# workspace row, through the cascade.
_PURGE_STATEMENTS: tuple[tuple[str, str], ...] = (
    ("outbox", "DELETE FROM outbox WHERE id IN (SELECT o.id FROM webhook_subscriptions s"
               " JOIN outbox o ON o.subscription_id = s.id WHERE s.workspace_id = ?1 LIMIT ?2)"),
    ("deliveries", "DELETE FROM deliveries WHERE (agent_id, seq) IN (SELECT d.agent_id, d.seq"
                   " FROM agents a JOIN deliveries d ON d.agent_id = a.id"
                   " WHERE a.workspace_id = ?1 LIMIT ?2)"),
    ("idempotency_keys", "DELETE FROM idempotency_keys WHERE (agent_id, key) IN ("
                         "SELECT k.agent_id, k.key FROM agents a JOIN idempotency_keys k"
                         " ON k.agent_id = a.id WHERE a.workspace_id = ?1 LIMIT ?2)"),
    ("node_tokens", "DELETE FROM node_tokens WHERE token_hash IN (SELECT t.token_hash"
                    " FROM agents a JOIN node_tokens t ON t.agent_id = a.id"
                    " WHERE a.workspace_id = ?1 LIMIT ?2)"),
    ("read_receipts", "DELETE FROM read_receipts WHERE (message_id, agent_id) IN ("
                      "SELECT r.message_id, r.agent_id FROM messages m JOIN read_receipts r"
                      " ON r.message_id = m.id WHERE m.workspace_id = ?1 LIMIT ?2)"),
    ("reactions", "DELETE FROM reactions WHERE id IN (SELECT r.id FROM messages m"
                  " JOIN reactions r ON r.message_id = m.id WHERE m.workspace_id = ?1 LIMIT ?2)"),
    ("message_attachments", "DELETE FROM message_attachments WHERE (message_id, file_id) IN ("
                            "SELECT t.message_id, t.file_id FROM messages m"
                            " JOIN message_attachments t ON t.message_id = m.id"
                            " WHERE m.workspace_id = ?1 LIMIT ?2)"),
    ("messages", "DELETE FROM messages WHERE id IN ("
                 "SELECT id FROM messages WHERE workspace_id = ?1 LIMIT ?2)"),
    ("message_log", "DELETE FROM message_log WHERE id IN ("
                    "SELECT id FROM message_log WHERE workspace_id = ?1 LIMIT ?2)"),
    ("files", "DELETE FROM files WHERE id IN ("
              "SELECT id FROM files WHERE workspace_id = ?1 LIMIT ?2) RETURNING storage_key"),
    ("channel_members", "DELETE FROM channel_members WHERE (channel_id, agent_id) IN ("
                        "SELECT m.channel_id, m.agent_id FROM channels c JOIN channel_members m"
                        " ON m.channel_id = c.id WHERE c.workspace_id = ?1 LIMIT ?2)"),
    ("conversation_participants", "DELETE FROM conversation_participants"
                                  " WHERE (conversation_id, agent_id) IN ("
                                  "SELECT p.conversation_id, p.agent_id FROM conversations c"
                                  " JOIN conversation_participants p"
                                  " ON p.conversation_id = c.id WHERE c.workspace_id = ?1"
                                  " LIMIT ?2)"),
    ("inbound_webhooks", "DELETE FROM inbound_webhooks WHERE id IN ("
                         "SELECT id FROM inbound_webhooks WHERE workspace_id = ?1 LIMIT ?2)"),
    ("webhook_subscriptions", "DELETE FROM webhook_subscriptions WHERE id IN ("
                              "SELECT id FROM webhook_subscriptions WHERE workspace_id = ?1"
                              " LIMIT ?2)"),
    ("channels", "DELETE FROM channels WHERE id IN ("
                 "SELECT id FROM channels WHERE workspace_id = ?1 LIMIT ?2)"),
    ("conversations", "DELETE FROM conversations WHERE id IN ("
                      "SELECT id FROM conversations WHERE workspace_id = ?1 LIMIT ?2)"),
    ("mailboxes", "DELETE FROM mailboxes WHERE agent_id IN (SELECT m.agent_id"
                  " FROM agents a JOIN mailboxes m ON m.agent_id = a.id"
                  " WHERE a.workspace_id = ?1 LIMIT ?2)"),
    ("agents", "DELETE FROM agents WHERE id IN ("
               "SELECT id FROM agents WHERE workspace_id = ?1 LIMIT ?2)"),
)
PURGED_TABLES: tuple[str, ...] = tuple(table for table, _ in _PURGE_STATEMENTS)


class PurgeStep(msgspec.Struct, frozen=True):
    """What one purge step did.

    rows: rows it deleted (at most its limit; the workspace row counts).
    storage_keys: the bytes of the file rows it deleted, to remove after the commit.
    done: the workspace row is gone, and with it every row of the workspace.
    """

    rows: int
    storage_keys: list[str]
    done: bool


class PurgeWorkspace(msgspec.Struct, frozen=True):
    """Delete up to `limit` rows of the deleted workspace `workspace_id`, children first.

    The last step deletes the workspace row itself. A workspace that is not
    marked deleted is left alone (done, nothing deleted), so a purge can
    never touch a live workspace.
    """

    workspace_id: int
    limit: int = PURGE_STEP_ROWS

    def apply(self, tx: Tx) -> PurgeStep:
        conn = tx.conn
        if conn.execute(
            "SELECT 1 FROM workspaces WHERE id = ? AND deleted_at IS NOT NULL",
            (self.workspace_id,),
        ).fetchone() is None:
            return PurgeStep(0, [], True)
        budget = self.limit
        keys: list[str] = []
        for table, sql in _PURGE_STATEMENTS:
            if budget <= 0:
                return PurgeStep(self.limit, keys, False)
            rows = conn.execute(sql, (self.workspace_id, budget)).fetchall()
            if table == "files":
                keys += [cast(str, r[0]) for r in rows if r[0] is not None]
            budget -= conn.changes()
        if budget <= 0:
            return PurgeStep(self.limit, keys, False)
        conn.execute("DELETE FROM workspaces WHERE id = ?", (self.workspace_id,))
        return PurgeStep(self.limit - budget + 1, keys, True)


def deleted_workspaces(conn: apsw.Connection) -> list[int]:
    """Workspaces marked deleted whose rows are still being purged, oldest deletion first."""
    return [cast(int, r[0]) for r in conn.execute(
        "SELECT id FROM workspaces WHERE deleted_at IS NOT NULL ORDER BY deleted_at, id"
    )]


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
