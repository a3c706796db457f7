"""A Python client for the native agent protocol (docs/protocol.md), on trio-websocket.

    async with connect("ws://127.0.0.1:8787/v1/ws", token) as client:  # or wss://
        sent = await client.request("message.send", channel="general", text="hi")
        async for delivery in client.deliveries():
            print(delivery.seq, delivery.type, delivery.data)

- `request(type, **fields)` sends a request and returns the reply's `data`,
  or raises `RequestError` with the server's code; it gives up after
  `request_timeout` (trio.TooSlowError; wrap it in trio.fail_after for
  less). A request in flight when the connection drops fails with
  `ConnectionLost` (it may or may not have been applied: use an
  `idempotency_key` to retry sends safely). While the delivery buffer is
  full the client reads nothing from the socket, replies included: consume
  deliveries in their own task.
- `deliveries()` yields each durable delivery once, in seq order, across
  reconnects (the client drops what the server replays a second time). With
  `auto_ack` (the default) a delivery is acked once the consumer asks for
  the next one, i.e. after it was processed; acks are cumulative, and one
  goes out per ACK_INTERVAL at most. Without it, call `ack(seq)`.
  The exception is a redelivery (`Delivery.redelivery`): a delivery the
  agent gave back over REST (`delivery.fail` retryable, `delivery.defer`)
  comes again once due, with a seq it may have seen, and is yielded again;
  after it is processed, the cumulative ack is sent again so that it
  covers the redelivered one too.
- With `batch` (the default) the client asks for `deliver.batch` frames
  (`?batch=1`): the server sends the deliveries it has queued together in
  one frame, so a frame is read and parsed once per flush, not per
  delivery. `batch=False` asks for one `deliver` frame each.
- `events()` yields ephemeral events (membership, channels, and with
  `presence=True`, which asks for `?presence=1`, one coalesced `presence`
  event per interval: who came online, went away or offline);
  when the consumer falls behind by `event_buffer`, newer events are dropped
  (they have no seq to resume from), and counted in `events_dropped`.
- A `wss://` URL speaks TLS, verified against the system's CAs or the
  given `ssl_context` (a private CA: `ssl.create_default_context(cafile=...)`).
- The connection is re-opened with exponential backoff and jitter when it
  drops, unless the server refused the token (4401, HTTP 401) or `close()`
  was called. Each new connection replays the unacked deliveries.

Backpressure is end to end: a consumer that stops reading deliveries stops
this client reading the socket, and the server's session falls back to
the database for it, without slowing anyone else down.
"""

from __future__ import annotations

import itertools
import logging
import random
import socket
import ssl
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qs, urlsplit

import msgspec
import trio
import trio_websocket

from protocol.codec import JSON_SUBPROTOCOL, MSGPACK_SUBPROTOCOL, CloseCode

log = logging.getLogger(__name__)

DEFAULT_REQUEST_TIMEOUT = 30.0
DEFAULT_CONNECT_TIMEOUT = 10.0
RECONNECT_MIN_DELAY = 0.1
RECONNECT_MAX_DELAY = 10.0
# Deliveries received but not yet consumed; when full, the client stops reading the socket.
DEFAULT_DELIVERY_BUFFER = 256
DEFAULT_EVENT_BUFFER = 256
# Auto-ack sends at most one (cumulative) ack per this many seconds. Every
# ack frame costs the broker a frame to read and a write; a longer interval
# only means more deliveries come again after a reconnect (dropped by seq).
ACK_INTERVAL = 0.2
MAX_MESSAGE_SIZE = 16 * 1024 * 1024
# Bytes read from the socket at a time: trio-websocket reads 4 KiB by default,
# so a deliver.batch or presence frame of tens of KiB took a read, a parse
# and a trip through the scheduler per 4 KiB (BENCHMARKS.md, session 14:
# about 8% of the load generator's CPU per send).
READ_SIZE = 64 * 1024

# Closes after which reconnecting cannot help.
_FINAL_CLOSE_CODES = frozenset({CloseCode.UNAUTHORIZED})


