"""Handing `/mcp` requests to the process that serves MCP, for daemons with several gateways.

An MCP session is state in one process (the SDK's transport, its streams,
the waits and subscriptions on that process's fanout hub), and a client's
successive requests may reach any gateway. So one gateway serves MCP and
the others forward every `/mcp` request to it over a private Unix socket,
unchanged and streaming both ways: the request body as it arrives, the
answer (an SSE stream that may last as long as the session) as it is
written. The client cannot tell, but for the headers that describe one hop
(`Connection`, `Transfer-Encoding`, ...) and the ones this gateway's server
writes itself (`Date`, `Server`), which are not copied from the answer.

The relay speaks HTTP/1.1 itself (h11), one connection per request, and
reads the answer while it sends the body: the serving process may answer
before it has read the body (a 413 for a body over the limit, a refused
token) and then stop reading. A client that sends the whole body before it
reads (as httpx does) would wait forever for the socket to take the rest,
and the answer would never be relayed; here the answer is relayed as it
comes, and the body stops there. A connection is not reused: one whose
answer came early cannot be, and a Unix socket connection costs little next
to an MCP request.

Nothing the relay waits for on the serving side can hold it for good:
connecting has a timeout, and so does each write of the body (a serving
process that takes no more of it for `stall_timeout` seconds, and has not
answered, gets the request a 503). The client's own pace is its own: the
relay waits as long as the client takes to send its body or read the
answer, and an answer (a stream, a wait) lasts as long as the serving side
makes it.

The forwarding gateway checks the token first, as the serving one does
again: a refused token is answered at the edge, where the client's
address is known, so the per-address block on guessing works for
forwarded requests too (behind the private socket every caller would have
one address).

A client that goes away ends the forwarded request (the serving side sees
its connection close, as it would without the hop).

Each forwarded request holds a connection to the serving process for as
long as it lasts, and an SSE stream, a listen stream or a
`message.inbox.wait` lasts long. So there is no limit by default: any
fixed cap below what the serving process admits (its `mcp.max_sessions`,
503, and `mcp.max_sessions_per_agent`, 429, bound the sessions; this
gateway's own client connections bound the requests it relays) would stall
requests the serving process would take. With a limit, a request waits at
most `pool_timeout` for a connection and is then answered 503; that bounded
wait is also when a client that left while waiting is noticed (its body has
not been read yet, so nothing else listens for its disconnect).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Awaitable, Callable, Sequence

import h11
import trio
from starlette.types import Message, Receive, Scope, Send

from broker.http.proxies import forwarded_by_us

log = logging.getLogger(__name__)

# Headers that describe one hop, not the request or its answer (RFC 9110, 7.6.1).
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                        b"transfer-encoding", b"upgrade", b"proxy-authenticate",
                        b"proxy-authorization"})
# ... and those this gateway's server writes on every answer itself: copied from the
# serving process's answer, the client would get each twice.
SERVER_WRITTEN = frozenset({b"date", b"server"})
CONNECT_TIMEOUT_S = 5.0
# How long a request waits for a free connection to the serving process (with a
# connection limit) before it is answered 503.
POOL_TIMEOUT_S = 10.0
# How long one write of a request body to the serving process may wait for it to take
# the bytes: it reads a body as it comes (or answers early, which the relay sees), so
# a write that waits this long means a stuck process.
STALL_TIMEOUT_S = 30.0
RECEIVE_BYTES = 65536
# The Host of a request that came without one (HTTP/1.1 requires it).
SERVING_HOST = b"mcp.serving"

ASGI = Callable[[Scope, Receive, Send], Awaitable[None]]
# What h11 reads off the serving process's connection.
Answer = h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]


class McpForwarder:
    """An ASGI endpoint that relays each request to the serving process on `socket_path`.

    check: the token check to run first (an ASGI app that answers a refusal
    and returns False, or returns True to let the request through).
    max_connections: connections to the serving process at once (None: no
    limit, see the module docstring); pool_timeout: how long a request waits
    for one when they are all taken, before it is answered 503.
    connect_timeout, stall_timeout: see the module docstring.
    """

    def __init__(self, socket_path: str,
                 check: Callable[[Scope, Receive, Send], Awaitable[bool]] | None = None, *,
                 max_connections: int | None = None,
                 pool_timeout: float = POOL_TIMEOUT_S,
                 connect_timeout: float = CONNECT_TIMEOUT_S,
                 stall_timeout: float = STALL_TIMEOUT_S) -> None:
        self.socket_path = socket_path
        self.check = check
        self.pool_timeout = pool_timeout
        self.connect_timeout = connect_timeout
        self.stall_timeout = stall_timeout
        self.forwarded = 0
        self.refused_busy = 0
        self.stalled = 0
        self._slots = trio.Semaphore(max_connections) if max_connections is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.check is not None and not await self.check(scope, receive, send):
            return
        self.forwarded += 1
        if self._slots is None:
            await self._forward(scope, receive, send)
            return
        acquired = False
        with trio.move_on_after(self.pool_timeout):
            await self._slots.acquire()
            acquired = True
        if not acquired:
            self.refused_busy += 1
            log.warning("mcp: every connection to the serving process is taken; "
                        "request refused (%d so far)", self.refused_busy)
            await _answer_busy(send)
            return
        try:
            await self._forward(scope, receive, send)
        finally:
            self._slots.release()

    async def _forward(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            with trio.fail_after(self.connect_timeout):
                upstream = await trio.open_unix_socket(self.socket_path)
        except (OSError, trio.TooSlowError) as exc:
            log.warning("mcp: the serving process did not answer: %r", exc)
            await _answer_unavailable(send)
            return
        async with upstream:
            relay = Relay(scope, receive, send, upstream, self.stall_timeout)
            await relay.run()
        if relay.state is RelayState.STALLED:
            self.stalled += 1
            await _answer_unavailable(send)


class RelayState(enum.Enum):
    """Where one relayed request stands, as far as the client is concerned."""

    WAITING = "waiting"  # no answer yet
    ANSWERING = "answering"  # the answer's head is relayed; its body follows
    ANSWERED = "answered"  # the answer's last message is being sent, or has been
    STALLED = "stalled"  # the serving process stopped taking the body, unanswered: a 503
    CUT = "cut"  # the serving process closed the connection before the answer ended


class Relay:
    """One request relayed over `upstream`: its head and body sent, its answer relayed
    back, both at once (see the module docstring)."""

    def __init__(self, scope: Scope, receive: Receive, send: Send,
                 upstream: trio.abc.Stream, stall_timeout: float) -> None:
        self.scope = scope
        self.receive = receive
        self.send = send
        self.upstream = upstream
        self.stall_timeout = stall_timeout
        self.state = RelayState.WAITING
        self._h11 = h11.Connection(h11.CLIENT)

    async def run(self) -> None:
        """Relay until the answer is relayed, the client goes away or the serving side fails
        (STALLED: the caller answers, no byte of an answer has been sent)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._send_request, nursery.cancel_scope)
            await self._relay_answer()
            # The answer is whole (or cannot be had): whatever is left of the body stays
            # unread (the client's connection then closes, broker.http.keepalive).
            nursery.cancel_scope.cancel()

    async def _send_request(self, done: trio.CancelScope) -> None:
        try:
            await self._write(self._h11.send(self._head()))
            while True:
                message = await self.receive()
                if message["type"] == "http.disconnect":
                    self._client_left(done)
                    return
                chunk = message.get("body", b"")
                if chunk:
                    await self._write(self._h11.send(h11.Data(data=chunk)))
                if not message.get("more_body", False):
                    break
            await self._write(self._h11.send(h11.EndOfMessage()))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # The serving side closed its end, maybe after answering early: the answer
            # (or its absence) is read by `_relay_answer`.
            return
        except trio.TooSlowError:
            if self.state is RelayState.WAITING:
                log.warning("mcp: the serving process took no more of a request body for %g s "
                            "and did not answer it; answered 503", self.stall_timeout)
                self.state = RelayState.STALLED
                done.cancel()
            return  # answering already: the answer goes on, the body stops
        # The body is sent: the client's going away is now what ends the request.
        while (await self.receive())["type"] != "http.disconnect":
            pass
        self._client_left(done)

    def _client_left(self, done: trio.CancelScope) -> None:
        """The server said the client's request is over: end the relay, unless its last
        message is being sent. hypercorn says so from inside that very send, as it
        closes the connection or starts its keep-alive timer; cancelled there, it would
        do neither, and the connection would stay open (a stop would wait its grace)."""
        if self.state is not RelayState.ANSWERED:
            done.cancel()

    async def _write(self, data: bytes | None) -> None:
        if data:
            with trio.fail_after(self.stall_timeout):
                await self.upstream.send_all(data)

    def _head(self) -> h11.Request:
        scope = self.scope
        headers = end_to_end(scope["headers"])
        names = {name.lower() for name, _ in headers}
        if b"host" not in names:
            headers.append((b"host", SERVING_HOST))
        if b"content-length" not in names:
            headers.append((b"transfer-encoding", b"chunked"))
        # The serving process believes the client and scheme resolved here
        # (broker.http.proxies).
        path = scope.get("raw_path") or scope["path"].encode()
        if scope.get("query_string"):
            path += b"?" + scope["query_string"]
        return h11.Request(method=scope["method"].encode(), target=path,
                           headers=forwarded_by_us(scope, headers))

    async def _relay_answer(self) -> None:
        while True:
            event: Answer | h11.RemoteProtocolError
            try:
                event = await self._next_event()
            except h11.RemoteProtocolError as exc:
                event = exc
            if isinstance(event, h11.Response):
                self.state = RelayState.ANSWERING
                headers = [(name, value) for name, value in end_to_end(event.headers)
                           if name not in SERVER_WRITTEN]
                await self.send({"type": "http.response.start", "status": event.status_code,
                                 "headers": headers})
            elif isinstance(event, h11.Data):
                await self.send({"type": "http.response.body", "body": bytes(event.data),
                                 "more_body": True})
            elif isinstance(event, h11.EndOfMessage):
                self.state = RelayState.ANSWERED
                await self.send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            elif isinstance(event, h11.InformationalResponse):
                continue  # a 1xx answer is for this hop only
            elif isinstance(event, h11.ConnectionClosed | h11.RemoteProtocolError):
                if self.state is RelayState.WAITING:
                    log.warning("mcp: the serving process closed the connection without "
                                "answering: %r", event)
                    self.state = RelayState.ANSWERED  # by the 503, whole in one send
                    await _answer_unavailable(self.send)
                else:
                    # Too late for another status: the answer ends unfinished, and the
                    # server closes the client's connection, so the client sees it cut.
                    log.warning("mcp: the serving process cut an answer short: %r", event)
                    self.state = RelayState.CUT
                return
            else:
                # h11 pauses a connection only after a whole answer, which ended above.
                raise AssertionError(f"unexpected HTTP event from the serving process: {event}")

    async def _next_event(self) -> Answer:
        while True:
            event = self._h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            try:
                data = await self.upstream.receive_some(RECEIVE_BYTES)
            except trio.BrokenResourceError:
                data = b""  # reset: as a close
            self._h11.receive_data(bytes(data))


def end_to_end(headers: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """`headers` without those that describe one hop: the standard ones, and any that the
    `Connection` header names."""
    named = {token.strip().lower() for name, value in headers if name.lower() == b"connection"
             for token in bytes(value).split(b",")}
    return [(bytes(name), bytes(value)) for name, value in headers
            if name.lower() not in HOP_BY_HOP and name.lower() not in named]


async def _answer_unavailable(send: Send) -> None:
    await _answer_503(send, b"the MCP process did not answer")


async def _answer_busy(send: Send) -> None:
    await _answer_503(send, b"every connection to the MCP process is in use; retry later")


async def _answer_503(send: Send, message: bytes) -> None:
    body = (b'{"jsonrpc":"2.0","id":null,"error":{"code":-32603,"message":'
            b'"unavailable: ' + message + b'","data":{"code":"unavailable"}}}')
    start: Message = {"type": "http.response.start", "status": 503,
                      "headers": [(b"content-type", b"application/json"),
                                  (b"content-length", str(len(body)).encode())]}
    await send(start)
    await send({"type": "http.response.body", "body": body})
