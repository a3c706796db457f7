"""The Relaycast workspace observer: `/v1/ws` opened with a workspace key.

It receives every event of the workspace as a flat Relaycast ServerEvent
(`{"type":"message.created","id":...,"channel":...,"message":{...}}`, see
`FactView.flat_event`), durable ones and ephemeral ones alike, with no seq
and no ack: an observer watches, it is not a recipient. Best effort: when
its frame queue is full, events are dropped (and counted).

Client frames (@relaycast/types `ClientEvent`): `subscribe` and
`unsubscribe` with channel names (a leading `#` is ignored), `ping`
(answered by `pong`), `resync` (answered by `resync_ack`; nothing is
replayed, since the observer stream has no seq to resume from). A frame
of a known type with wrong fields is answered with
`{"type":"error","code":"invalid_request","message":...}`.

Requests: the observer also answers the native request frames
(`{"v":1,"id":"r1","type":"message.list","channel":"ops"}`, docs/protocol.md)
of every operation the workspace key may call, with the native `reply`
frame; the key is the workspace's owner, so these are its reads of every
channel, conversation and mailbox of the workspace (and its management
operations). A request of an operation that needs an agent token is
answered `forbidden`; one that cannot be decoded but has an `id`, with the
error as a `reply`. Filter
rule: with no subscription the observer sees everything; once it has
subscribed to channels, events that concern another channel are left out,
and events that concern no channel (DMs, presence) still pass.
"""

from __future__ import annotations

from typing import Any

import msgspec

from broker.gateway.frame_queue import Mode
from broker.gateway.session import Session
from broker.gateway.views import FactView
from protocol import frames as fr
from protocol.codec import FrameError


class ObserverSession(Session):
    kind = "observer"
    pings = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue.mode = Mode.LIVE  # no delivery stream to replay
        self.channels: set[str] = set()

    def offer_fact(self, view: FactView) -> None:
        if self.revoked_by(view):
            return
        if self.channels:
            _, channel = view.flat_event()
            if channel is not None and channel not in self.channels:
                return
        self.queue.offer_event(view)

    def event_frame(self, view: FactView) -> Any:
        return msgspec.Raw(view.flat_event()[0])

    async def handle(self, frame: Any) -> None:
        op = self.gateway.request_operations.get(type(frame))
        if op is not None:
            await self.answer(op, frame)
        elif isinstance(frame, fr.Subscribe):
            self.channels.update(_names(frame.channels))
        elif isinstance(frame, fr.Unsubscribe):
            self.channels.difference_update(_names(frame.channels))
        elif isinstance(frame, fr.ObserverPing):
            self.queue.put(fr.FlatPong())
        elif isinstance(frame, fr.Resync):
            self.queue.put(fr.ResyncAck(last_seen_seq=frame.last_seen_seq, current_seq=0,
                                         replayed=0, gap_detected=False))

    def frame_error(self, err: FrameError) -> bool:
        """A request's error is its reply; Relaycast frames carry no id: a readable but
        wrong one gets an error frame.

        Unknown types without an id (a newer SDK's) are ignored; only bytes
        that are not a document at all, or too large, close the socket.
        """
        if err.request_id is not None:
            # A request (it has an id): its error is its reply.
            self.refuse(err.request_id, err.code, err.message)
            return True
        if err.code == "unknown_type":
            return True
        if err.code in ("invalid_request", "invalid_frame"):
            self.refuse(None, err.code, err.message)
            return True
        return super().frame_error(err)

    def refuse(self, request_id: str | None, code: str, message: str) -> None:
        """A request's refusal is its `reply`; any other frame's a flat `error`."""
        if request_id is not None:
            super().refuse(request_id, code, message)
        else:
            self.queue.put(fr.FlatError(code=code, message=message))

    def final_error(self, code: str, message: str) -> Any:
        return fr.FlatError(code=code, message=message)


def _names(channels: list[str]) -> set[str]:
    return {name.strip().removeprefix("#") for name in channels if name.strip()}
