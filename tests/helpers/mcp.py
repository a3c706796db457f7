"""Helpers for MCP tests: the SDK's client on /mcp with a bearer token, and tool results."""

from __future__ import annotations

import sys
import warnings
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, NamedTuple

import h11
import httpx2
import mcp_types as types
import pytest
import trio
from mcp.client import Client
from mcp.client.stdio import StdioServerParameters, get_default_environment
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.exceptions import MCPDeprecationWarning

from broker.server import BrokerServer

# The two protocol revisions a test runs against: the 2025 handshake
# (initialize, a session id, a GET stream) and the 2026 one (no session).
LEGACY = "legacy"
MODERN = "2026-07-28"

# The SDK's client leaves its own HTTP response streams (httpx2's) to the garbage
# collector when a session ends: client side, the daemon is not involved.
SDK_CLIENT_STREAMS = pytest.mark.filterwarnings(
    "ignore:Exception ignored in.*(PoolByteStream|Response.aiter_|EventSource)"
    ":pytest.PytestUnraisableExceptionWarning")


def mcp_url(server: BrokerServer) -> str:
    assert server.url is not None
    return f"{server.url}/mcp"


@asynccontextmanager
async def mcp_client(url: str, token: str, mode: str = MODERN, *,
                     fresh_connections: bool = False, **kwargs: Any) -> AsyncIterator[Client]:
    """The SDK's client on `url` as the holder of `token`, in protocol `mode`.

    fresh_connections: a new TCP connection for every request (with several gateway
    processes on one port, each request may then reach any of them).
    """
    headers = {"Authorization": f"Bearer {token}"}
    http = httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=300),
                              limits=httpx2.Limits(max_keepalive_connections=0)) \
        if fresh_connections else create_mcp_http_client(headers=headers)
    async with http:
        async with Client(streamable_http_client(url, http_client=http), mode=mode,
                          cache=None, **kwargs) as client:
            yield client


def data(result: types.CallToolResult) -> Any:
    """A successful tool result's structured content (a list comes back as `items`)."""
    assert not result.is_error, result.content
    content = result.structured_content
    assert content is not None
    return content["items"] if set(content) == {"items"} else content


def error_code(result: types.CallToolResult) -> str:
    """A failed tool result's error code."""
    assert result.is_error, result.structured_content
    assert result.structured_content is not None
    return str(result.structured_content["error"]["code"])


def texts(result: types.CallToolResult) -> list[str]:
    return [c.text for c in result.content if isinstance(c, types.TextContent)]


@asynccontextmanager
async def stdio_client(url: str, token: str, mode: str = MODERN,
                       **kwargs: Any) -> AsyncIterator[Client]:
    """The SDK's client on `broker mcp` run as a subprocess (the stdio bridge to `url`)."""
    env = {**get_default_environment(), "BROKER_TOKEN": token}
    params = StdioServerParameters(command=sys.executable,
                                   args=["-m", "broker", "mcp", "--url", url], env=env)
    async with Client(params, mode=mode, cache=None, **kwargs) as client:
        yield client


async def plan_with_bob_subscribed(alice: Client, bob: Client) -> None:
    """alice creates #plan, bob joins it and subscribes to his inbox (the 2025
    subscription call, which the SDK marks deprecated)."""
    data(await alice.call_tool("channel.create", {"name": "plan"}))
    data(await bob.call_tool("channel.join", {"channel": "plan"}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MCPDeprecationWarning)
        await bob.subscribe_resource("broker://inbox")


class RawAnswer(NamedTuple):
    """An HTTP answer as it came: the status, every header line in order (repeated ones
    too, names in lower case) and the body."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header_lines(self, name: bytes) -> list[bytes]:
        return [value for key, value in self.headers if key == name]


async def raw_request(port: int, method: str, path: str, headers: Sequence[tuple[str, str]],
                      body: Sequence[bytes] = (), *, chunked: bool = False) -> RawAnswer:
    """`method path` to 127.0.0.1:`port` over a raw socket, one new connection.

    The answer is read while the body is still being sent, as a client that
    reads concurrently (curl) does: a server may answer before the body is
    in, and then stop reading it. body: the chunks to send (with a
    Content-Length of their sum, or chunked).
    """
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    conn = h11.Connection(h11.CLIENT)
    framing = ("transfer-encoding", "chunked") if chunked else \
        ("content-length", str(sum(len(chunk) for chunk in body)))
    await stream.send_all(conn.send(h11.Request(
        method=method, target=path, headers=[("host", "broker"), *headers, framing])))

    async def send_body() -> None:
        try:
            for chunk in body:
                await stream.send_all(conn.send(h11.Data(data=chunk)))
            await stream.send_all(conn.send(h11.EndOfMessage()))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the server answered and closed: the answer is what counts

    status, lines, received = 0, [], bytearray()
    async with stream, trio.open_nursery() as nursery:
        nursery.start_soon(send_body)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                try:
                    data = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    data = b""  # reset: as closed, whatever was left unread
                conn.receive_data(data)
            elif isinstance(event, h11.Response):
                status, lines = event.status_code, list(event.headers)
            elif isinstance(event, h11.Data):
                received += event.data
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                break
        nursery.cancel_scope.cancel()
    return RawAnswer(status, lines, bytes(received))
