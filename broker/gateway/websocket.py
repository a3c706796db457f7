"""A thin adapter from an ASGI WebSocket connection to what a session needs.

Sessions talk to `WebSocket` (receive, send, close, abort), never to ASGI
messages, so they can be driven in tests by an in-memory fake.

Why `abort` exists: hypercorn's trio worker writes to the TCP stream inside
a shielded cancel scope (hypercorn/trio/tcp_server.py, `protocol_send`), so
a `websocket.send` to a client that reads nothing blocks, uncancellably,
once the kernel buffers are full, and so does any close frame queued
behind it. The only way out is to close the transport under it: the
blocked write then fails with ClosedResourceError, which hypercorn handles
as a closed connection. ASGI gives no handle on the transport, so `abort`
finds hypercorn's stream by following the `send` callable back to the
connection that owns it (bound methods and closures, a few steps). If it
cannot (another server), `abort` does nothing and the connection stays
until TCP gives up on it; the session has already let go of it.

Why data frames skip the ASGI `websocket.send`: under load a session's
pump finds several frames queued (deliveries of one commit, replies), and
hypercorn would write each with a socket call of its own, after a trip
through four layers per frame; `send_many` (and `send`, a batch of one)
frames them with the connection's wsproto object and writes them at once:
straight to the socket with a non-blocking `write(2)` when hypercorn is not
writing and the socket takes them, otherwise (or for what the socket did not
take) through hypercorn's own send path, found the same way as the stream.
The handshake and the close frame still go through ASGI. Measured in
BENCHMARKS.md.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import trio
from hypercorn.protocol.events import Data
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.protocol.ws_stream import ASGIWebsocketState, WSStream
from hypercorn.trio.tcp_server import TCPServer
from starlette.types import Receive, Scope, Send
from wsproto.events import BytesMessage, Message, TextMessage
from wsproto.utilities import LocalProtocolError

log = logging.getLogger(__name__)


class ConnectionClosed(Exception):
    """The peer went away, or the session is closing; `code` is the close code if known."""

    def __init__(self, code: int | None = None) -> None:
        super().__init__(f"connection closed ({code})")
        self.code = code


class WebSocket(Protocol):
    """What a session needs from its connection."""

    subprotocols: Sequence[str]
    closing: bool

    async def receive(self) -> str | bytes: ...

    async def send(self, data: str | bytes) -> None: ...

    async def send_many(self, frames: Sequence[str | bytes]) -> None: ...

    async def close(self, code: int, reason: str = "") -> None: ...

    def abort(self) -> bool: ...


class AsgiWebSocket:
    """An accepted (or about to be accepted) ASGI WebSocket connection."""

    def __init__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.scope = scope
        self._receive = receive
        self._send = send
        self.subprotocols: Sequence[str] = list(scope.get("subprotocols") or ())
        self.closing = False
        self.accepted = False
        self._disconnected = False
        self._ws_stream: WSStream | None | bool = False  # False: not looked for yet
        self._tcp_server: TCPServer | None | bool = False

    # -- the handshake -------------------------------------------------------------------

    def query(self, name: str) -> str | None:
        """The query parameter `name`: None when absent, "" when blank.

        Given more than once, its values joined by commas: an ambiguous
        option then matches no valid value and is refused, rather than one
        of its values being picked silently.
        """
        from urllib.parse import parse_qs

        query = self.scope.get("query_string", b"").decode("latin-1")
        values = parse_qs(query, keep_blank_values=True).get(name)
        return None if values is None else ",".join(values)

    def header(self, name: str) -> str | None:
        wanted = name.lower().encode("latin-1")
        for key, value in self.scope.get("headers", ()):
            if key.lower() == wanted:
                return bytes(value).decode("latin-1")
        return None

    async def wait_connect(self) -> None:
        message = await self._receive()
        if message["type"] != "websocket.connect":
            raise ConnectionClosed(message.get("code"))

    async def accept(self, subprotocol: str | None) -> None:
        await self._send({"type": "websocket.accept", "subprotocol": subprotocol})
        self.accepted = True

    async def deny(self, status: int, body: bytes, content_type: str = "application/json", *,
                   close_code: int = 4401) -> None:
        """Refuse the handshake with an HTTP response (or close with `close_code`, 4401
        unless told, if the server cannot)."""
        if "websocket.http.response" in self.scope.get("extensions", {}):
            await self._send({
                "type": "websocket.http.response.start", "status": status,
                "headers": [(b"content-type", content_type.encode()),
                            (b"content-length", str(len(body)).encode())],
            })
            await self._send({"type": "websocket.http.response.body", "body": body})
        else:
            await self.accept(None)
            await self.close(close_code, "unauthorized" if close_code == 4401 else "refused")

    # -- an open connection -------------------------------------------------------------

    async def receive(self) -> str | bytes:
        """The next message; raises ConnectionClosed when the peer is gone."""
        if self._disconnected:
            raise ConnectionClosed()
        message = await self._receive()
        kind = message["type"]
        if kind == "websocket.receive":
            text = message.get("text")
            if text is not None:
                return str(text)
            return bytes(message.get("bytes") or b"")
        self._disconnected = True
        raise ConnectionClosed(message.get("code"))

    async def send(self, data: str | bytes) -> None:
        """Send one frame; raises ConnectionClosed once the session is closing."""
        await self.send_many((data,))

    async def send_many(self, frames: Sequence[str | bytes]) -> None:
        """Send frames in order, with hypercorn as one write to the socket.

        hypercorn turns each `websocket.send` into its own socket write after
        a trip through four layers (starlette's wrapper, the ASGI message,
        hypercorn's app_send and event handling); here the frames are framed
        by the connection's own wsproto object and written at once: straight
        to the socket when it takes them (`_write_now`), otherwise through
        hypercorn's send path (its send lock and shielded write). Anywhere
        else, one ASGI `websocket.send` per frame.
        Raises ConnectionClosed once the session is closing.
        """
        if self.closing:
            raise ConnectionClosed()
        if self._ws_stream is False:
            self._ws_stream = _find_owner(self._send, WSStream)
        stream = self._ws_stream
        if (not isinstance(stream, WSStream) or stream.closed
                or stream.state is not ASGIWebsocketState.CONNECTED):
            for data in frames:
                if self.closing:
                    raise ConnectionClosed()
                if isinstance(data, str):
                    await self._send({"type": "websocket.send", "text": data})
                else:
                    await self._send({"type": "websocket.send", "bytes": data})
            return
        events: list[Message[Any]] = [
            TextMessage(data=data) if isinstance(data, str) else BytesMessage(data=data)
            for data in frames
        ]
        try:
            wire = b"".join([stream.connection.send(event) for event in events])
        except LocalProtocolError:
            return  # the connection is closing; hypercorn drops such sends too
        written = self._write_now(stream, wire)
        if written < len(wire):
            # Once part of a frame is out, the rest must follow even if the
            # session is being cancelled: anything written after a cut frame
            # (a last error, the close frame) would be read as its payload.
            # abort() still frees a write the client never reads.
            with trio.CancelScope(shield=written > 0):
                await stream.send(Data(stream_id=stream.stream_id, data=wire[written:]))

    def _write_now(self, stream: WSStream, wire: bytes) -> int:
        """Write what the socket takes at once, if nothing else is writing; bytes written.

        hypercorn writes under its connection's send lock, in a shielded
        cancel scope, through trio's `send_all`: a large share of the event
        loop's time where each delivery is a write of its own (BENCHMARKS.md,
        "Figures behind the code").
        With the lock free no write of hypercorn's is under way (it holds the
        lock across its whole `send_all`), and nothing runs between the check
        and the non-blocking `write(2)`, so the bytes keep their order; what
        the socket does not take now (a full buffer, an error) goes the usual
        way, which waits for room or handles the closed connection. Only for
        HTTP/1.1 connections: over HTTP/2 (RFC 8441) the frames must travel
        inside HTTP/2 DATA frames, which hypercorn's path makes; over TLS the
        stream is not a plain socket.
        """
        if self._tcp_server is False:
            over_h11 = isinstance(getattr(stream.send, "__self__", None), H11Protocol)
            self._tcp_server = _find_owner(self._send, TCPServer) if over_h11 else None
        server = self._tcp_server
        if not isinstance(server, TCPServer) or server.send_lock.locked():
            return 0
        socket_stream = _socket_stream(server.stream)  # None under TLS
        if socket_stream is None:
            return 0
        try:
            return os.write(socket_stream.socket.fileno(), wire)
        except OSError:  # EAGAIN, or the connection is gone: hypercorn's path will tell
            return 0

    async def close(self, code: int, reason: str = "") -> None:
        """Send a close frame (once); later sends raise ConnectionClosed."""
        if self.closing:
            return
        self.closing = True
        if self._disconnected:
            return
        await self._send({"type": "websocket.close", "code": code, "reason": reason})

    def abort(self) -> bool:
        """Close the transport now, with a reset; True if the transport was found."""
        self.closing = True
        stream = _find_stream(self._send)
        if stream is None:
            return False
        sock = stream.socket
        try:
            # Linger 0: reset the connection, dropping what the client never read.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        sock.close()
        return True


def _find_stream(send: Any, depth: int = 8) -> trio.SocketStream | None:
    """hypercorn's SocketStream behind an ASGI `send` callable, if it can be found."""
    found: trio.SocketStream | None = _find(
        send, lambda obj: _socket_stream(getattr(obj, "stream", None)), depth)
    return found


def _find_owner(send: Any, kind: type[Any], depth: int = 8) -> Any:
    """The object of type `kind` behind an ASGI `send` callable, if it can be found."""
    return _find(send, lambda obj: obj if isinstance(obj, kind) else None, depth)


def _socket_stream(obj: Any) -> trio.SocketStream | None:
    return obj if isinstance(obj, trio.SocketStream) else None


def _find(send: Any, match: Callable[[Any], Any], depth: int) -> Any:
    """Follow bound methods and closures from `send` until `match(obj)` is not None."""
    seen: set[int] = set()
    frontier: list[Any] = [send]
    for _ in range(depth):
        following: list[Any] = []
        for obj in frontier:
            if obj is None or id(obj) in seen:
                continue
            seen.add(id(obj))
            found = match(obj)
            if found is not None:
                return found
            owner = getattr(obj, "__self__", None)
            if owner is not None:
                following.append(owner)
            following.append(getattr(obj, "send", None))
            for cell in getattr(obj, "__closure__", None) or ():
                try:
                    content = cell.cell_contents
                except ValueError:
                    continue
                if callable(content):
                    following.append(content)
        frontier = following
        if not frontier:
            break
    return None
