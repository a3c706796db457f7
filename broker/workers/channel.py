"""The link between the writer process and one gateway process: framed messages on a socket.

One Unix stream socket (a socketpair made by the writer process, one end
handed to the gateway at spawn) carries every message both ways. A frame is
a 4-byte big-endian length and a MessagePack array: the message's kind,
then its fields.

What the fields carry, and why each is encoded the way it is (measured:
BENCHMARKS.md, "Processes"; pickle of a msgspec Struct goes through its
`__reduce__`, about fifteen times slower than msgspec's typed MessagePack):

- a command: its class (`module:QualName`, only from `broker.engine`) and
  the Struct as MessagePack, decoded by a typed decoder made once per class;
- a batch of facts: `list[Fact]` as MessagePack, one typed decoder;
- a command's result: pickle. Results come in many types (Structs, lists
  of them, ints, None), some holding `msgspec.Raw` JSON that MessagePack
  would embed as if it were MessagePack; pickle round-trips them all,
  both ends are the same program, and the socketpair is reachable by no
  one else.

Writes are coalesced: `send_nowait` appends the encoded frame to a buffer
and one task writes whatever gathered in one `send_all`, so a batch of N
facts and replies costs one system call, not N.
"""

from __future__ import annotations

import importlib
import pickle
import struct
from typing import Any

import msgspec
import trio

from broker.engine.facts import Fact

HEADER = struct.Struct(">I")
# A frame larger than this is a bug (a fact batch is bounded by the writer's
# max_batch); refusing it keeps a corrupt length from allocating gigabytes.
MAX_FRAME_BYTES = 256 * 1024 * 1024
# Bytes read per receive call.
RECEIVE_BYTES = 256 * 1024


# Modules whose Structs may be sent as commands (the writer process imports them by name).
COMMAND_MODULES = "broker.engine."

_encoder = msgspec.msgpack.Encoder()
_envelope = msgspec.msgpack.Decoder()
_facts = msgspec.msgpack.Decoder(list[Fact])
_commands: dict[str, msgspec.msgpack.Decoder[Any]] = {}


def encode(message: tuple[Any, ...]) -> bytes:
    """One frame: the length, then the message as a MessagePack array."""
    body = _encoder.encode(message)
    return HEADER.pack(len(body)) + body


def pack_command(command: object) -> tuple[str, bytes]:
    """A command as (its class name, its MessagePack)."""
    kind = type(command)
    return f"{kind.__module__}:{kind.__qualname__}", _encoder.encode(command)


def unpack_command(name: str, data: bytes) -> Any:
    """The command `pack_command` made. Raises TypeError for a class that is not a
    command Struct of the engine (a bug of the sender: the caller's 500)."""
    decoder = _commands.get(name)
    if decoder is None:
        module, _, qualname = name.partition(":")
        kind: Any = None
        if module.startswith(COMMAND_MODULES):
            try:
                kind = importlib.import_module(module)
            except ImportError:
                kind = None
            for part in qualname.split("."):
                kind = getattr(kind, part, None)
        if not (isinstance(kind, type) and issubclass(kind, msgspec.Struct)
                and hasattr(kind, "apply")):
            raise TypeError(f"{name} is not a command")
        decoder = _commands[name] = msgspec.msgpack.Decoder(kind)
    return decoder.decode(data)


def pack_facts(batch: list[Fact]) -> bytes:
    return _encoder.encode(batch)


def unpack_facts(data: bytes) -> list[Fact]:
    return _facts.decode(data)


def pack_result(value: Any) -> bytes:
    return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


def unpack_result(data: bytes) -> Any:
    return pickle.loads(data)


class LinkClosed(Exception):
    """The other end closed the link, or it broke."""


class Link:
    """Framed messages over one stream. Run `await nursery.start(link.run_sender)`
    before sending; `receive()` returns the next message."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self._buffer = bytearray()
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._wake = trio.Event()
        self._closed = False
        self.frames_sent = 0
        self.frames_received = 0

    @property
    def pending_bytes(self) -> int:
        """Encoded bytes waiting for the sender task."""
        return self._out_bytes

    def send_nowait(self, message: tuple[Any, ...]) -> None:
        """Queue `message` (encoded now); the sender task writes it. Raises LinkClosed."""
        self.send_frame_nowait(encode(message))

    def send_frame_nowait(self, frame: bytes) -> None:
        """Queue an already encoded frame (the same fact batch goes to every gateway)."""
        if self._closed:
            raise LinkClosed("the link is closed")
        self._out.append(frame)
        self._out_bytes += len(frame)
        self._wake.set()

    async def run_sender(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Write queued frames until `close()`; what is queued at close is written first.

        A broken link closes it and returns: the receiving side reports the loss
        (`receive` raises LinkClosed), so a peer gone during a stop is no crash.
        """
        task_status.started()
        while True:
            if not self._out:
                if self._closed:
                    return
                self._wake = trio.Event()
                await self._wake.wait()
                continue
            data = b"".join(self._out)
            self._out.clear()
            self._out_bytes = 0
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._closed = True
                return
            self.frames_sent += 1

    def close(self) -> None:
        """Take nothing more; the sender writes what is queued and returns."""
        self._closed = True
        self._wake.set()

    async def receive(self) -> Any:
        """The next message. Raises LinkClosed at the end of the stream."""
        while True:
            if len(self._buffer) >= HEADER.size:
                (size,) = HEADER.unpack_from(self._buffer)
                if size > MAX_FRAME_BYTES:
                    raise LinkClosed(f"a frame of {size} bytes: the link is corrupt")
                end = HEADER.size + size
                if len(self._buffer) >= end:
                    body = bytes(self._buffer[HEADER.size:end])
                    del self._buffer[:end]
                    self.frames_received += 1
                    return _envelope.decode(body)
            try:
                chunk = await self.stream.receive_some(RECEIVE_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise LinkClosed(f"the link broke: {exc!r}") from None
            if not chunk:
                raise LinkClosed("the other end closed the link")
            self._buffer += chunk
