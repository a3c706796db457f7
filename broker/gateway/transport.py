"""The connection's transport, handed to the gateway by the server that owns it.

ASGI gives an application messages, not the connection, and a WebSocket
session needs two things messages cannot do:

- `send_frames`: write the frames a session has queued as one write, framed
  by the connection's own WebSocket protocol object, straight to the socket
  when nothing else is writing and the socket takes them. hypercorn would
  write each frame with a socket call of its own after a trip through four
  layers (starlette's wrapper, the ASGI message, its app_send and event
  handling); the figure is in BENCHMARKS.md, "Figures behind the code".
  Over TLS the bytes on the socket are not the frames, so the framed bytes
  go through hypercorn's own write (its send lock, then the `SSLStream`):
  one TLS write for all of them, past the four layers.
- `abort`: reset the connection under a write that never ends. hypercorn's
  trio worker writes inside a shielded cancel scope, so a `websocket.send`
  to a client that reads nothing blocks, uncancellably, once the kernel
  buffers are full; closing the socket makes that write fail, which
  hypercorn handles as a closed connection.

How the transport gets here: `install()` makes hypercorn's trio worker
build `TransportServer`, a `TCPServer` subclass, for each accepted
connection (hypercorn builds the connection by the name `TCPServer` in
`hypercorn.trio.run`, the one name replaced; nothing else of hypercorn's
changes). `TransportServer` hands a `Transport` to the application in the
WebSocket scope's `extensions` under `TRANSPORT_EXTENSION`, the place ASGI
gives servers for what the specification does not cover. The gateway only
reads that key: with no transport there (another server, HTTP/2, a
hypercorn this was not checked against) it sends through plain ASGI
`websocket.send` messages and `abort` is not available.

No transport is given:
- over HTTP/2 (RFC 8441): the frames must travel inside HTTP/2 DATA frames;
- on a hypercorn version not in `CHECKED_VERSIONS`: `install()` leaves
  hypercorn alone and logs why; tests/test_gateway_transport.py then fails
  until this module has been read against the new version.

What `Transport` relies on in hypercorn (checked by that test): the
`TCPServer` constructor's parameters, its `stream`, `send_lock` (held by
hypercorn across each whole write) and `protocol` (told `Closed()` when a
write finds the connection broken, as hypercorn's own write does), the
HTTP/1.1 protocol's `stream`, and
the WebSocket stream's `scope`, `state`, `closed`, `connection` (wsproto),
`send` and `stream_id`, and over TLS trio's `SSLStream.transport_stream`.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import logging
import os
import socket
import struct
from collections.abc import Sequence
from typing import Any

import hypercorn.trio.run as hypercorn_run
import trio
from hypercorn.events import Closed
from hypercorn.protocol.events import Data
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.protocol.ws_stream import ASGIWebsocketState, WSStream
from hypercorn.trio.tcp_server import TCPServer
from wsproto.events import BytesMessage, Message, TextMessage
from wsproto.utilities import LocalProtocolError

log = logging.getLogger(__name__)

# The key of the WebSocket scope's `extensions` that holds the `Transport`.
TRANSPORT_EXTENSION = "broker.transport"

# hypercorn versions (major.minor) whose internals this module was read against.
CHECKED_VERSIONS = ("0.18",)

_CONSTRUCTOR = ("self", "app", "config", "context", "state", "stream")


class Transport:
    """One HTTP/1.1 WebSocket connection's socket and WebSocket protocol, from hypercorn.

    tls: the connection's bytes are encrypted (an `SSLStream` over `sock`):
    frames are never written to the socket directly.
    """

    def __init__(self, server: TCPServer, stream: WSStream, sock: trio.SocketStream,
                 *, tls: bool = False) -> None:
        self._server = server
        self._ws = stream
        self._socket = sock
        self.tls = tls

    @property
    def open(self) -> bool:
        """Data frames may be sent (the handshake is done and no close began)."""
        return not self._ws.closed and self._ws.state is ASGIWebsocketState.CONNECTED

    async def send_frames(self, frames: Sequence[str | bytes]) -> None:
        """Frame and write `frames` in order, as one write when the socket takes them.

        The caller checks `open` first. With hypercorn's send lock free no
        write of hypercorn's is under way (it holds the lock across its whole
        `send_all`), and nothing runs between that check and the non-blocking
        `write(2)`, so the bytes keep their order; what the socket does not
        take at once (a full buffer, an error) goes hypercorn's way, which
        waits for room or handles the closed connection. Over TLS all of it
        goes hypercorn's way, as one write.
        """
        events: list[Message[Any]] = [
            TextMessage(data=data) if isinstance(data, str) else BytesMessage(data=data)
            for data in frames
        ]
        try:
            wire = b"".join([self._ws.connection.send(event) for event in events])
        except LocalProtocolError:
            return  # the connection is closing; hypercorn drops such sends too
        written = self._write_now(wire)
        if written == 0:
            await self._ws.send(Data(stream_id=self._ws.stream_id, data=wire))
        elif written < len(wire):
            await self._send_rest(wire[written:])

    async def _send_rest(self, rest: bytes) -> None:
        """The rest of a frame already partly on the socket, as hypercorn writes, but shielded.

        Once part of a frame is out, the rest must follow even if the session
        is being cancelled: anything written after a cut frame (a last error,
        the close frame) would be read as its payload. abort() still frees a
        write the client never reads. Only the lock and the write are
        shielded: a broken connection is then handed to hypercorn as its own
        write does, and that may wait (for room in the application's queue,
        which a cancelled session no longer reads), so it must stay
        cancellable.
        """
        server = self._server
        broken = False
        with trio.CancelScope(shield=True):
            async with server.send_lock:
                try:
                    await server.stream.send_all(rest)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    broken = True
        if broken:
            await server.protocol.handle(Closed())

    def _write_now(self, wire: bytes) -> int:
        """Write what the socket takes at once, if nothing else is writing and the bytes on
        the socket are the frames (not TLS); bytes written."""
        if self.tls or self._server.send_lock.locked():
            return 0
        try:
            return os.write(self._socket.socket.fileno(), wire)
        except OSError:  # EAGAIN, or the connection is gone: hypercorn's path will tell
            return 0

    def abort(self) -> None:
        """Close the socket now, with a reset, dropping what the client never read."""
        sock = self._socket.socket
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        sock.close()


class TransportServer(TCPServer):
    """hypercorn's connection handler, handing each WebSocket its `Transport` in the scope."""

    def __init__(self, app: Any, config: Any, context: Any, state: Any, stream: Any) -> None:
        super().__init__(_GivingTransport(app, self), config, context, state, stream)

    def transport_for(self, scope: dict[str, Any]) -> Transport | None:
        """The transport of the WebSocket whose scope this is; None where there is none."""
        tls = isinstance(self.stream, trio.SSLStream)
        sock = self.stream.transport_stream if tls else self.stream
        if not isinstance(sock, trio.SocketStream):
            return None
        protocol = getattr(getattr(self, "protocol", None), "protocol", None)
        if not isinstance(protocol, H11Protocol):  # HTTP/2
            return None
        stream = protocol.stream
        if not isinstance(stream, WSStream) or stream.scope is not scope:
            return None
        return Transport(self, stream, sock, tls=tls)


