"""The transport seam (`broker.gateway.transport`): hypercorn hands each WebSocket its
transport in the scope, and a session without one still gets every frame.

Sessions write data frames through the transport the server puts in the
WebSocket scope's `extensions` (one write per flush, straight to the socket
when it takes them). These tests check that it reaches a session on the
hypercorn installed, that frames go through it, and that without it (a
server that does not hand one over, or `gateway.direct_writes = false`) the
same frames arrive through plain ASGI sends; over TLS the transport hands
the framed bytes to hypercorn's own TLS write.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import hypercorn.trio.run as hypercorn_run
import pytest
import trio
from hypercorn.trio.tcp_server import TCPServer

from broker.client import connect
from broker.gateway import transport
from broker.gateway.settings import GatewaySettings
from broker.gateway.transport import Transport, TransportServer
from broker.server import BrokerServer
from tests.helpers.daemon import serve
from tests.helpers.engine import TEST_DEADLINE_S, make_world
from tests.helpers.realtime import (
    gateway_of,
    next_deliveries,
    next_frame,
    post,
    raw_socket,
    send_json,
)
from tests.helpers.tls import make_certificates


@pytest.fixture
def sent_through_transport(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The frame count of each `Transport.send_frames` call from now on."""
    calls: list[int] = []
    send_frames = Transport.send_frames

    async def counting(self: Transport, frames: Sequence[str | bytes]) -> None:
        calls.append(len(frames))
        await send_frames(self, frames)

    monkeypatch.setattr(Transport, "send_frames", counting)
    return calls


async def _frames_arrive(server: BrokerServer) -> Transport | None:
    """Connect bob, check a pong and a delivery arrive; the transport bob's session got."""
    world = await make_world(server.engine)
    async with raw_socket(server, world.tokens["bob"], batch="1") as ws:
        await send_json(ws, {"v": 1, "id": "p1", "type": "ping"})
        assert (await next_frame(ws, "pong"))["re"] == "p1"
        (session,) = gateway_of(server).sessions
        await post(server.engine, world.workspace_id, world.agents["alice"], "general", "hi")
        (delivery,) = await next_deliveries(ws)
        assert delivery["payload"]["data"]["text"] == "hi"
        return session.ws.transport  # type: ignore[attr-defined, no-any-return]


def test_transport_checked_against_installed_hypercorn() -> None:
    """The hypercorn installed is one the transport was read against.

    When this fails, hypercorn changed: read broker/gateway/transport.py
    against the new version (what it relies on is listed in its docstring)
    and add the version to CHECKED_VERSIONS. Until then sessions use plain
    ASGI sends, correct but slower.
    """
    assert transport.unchecked() is None
    assert transport.install() is True
    assert hypercorn_run.TCPServer is TransportServer  # type: ignore[attr-defined]


async def test_transport_reaches_session_and_carries_its_frames(
    tmp_path: Path, sent_through_transport: list[int]
) -> None:
    """A plain-TCP WebSocket's session gets a transport, and its frames go through it."""
    with trio.fail_after(TEST_DEADLINE_S):
        async with serve(tmp_path) as server:
            given = await _frames_arrive(server)
    assert isinstance(given, Transport)
    assert len(sent_through_transport) >= 2  # the pong, the delivery
    assert all(count >= 1 for count in sent_through_transport)


async def test_transport_absent_frames_arrive_through_asgi(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sent_through_transport: list[int]
) -> None:
    """Under hypercorn's own TCPServer (no transport handed over) frames still arrive."""
    monkeypatch.setattr(hypercorn_run, "TCPServer", TCPServer)
    monkeypatch.setattr(transport, "install", lambda: False)
    with trio.fail_after(TEST_DEADLINE_S):
        async with serve(tmp_path) as server:
            given = await _frames_arrive(server)
    assert given is None
    assert sent_through_transport == []


async def test_transport_direct_writes_off_frames_arrive_through_asgi(
    tmp_path: Path, sent_through_transport: list[int]
) -> None:
    """`gateway.direct_writes = false`: the transport is there, frames go through ASGI."""
    with trio.fail_after(TEST_DEADLINE_S):
        async with serve(tmp_path, GatewaySettings(direct_writes=False)) as server:
            given = await _frames_arrive(server)
    assert isinstance(given, Transport)
    assert sent_through_transport == []


async def test_transport_over_tls_carries_frames_through_hypercorns_write(
    tmp_path: Path, sent_through_transport: list[int]
) -> None:
    """A wss:// session gets a transport that never writes to the socket itself (its bytes
    are not the frames): its frames go out through hypercorn's TLS stream, and arrive."""
    certs = make_certificates(tmp_path / "tls")
    with trio.fail_after(TEST_DEADLINE_S):
        async with serve(tmp_path / "data", tls=certs.settings()) as server:
            world = await make_world(server.engine)
            url = f"wss://127.0.0.1:{server.port}/v1/ws"
            async with connect(url, world.tokens["bob"], ssl_context=certs.client_context()) as bob:
                await post(server.engine, world.workspace_id, world.agents["alice"], "general",
                           "hi")
                async for delivery in bob.deliveries():
                    assert delivery.data["text"] == "hi"
                    break
                (session,) = gateway_of(server).sessions
                given = session.ws.transport  # type: ignore[attr-defined]
                assert isinstance(given, Transport) and given.tls
    assert len(sent_through_transport) >= 1


class _BrokenStream:
    async def send_all(self, data: bytes) -> None:
        raise trio.BrokenResourceError("the client reset the connection")


class _StuckProtocol:
    """hypercorn's protocol told `Closed()` while the application's queue is full: the
    handling waits for a reader that a cancelled session no longer is."""

    def __init__(self) -> None:
        self.outcome = "running"

    async def handle(self, event: object) -> None:
        try:
            with trio.move_on_after(5):  # bounds the hang this test is about
                await trio.sleep_forever()
            self.outcome = "outlived its cancellation"
        except trio.Cancelled:
            self.outcome = "cancelled"
            raise


class _Server:
    def __init__(self) -> None:
        self.send_lock = trio.Lock()
        self.stream = _BrokenStream()
        self.protocol = _StuckProtocol()


class _WebSocket:
    """hypercorn's WebSocket stream: `send` writes as hypercorn's TCPServer does."""

    closed = False
    stream_id = 1

    def __init__(self, server: _Server) -> None:
        self.server = server

    async def send(self, event: object) -> None:
        async with self.server.send_lock:
            try:
                with trio.CancelScope(shield=True):
                    await self.server.stream.send_all(b"")
            except trio.BrokenResourceError:
                await self.server.protocol.handle(event)

    class connection:  # noqa: N801 - wsproto's attribute name
        @staticmethod
        def send(event: object) -> bytes:
            return b"\x81\x05hello"


async def test_rest_of_a_cut_frame_on_a_broken_connection_stays_cancellable() -> None:
    """A frame partly written, then the connection breaks while the session is being
    cancelled: before, the whole hand-over of the rest was shielded, hypercorn's
    handling of the broken connection included, and it waited forever for room in
    the application's queue (the session, and a graceful stop, never ended)."""
    server = _Server()
    sender = Transport(server, _WebSocket(server), None)  # type: ignore[arg-type]
    sender._write_now = lambda wire: 3  # type: ignore[method-assign]  # a cut frame
    with trio.move_on_after(0.2):
        await sender.send_frames(["hello"])
    assert server.protocol.outcome == "cancelled"
    assert not server.send_lock.locked()
