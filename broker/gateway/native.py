"""The native agent session on `/v1/ws` (docs/protocol.md is its contract).

Requests are the operations of `broker.operations` that an agent token may
call, bound by name: the request `type` is the operation name, its other
fields are the REST body's, its reply `data` is the REST response's, and a
refusal carries the REST error code. `delivery.ack` is the cumulative ack
of the delivery stream (it shadows the REST-only operation of that name,
which acks one delivery by id), and `ping` is answered by `pong`.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec

from broker.engine.errors import BrokerError
from broker.engine.workspaces import Principal
from broker.fanout import FactView
from broker.gateway.session import DeliverySession
from broker.operations import Call, Operation
from protocol import frames as fr

log = logging.getLogger(__name__)


class AgentSession(DeliverySession):
    """An agent's socket: its requests, its durable deliveries and the workspace's events."""

    kind = "agent"

    @property
    def principal(self) -> Principal:
        return Principal(self.workspace_id, self.agent_id, self.agent_name)

    def delivery_frame(self, seq: int, view: FactView) -> Any:
        return fr.Deliver(seq=seq, delivery_id=fr.delivery_id(self.agent_id, seq),
                          payload=view.raw(self.codec.msgpack))

    async def handle(self, frame: Any) -> None:
        if isinstance(frame, fr.DeliveryAck):
            if frame.id is None:
                self.gateway.recorder.ack_nowait(self.workspace_id, self.agent_id, frame.up_to_seq)
            else:
                await self.spawn_request(self._ack, frame)
        elif isinstance(frame, fr.Ping):
            self.outbox.put(fr.ServerPong(re=msgspec.UNSET if frame.id is None else frame.id))
        elif isinstance(frame, fr.Pong):
            pass  # its arrival is what counts (last_received)
        else:
            op = self.gateway.request_operations[type(frame)]
            await self.spawn_request(self._request, op, frame)

    async def _ack(self, frame: fr.DeliveryAck) -> None:
        assert frame.id is not None
        try:
            result = await self.gateway.recorder.ack(
                self.workspace_id, self.agent_id, frame.up_to_seq)
        except BrokerError as exc:
            self.refuse(frame.id, exc.code, exc.message)
        else:
            self.outbox.put(fr.Reply(re=frame.id, ok=True, data=result))

    async def _request(self, op: Operation[Any], frame: Any) -> None:
        call = Call(self.principal, idempotency_key=frame.idempotency_key)
        try:
            result = await op.handler(self.engine, call, frame)
        except BrokerError as exc:
            self.refuse(frame.id, exc.code, exc.message)
        except Exception:
            log.exception("session %d: request %s (%s) failed", self.id, frame.id, op.name)
            self.refuse(frame.id, "internal_error", "the broker failed to handle this request")
        else:
            self.outbox.put(fr.Reply(re=frame.id, ok=True, data=result))
