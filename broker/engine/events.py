"""Recording a durable event: one message-log row plus one delivery per recipient.

Every send path (channel, DM, group DM, thread reply) and every notice
(reaction, read) ends here, inside its command's transaction, so an event
can never exist without its deliveries or the other way round.

Sequence numbers come from `mailboxes.last_seq`: the recipients that still
have room in their mailbox get `last_seq + 1`, and their marks advance, in
the same transaction (the writer is the only one changing those rows):
gap-free per agent, strictly increasing, and never reused, because the
high-water mark lives on the agent's mailbox row, not in the (prunable)
deliveries.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

import msgspec

from broker.engine.facts import Delivery, Fact
from broker.engine.outbox import enqueue_webhooks
from broker.engine.writer import Tx

_encoder = msgspec.json.Encoder()
# `[[agent_id, seq], ...]` straight into the facts' Delivery structs (array-like)
_allocated = msgspec.json.Decoder(tuple[Delivery, ...])
# Recipients (?1, a JSON array of agent ids) whose mailbox has room (?2: the depth).
_ROOM = "agent_id IN (SELECT value FROM json_each(?1)) AND pending_count < ?2"


class Recorded(msgspec.Struct, frozen=True):
    """What `record_event` wrote: the log row, the deliveries, who was skipped."""

    log_id: int
    payload: bytes
    deliveries: tuple[Delivery, ...]
    mailbox_full: tuple[int, ...]


def encode_payload(event_type: str, data: Any) -> bytes:
    """The one encoding of an event, `{"type": ..., "data": ...}`, shared by all recipients."""
    return _encoder.encode({"type": event_type, "data": data})


def record_event(
    tx: Tx,
    *,
    workspace_id: int,
    event_type: str,
    data: Any,
    recipients: Iterable[int],
    message_id: int | None = None,
    channel_id: int | None = None,
    conversation_id: int | None = None,
    agent_id: int | None = None,
) -> Recorded:
    """Append the event to message_log and give each recipient a delivery; emit the fact.

    A recipient whose mailbox already holds `limits.mailbox_depth` unacked
    deliveries gets none and is listed in `mailbox_full`.
    """
    conn, now = tx.conn, tx.now_ms
    log_id = tx.new_id()
    payload = encode_payload(event_type, data)
    conn.execute(
        "INSERT INTO message_log(id, workspace_id, type, message_id, channel_id,"
        " conversation_id, agent_id, payload, created_at) VALUES (?,?,?,?,?,?,?,?,?)",
        (log_id, workspace_id, event_type, message_id, channel_id, conversation_id,
         agent_id, payload, now),
    )
    wanted = sorted(set(recipients))
    deliveries: tuple[Delivery, ...] = ()
    full: tuple[int, ...] = ()
    if wanted:
        # Three statements of one step each (each sqlite call lets the
        # event loop take the GIL, so row-by-row RETURNING or executemany
        # would cost a hand-over per recipient): the recipients with room
        # and their next seqs, their deliveries, their marks advanced. The
        # same filter in each, on rows nothing else changes in between.
        room = (_encoder.encode(wanted).decode(), tx.limits.mailbox_depth)
        row = conn.execute(
            "SELECT json_group_array(json_array(agent_id, last_seq + 1)) FROM mailboxes"
            f" WHERE {_ROOM}", room,
        ).fetchone()
        if row is not None:
            deliveries = _allocated.decode(cast(str, row[0]))
        if deliveries:
            expires = now + tx.limits.delivery_ttl_seconds * 1000
            conn.execute(
                "INSERT INTO deliveries(agent_id, seq, log_id, message_id, expires_at, created_at)"
                f" SELECT agent_id, last_seq + 1, ?3, ?4, ?5, ?6 FROM mailboxes WHERE {_ROOM}",
                (*room, log_id, message_id, expires, now),
            )
            conn.execute(
                "UPDATE mailboxes SET last_seq = last_seq + 1, pending_count = pending_count + 1"
                f" WHERE {_ROOM}", room,
            )
        if len(deliveries) < len(wanted):
            got = {d.agent_id for d in deliveries}
            full = tuple(a for a in wanted if a not in got)
    # Webhook outbox rows, in this transaction (invariant 9).
    enqueue_webhooks(tx, workspace_id=workspace_id, event_type=event_type, payload=payload,
                     channel_id=channel_id, log_id=log_id)
    tx.emit(
        Fact(
            type=event_type,
            workspace_id=workspace_id,
            payload=payload,
            log_id=log_id,
            channel_id=channel_id,
            conversation_id=conversation_id,
            deliveries=deliveries,
        )
    )
    return Recorded(log_id, payload, deliveries, full)


def notify_sessions(
    tx: Tx, *, workspace_id: int, event_type: str, data: Any, audience: Iterable[int],
) -> None:
    """An internal nudge to the audience's live sessions (no outbox row, no observer)."""
    tx.emit(
        Fact(
            type=event_type,
            workspace_id=workspace_id,
            payload=encode_payload(event_type, data),
            audience=tuple(audience),
            internal=True,
        )
    )


def emit_ephemeral(
    tx: Tx, *, workspace_id: int, event_type: str, data: Any,
    audience: Iterable[int] | None = None, channel_id: int | None = None,
) -> None:
    """An event with no delivery rows (presence, membership, channel changes).

    audience: the agents whose sessions see it; None for the whole workspace,
    and an empty one for no session (observers and webhooks still see it).
    """
    payload = encode_payload(event_type, data)
    # Webhook outbox rows, in this transaction (invariant 9).
    enqueue_webhooks(tx, workspace_id=workspace_id, event_type=event_type, payload=payload,
                     channel_id=channel_id)
    tx.emit(
        Fact(
            type=event_type,
            workspace_id=workspace_id,
            payload=payload,
            channel_id=channel_id,
            audience=None if audience is None else tuple(audience),
        )
    )
