"""The native agent session on `/v1/ws` (docs/protocol.md is its contract).

Requests are the operations of `broker.operations` that an agent token may
call, bound by name: the request `type` is the operation name, its other
fields are the REST body's, its reply `data` is the REST response's, and a
refusal carries the REST error code. `delivery.ack` is the cumulative ack
of the delivery stream (it shadows the REST-only operation of that name,
which acks one delivery by id), and `ping` is answered by `pong`.

The session keeps the digest of the token it was opened with. A token
rotation leaves the old token working for a grace period: a session opened
with the old one is closed (4401) when that grace ends, one opened with the
new token stays. Whether this session's token is the old one is read from
the database, after the session is attached (a rotation committed before
is in the row) and again on each `agent.token_rotated` event (one after).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal

import apsw
import msgspec

from broker.engine.errors import BrokerError
from broker.gateway.delivery import DeliverySession
from broker.gateway.views import FactView
from protocol import frames as fr

log = logging.getLogger(__name__)


class Redeliver(msgspec.Struct, kw_only=True):
    """`deliver` of a delivery the agent gave back: its seq may be one the client has seen."""

    v: int = fr.PROTOCOL_VERSION
    type: Literal["deliver"] = "deliver"
    seq: int
    delivery_id: str
    payload: msgspec.Raw
    redelivery: bool = True


def token_expiry(conn: apsw.Connection, workspace_id: int, agent_id: int,
                 token_digest: bytes) -> int | None:
    """When the agent's token with this digest stops working (epoch ms); None: it is current.

    0 when it no longer names the agent (rotated out twice). Raises agent_not_found.
    """
    row = conn.execute(
        "SELECT token_hash = ?1, CASE WHEN prev_token_hash = ?1 THEN prev_token_expires_at END"
        " FROM agents WHERE id = ?2 AND workspace_id = ?3 AND deactivated_at IS NULL",
        (token_digest, agent_id, workspace_id),
    ).fetchone()
    if row is None:
        raise BrokerError("agent_not_found", f"agent {agent_id} not found")
    if row[0]:
        return None
    return 0 if row[1] is None else int(row[1])


class AgentSession(DeliverySession):
    """An agent's socket: its requests, its durable deliveries and the workspace's events.

    credential: the digest of the agent token the socket was opened with
    (None: not followed, as in tests that drive a session directly).
    presence: the client asked for presence (`?presence=1`): it gets the
    coalesced `presence` events.
    """

    kind = "agent"

    def __init__(self, *args: Any, presence: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.wants_presence = presence

    def credential_expiry(self) -> Callable[[apsw.Connection, int, int, bytes], int | None]:
        return token_expiry

    def delivery_frame(self, seq: int, view: FactView, redelivery: bool = False) -> Any:
        if redelivery:
            return Redeliver(seq=seq, delivery_id=fr.delivery_id(self.agent_id, seq),
                             payload=view.raw(self.codec.msgpack))
        return fr.Deliver(seq=seq, delivery_id=fr.delivery_id(self.agent_id, seq),
                          payload=view.raw(self.codec.msgpack))

    async def handle(self, frame: Any) -> None:
        if isinstance(frame, fr.DeliveryAck):
            if frame.id is None:
                self.gateway.recorder.ack_nowait(self.workspace_id, self.agent_id, frame.up_to_seq)
            else:
                await self.spawn_request(self._ack, frame)
        elif isinstance(frame, fr.Ping):
            self.queue.put(fr.ServerPong(re=msgspec.UNSET if frame.id is None else frame.id))
        elif isinstance(frame, fr.Pong):
            pass  # its arrival is what counts (last_received)
        else:
            await self.answer(self.gateway.request_operations[type(frame)], frame)

    async def _ack(self, frame: fr.DeliveryAck) -> None:
        assert frame.id is not None
        try:
            result = await self.gateway.recorder.ack(
                self.workspace_id, self.agent_id, frame.up_to_seq)
        except BrokerError as exc:
            self.refuse(frame.id, exc.code, exc.message)
        else:
            self.queue.put(fr.Reply(re=frame.id, ok=True, data=result))
