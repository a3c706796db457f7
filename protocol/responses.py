"""Result shapes that the operation table builds from engine results for the wire contract.

Most operations return an engine object as it is (protocol.objects). These
are the few where the Relaycast contract nests or trims differently:
`SendDmResponse` nests the message, a workspace lookup by name (which needs
no token) shows only the id, name and creation time, and a delivery item
carries the Relaycast delivery fields and the message it delivers.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from protocol.objects import Message


class DmSent(msgspec.Struct, kw_only=True):
    """Relaycast `SendDmResponse` / `GroupDmMessageResponse`."""

    conversation_id: str
    message: Message
    created_at: str


class WorkspaceFound(msgspec.Struct, kw_only=True):
    """Relaycast `CreateWorkspaceResponse` for a workspace that already existed: no key."""

    workspace_id: str
    name: str
    created_at: str


class WorkspaceLookup(msgspec.Struct, kw_only=True):
    """Relaycast `WorkspaceLookup`: public, so nothing else of the workspace."""

    id: str
    name: str
    created_at: str


class PresenceInfo(msgspec.Struct, kw_only=True):
    """Relaycast `AgentPresenceInfo`."""

    agent_id: str
    agent_name: str
    status: str
    last_seen: str | None


class DeliveredMessage(msgspec.Struct, kw_only=True):
    """Relaycast `DeliveryMessage`: the message a delivery carries, in short."""

    id: str
    channel_id: str | None
    conversation_id: str | None
    agent_id: str | None
    agent_name: str | None
    text: str
    thread_id: str | None
    created_at: str


class DeliveryItem(msgspec.Struct, kw_only=True):
    """One delivery of the caller (Relaycast `DeliveryItem` fields that apply here).

    id: `"<agent_id>:<seq>"`, what ack / fail / defer take.
    type: the event type; payload: the whole event `{"type", "data"}` as pushed.
    message: the message, for the event types that carry one (else null).
    """

    id: str
    seq: int
    agent_id: str
    status: Literal["queued", "delivered", "acked", "failed", "dead_lettered"]
    type: str
    message_id: str | None
    dispatch_attempts: int
    available_at: str | None
    expires_at: str
    created_at: str
    message: DeliveredMessage | None
    payload: Any


class ServiceStatus(msgspec.Struct, kw_only=True):
    """The answer of `/healthz` ("ok") and `/readyz` ("ready")."""

    status: Literal["ok", "ready"]
