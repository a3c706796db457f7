"""Handing `/mcp` requests to the process that serves MCP, for daemons with several gateways.

An MCP session is state in one process (the SDK's transport, its streams,
the waits and subscriptions on that process's fanout hub), and a client's
successive requests may reach any gateway. So one gateway serves MCP and
the others forward every `/mcp` request to it over a private Unix socket,
unchanged and streaming both ways: the request body as it arrives, the
answer (an SSE stream that may last as long as the session) as it is
written. The client cannot tell.

The forwarding gateway checks the token first, as the serving one does
again: a refused token is answered at the edge, where the client's
address is known, so the per-address block on guessing works for
forwarded requests too (behind the private socket every caller would have
one address).

A client that goes away ends the forwarded request (the serving side sees
its stream close, as it would without the hop).

Each forwarded request holds a connection to the serving process for as
long as it lasts, and an SSE stream, a listen stream or a
`message.inbox.wait` lasts long. So the pool has no limit by default: any
fixed cap below what the serving process admits (its `mcp.max_sessions`,
503, and `mcp.max_sessions_per_agent`, 429, bound the sessions; this
gateway's own client connections bound the requests it relays) would stall
requests the serving process would take. With a limit, a request waits at
most `pool_timeout` for a connection and is then answered 503; that bounded
wait is also when a client that left while waiting is noticed (its body has
not been read yet, so nothing else listens for its disconnect).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import trio
from starlette.types import Message, Receive, Scope, Send

from broker.http.proxies import forwarded_by_us

log = logging.getLogger(__name__)

# Headers that describe one hop, not the request (RFC 9110, 7.6.1).
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                        b"transfer-encoding", b"upgrade", b"proxy-authenticate",
                        b"proxy-authorization"})
CONNECT_TIMEOUT_S = 5.0
# How long a request waits for a free connection to the serving process (with a
# connection limit) before it is answered 503.
POOL_TIMEOUT_S = 10.0

ASGI = Callable[[Scope, Receive, Send], Awaitable[None]]


class McpForwarder:
    """An ASGI endpoint that relays each request to the serving process on `socket_path`.

    check: the token check to run first (an ASGI app that answers a refusal
    and returns False, or returns True to let the request through).
    max_connections: connections to the serving process at once (None: no
    limit, see the module docstring); pool_timeout: how long a request waits
    for one when they are all taken, before it is answered 503.
    """

    def __init__(self, socket_path: str,
                 check: Callable[[Scope, Receive, Send], Awaitable[bool]] | None = None, *,
                 max_connections: int | None = None,
                 pool_timeout: float = POOL_TIMEOUT_S) -> None:
        self.socket_path = socket_path
        self.check = check
        self.forwarded = 0
        self.refused_busy = 0
        self._client = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(
                uds=socket_path, limits=httpx.Limits(max_connections=max_connections)),
            timeout=httpx.Timeout(None, connect=CONNECT_TIMEOUT_S, pool=pool_timeout))

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.check is not None and not await self.check(scope, receive, send):
            return
        self.forwarded += 1
        body_done = trio.Event()

        async def body() -> AsyncIterator[bytes]:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    break
                chunk = message.get("body", b"")
                if chunk:
                    yield chunk
                if not message.get("more_body", False):
                    break
            body_done.set()

        # The serving process believes the client and scheme resolved here
        # (broker.http.proxies).
        headers = forwarded_by_us(
            scope, [(k, v) for k, v in scope["headers"] if k.lower() not in HOP_BY_HOP])
        path = scope.get("raw_path") or scope["path"].encode()
        if scope.get("query_string"):
            path += b"?" + scope["query_string"]
        request = self._client.build_request(
            scope["method"], "http://mcp.serving" + path.decode("latin-1"), headers=headers,
            content=body())
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_disconnect, receive, body_done, nursery.cancel_scope)
            try:
                response = await self._client.send(request, stream=True)
            except httpx.PoolTimeout:
                self.refused_busy += 1
                log.warning("mcp: every connection to the serving process is taken; "
                            "request refused (%d so far)", self.refused_busy)
                await _answer_busy(send)
                nursery.cancel_scope.cancel()
                return
            except httpx.HTTPError as exc:
                log.warning("mcp: the serving process did not answer: %r", exc)
                await _answer_unavailable(send)
                nursery.cancel_scope.cancel()
                return
            try:
                await send({"type": "http.response.start", "status": response.status_code,
                            "headers": [(k, v) for k, v in response.headers.raw
                                        if k.lower() not in HOP_BY_HOP]})
                async for chunk in response.aiter_raw():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            finally:
                await response.aclose()
                nursery.cancel_scope.cancel()

    @staticmethod
    async def _watch_disconnect(receive: Receive, body_done: trio.Event,
                                done: trio.CancelScope) -> None:
        """End the relay when the client goes away (after its body was read)."""
        await body_done.wait()
        while True:
            message: Message = await receive()
            if message["type"] == "http.disconnect":
                done.cancel()
                return


async def _answer_unavailable(send: Send) -> None:
    await _answer_503(send, b"the MCP process did not answer")


async def _answer_busy(send: Send) -> None:
    await _answer_503(send, b"every connection to the MCP process is in use; retry later")


async def _answer_503(send: Send, message: bytes) -> None:
    body = (b'{"jsonrpc":"2.0","id":null,"error":{"code":-32603,"message":'
            b'"unavailable: ' + message + b'","data":{"code":"unavailable"}}}')
    await send({"type": "http.response.start", "status": 503,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
