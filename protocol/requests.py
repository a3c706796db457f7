"""Inputs of operations, as they arrive on the wire (REST body + path + query, or a WS request).

One Struct per operation; the REST binding merges path parameters, query
parameters and the JSON body into one object and converts it to this type,
and the WebSocket binding converts the request frame's fields the same way,
so both bindings share names, shapes and validation messages.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

Mode = Literal["wait", "steer"]


class Request(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    """Base of every operation input (unknown fields are ignored, as the SDK sends extras)."""


class CreateWorkspace(Request):
    name: str


class RegisterAgent(Request):
    name: str
    type: Literal["agent", "human", "system"] = "agent"
    persona: str | None = None
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)


class CreateChannel(Request):
    name: str
    topic: str | None = None
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)


class JoinChannel(Request):
    channel: str


class SendMessage(Request):
    channel: str
    text: str
    mode: Mode = "wait"
    data: dict[str, Any] | None = None
    attachments: list[str] = msgspec.field(default_factory=list)