class RequestError(Exception):
    """The server refused a request: `code` is the stable error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ConnectionLost(Exception):
    """The connection dropped before the reply arrived; `code` is the close code if known."""

    def __init__(self, code: int | None = None, reason: str | None = None) -> None:
        super().__init__(f"connection lost ({code} {reason or ''})".strip())
        self.code = code
        self.reason = reason


class Delivery(msgspec.Struct, frozen=True):
    """One durable delivery: its seq, id and payload `{"type": ..., "data": ...}`.

    redelivery: the agent gave it back (failed or deferred) and it came again.
    """

    seq: int
    delivery_id: str
    payload: dict[str, Any]
    redelivery: bool = False

    @property
    def type(self) -> str:
        return str(self.payload.get("type"))

    @property
    def data(self) -> Any:
        return self.payload.get("data")


class _Pending:
    __slots__ = ("done", "frame")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.frame: dict[str, Any] | None = None


class BrokerClient:
    """Use `connect(...)`; the client runs its connection in that context's nursery."""

    def __init__(
        self, url: str, token: str, *, msgpack: bool = False, auto_ack: bool = True,
        reconnect: bool = True, request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        delivery_buffer: int = DEFAULT_DELIVERY_BUFFER, event_buffer: int = DEFAULT_EVENT_BUFFER,
        receive_buffer: int | None = None, batch: bool = True, presence: bool = False,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.url = url
        self.ssl_context = ssl_context
        self.batch = batch
        self.presence = presence
        self.token = token
        self.msgpack = msgpack
        self.auto_ack = auto_ack
        self.reconnect = reconnect
        self.request_timeout = request_timeout
        self.connect_timeout = connect_timeout
        self.receive_buffer = receive_buffer
        self._ids = itertools.count(1)
        self._pending: dict[str, _Pending] = {}
        self._deliveries_send, self._deliveries = trio.open_memory_channel[Delivery](
            delivery_buffer)
        self._events_send, self._events = trio.open_memory_channel[dict[str, Any]](event_buffer)
        self._ws: trio_websocket.WebSocketConnection | None = None
        self._stream: trio.SocketStream | trio.SSLStream[trio.SocketStream] | None = None
        self._connected = trio.Event()
        self._closing = False
        self._json = msgspec.json.Encoder()
        self._msgpack = msgspec.msgpack.Encoder()
        self.last_seq = 0  # highest seq received (duplicates at or below it are dropped)
        self._acked = 0  # highest seq acked by this client
        self._consumed = 0  # highest seq the consumer has processed
        self._ack_again = False  # a redelivery was processed: send the cumulative ack again
        self._ack_wanted = trio.Event()
        self.redeliveries = 0
        self.connections = 0
        self.duplicates = 0
        self.events_dropped = 0
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self._stopped = trio.Event()

    # -- the connection ------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, read, and reconnect with backoff until `close()`; with auto_ack, ack too.

        The first connection must succeed (its error is raised); later ones are retried.
        """
        try:
            async with trio.open_nursery() as nursery:
                if self.auto_ack:
                    nursery.start_soon(self._auto_ack)
                await nursery.start(self._connection)
                task_status.started()
                await self._stopped.wait()
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise _only(group) from None

    async def _connection(self, *, task_status: trio.TaskStatus[None]) -> None:
        attempt = 0
        first = True
        try:
            while not self._closing:
                try:
                    try:
                        async with trio.open_nursery() as nursery:
                            with trio.fail_after(self.connect_timeout):
                                ws = await self._open(nursery)
                            attempt = 0
                            self.connections += 1
                            self._ws = ws
                            self._connected.set()
                            if first:
                                first = False
                                task_status.started()
                            await self._read(ws)
                            # Let trio-websocket finish the close handshake, within bounds.
                            nursery.cancel_scope.deadline = (
                                trio.current_time() + self.connect_timeout)
                    except BaseExceptionGroup as group:
                        # The nursery wraps what the connection raised; take it out.
                        raise _only(group) from None
                except (trio_websocket.HandshakeError, OSError, trio.TooSlowError) as exc:
                    rejected = isinstance(exc, trio_websocket.ConnectionRejected)
                    if first or (rejected and getattr(exc, "status_code", 0) == 401):
                        raise
                    log.info("client: connecting to %s failed: %r", self.url, exc)
                finally:
                    # trio-websocket leaves the stream open when the handshake
                    # is refused or its reader is cancelled early.
                    if self._stream is not None:
                        await trio.aclose_forcefully(self._stream)
                        self._stream = None
                    self._ws = None
                    self._connected = trio.Event()
                    self._fail_pending()
                if self._closing or not self.reconnect or self.close_code in _FINAL_CLOSE_CODES:
                    break
                attempt += 1
                delay = min(RECONNECT_MAX_DELAY, RECONNECT_MIN_DELAY * 2 ** (attempt - 1))
                await trio.sleep(delay * (0.5 + random.random()))
        finally:
            self._stopped.set()
            self._deliveries_send.close()
            self._events_send.close()

    async def _open(self, nursery: trio.Nursery) -> trio_websocket.WebSocketConnection:
        parts = urlsplit(self.url)
        if parts.scheme not in ("ws", "wss"):
            raise ValueError(f"only ws:// and wss:// URLs are supported, not {self.url!r}")
        resource = parts.path or "/"
        query = [parts.query] if parts.query else []
        given = parse_qs(parts.query, keep_blank_values=True)
        # An option already in the URL is the caller's choice; a second one would be refused.
        if self.batch and "batch" not in given:
            query.append("batch=1")
        if self.presence and "presence" not in given:
            query.append("presence=1")
        if query:
            resource += "?" + "&".join(query)
        secure = parts.scheme == "wss"
        host, port = parts.hostname or "127.0.0.1", parts.port or (443 if secure else 80)
        stream: trio.SocketStream | trio.SSLStream[trio.SocketStream]
        stream = await open_stream(host, port, self.receive_buffer)
        if secure:
            stream = trio.SSLStream(stream, self.ssl_context or ssl.create_default_context(),
                                    server_hostname=host, https_compatible=True)
        self._stream = stream
        return await trio_websocket.wrap_client_stream(
            nursery, stream, f"{host}:{port}", resource,
            subprotocols=[MSGPACK_SUBPROTOCOL if self.msgpack else JSON_SUBPROTOCOL],
            extra_headers=[(b"authorization", f"Bearer {self.token}".encode())],
            max_message_size=MAX_MESSAGE_SIZE,
            receive_buffer_size=READ_SIZE,
        )

    async def _read(self, ws: trio_websocket.WebSocketConnection) -> None:
        while True:
            try:
                message = await ws.get_message()
            except trio_websocket.ConnectionClosed as closed:
                reason = closed.reason
                self.close_code = reason.code if reason is not None else None
                self.close_reason = reason.reason if reason is not None else None
                return
            frame = (msgspec.msgpack.decode(message) if isinstance(message, bytes)
                     else msgspec.json.decode(message))
            if not isinstance(frame, dict):
                continue
            kind = frame.get("type")
            if kind == "deliver.batch":
                for item in frame["deliveries"]:
                    await self._take(item)
            elif kind == "deliver":
                await self._take(frame)
            elif kind == "reply" or (kind == "pong" and frame.get("re") is not None):
                pending = self._pending.pop(str(frame.get("re")), None)
                if pending is not None:
                    pending.frame = frame
                    pending.done.set()
            elif kind == "event":
                try:
                    self._events_send.send_nowait(frame["payload"])
                except trio.WouldBlock:
                    self.events_dropped += 1
            elif kind == "ping":
                try:
                    await self._send({"v": 1, "type": "pong"}, ws)
                except ConnectionLost:
                    # closed under us: the next get_message reports how, and
                    # run() reconnects (or ends) from there
                    continue

    async def _take(self, frame: dict[str, Any]) -> None:
        """Hand one `deliver` frame to the consumer, unless it is a duplicate."""
        seq = int(frame["seq"])
        redelivery = frame.get("redelivery") is True
        if redelivery:
            # Given back by the agent and pushed again: taken whatever its seq.
            self.redeliveries += 1
        elif seq <= self.last_seq:
            self.duplicates += 1
            return
        self.last_seq = max(self.last_seq, seq)
        await self._deliveries_send.send(
            Delivery(seq, str(frame["delivery_id"]), frame["payload"], redelivery))

    def _fail_pending(self) -> None:
        for pending in self._pending.values():
            pending.done.set()
        self._pending.clear()

    async def _send(self, frame: dict[str, Any],
                    ws: trio_websocket.WebSocketConnection | None = None) -> None:
        ws = ws or self._ws
        if ws is None:
            raise ConnectionLost(self.close_code, self.close_reason)
        data = self._msgpack.encode(frame) if self.msgpack else self._json.encode(frame).decode()
        try:
            await ws.send_message(data)
        except trio_websocket.ConnectionClosed as closed:
            reason = closed.reason
            raise ConnectionLost(reason.code if reason else None,
                                 reason.reason if reason else None) from None

    async def close(self) -> None:
        """Ack what was consumed, close the socket (1000) and stop reconnecting."""
        self._closing = True
        ws = self._ws
        if ws is not None:
            with trio.move_on_after(self.connect_timeout):
                if self.auto_ack and (self._consumed > self._acked or self._ack_again):
                    try:
                        await self.ack(self._consumed)
                    except ConnectionLost:
                        pass
                await ws.aclose()

    async def wait_connected(self) -> None:
        """Until a connection is open."""
        await self._connected.wait()

    # -- requests --------------------------------------------------------------------------

    async def request(
        self, type: str, /, *, idempotency_key: str | None = None, **fields: Any,
    ) -> Any:
        """Send request `type` with `fields`; the reply's data.

        Raises RequestError (the server refused: `.code`), ConnectionLost,
        trio.TooSlowError (no reply within the client's request_timeout;
        wrap the call in trio.fail_after for a shorter one).
        """
        request_id = f"r{next(self._ids)}"
        frame: dict[str, Any] = {"v": 1, "id": request_id, "type": type, **fields}
        if idempotency_key is not None:
            frame["idempotency_key"] = idempotency_key
        pending = _Pending()
        with trio.fail_after(self.request_timeout):
            await self._connected.wait()
            self._pending[request_id] = pending
            try:
                await self._send(frame)
                await pending.done.wait()
            finally:
                self._pending.pop(request_id, None)
        reply = pending.frame
        if reply is None:
            raise ConnectionLost(self.close_code, self.close_reason)
        if reply.get("type") == "pong":
            return None
        if not reply.get("ok"):
            error = reply.get("error") or {}
            raise RequestError(str(error.get("code")), str(error.get("message")))
        return reply.get("data")

    async def ping(self) -> None:
        """A round trip to the server."""
        await self.request("ping")

    # -- deliveries ------------------------------------------------------------------------

    async def ack(self, up_to_seq: int, *, wait: bool = False) -> Any:
        """Ack every delivery up to `up_to_seq`; with `wait`, return once it is durable."""
        if up_to_seq > self._acked:
            self._acked = up_to_seq
        if wait:
            return await self.request("delivery.ack", up_to_seq=up_to_seq)
        await self._send({"v": 1, "type": "delivery.ack", "up_to_seq": up_to_seq})
        return None

    def deliveries(self) -> Deliveries:
        """Every delivery once, in seq order; ends when the client stops for good."""
        return Deliveries(self)

    def _processed(self, delivery: Delivery) -> None:
        self._consumed = max(self._consumed, delivery.seq)
        if delivery.redelivery:
            # Its seq is at or below what was acked: only an ack sent after it
            # was pushed again settles it (the server held it until then).
            self._ack_again = True
        if self.auto_ack:
            self._ack_wanted.set()

    async def _auto_ack(self) -> None:
        """Send the cumulative ack of what was processed, at most once per ACK_INTERVAL."""
        while True:
            await self._ack_wanted.wait()
            self._ack_wanted = trio.Event()
            if self._consumed > self._acked or self._ack_again:
                self._ack_again = False
                try:
                    await self.ack(self._consumed)
                except ConnectionLost:
                    pass  # the next connection replays from the last durable ack
            await trio.sleep(ACK_INTERVAL)

    def events(self) -> trio.MemoryReceiveChannel[dict[str, Any]]:
        """Ephemeral events (`{"type": ..., "data": ...}`) as they arrive (iterate it)."""
        return self._events


class Deliveries:
    """The async iterator of `BrokerClient.deliveries()` (a plain object: no aclosing needed).

    With auto_ack, a delivery counts as processed when the next one is
    asked for; the client's ack task then sends one cumulative ack per
    ACK_INTERVAL at most, however many deliveries were processed.
    """

    def __init__(self, client: BrokerClient) -> None:
        self.client = client
        self._last: Delivery | None = None

    def __aiter__(self) -> Deliveries:
        return self

    async def __anext__(self) -> Delivery:
        client = self.client
        if self._last is not None:
            client._processed(self._last)
        try:
            delivery = await client._deliveries.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None
        self._last = delivery
        return delivery


def _only(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one exception in a (nested) group, or the group itself when there are several."""
    leaves = list(_leaves(group))
    return leaves[0] if len(leaves) == 1 else group


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


async def open_stream(host: str, port: int, receive_buffer: int | None = None) -> trio.SocketStream:
    """A TCP stream to host:port; `receive_buffer` sets SO_RCVBUF before connecting.

    A small receive buffer makes a client that stops reading push back on
    the server quickly (tests of slow consumers use it).
    """
    if receive_buffer is None:
        return await trio.open_tcp_stream(host, port)
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    family, type_, proto, _, address = infos[0]
    sock = trio.socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        await sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


@asynccontextmanager
async def connect(url: str, token: str, **options: Any) -> AsyncIterator[BrokerClient]:
    """Open a client on `url` (`ws://host:port/v1/ws` or `wss://...`) with an agent token.

    Options are BrokerClient's. Raises trio_websocket.ConnectionRejected
    (HTTP 401 for a bad token) or OSError when the first connection fails.
    """
    client = BrokerClient(url, token, **options)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(client.run)
            try:
                yield client
            finally:
                await client.close()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # One failure (a refused handshake, the caller's own error) comes out as itself.
        raise _only(group) from None
