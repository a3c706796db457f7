"""Bytes in, frames out (and back): the sans-IO codec of one WebSocket session.

A session speaks JSON text frames unless the client negotiated the
MessagePack subprotocol, in which case the server sends binary MessagePack
frames (and still accepts JSON text frames). One `Codec` is made per
encoding and frame set and shared by every session that uses it: msgspec
encoders and decoders are built once and reused.

Decoding never raises anything but `FrameError`, which says how to answer:
with an error reply when the request `id` could be read, otherwise by
closing the socket with `close_code`. The decision is made here, not in the
gateway, so that it is tested without a socket.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Iterable, Sequence
from typing import Any, Union

import msgspec

from protocol.frames import DeliverBatch
from protocol.nesting import (
    MAX_NESTING_DEPTH,
    NestingTooDeep,
    Unstorable,
    decode_json,
    decode_msgpack,
    json_head,
    json_openers,
    msgpack_head,
    msgpack_openers,
)

JSON_SUBPROTOCOL = "broker.v1"
MSGPACK_SUBPROTOCOL = "broker.v1.msgpack"
DEFAULT_MAX_FRAME_BYTES = 1 << 20  # 1 MiB


class CloseCode(enum.IntEnum):
    """Every close code the server uses (docs/protocol.md lists them for clients)."""

    NORMAL = 1000
    GOING_AWAY = 1001  # the daemon is stopping
    UNSUPPORTED_DATA = 1003  # a binary frame without the MessagePack subprotocol
    INVALID_PAYLOAD = 1007  # a frame that is not JSON (or not MessagePack)
    MESSAGE_TOO_BIG = 1009  # a frame above the size limit
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013  # the daemon holds gateway.max_sessions sockets already
    SLOW_CLIENT = 4008  # the client read nothing for slow_client_timeout
    BAD_FRAME = 4400  # a frame that cannot be answered (no readable id)
    UNAUTHORIZED = 4401  # the token was refused after the handshake
    PONG_TIMEOUT = 4408  # no pong (or any frame) within the ping timeout
    RATE_LIMITED = 4429  # too many sockets for the agent, or too many refused tokens


class FrameError(Exception):
    """An inbound frame that cannot be taken.

    code: the error code (as in REST error bodies).
    request_id: the frame's `id` when it could be read; then the session
        answers with an error reply and keeps going.
    close_code: how to close when there is no id to answer.
    """

    def __init__(
        self, code: str, message: str, *, request_id: str | None = None,
        close_code: CloseCode = CloseCode.BAD_FRAME,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id
        self.close_code = close_code


def negotiate(offered: Iterable[str]) -> str | None:
    """The subprotocol to accept from the client's offer (None: plain JSON, none named)."""
    offered = list(offered)
    if MSGPACK_SUBPROTOCOL in offered:
        return MSGPACK_SUBPROTOCOL
    if JSON_SUBPROTOCOL in offered:
        return JSON_SUBPROTOCOL
    return None


class _Envelope(msgspec.Struct):
    """The lenient second look at a frame that failed validation: can it be answered?"""

    type: Any = None
    id: Any = None
    v: Any = None


_json_envelope = msgspec.json.Decoder(_Envelope)
_msgpack_envelope = msgspec.msgpack.Decoder(_Envelope)
_any_json = msgspec.json.Decoder()
_any_msgpack = msgspec.msgpack.Decoder()
_msgpack_encoder = msgspec.msgpack.Encoder()
# Bytes of a `deliver.batch` frame besides its items: the JSON envelope
# `{"v":1,"type":"deliver.batch","deliveries":[]}` is 46, MessagePack's
# smaller; 8 more cover MessagePack's array header growing to 5 bytes.
_BATCH_OVERHEAD = len(msgspec.json.encode(DeliverBatch(deliveries=[]))) + 8


def json_to_msgpack(payload: bytes) -> bytes:
    """Re-encode a JSON document as MessagePack (for a payload sent to a MessagePack session)."""
    return _msgpack_encoder.encode(_any_json.decode(payload))


