"""A thin adapter from an ASGI WebSocket connection to what a session needs.

Sessions talk to `WebSocket` (receive, send, close, abort), never to ASGI
messages, so they can be driven in tests by an in-memory fake.

Data frames and `abort` use the connection's transport when the server
hands one over in the scope's extensions (`broker.gateway.transport`: our
hypercorn worker does, for HTTP/1.1 WebSockets over plain TCP or TLS): the
frames a session has queued then go out as one write, and a connection
stuck in a write to a client that reads nothing can be reset. Without one
(HTTP/2, another server) every frame is an ASGI `websocket.send` and
`abort` does nothing: the connection stays until TCP gives up on it, the
session having already let go of it. The handshake and the close frame
always go through ASGI.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol
from urllib.parse import parse_qs

from starlette.types import Receive, Scope, Send

from broker.gateway.transport import TRANSPORT_EXTENSION, Transport


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

    def __init__(self, scope: Scope, receive: Receive, send: Send, *,
                 direct_writes: bool = True) -> None:
        """direct_writes: send data frames through the scope's transport when it has one
        (`gateway.direct_writes`); `abort` uses the transport either way."""
        self.scope = scope
        self._receive = receive
        self._send = send
        self.subprotocols: Sequence[str] = list(scope.get("subprotocols") or ())
        self.closing = False
        self.accepted = False
        self._disconnected = False
        self._query: dict[str, list[str]] | None = None  # parsed on first use
        transport = (scope.get("extensions") or {}).get(TRANSPORT_EXTENSION)
        self.transport: Transport | None = (
            transport if isinstance(transport, Transport) else None)
        self._direct = direct_writes and self.transport is not None

    # -- the handshake -------------------------------------------------------------------

    def query(self, name: str) -> str | None:
        """The query parameter `name`: None when absent, "" when blank.

        Given more than once, its values joined by commas: an ambiguous
        option then matches no valid value and is refused, rather than one
        of its values being picked silently.
        """
        if self._query is None:
            query = self.scope.get("query_string", b"").decode("latin-1")
            self._query = parse_qs(query, keep_blank_values=True)
        values = self._query.get(name)
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
        """Send frames in order: through the transport as one write when there is one,
        else one ASGI `websocket.send` per frame.

        Raises ConnectionClosed once the session is closing.
        """
        if self.closing:
            raise ConnectionClosed()
        transport = self.transport
        if self._direct and transport is not None and transport.open:
            await transport.send_frames(frames)
            return
        for data in frames:
            if self.closing:
                raise ConnectionClosed()
            if isinstance(data, str):
                await self._send({"type": "websocket.send", "text": data})
            else:
                await self._send({"type": "websocket.send", "bytes": data})

    async def close(self, code: int, reason: str = "") -> None:
        """Send a close frame (once); later sends raise ConnectionClosed."""
        if self.closing:
            return
        self.closing = True
        if self._disconnected:
            return
        await self._send({"type": "websocket.close", "code": code, "reason": reason})

    def abort(self) -> bool:
        """Close the transport now, with a reset; False if the server gave none."""
        self.closing = True
        if self.transport is None:
            return False
        self.transport.abort()
        return True
