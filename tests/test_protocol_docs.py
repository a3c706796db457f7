"""docs/protocol.md tells the truth: its frames are what the codec takes and the server sends.

Client frames (`C:`, `NC:`, `OC:`) must decode with the session's codec; one
followed by an error reply that answers it must be refused with exactly that
code and message. Server frames (`S:`, `NS:`, `OS:`) must be byte for byte
what encoding them again gives, field order included.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import msgspec
import pytest

from broker.engine.engine import Engine
from broker.gateway import Gateway
from broker.gateway.node import ContextUpdate
from protocol import frames as fr
from protocol.codec import Codec, FrameError

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"


class _StubEngine:
    facts = None


GATEWAY = Gateway(cast(Engine, _StubEngine()))
CODECS: dict[str, Codec] = {"C": GATEWAY.native_json, "NC": GATEWAY.node_codec,
                            "OC": GATEWAY.observer_codec}
SERVER_TYPES: dict[str, dict[str, type[Any]]] = {
    "S": {"reply": fr.Reply, "deliver": fr.Deliver, "deliver.batch": fr.DeliverBatch,
          "event": fr.Event, "ping": fr.ServerPing, "pong": fr.ServerPong},
    "NS": {"reply": fr.NodeReply, "deliver": fr.NodeDeliver, "error": fr.NodeError,
           "context.update": ContextUpdate},
    "OS": {"pong": fr.FlatPong, "resync_ack": fr.ResyncAck, "error": fr.FlatError,
           "reply": fr.Reply},
}


def examples() -> list[tuple[str, str]]:
    """(prefix, frame) for every example line inside a fenced block, in order."""
    found: list[tuple[str, str]] = []
    fenced = False
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            prefix, sep, frame = line.partition(": ")
            if sep and prefix in ("C", "S", "NC", "NS", "OC", "OS"):
                found.append((prefix, frame))
    return found


EXAMPLES = examples()


def test_protocol_docs_examples_of_every_kind() -> None:
    """The document has examples of every kind."""
    kinds = {prefix for prefix, _ in EXAMPLES}
    assert kinds == {"C", "S", "NC", "NS", "OC", "OS"}
    assert len(EXAMPLES) >= 25


def _answer_to(index: int) -> dict[str, Any] | None:
    """The error reply that directly follows client frame `index` and answers it, if any."""
    prefix, frame = EXAMPLES[index]
    if index + 1 >= len(EXAMPLES) or EXAMPLES[index + 1][0] != prefix.replace("C", "S"):
        return None
    reply = msgspec.json.decode(EXAMPLES[index + 1][1])
    sent = msgspec.json.decode(frame)
    if reply.get("type") == "reply" and reply.get("ok") is False \
            and reply.get("re") in (sent.get("id"), None):
        return cast(dict[str, Any], reply)
    return None


@pytest.mark.parametrize("index", [i for i, (p, _) in enumerate(EXAMPLES) if p.endswith("C")])
def test_protocol_docs_client_examples_as_shown(index: int) -> None:
    """Client examples are taken or refused as shown."""
    prefix, frame = EXAMPLES[index]
    answer = _answer_to(index)
    codec = CODECS[prefix]
    if answer is None or answer["error"]["code"] not in _CODEC_CODES:
        codec.decode(frame)
        return
    with pytest.raises(FrameError) as refused:
        codec.decode(frame)
    assert refused.value.code == answer["error"]["code"]
    assert refused.value.message == answer["error"]["message"]
    assert refused.value.request_id == answer["re"]


_CODEC_CODES = {"invalid_json", "invalid_msgpack", "invalid_frame", "unknown_type",
                "invalid_request", "unsupported_version", "frame_too_large",
                "binary_not_negotiated"}


@pytest.mark.parametrize("index", [i for i, (p, _) in enumerate(EXAMPLES) if p.endswith("S")])
def test_protocol_docs_server_examples_as_encoded(index: int) -> None:
    """Server examples are what the server encodes."""
    prefix, frame = EXAMPLES[index]
    raw = msgspec.json.decode(frame)
    kind = SERVER_TYPES[prefix].get(raw["type"])
    if kind is None:  # a flat observer event: a plain object with a string type
        assert prefix == "OS" and isinstance(raw["type"], str)
        return
    decoded = msgspec.json.decode(frame, type=kind)
    assert msgspec.json.encode(decoded).decode() == frame