def _tag(frame_type: type[msgspec.Struct]) -> str:
    tag = frame_type.__struct_config__.tag
    if not isinstance(tag, str):
        raise ValueError(f"{frame_type.__name__} is not tagged with a string type")
    return tag


class Codec:
    """Decode one session's inbound frames and encode its outbound ones.

    inbound: the tagged frame types the session accepts (one decode pass).
    msgpack: send binary MessagePack frames (the client negotiated it).
    max_frame_bytes: inbound frames above this are refused (close 1009).
    version: the `v` the frames must carry when they carry one (None: no check).
    """

    def __init__(
        self, inbound: Sequence[type[msgspec.Struct]], *, msgpack: bool = False,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, version: int | None = 1,
    ) -> None:
        if not inbound:
            raise ValueError("a codec needs at least one inbound frame type")
        self.msgpack = msgpack
        self.max_frame_bytes = max_frame_bytes
        self.version = version
        self.types = frozenset(_tag(t) for t in inbound)
        if len(self.types) != len(inbound):
            raise ValueError("two inbound frame types share a tag")
        union: Any = Union[tuple(inbound)]  # noqa: UP007 (built from a runtime tuple)
        self._json = msgspec.json.Decoder(union)
        self._msgpack = msgspec.msgpack.Decoder(union)
        self._json_encoder = msgspec.json.Encoder()
        self._msgpack_encoder = msgspec.msgpack.Encoder()

    @property
    def subprotocol(self) -> str:
        return MSGPACK_SUBPROTOCOL if self.msgpack else JSON_SUBPROTOCOL

    # -- inbound -------------------------------------------------------------------

    def decode(self, data: str | bytes) -> Any:
        """The frame in `data` (a text frame is `str`, a binary frame `bytes`).

        Raises FrameError.
        """
        binary = not isinstance(data, str)
        if binary and not self.msgpack:
            raise FrameError(
                "binary_not_negotiated",
                f"binary frames need the {MSGPACK_SUBPROTOCOL!r} subprotocol",
                close_code=CloseCode.UNSUPPORTED_DATA,
            )
        self._check_size(data)
        try:
            if isinstance(data, str):
                frame = decode_json(self._json, data)
            else:
                frame = decode_msgpack(self._msgpack, data)
        except NestingTooDeep as exc:
            raise self._too_deep(data, exc) from None
        except msgspec.ValidationError as exc:
            raise self._explain(data, str(exc)) from None
        except msgspec.DecodeError as exc:
            kind = "msgpack" if binary else "json"
            raise FrameError(
                f"invalid_{kind}", f"the frame is not valid {kind.upper()}: {exc}",
                close_code=CloseCode.INVALID_PAYLOAD,
            ) from None
        if self.version is not None and getattr(frame, "v", self.version) != self.version:
            raise FrameError(
                "unsupported_version", f"this server speaks protocol version {self.version}",
                request_id=_request_id(getattr(frame, "id", None)),
            )
        return frame

    def _check_size(self, data: str | bytes) -> None:
        limit = self.max_frame_bytes
        size = len(data)
        if isinstance(data, str) and size <= limit < size * 4:
            size = len(data.encode("utf-8", "surrogatepass"))
        if size > limit:
            raise FrameError(
                "frame_too_large", f"frames are limited to {limit} bytes",
                close_code=CloseCode.MESSAGE_TOO_BIG,
            )

    def _explain(self, data: str | bytes, detail: str) -> FrameError:
        """Why a well-formed document is not an acceptable frame, and whether to answer it."""
        try:
            if isinstance(data, str):
                if json_openers(data) > MAX_NESTING_DEPTH:
                    # Validation may stop before the part too deep: depth is
                    # refused first, whatever else is wrong with the frame
                    # (an unstorable value, checked after depth, is `detail`).
                    with contextlib.suppress(Unstorable):
                        decode_json(_any_json, data)
                envelope = _json_envelope.decode(data)
            else:
                if msgpack_openers(data) > MAX_NESTING_DEPTH:
                    with contextlib.suppress(Unstorable):
                        decode_msgpack(_any_msgpack, data)
                envelope = _msgpack_envelope.decode(data)
        except NestingTooDeep as exc:
            return self._too_deep(data, exc)
        except (msgspec.ValidationError, msgspec.DecodeError):
            return FrameError("invalid_frame", "a frame must be an object with a string `type`")
        request_id = _request_id(envelope.id)
        if self.version is not None and envelope.v is not None and envelope.v != self.version:
            return FrameError(
                "unsupported_version", f"this server speaks protocol version {self.version}",
                request_id=request_id,
            )
        if not isinstance(envelope.type, str):
            return FrameError(
                "invalid_frame", "a frame must have a string `type`", request_id=request_id
            )
        if envelope.type not in self.types:
            return FrameError(
                "unknown_type", f"unknown frame type {envelope.type!r}", request_id=request_id
            )
        return FrameError("invalid_request", detail, request_id=request_id)

    def _too_deep(self, data: str | bytes, exc: NestingTooDeep) -> FrameError:
        """A frame nested too deep: answered when an `id` precedes its first nested value.

        Such a frame cannot be decoded whole, so only its top-level members
        before the first nested value are read (clients write `v`, `id` and
        `type` first); without an id there, the session closes with 1007, as
        for a frame that is not JSON.
        """
        kind = "json" if isinstance(data, str) else "msgpack"
        request_id = None
        head = json_head(data) if isinstance(data, str) else msgpack_head(data)
        if head is not None:
            try:
                envelope = (_json_envelope.decode(head) if isinstance(head, str)
                            else _msgpack_envelope.decode(head))
            except msgspec.DecodeError:
                pass
            else:
                request_id = _request_id(envelope.id)
        return FrameError(f"invalid_{kind}", f"the frame is {exc}", request_id=request_id,
                          close_code=CloseCode.INVALID_PAYLOAD)

    # -- outbound --------------------------------------------------------------------

    def encode(self, frame: Any) -> str | bytes:
        """One outbound frame: `str` (a text frame) for JSON, `bytes` for MessagePack."""
        if self.msgpack:
            return self._msgpack_encoder.encode(frame)
        return self._json_encoder.encode(frame).decode()

    def encode_bytes(self, frame: Any) -> bytes:
        """One outbound frame's bytes (JSON or MessagePack), to splice into a batch."""
        if self.msgpack:
            return self._msgpack_encoder.encode(frame)
        return self._json_encoder.encode(frame)

    def encode_batch(self, deliveries: Sequence[bytes], limit: int) -> list[str | bytes]:
        """`deliver.batch` frames carrying these encoded `deliver` frames, in order.

        Each frame is at most `limit` bytes: a delivery that would take a
        frame past it starts the next one. A delivery too large for a frame
        of its own still goes, alone in its batch (it would have gone as a
        `deliver` frame of that size anyway). Empty `deliveries`: no frame.
        """
        frames: list[str | bytes] = []
        chunk: list[msgspec.Raw] = []
        size = _BATCH_OVERHEAD
        for item in deliveries:
            # One separator per item (a comma in JSON; MessagePack has none,
            # and the array header's growth is inside the overhead).
            if chunk and size + len(item) + 1 > limit:
                frames.append(self._batch(chunk))
                chunk, size = [], _BATCH_OVERHEAD
            chunk.append(msgspec.Raw(item))
            size += len(item) + 1
        if chunk:
            frames.append(self._batch(chunk))
        return frames

    def _batch(self, chunk: list[msgspec.Raw]) -> str | bytes:
        return self.encode(DeliverBatch(deliveries=chunk))

    def payload(self, json_payload: bytes) -> msgspec.Raw:
        """A JSON payload as this codec embeds it (re-encoded once for MessagePack)."""
        return msgspec.Raw(json_to_msgpack(json_payload) if self.msgpack else json_payload)


def _request_id(value: Any) -> str | None:
    """A request id that can be echoed back, or None."""
    if isinstance(value, str) and 0 < len(value) <= 128:
        return value
    return None
