"""Forwarding a route to gateway 0, for a service that must live in one process.

MCP sessions are state held by one process (their session id, their
waits), so with gateway processes `/mcp` is served by gateway 0 alone and
the other gateways pass each request through, streamed both ways, to gateway
0's private Unix socket (`WorkerInfo.gateway0_socket`). The forwarded
request keeps its method, path, query, headers and body; the answer its
status, headers and body, chunk by chunk as gateway 0 writes it (a
server-sent event stream stays a stream).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
from starlette.types import Receive, Scope, Send

# Headers of one hop, not of the request: the forwarding connection has its own.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"transfer-encoding", b"te", b"trailer", b"upgrade",
    b"proxy-connection",
})


class ForwardToGateway0:
    """An ASGI endpoint that forwards HTTP requests to gateway 0's Unix socket."""

    def __init__(self, socket_path: str) -> None:
        self.client = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=socket_path),
            base_url="http://gateway-0", timeout=httpx.Timeout(None))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"

        async def body() -> AsyncIterator[bytes]:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                yield message.get("body", b"")
                if not message.get("more_body", False):
                    return

        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in HOP_BY_HOP]
        path = scope.get("raw_path") or scope["path"].encode()
        if scope.get("query_string"):
            path += b"?" + scope["query_string"]
        request = self.client.build_request(
            scope["method"], path.decode("latin-1"), headers=headers, content=body())
        response = await self.client.send(request, stream=True)
        try:
            await send({
                "type": "http.response.start", "status": response.status_code,
                "headers": [(k, v) for k, v in response.headers.raw
                            if k.lower() not in HOP_BY_HOP],
            })
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()

    async def aclose(self) -> None:
        await self.client.aclose()
