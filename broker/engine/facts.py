"""Committed facts: what the writer tells the fanout after a COMMIT returned.

A fact is produced by a command inside the transaction but published only if
that command's writes were committed. The payload is encoded once, here, and
the gateway reuses the bytes for every recipient.
"""

from __future__ import annotations

import msgspec


class Delivery(msgspec.Struct, frozen=True, array_like=True):
    """One durable delivery row: this agent must receive the fact at this seq."""

    agent_id: int
    seq: int


class Fact(msgspec.Struct, frozen=True, kw_only=True):
    """One committed event.

    type: the event type (`message.created`, `member.joined`, ...).
    payload: the encoded `{"type": ..., "data": ...}` JSON object, shared by all recipients.
    deliveries: durable deliveries written for it (empty for an ephemeral event).
    audience: agents whose sessions see an ephemeral event (None: the whole
    workspace; empty: no session).
    """

    type: str
    workspace_id: int
    payload: bytes
    log_id: int | None = None
    channel_id: int | None = None
    conversation_id: int | None = None
    deliveries: tuple[Delivery, ...] = ()
    audience: tuple[int, ...] | None = None
    # A nudge for the audience's own sessions (mailbox.changed,
    # agent.token_rotated): never shown to observers nor sent to webhooks.
    internal: bool = False
