"""WebSocket frames: one msgspec Struct per frame of the native protocol and the Relaycast sockets.

Inbound frames (what clients send) are tagged on `type` so that a session
decodes every frame in one pass into the right Struct: a union of the fixed
frames below plus one request frame per operation (see `request_frame`).
Outbound frames (what the server sends) declare `v` and `type` as ordinary
fields instead of a tag, only so that they are encoded in the documented
order, `{"v":1,"type":...}`.

A durable payload is carried as `msgspec.Raw`: the engine encoded it once,
when the event was committed, and every recipient's frame embeds those same
bytes; only `seq` and the ids around them differ per frame.

Nothing here does I/O (see `protocol.codec` for bytes in and out).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, Raw, UnsetType

PROTOCOL_VERSION = 1

# Request ids are chosen by the client and echoed back as `re`.
RequestId = Annotated[str, Meta(min_length=1, max_length=128)]
Seq = Annotated[int, Meta(ge=0)]

# Fields that every request frame adds to its operation's input; an input
# may not use these names (the frame could not tell them apart).
REQUEST_ENVELOPE_FIELDS = ("v", "type", "id", "idempotency_key")


# -- native protocol: inbound ------------------------------------------------------------


class DeliveryAck(msgspec.Struct, tag="delivery.ack", tag_field="type", kw_only=True):
    """Cumulative ack: every delivery of the agent with seq <= up_to_seq is done.

    `id` is optional: with it, the server replies once the ack is durable.
    `agent` is the agent's name (Relaycast node sockets send it; the native
    session ignores it, its token already names the agent).
    """

    up_to_seq: Seq
    v: int = PROTOCOL_VERSION
    id: RequestId | None = None
    agent: str | None = None


class Ping(msgspec.Struct, tag="ping", tag_field="type", kw_only=True):
    """Liveness probe, either direction; with an `id`, the pong carries it back as `re`."""

    v: int = PROTOCOL_VERSION
    id: RequestId | None = None


class Pong(msgspec.Struct, tag="pong", tag_field="type", kw_only=True):
    """The answer to a server ping (any inbound frame also proves liveness)."""

    v: int = PROTOCOL_VERSION
    re: str | None = None


class RequestEnvelope(msgspec.Struct, kw_only=True):
    """What every request frame carries besides its operation's fields."""

    id: RequestId
    v: int = PROTOCOL_VERSION
    # checked where it is used, as for REST's header (invalid_idempotency_key)
    idempotency_key: str | None = None


def request_frame(type_name: str, input_type: type[msgspec.Struct]) -> type[msgspec.Struct]:
    """The inbound frame of request `type_name`: its input plus `id`, `v`, `idempotency_key`.

    The frame is a subclass of `input_type`, so a decoded frame is the
    operation's input as it is (flat fields, as in the REST body).
    Raises ValueError when the input already uses one of the envelope names.
    """
    clash = set(REQUEST_ENVELOPE_FIELDS) & {f.name for f in msgspec.structs.fields(input_type)}
    if clash:
        raise ValueError(
            f"request {type_name!r}: input {input_type.__name__} uses reserved field(s) "
            f"{sorted(clash)}"
        )
    envelope = [
        (f.name, f.type, f.default) for f in msgspec.structs.fields(RequestEnvelope)
        if f.name != "id"
    ]
    return msgspec.defstruct(
        f"{input_type.__name__}Frame",
        [("id", RequestId), *envelope],
        bases=(input_type,),
        tag=type_name,
        tag_field="type",
        kw_only=True,
        module=__name__,
    )


# -- native protocol: outbound -----------------------------------------------------------


class ErrorBody(msgspec.Struct):
    """A refusal: a stable machine code (the same as REST's) and a message for people."""

    code: str
    message: str
    # With rate_limit_exceeded: how long to wait before the request would pass.
    retry_after_ms: int | msgspec.UnsetType = msgspec.UNSET


class Reply(msgspec.Struct, kw_only=True):
    """The answer to request `re`: `ok` with `data`, or not `ok` with `error`."""

    v: int = PROTOCOL_VERSION
    type: Literal["reply"] = "reply"
    re: str | None
    ok: bool
    data: Any | UnsetType = UNSET
    error: ErrorBody | UnsetType = UNSET


class Deliver(msgspec.Struct, kw_only=True):
    """A durable delivery: `payload` is `{"type": ..., "data": ...}` as the engine encoded it."""

    v: int = PROTOCOL_VERSION
    type: Literal["deliver"] = "deliver"
    seq: int
    delivery_id: str
    payload: Raw


class DeliverBatch(msgspec.Struct, kw_only=True):
    """Several durable deliveries in one frame, for a session that asked for batches.

    Each item of `deliveries` is a whole `deliver` frame, exactly as it
    would be sent alone (redeliveries included), spliced in already
    encoded: the batch costs one frame, not one re-encoding per delivery.
    """

    v: int = PROTOCOL_VERSION
    type: Literal["deliver.batch"] = "deliver.batch"
    deliveries: list[Raw]


class Event(msgspec.Struct, kw_only=True):
    """An ephemeral push (presence, membership, channel changes): no seq, no ack."""

    v: int = PROTOCOL_VERSION
    type: Literal["event"] = "event"
    payload: Raw


