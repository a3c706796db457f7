"""Queries and a probe for the daemon's health, readiness and metrics endpoints."""

from __future__ import annotations

import apsw
import msgspec

from broker.engine.writer import Tx


def pending_deliveries_total(conn: apsw.Connection) -> int:
    """Deliveries not yet acknowledged, over every agent (the sum of mailboxes.pending_count)."""
    row = conn.execute("SELECT coalesce(sum(pending_count), 0) FROM mailboxes").fetchone()
    return 0 if row is None else int(row[0])


class Probe(msgspec.Struct, frozen=True):
    """A command that writes nothing: it commits only if the writer can take the write lock.

    The writer wraps it in BEGIN IMMEDIATE ... COMMIT, so its success proves
    that the writer is running and the database accepts a write transaction.
    An empty transaction writes no WAL frame, so it costs no fsync.
    """

    def apply(self, tx: Tx) -> bool:
        return True