class _GivingTransport:
    """hypercorn's app wrapper, with the transport added to a WebSocket scope's extensions."""

    def __init__(self, app: Any, server: TransportServer) -> None:
        self._app = app
        self._server = server

    async def __call__(self, scope: Any, receive: Any, send: Any, sync_spawn: Any,
                       call_soon: Any) -> None:
        if scope.get("type") == "websocket":
            transport = self._server.transport_for(scope)
            if transport is not None:
                extensions = {**(scope.get("extensions") or {}), TRANSPORT_EXTENSION: transport}
                scope = {**scope, "extensions": extensions}
        await self._app(scope, receive, send, sync_spawn, call_soon)


def unchecked() -> str | None:
    """Why this hypercorn is not one `TransportServer` was checked against; None if it is."""
    version = importlib.metadata.version("hypercorn")
    if ".".join(version.split(".")[:2]) not in CHECKED_VERSIONS:
        return f"hypercorn {version} is not a version checked ({', '.join(CHECKED_VERSIONS)})"
    if _built() not in (TCPServer, TransportServer):
        return "hypercorn.trio.run.TCPServer is not hypercorn's own: replaced by something else"
    parameters = tuple(inspect.signature(TCPServer.__init__).parameters)
    if parameters != _CONSTRUCTOR:
        return f"hypercorn's TCPServer takes {parameters}, not {_CONSTRUCTOR}"
    return None


def install() -> bool:
    """Make hypercorn's trio worker hand transports to WebSocket scopes; False if it cannot.

    Idempotent. On a hypercorn this module was not checked against it
    changes nothing and logs why once: sessions then use plain ASGI sends.
    """
    if _built() is TransportServer:
        return True
    problem = unchecked()
    if problem is not None:
        global _warned
        if not _warned:
            log.warning("WebSocket sessions send through ASGI messages only: %s", problem)
            _warned = True
        return False
    hypercorn_run.TCPServer = TransportServer  # type: ignore[attr-defined]
    return True


_warned = False


def _built() -> Any:
    """The class hypercorn's trio worker builds for each accepted connection."""
    return hypercorn_run.TCPServer  # type: ignore[attr-defined]
