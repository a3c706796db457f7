"""Helpers for WebSocket tests: `Live` (the `live` fixture's server, world and HTTP client),
raw sockets, frames, sends, and an in-memory socket for sessions driven without a server."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import msgspec
import trio
import trio_websocket

from broker.client import open_stream
from broker.engine.engine import Engine
from broker.engine.mailbox import delivery_id, seq_marks
from broker.engine.messages import SendChannelMessage
from broker.gateway import Gateway
from broker.gateway.presence import PresenceReporter
from broker.gateway.websocket import ConnectionClosed
from broker.server import BrokerServer
from protocol.codec import JSON_SUBPROTOCOL
from tests.helpers.engine import World
from tests.helpers.rest import call

# Longest wait for state that another task moves (acks committed, ...).
POLL_LIMIT_S = 10.0


def gateway_of(server: BrokerServer) -> Gateway:
    assert server.gateway is not None
    return server.gateway


class Live(msgspec.Struct):
    """A live server, a world made through its engine, and (from the `live` fixture) an HTTP
    client for the server."""

    server: BrokerServer
    world: World
    http: httpx.AsyncClient | None = None

    @property
    def url(self) -> str:
        return ws_url(self.server)

    def token(self, name: str) -> str:
        return self.world.tokens[name]

    def delivery_id(self, name: str, seq: int) -> str:
        return delivery_id(self.world.agents[name], seq)

    async def post(self, author: str, text: str, channel: str = "general") -> int:
        return await post(self.server.engine, self.world.workspace_id, self.world.agents[author],
                          channel, text)

    async def marks(self, name: str) -> tuple[int, int]:
        """The agent's (last_seq, acked_seq)."""
        marks = await self.server.engine.read(seq_marks, self.world.workspace_id,
                                              self.world.agents[name])
        return marks.last_seq, marks.acked_seq

    async def acked(self, name: str) -> int:
        return (await self.marks(name))[1]

    async def node_token(self, name: str) -> dict[str, Any]:
        assert self.server.url is not None
        async with httpx.AsyncClient(base_url=self.server.url) as http:
            response = await http.post(
                "/v1/agent/node-token", json={},
                headers={"Authorization": f"Bearer {self.world.tokens[name]}"})
        assert response.status_code == 201, response.text
        body = response.json()
        assert body["ok"] is True
        data: dict[str, Any] = body["data"]
        return data

    @property
    def presence(self) -> PresenceReporter:
        return gateway_of(self.server).presence

    async def heartbeat(self, name: str) -> None:
        assert self.http is not None
        beat = await call(self.http, "POST", "/v1/agents/heartbeat", self.world.tokens[name],
                          json={})
        assert beat.data["status"] == "online"

    async def status(self, name: str) -> str:
        row = await self.server.engine.read(lambda c: c.execute(
            "SELECT status FROM agents WHERE id = ?", (self.world.agents[name],)).fetchone())
        return str(row[0])

    async def timeout_pass(self) -> int:
        """One pass of the reporter's heartbeat timeout; how many agents it set offline."""
        stale = await self.presence.find_stale()
        return await self.presence.expire(stale.agents)


def ws_url(server: BrokerServer, path: str = "/v1/ws", token: str | None = None) -> str:
    url = f"ws://127.0.0.1:{server.port}{path}"
    return url if token is None else f"{url}?token={token}"


