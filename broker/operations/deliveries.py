"""Delivery operations: the calling agent's mailbox (list, ack one or up to a seq, fail, defer).

The same delivery rows that a WebSocket session pushes, listed and settled
by request instead. The workspace key, the workspace's owner, reads every
agent's mailbox (its summary, its deliveries) and settles none.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

import msgspec

from broker.engine import mailbox
from broker.engine.engine import Engine
from broker.engine.errors import BrokerError
from broker.engine.history import page_limit
from broker.operations.registry import Call, agent_id_of, agent_of, operation, workspace_of
from protocol import objects as ob
from protocol import requests as rq
from protocol.objects import iso
from protocol.responses import DeliveredMessage, DeliveryItem

_payload_decoder = msgspec.json.Decoder(dict[str, Any])


def _delivery_item(pending: mailbox.PendingDelivery) -> DeliveryItem:
    message = None
    # Only an event whose data is the message itself carries one (not a notice about it).
    if pending.type in ob.MESSAGE_EVENTS:
        data = _payload_decoder.decode(pending.payload).get("data") or {}
        message = msgspec.convert(data, DeliveredMessage, strict=False)
    return DeliveryItem(
        id=pending.delivery_id, seq=pending.seq, agent_id=str(pending.agent_id),
        status=pending.state,
        type=pending.type,
        message_id=None if pending.message_id is None else str(pending.message_id),
        dispatch_attempts=pending.attempts, available_at=iso(pending.available_at),
        expires_at=iso(pending.expires_at) or "", created_at=iso(pending.created_at) or "",
        message=message, payload=pending.payload,
    )


@operation("delivery.list", rq.ListDeliveries, auth="agent", output=list[DeliveryItem])
async def list_deliveries(engine: Engine, call: Call, req: rq.ListDeliveries) -> Any:
    """The caller's deliveries: unacked ones in seq order, or final ones newest first.

    No status or an unacked one: the pending rows (of that state, paged
    through). acked or dead_lettered: those rows still kept (list_settled).
    Raises invalid_limit (1..mailbox.MAX_PAGE), invalid_seq, invalid_cursor (a
    malformed `before`, another agent's delivery, or a cursor of the other kind
    of list).
    """
    workspace_id, agent_id = agent_of(call)
    return await _deliveries(engine, workspace_id, agent_id, req)


@operation("agent.deliveries", rq.AgentDeliveries, auth="workspace", output=list[DeliveryItem])
async def agent_deliveries(engine: Engine, call: Call, req: rq.AgentDeliveries) -> Any:
    """An agent's deliveries, by status, as `delivery.list` gives them to the agent itself.

    Raises agent_not_found, and the errors of `delivery.list`.
    """
    workspace_id = workspace_of(call)
    agent_id = await agent_id_of(engine, workspace_id, req.name)
    return await _deliveries(engine, workspace_id, agent_id, req)


async def _deliveries(
    engine: Engine, workspace_id: int, agent_id: int, req: rq.ListDeliveries
) -> list[DeliveryItem]:
    if req.status in mailbox.SETTLED_STATES:
        if req.after_seq is not None:
            raise BrokerError("invalid_cursor", "acked and dead_lettered deliveries are listed "
                              "newest first: page them with before, not after_seq")
        return [_delivery_item(p) for p in await engine.read(
            mailbox.list_settled, workspace_id, agent_id, req.status, req.before, req.limit)]
    if req.before is not None:
        raise BrokerError("invalid_cursor", "unacked deliveries are listed in seq order: page "
                          "them with after_seq, not before")
    # Checked here too: the loop below would not run for a size of 0 or less.
    size = page_limit(req.limit, mailbox.DEFAULT_PAGE, mailbox.MAX_PAGE)
    items: list[DeliveryItem] = []
    after = req.after_seq
    while len(items) < size:
        page = await engine.read(mailbox.list_pending, workspace_id, agent_id, after, size)
        items.extend(_delivery_item(p) for p in page
                     if req.status is None or p.state == req.status)
        if len(page) < size or req.status is None:
            break
        after = page[-1].seq
    return items[:size]


@operation("mailbox.list", rq.Empty, auth="workspace", output=list[ob.MailboxSummary])
async def list_mailboxes(engine: Engine, call: Call, req: rq.Empty) -> Any:
    """Every active agent's mailbox: presence, last seen, delivery counts, oldest unacked age."""
    return await engine.read(mailbox.mailbox_summaries, workspace_of(call), _now_ms())


@operation("agent.mailbox", rq.AgentByName, auth="workspace", output=ob.MailboxSummary)
async def agent_mailbox(engine: Engine, call: Call, req: rq.AgentByName) -> Any:
    """One agent's mailbox summary (as `mailbox.list`). Raises agent_not_found."""
    (summary,) = await engine.read(mailbox.mailbox_summaries, workspace_of(call), _now_ms(),
                                   req.name)
    return summary


def _now_ms() -> int:
    return int(time.time() * 1000)


@operation("delivery.ack_one", rq.DeliveryRef, auth="agent", output=ob.DeliveryTransition)
async def ack_delivery(engine: Engine, call: Call, req: rq.DeliveryRef) -> Any:
    workspace_id, agent_id = agent_of(call)
    return await engine.submit(mailbox.AckDelivery(
        workspace_id=workspace_id, agent_id=agent_id, delivery_id=req.delivery_id))


@operation("delivery.ack_up_to", rq.AckUpTo, auth="agent", output=ob.AckResult)
async def ack_up_to(engine: Engine, call: Call, req: rq.AckUpTo) -> Any:
    workspace_id, agent_id = agent_of(call)
    return await engine.submit(mailbox.AckUpTo(
        workspace_id=workspace_id, agent_id=agent_id, up_to_seq=req.up_to_seq))


@operation("delivery.fail", rq.FailDelivery, auth="agent", output=ob.DeliveryTransition)
async def fail_delivery(engine: Engine, call: Call, req: rq.FailDelivery) -> Any:
    workspace_id, agent_id = agent_of(call)
    return await engine.submit(mailbox.FailDelivery(
        workspace_id=workspace_id, agent_id=agent_id, delivery_id=req.delivery_id,
        error=req.error, retryable=req.retryable))


def _epoch_ms(value: str, field: str) -> int:
    """An ISO 8601 time as milliseconds since the epoch (UTC when no offset is given)."""
    try:
        when = dt.datetime.fromisoformat(value.strip())
    except ValueError:
        raise BrokerError(f"invalid_{field}", f"{field} must be an ISO 8601 time") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp() * 1000)


@operation("delivery.defer", rq.DeferDelivery, auth="agent", output=ob.DeliveryTransition)
async def defer_delivery(engine: Engine, call: Call, req: rq.DeferDelivery) -> Any:
    workspace_id, agent_id = agent_of(call)
    return await engine.submit(mailbox.DeferDelivery(
        workspace_id=workspace_id, agent_id=agent_id, delivery_id=req.delivery_id,
        until_ms=_epoch_ms(req.available_at, "available_at")))
