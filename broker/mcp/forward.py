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

ASGI = Callable[[Scope, Receive, Send], Awaitable[None]]


class McpForwarder:
    """An ASGI endpoint that relays each request to the serving process on `socket_path`.

    check: the token check to run first (an ASGI app that answers a refusal
    and returns False, or returns True to let the request through).
    """

    def __init__(self, socket_path: str,
                 check: Callable[[Scope, Receive, Send], Awaitable[bool]] | None = None) -> None:
        self.socket_path = socket_path
        self.check = check
        self.forwarded = 0
        self._client = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=socket_path),
            timeout=httpx.Timeout(None, connect=CONNECT_TIMEOUT_S))

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
    body = (b'{"jsonrpc":"2.0","id":null,"error":{"code":-32603,"message":'
            b'"unavailable: the MCP process did not answer","data":{"code":"unavailable"}}}')
    await send({"type": "http.response.start", "status": 503,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