@asynccontextmanager
async def raw_socket(
    server: BrokerServer, token: str | None, *, path: str = "/v1/ws",
    subprotocols: list[str] | None = None, queue: int = 10_000,
    receive_buffer: int | None = None, headers: list[tuple[bytes, bytes]] | None = None,
    batch: str | None = None, ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """A plain trio-websocket connection (token in the query), for frame-level tests.

    queue: messages trio-websocket reads ahead; receive_buffer: SO_RCVBUF;
    batch: the `batch` query parameter ("1": deliver.batch frames), if any;
    ssl_context: over TLS (wss://), trusting what it trusts.
    """
    assert server.port is not None
    query = [] if token is None else [f"token={token}"]
    if batch is not None:
        query.append(f"batch={batch}")
    resource = f"{path}?{'&'.join(query)}" if query else path
    try:
        async with _raw(server.port, resource, subprotocols, queue, receive_buffer,
                        headers, ssl_context) as ws:
            yield ws
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        if len(leaves) == 1:
            raise leaves[0] from None
        raise


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


@asynccontextmanager
async def _raw(
    port: int, resource: str, subprotocols: list[str] | None, queue: int,
    receive_buffer: int | None, headers: list[tuple[bytes, bytes]] | None,
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    stream: trio.abc.Stream = await open_stream("127.0.0.1", port, receive_buffer)
    if ssl_context is not None:
        stream = trio.SSLStream(stream, ssl_context, server_hostname="127.0.0.1",
                                https_compatible=True)
    try:
        async with trio.open_nursery() as nursery:
            ws = await trio_websocket.wrap_client_stream(
                nursery, stream, f"127.0.0.1:{port}", resource,
                subprotocols=[JSON_SUBPROTOCOL] if subprotocols is None else subprotocols,
                message_queue_size=queue, extra_headers=headers,
            )
            try:
                yield ws
            finally:
                with trio.move_on_after(5):
                    await ws.aclose()
                nursery.cancel_scope.cancel()
    finally:
        # trio-websocket leaves the stream open when the handshake is refused
        # or the reader is cancelled before the server's TCP close.
        await trio.aclose_forcefully(stream)


async def next_frame(ws: trio_websocket.WebSocketConnection, *types: str) -> dict[str, Any]:
    """The next frame (of one of `types`, skipping others such as events and pings)."""
    while True:
        message = await ws.get_message()
        frame = (msgspec.msgpack.decode(message) if isinstance(message, bytes)
                 else msgspec.json.decode(message))
        assert isinstance(frame, dict)
        if not types or frame.get("type") in types:
            return frame


async def next_deliveries(ws: trio_websocket.WebSocketConnection) -> list[dict[str, Any]]:
    """The `deliver` frames of the next delivery frame (a `deliver.batch` or a `deliver`)."""
    frame = await next_frame(ws, "deliver", "deliver.batch")
    if frame["type"] == "deliver.batch":
        items: list[dict[str, Any]] = frame["deliveries"]
        return items
    return [frame]


async def send_json(ws: trio_websocket.WebSocketConnection, frame: Any) -> None:
    await ws.send_message(msgspec.json.encode(frame).decode())


async def closed_with(ws: trio_websocket.WebSocketConnection) -> int | None:
    """Read until the server closes; its close code."""
    try:
        while True:
            await ws.get_message()
    except trio_websocket.ConnectionClosed as closed:
        return closed.reason.code if closed.reason is not None else None


async def eventually(check: Callable[[], Awaitable[bool]]) -> None:
    """Poll `check` until it is true (for state another task moves), at most POLL_LIMIT_S."""
    with trio.fail_after(POLL_LIMIT_S):
        while True:
            if await check():
                return
            await trio.sleep(0.01)


async def post(engine: Engine, workspace_id: int, agent_id: int, channel: str, text: str) -> int:
    """Send a channel message through the writer; its message id."""
    message = await engine.submit(SendChannelMessage(
        workspace_id=workspace_id, agent_id=agent_id, channel=channel, text=text))
    return int(message.id)


class FakeWebSocket:
    """An in-memory socket whose writes can block the way hypercorn's do: uncancellably.

    inbound: frames the client has sent that the session has not read yet.
    """

    subprotocols: tuple[str, ...] = ()

    def __init__(self, inbound: int = 100) -> None:
        self.inbound_send, self.inbound = trio.open_memory_channel[str](inbound)
        self.sent: list[Any] = []
        self.closing = False
        self.close_code: int | None = None
        self.aborted = False
        self.reads_nothing = False
        self._unblocked = trio.Event()

    async def receive(self) -> str | bytes:
        try:
            return await self.inbound.receive()
        except trio.EndOfChannel:
            raise ConnectionClosed(1000) from None

    async def send(self, data: str | bytes) -> None:
        if self.closing:
            raise ConnectionClosed()
        if self.reads_nothing:
            with trio.CancelScope(shield=True):  # like hypercorn's shielded send_all
                await self._unblocked.wait()
        self.sent.append(msgspec.json.decode(data))

    async def send_many(self, frames: list[str | bytes]) -> None:
        for data in frames:
            await self.send(data)

    async def close(self, code: int, reason: str = "") -> None:
        if self.closing:
            return
        self.closing = True
        if self.reads_nothing:
            await self._unblocked.wait()  # queued behind the stuck write
        self.close_code = code

    def abort(self) -> bool:
        self.closing = True
        self.aborted = True
        self._unblocked.set()
        return True


async def close_of(ws: trio_websocket.WebSocketConnection) -> tuple[int | None, str]:
    """Read until the server closes: its close code and reason."""
    try:
        while True:
            await ws.get_message()
    except trio_websocket.ConnectionClosed as closed:
        if closed.reason is None:
            return None, ""
        return closed.reason.code, closed.reason.reason or ""
