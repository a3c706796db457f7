"""The per-fact views: one committed event in every form a session sends it.

The hub wraps each fact once in a `FactView` (the gateway hands it
`FactView.of`), shared by all its recipients: the JSON payload the engine
encoded is reused as is, and the other forms a session may need
(MessagePack, the Relaycast node payload, the node's `context.update`
frame, the observer's flat event) are derived at most once per fact, on
first use.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from broker.engine.facts import Fact
from protocol import frames as fr
from protocol.codec import json_to_msgpack
from protocol.objects import MESSAGE_EVENTS  # message-bearing events: data is a message

_json = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()


Topic = Literal["agent", "channel", "presence", "thread"]


class ContextUpdate(msgspec.Struct, kw_only=True):
    """`FleetContextUpdateMessage`: an ephemeral event pushed to a Relaycast node socket."""

    v: int = fr.PROTOCOL_VERSION
    type: Literal["context.update"] = "context.update"
    topic: Topic
    event: str
    data: Any


class FactView:
    """One event as sessions send it; every derived encoding is computed once and shared.

    type: the event type; payload: the engine's `{"type","data"}` JSON bytes.
    message_id: the message the event is about, when known without decoding.
    """

    __slots__ = ("type", "workspace_id", "payload", "channel_id", "_message_id", "_msgpack",
                 "_decoded", "_node", "_flat", "_context")

    def __init__(self, type: str, workspace_id: int, payload: bytes, *,
                 message_id: int | None = None, channel_id: int | None = None) -> None:
        self.type = type
        self.workspace_id = workspace_id
        self.payload = payload
        self.channel_id = channel_id
        self._message_id = message_id
        self._msgpack: bytes | None = None
        self._decoded: dict[str, Any] | None = None
        self._node: bytes | None = None
        self._flat: tuple[bytes, str | None] | None = None
        self._context: bytes | None = None

    @classmethod
    def of(cls, fact: Fact) -> FactView:
        return cls(fact.type, fact.workspace_id, fact.payload, channel_id=fact.channel_id)

    def raw(self, msgpack: bool = False) -> msgspec.Raw:
        """The payload as a frame embeds it: the engine's JSON, or MessagePack made once."""
        if not msgpack:
            return msgspec.Raw(self.payload)
        if self._msgpack is None:
            self._msgpack = json_to_msgpack(self.payload)
        return msgspec.Raw(self._msgpack)

    @property
    def data(self) -> Any:
        """The payload's `data`, decoded once."""
        if self._decoded is None:
            decoded = _json.decode(self.payload)
            self._decoded = decoded if isinstance(decoded, dict) else {"data": decoded}
        return self._decoded.get("data")

    def message_object(self) -> dict[str, Any]:
        """The message an event carries (its data, or data.message), as a dict."""
        data = self.data
        if not isinstance(data, dict):
            return {}
        inner = data.get("message")
        return inner if isinstance(inner, dict) else data

    @property
    def message_id(self) -> str:
        """The id of the message the event is about ("" when there is none)."""
        if self._message_id is not None:
            return str(self._message_id)
        data = self.data
        if not isinstance(data, dict):
            return ""
        if self.type in MESSAGE_EVENTS:
            value = self.message_object().get("id")
        else:
            value = data.get("message_id")
        return "" if value is None else str(value)

    @property
    def mode(self) -> str:
        """The message's injection mode, `wait` unless it says `steer`."""
        mode = self.message_object().get("injection_mode") if self.type in MESSAGE_EVENTS else None
        return "steer" if mode == "steer" else "wait"

    def node_payload(self) -> msgspec.Raw:
        """The payload for a Relaycast node socket.

        The SDK reads a message event's author from `data.from_name`
        (ws.js, transformServerLikeEvent); our message objects name it
        `agent_name`, so the node form adds `from_name`. Made once per fact.
        """
        if self._node is None:
            data = self.data
            if (self.type in MESSAGE_EVENTS and isinstance(data, dict)
                    and "from_name" not in data):
                author = self.message_object().get("agent_name")
                self._node = _encoder.encode({"type": self.type,
                                              "data": {**data, "from_name": author}})
            else:
                self._node = self.payload
        return msgspec.Raw(self._node)

    def flat_event(self) -> tuple[bytes, str | None]:
        """The Relaycast observer form (a flat ServerEvent) and the channel it concerns.

        Shapes from @relaycast/types events.d.ts: message events become
        `{type, id, channel|conversation_id, message}`; the rest spread their
        data next to `type`. Made once per fact.
        """
        if self._flat is None:
            self._flat = _flatten(self.type, self.data, self.message_object())
        return self._flat


    def context_update(self) -> msgspec.Raw:
        """The whole `context.update` frame a Relaycast node socket gets. Made once per fact.

        Every node session of the workspace sends the same bytes, so a
        presence change seen by a thousand nodes is encoded once.
        """
        if self._context is None:
            self._context = _encode_context_update(self.type, self.data)
        return msgspec.Raw(self._context)


def _topic(event_type: str) -> Topic:
    if event_type.startswith("agent.status."):
        return "presence"
    if event_type.startswith(("channel.", "member.")):
        return "channel"
    return "agent"


def _encode_context_update(event_type: str, data: Any) -> bytes:
    return _encoder.encode(ContextUpdate(topic=_topic(event_type), event=event_type, data=data))


def _flatten(event_type: str, data: Any, message: dict[str, Any]) -> tuple[bytes, str | None]:
    event: dict[str, Any]
    channel: str | None = None
    if event_type in MESSAGE_EVENTS:
        summary = {
            "id": message.get("id"), "agent_id": message.get("agent_id"),
            "agent_name": message.get("agent_name"), "text": message.get("text"),
            "attachments": message.get("attachments") or [],
            "injection_mode": message.get("injection_mode") or "wait",
        }
        event = {"type": event_type, "id": str(message.get("id") or "")}
        if event_type in ("dm.received", "group_dm.received"):
            outer = data if isinstance(data, dict) else {}
            event["conversation_id"] = outer.get("conversation_id") or message.get(
                "conversation_id")
        else:
            channel = message.get("channel_name")
            event["channel"] = channel
            if event_type == "thread.reply":
                event["parent_id"] = message.get("thread_id")
        event["message"] = summary
    elif event_type.startswith("channel.") and isinstance(data, dict) and "channel" not in data:
        channel = data.get("name")
        event = {"type": event_type, "channel": data}
    elif isinstance(data, dict):
        event = {**data, "type": event_type}
        named = data.get("channel")
        if isinstance(named, str):
            channel = named
        elif isinstance(named, dict) and isinstance(named.get("name"), str):
            channel = named["name"]
    else:
        event = {"type": event_type, "data": data}
    return _encoder.encode(event), channel if isinstance(channel, str) else None
