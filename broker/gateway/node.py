"""The Relaycast node socket, `/v1/node/ws?token=nt_live_...`, as @relaycast/sdk 6.0.2 uses it.

The SDK's AgentClient (agent.js) gets a node token from
`POST /v1/agent/node-token`, opens this socket, sends `node.register`, and
then receives `deliver` frames (fleet-wire `FleetDeliverMessage`), each of
which it acks with `{"v":1,"type":"delivery.ack","agent":NAME,"up_to_seq":N}`.
It sends `node.heartbeat` every 30 s and never answers a server ping, so
this socket is not pinged: it is closed (4408) after `idle_timeout` with
no frame at all.

The node is the agent's own "direct" node: the socket carries exactly that
agent's durable stream, with the same replay-then-live seam as the native
session. Ephemeral events go out as `context.update` frames, which the SDK
turns into the same events as on the observer socket. Relaycast replies
carry the request's `id` (not `re`); errors are `type: "error"` frames.
Actions (capabilities) are not supported: a registration lists each
capability as not accepted, with the reason.

A rotation of the agent's token cuts its node tokens to the end of the
grace (`RotateToken`): a node socket opened with such a token is closed
then, with the close code and reason of a native session whose token was
rotated out (4401). Where its token stands is read after the session is
attached and again on each `agent.token_rotated` event; a node token minted
after the rotation with the new token keeps its socket open, and one minted
with the old token during the grace ends with the grace (`IssueNodeToken`).

Frames of the fleet protocol that this broker does not implement
(`action.result`, `inventory.sync`, ...) are ignored, or refused with
`unknown_type` when they carry an `id`; the socket stays open.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import apsw

from broker.engine.errors import BrokerError
from broker.gateway.delivery import DeliverySession
from broker.gateway.presence import PresenceBatch
from broker.gateway.views import ContextUpdate, FactView
from protocol import frames as fr
from protocol.codec import FrameError

__all__ = ["ContextUpdate", "NodeSession"]

log = logging.getLogger(__name__)


def node_token_cut(conn: apsw.Connection, workspace_id: int, agent_id: int,
                   token_digest: bytes) -> int | None:
    """When the node token with this digest stops working because of a rotation (epoch ms).

    None: no rotation cut it (it ends at its own expiry, which an open
    socket outlives, as before). A token that expires at or before the
    grace end of the agent's last rotation was cut by it (a rotation sets
    every longer-lived one to that end). 0 when the token is gone.
    Raises agent_not_found.
    """
    row = conn.execute(
        "SELECT a.prev_token_expires_at, t.expires_at FROM agents a"
        " LEFT JOIN node_tokens t ON t.token_hash = ?1 AND t.agent_id = a.id"
        " WHERE a.id = ?2 AND a.workspace_id = ?3 AND a.deactivated_at IS NULL",
        (token_digest, agent_id, workspace_id),
    ).fetchone()
    if row is None:
        raise BrokerError("agent_not_found", f"agent {agent_id} not found")
    grace_end, expires = row
    if expires is None:
        return 0
    if grace_end is not None and int(expires) <= int(grace_end):
        return int(expires)
    return None


class NodeSession(DeliverySession):
    """The socket of an agent's own node: its durable deliveries and the workspace's events.

    credential: the digest of the node token the socket was opened with
    (None: not followed, as in tests that drive a session directly).
    """

    kind = "node"
    pings = False
    # The SDK's agentActive / agentOffline handlers read presence from
    # context.update frames, and it has no way to ask: a node socket always
    # gets presence, one frame per agent whose state changed in the interval.
    wants_presence = True

    def __init__(self, *args: Any, node_id: str, node_name: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.node_id = node_id
        self.node_name = node_name
        self.registered = False

    def credential_expiry(self) -> Callable[[apsw.Connection, int, int, bytes], int | None]:
        return node_token_cut

    def delivery_frame(self, seq: int, view: FactView, redelivery: bool = False) -> Any:
        # A redelivery looks like any other: the fleet frame has no field for it.
        assert self.agent_name is not None
        return fr.NodeDeliver(
            delivery_id=fr.delivery_id(self.agent_id, seq), agent_id=str(self.agent_id),
            agent=self.agent_name, msg_id=view.message_id, seq=seq,
            mode="steer" if view.mode == "steer" else "wait", payload=view.node_payload(),
        )

    def offer_presence(self, batch: PresenceBatch) -> None:
        for view in batch.changes:
            self.queue.offer_event(view)

    def event_frame(self, view: FactView) -> Any:
        return view.context_update()  # encoded once per fact, shared by every node

    async def handle(self, frame: Any) -> None:
        if isinstance(frame, fr.DeliveryAck):
            await self._ack(frame)
        elif isinstance(frame, fr.NodeRegister):
            self.registered = True
            if frame.id is not None:
                self.queue.put(fr.NodeReply(id=frame.id, data=self._registration(frame)))
        elif isinstance(frame, fr.NodeHeartbeat | fr.NodeDeregister):
            if frame.id is not None:
                self.queue.put(fr.NodeReply(id=frame.id, data={"node_id": self.node_id}))
        elif isinstance(frame, fr.Ping):
            self.queue.put(fr.ServerPong())

    def _registration(self, frame: fr.NodeRegister) -> fr.NodeRegistered:
        provider = frame.provider or {}
        accepted = [
            fr.CapabilityAcceptance(
                name=str(cap.get("name", "")),
                kind="capacity" if str(cap.get("name", "")).startswith("spawn:")
                or cap.get("name") == "release" else "action",
                accepted=False, reason="this broker does not run node capabilities",
            )
            for cap in frame.capabilities
        ]
        assert self.agent_name is not None
        return fr.NodeRegistered(
            node_id=self.node_id, name=self.node_name, agent_id=str(self.agent_id),
            agent=self.agent_name,
            provider=fr.ProviderIdentity(
                name=str(provider.get("name") or self.node_name),
                instance_id=str(provider.get("instance_id") or self.id)),
            accepted_capabilities=accepted,
        )

    async def _ack(self, frame: fr.DeliveryAck) -> None:
        if frame.agent is not None and frame.agent != self.agent_name:
            if frame.id is not None:
                self.refuse(frame.id, "agent_not_found",
                            f"this node carries agent {self.agent_name!r}, not {frame.agent!r}")
            return
        if frame.id is None:
            self.gateway.recorder.ack_nowait(self.workspace_id, self.agent_id, frame.up_to_seq)
            return
        await self.spawn_request(self._ack_and_reply, frame)

    async def _ack_and_reply(self, frame: fr.DeliveryAck) -> None:
        assert frame.id is not None
        try:
            result = await self.gateway.recorder.ack(
                self.workspace_id, self.agent_id, frame.up_to_seq)
        except BrokerError as exc:
            self.refuse(frame.id, exc.code, exc.message)
        else:
            self.queue.put(fr.NodeReply(id=frame.id, data=result))

    def frame_error(self, err: FrameError) -> bool:
        if err.code == "unknown_type" and err.request_id is None:
            return True
        return super().frame_error(err)

    def refuse(self, request_id: str | None, code: str, message: str) -> None:
        if request_id is None:
            return
        self.queue.put(fr.NodeError(id=request_id, code=code, message=message))

    def final_error(self, code: str, message: str) -> Any:
        return None
