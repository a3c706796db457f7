"""The transactional outbox's hot path: one webhook row per matching subscription, per fact.

`enqueue_webhooks` is called by `record_event` and `emit_ephemeral`, the
two choke points every fact passes through, inside the command's own
transaction (DESIGN.md, invariant 9): the outbox row commits with the fact
or not at all. It is ONE `INSERT ... SELECT` from the workspace's active
subscriptions, matching in SQL (event type or `*`, channel filter, mentions
filter), so a fact nobody subscribed to costs one index probe and writes
nothing; whether the workspace has an active subscription at all is
remembered from one probe while only sends and receipts run (Tx.read_once),
so a run of sends in a workspace without subscriptions skips the INSERT.
The matching uses `instr` on the JSON text rather than
`json_each`: a table-valued function in that statement costs more than
the probe even with no subscription at all (BENCHMARKS.md, "Figures
behind the code"). The rows' ids come from a block reserved from the
writer's id allocator (the first id plus the subscription's rank in its
workspace), so an outbox id is unique and never reused: receivers
deduplicate on it (`webhook-id`, `X-Relay-Delivery`).

This module depends on the writer's `Tx` only, so the event recorders can
import it without pulling in subscriptions or inbound hooks (which post
messages, and so import the recorders). The subscriptions live in
broker.engine.webhooks, the dispatcher's side of the table in
broker.engine.webhook_deliveries.
"""

from __future__ import annotations

from broker.engine.writer import Tx

# The commit signal (`Tx.signal`) of a command that made outbox rows due:
# the dispatcher waits on it instead of polling the table.
OUTBOX_WRITTEN = "outbox_written"

# -- the outbox enqueue (hot path: runs for every fact) ------------------------------

# ?1 first id of the reserved block, ?2 workspace, ?3 log id, ?4 event type,
# ?5 payload ({"type", "data"} JSON), ?6 now, ?7 channel id.
# Event types and agent names never contain '"', so looking for '"name"' in
# the JSON text of a list is exact. The payload is bound as a BLOB, which
# SQLite's JSON functions would read as JSONB, hence the CAST. The
# subqueries run only for subscriptions of the workspace that are active.
ENQUEUE_SQL = (
    "INSERT INTO outbox(id, workspace_id, subscription_id, log_id, type, payload,"
    " next_attempt_at, created_at)"
    " SELECT ?1 + (SELECT count(*) FROM webhook_subscriptions p WHERE p.workspace_id = ?2"
    " AND p.active AND p.id < s.id), ?2, s.id, ?3, ?4, ?5, ?6, ?6"
    " FROM webhook_subscriptions s WHERE s.workspace_id = ?2 AND s.active"
    " AND (instr(s.events, '\"' || ?4 || '\"') OR instr(s.events, '\"*\"'))"
    " AND (json_extract(s.filters, '$.channel') IS NULL"
    " OR json_extract(s.filters, '$.channel') = (SELECT c.name FROM channels c WHERE c.id = ?7))"
    " AND (json_extract(s.filters, '$.mentions') IS NULL"
    " OR instr(json_extract(CAST(?5 AS TEXT), '$.data.mentions'),"
    " '\"' || json_extract(s.filters, '$.mentions') || '\"'))"
)


def _has_subscriptions(tx: Tx, workspace_id: int) -> bool:
    return tx.conn.execute(
        "SELECT 1 FROM webhook_subscriptions WHERE workspace_id = ? AND active LIMIT 1",
        (workspace_id,),
    ).fetchone() is not None


def enqueue_webhooks(
    tx: Tx, *, workspace_id: int, event_type: str, payload: bytes,
    channel_id: int | None = None, log_id: int | None = None,
) -> int:
    """Write one outbox row per matching active subscription; returns how many.

    Called inside the fact's command, so the rows commit with the fact.
    Whether the workspace has an active subscription at all is probed once
    and remembered until a command that does not keep the topology runs
    (Tx.read_once): in a workspace with none, a batch's sends write no
    statement of their own here.
    """
    if not tx.read_once(("subscribed", workspace_id),
                        lambda: _has_subscriptions(tx, workspace_id)):
        return 0
    first = tx.new_id()
    tx.conn.execute(
        ENQUEUE_SQL, (first, workspace_id, log_id, event_type, payload, tx.now_ms, channel_id)
    )
    written = tx.conn.changes()
    if written:
        tx.signal(OUTBOX_WRITTEN)
        # Ids first .. first + (rank of the last match) are taken: move past them.
        row = tx.conn.execute("SELECT max(id) FROM outbox").fetchone()
        last = int(row[0]) if row is not None and row[0] is not None else first
        while tx.ids.last < last:
            tx.new_id()
    return written
