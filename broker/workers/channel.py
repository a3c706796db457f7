"""The link between the writer process and one gateway process: framed messages on a socket.

One Unix stream socket (a socketpair made by the writer process, one end
handed to the gateway at spawn) carries every message both ways. A frame is
a 4-byte big-endian length and a pickle. Pickle, not MessagePack with a type
registry: the link carries the engine's own objects (commands, their many
result types, `BrokerError`, `Fact` batches), which pickle round-trips with
no registry to keep in step with them, and both ends are the same program
and the same trust domain (the socketpair is never reachable from outside).
Measured on the load test's commands and facts, pickle was no slower than
msgspec's MessagePack encoder (BENCHMARKS.md, "Processes").

Writes are coalesced: `send_nowait` appends the encoded frame to a buffer
and one task writes whatever gathered in one `send_all`, so a batch of N
facts and replies costs one system call, not N.
"""

from __future__ import annotations

import pickle
import struct
from typing import Any

import trio

HEADER = struct.Struct(">I")
# A frame larger than this is a bug (a fact batch is bounded by the writer's
# max_batch); refusing it keeps a corrupt length from allocating gigabytes.
MAX_FRAME_BYTES = 256 * 1024 * 1024
# Bytes read per receive call.
RECEIVE_BYTES = 256 * 1024


def encode(message: Any) -> bytes:
    """One frame: the length, then the pickle."""
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(body)) + body


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

    def send_nowait(self, message: Any) -> None:
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
        """Write queued frames until `close()`; what is queued at close is written first."""
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
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._closed = True
                raise LinkClosed(f"the link broke: {exc!r}") from None
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
                    return pickle.loads(body)
            try:
                chunk = await self.stream.receive_some(RECEIVE_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise LinkClosed(f"the link broke: {exc!r}") from None
            if not chunk:
                raise LinkClosed("the other end closed the link")
            self._buffer += chunk
