"""Edges of the direct socket write (`Transport.send_frames`): bytes stay whole frames.

The transport writes WebSocket frames straight to hypercorn's socket when it
takes them and hands the rest to hypercorn. Two ways that could put bad
bytes on the wire, each checked here: a session cancelled between the part
written and the rest (the rest must still follow, or the next frame lands
inside the cut one), and a WebSocket carried over HTTP/2 (its frames must
travel inside HTTP/2 DATA frames, so no direct write at all).
"""

from __future__ import annotations

import socket
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import msgspec
import trio
from hypercorn.config import Config
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.protocol.ws_stream import ASGIWebsocketState, WSStream
from hypercorn.trio.tcp_server import TCPServer
from wsproto import ConnectionType
from wsproto.connection import Connection
from wsproto.events import TextMessage

from broker.gateway.transport import TRANSPORT_EXTENSION, Transport
from broker.gateway.websocket import AsgiWebSocket
from tests.helpers.daemon import serve
from tests.helpers.engine import TEST_DEADLINE_S, make_world

FRAME_PAYLOAD = 1_000_000  # far more than the socket buffers below hold


def _hypercorn_connection(sock: socket.socket) -> tuple[WSStream, TCPServer]:
    """hypercorn's objects for one HTTP/1.1 WebSocket, as its trio worker wires them."""
    server = TCPServer.__new__(TCPServer)
    server.send_lock = trio.Lock()
    server.stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
    protocol = H11Protocol.__new__(H11Protocol)
    protocol.send = server.protocol_send  # what H11Protocol.stream_send writes Data through
    stream = WSStream(None, Config(), None, None, False, None, None, protocol.stream_send, 1)
    stream.state = ASGIWebsocketState.CONNECTED
    stream.connection = Connection(ConnectionType.SERVER)
    return stream, server


async def test_write_now_finishes_cut_frame_when_cancelled() -> None:
    """A frame cut by a full socket is finished even when cancelled."""
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stream, server = _hypercorn_connection(ours)
    assert isinstance(server.stream, trio.SocketStream)
    transport = Transport(server, stream, server.stream)
    ws = AsgiWebSocket({"type": "websocket", "extensions": {TRANSPORT_EXTENSION: transport}},
                       None, stream.app_send)  # type: ignore[arg-type]
    peer = trio.SocketStream(trio.socket.from_stdlib_socket(theirs))
    received = bytearray()

    async def read_until_closed() -> None:
        while chunk := await peer.receive_some(1 << 16):
            received.extend(chunk)

    with trio.fail_after(TEST_DEADLINE_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_until_closed)
            with trio.CancelScope() as scope:
                scope.cancel()  # as when a session closes while its pump is runnable
                await ws.send_many([b"x" * FRAME_PAYLOAD])
            await server.stream.aclose()
        await peer.aclose()
    # One whole binary frame: FIN + opcode 2, 64-bit length, then the payload.
    assert received[:2] == b"\x82\x7f"
    assert int.from_bytes(received[2:10], "big") == FRAME_PAYLOAD
    assert len(received) == 10 + FRAME_PAYLOAD
    assert received[10:] == b"x" * FRAME_PAYLOAD


async def test_write_now_http2_frames_inside_data_frames(
    tmp_path: Path,
) -> None:
    """A WebSocket over HTTP/2 gets its frames inside HTTP/2 DATA frames."""
    with trio.fail_after(TEST_DEADLINE_S):
        async with serve(tmp_path) as server:
            world = await make_world(server.engine)
            assert server.port is not None
            tcp = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with tcp:
                await _ping_over_http2(tcp, world.tokens["bob"])


async def _ping_over_http2(tcp: trio.SocketStream, token: str) -> None:
    """Open the WebSocket with an extended CONNECT, ping, and wait for the pong."""
    h2c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    h2c.initiate_connection()
    await tcp.send_all(h2c.data_to_send())
    # hypercorn offers extended CONNECT (RFC 8441) in its settings.
    settled = False
    while not settled:
        events = h2c.receive_data(await tcp.receive_some(1 << 16))
        settled = any(isinstance(e, h2.events.RemoteSettingsChanged) for e in events)
        await tcp.send_all(h2c.data_to_send())
    stream_id = h2c.get_next_available_stream_id()
    h2c.send_headers(stream_id, [
        (":method", "CONNECT"), (":protocol", "websocket"), (":scheme", "http"),
        (":path", f"/v1/ws?token={token}"),
        (":authority", "127.0.0.1"), ("sec-websocket-version", "13"),
    ])
    await tcp.send_all(h2c.data_to_send())
    websocket = Connection(ConnectionType.CLIENT)
    pong = None
    while pong is None:
        data = await tcp.receive_some(1 << 16)
        assert data, "the server closed the connection"
        # Bare WebSocket bytes on an HTTP/2 connection make h2 raise here.
        for event in h2c.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                assert dict(event.headers)[b":status"] == b"200"
                ping = TextMessage(data='{"v":1,"id":"p0","type":"ping"}')
                h2c.send_data(stream_id, websocket.send(ping))
            elif isinstance(event, h2.events.DataReceived):
                h2c.acknowledge_received_data(event.flow_controlled_length, stream_id)
                websocket.receive_data(event.data)
                for message in websocket.events():
                    if isinstance(message, TextMessage):
                        decoded = msgspec.json.decode(message.data)
                        if decoded.get("type") == "pong":
                            pong = decoded
        await tcp.send_all(h2c.data_to_send())
    assert pong["re"] == "p0"