class ServerPing(msgspec.Struct, kw_only=True):
    v: int = PROTOCOL_VERSION
    type: Literal["ping"] = "ping"


class ServerPong(msgspec.Struct, kw_only=True):
    v: int = PROTOCOL_VERSION
    type: Literal["pong"] = "pong"
    re: str | UnsetType = UNSET


class AckResult(msgspec.Struct, kw_only=True):
    """Reply data of a `delivery.ack` that carried an id."""

    up_to_seq: int
    acked_seq: int


# Inbound frames that are not requests; a session's decoder adds its request frames.
NATIVE_CONTROL_FRAMES: tuple[type[msgspec.Struct], ...] = (DeliveryAck, Ping, Pong)


def delivery_id(agent_id: int, seq: int) -> str:
    """The stable id of one delivery: `<agent id>:<seq>`."""
    return f"{agent_id}:{seq}"


# -- Relaycast node socket (/v1/node/ws) ----------------------------------------------------
# Shapes from @relaycast/types@6.0.2 fleet-wire.d.ts; unknown fields are ignored.


class NodeRegister(msgspec.Struct, tag="node.register", tag_field="type", kw_only=True):
    v: int = PROTOCOL_VERSION
    id: RequestId | None = None
    name: str | None = None
    node_id: str | None = None
    provider: dict[str, Any] | None = None
    capabilities: list[dict[str, Any]] = msgspec.field(default_factory=list)


class NodeHeartbeat(msgspec.Struct, tag="node.heartbeat", tag_field="type", kw_only=True):
    v: int = PROTOCOL_VERSION
    id: RequestId | None = None


class NodeDeregister(msgspec.Struct, tag="node.deregister", tag_field="type", kw_only=True):
    v: int = PROTOCOL_VERSION
    id: RequestId | None = None


NODE_INBOUND_FRAMES: tuple[type[msgspec.Struct], ...] = (
    NodeRegister, NodeHeartbeat, NodeDeregister, DeliveryAck, Ping, Pong,
)


class NodeDeliver(msgspec.Struct, kw_only=True):
    """`FleetDeliverMessage`: one durable delivery pushed to a node socket."""

    v: int = PROTOCOL_VERSION
    type: Literal["deliver"] = "deliver"
    delivery_id: str
    agent_id: str
    agent: str
    msg_id: str
    seq: int
    mode: Literal["wait", "steer"]
    payload: Raw


class NodeReply(msgspec.Struct, kw_only=True):
    """`FleetReplyMessage`: Relaycast replies carry the request's `id` (not `re`)."""

    v: int = PROTOCOL_VERSION
    type: Literal["reply"] = "reply"
    id: str
    ok: Literal[True] = True
    data: Any


class NodeError(msgspec.Struct, kw_only=True):
    """`FleetErrorMessage`."""

    v: int = PROTOCOL_VERSION
    type: Literal["error"] = "error"
    id: str
    ok: Literal[False] = False
    code: str
    message: str


class CapabilityAcceptance(msgspec.Struct, kw_only=True):
    name: str
    kind: Literal["action", "capacity"]
    accepted: bool
    reason: str | UnsetType = UNSET


class ProviderIdentity(msgspec.Struct, kw_only=True):
    name: str
    instance_id: str


class NodeRegistered(msgspec.Struct, kw_only=True):
    """`NodeRegisterReplyData` plus the node's descriptor."""

    node_id: str
    name: str
    agent_id: str
    agent: str
    provider: ProviderIdentity
    accepted_capabilities: list[CapabilityAcceptance]


class NodeToken(msgspec.Struct, kw_only=True):
    """Response of `POST /v1/agent/node-token`."""

    node_id: str
    node_name: str
    token: str


# -- Relaycast workspace observer (/v1/ws with a workspace key) ----------------------------
# Shapes from @relaycast/types@6.0.2 events.d.ts (ClientEvent and ServerEvent).


class Subscribe(msgspec.Struct, tag="subscribe", tag_field="type", kw_only=True):
    channels: list[str]


class Unsubscribe(msgspec.Struct, tag="unsubscribe", tag_field="type", kw_only=True):
    channels: list[str]


class Resync(msgspec.Struct, tag="resync", tag_field="type", kw_only=True):
    last_seen_seq: int | float = 0
    since: str | None = None


class ObserverPing(msgspec.Struct, tag="ping", tag_field="type", kw_only=True):
    pass


class ObserverPong(msgspec.Struct, tag="pong", tag_field="type", kw_only=True):
    pass


OBSERVER_INBOUND_FRAMES: tuple[type[msgspec.Struct], ...] = (
    Subscribe, Unsubscribe, Resync, ObserverPing, ObserverPong,
)


class FlatPong(msgspec.Struct, kw_only=True):
    type: Literal["pong"] = "pong"


class ResyncAck(msgspec.Struct, kw_only=True):
    type: Literal["resync_ack"] = "resync_ack"
    last_seen_seq: int | float
    current_seq: int
    replayed: int
    gap_detected: bool


class FlatError(msgspec.Struct, kw_only=True):
    type: Literal["error"] = "error"
    code: str
    message: str
