"""/mcp through a gateway that does not serve MCP: every request is relayed, streaming,
to the one that does, over a private Unix socket (broker.mcp.forward)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import h11
import httpx
import mcp_types as types
import pytest
import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from starlette.applications import Starlette
from starlette.routing import Route

from broker.mcp.endpoint import TokenCheck
from broker.mcp.forward import McpForwarder
from broker.ratelimit import UNLIMITED, RateLimiter
from broker.server import BrokerServer
from tests.helpers.mcp import (
    LEGACY,
    MODERN,
    SDK_CLIENT_STREAMS,
    data,
    mcp_client,
    plan_with_bob_subscribed,
    raw_request,
)
from tests.helpers.realtime import eventually
from tests.helpers.rest import make_rest_world

pytestmark = [SDK_CLIENT_STREAMS]


@asynccontextmanager
async def serving(app: Any, bind: str) -> AsyncIterator[str]:
    """`app` served by hypercorn on `bind` until the block ends; yields the bound address."""
    config = Config()
    config.bind = [bind]
    config.graceful_timeout = 0.5
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(lambda task_status: serve(
            app, config, shutdown_trigger=stop.wait, task_status=task_status))
        try:
            yield binds[0]
        finally:
            stop.set()


@asynccontextmanager
async def forwarding_gateway(server: BrokerServer, socket: Path) -> AsyncIterator[str]:
    """The server's app on `socket`, and a second gateway that only forwards /mcp to it;
    yields the second gateway's /mcp URL."""
    forwarder = McpForwarder(str(socket), TokenCheck(server.engine, RateLimiter(UNLIMITED)).passes)
    gateway = Starlette(routes=[Route("/mcp", forwarder)])
    async with serving(server.app, f"unix:{socket}"), \
            serving(gateway, "127.0.0.1:0") as address:
        yield f"{address}/mcp"


async def _true(value: bool) -> bool:
    return value


@pytest.mark.one_process  # reads the in-process MCP surface
async def test_mcp_forwarded_session_wait_and_notifications(
    server: BrokerServer, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    """bob's 2025 session through the forwarding gateway: his wait returns when alice
    (2026, straight to the serving gateway) posts, and his GET stream carries the
    resources/updated of his inbox; a bad token is refused at the forwarding edge."""
    world = await make_rest_world(client)
    assert server.mcp is not None and server.url is not None
    bob_id = int(world.agents["bob"])
    updated = trio.Event()

    async def on_message(message: Any) -> None:
        if isinstance(message, types.ResourceUpdatedNotification):
            updated.set()

    with trio.fail_after(30):
        async with forwarding_gateway(server, tmp_path / "mcp.sock") as url:
            refused = await client.post(url, json={"jsonrpc": "2.0", "id": 1,
                                                   "method": "tools/list"})
            assert refused.status_code == 401
            async with mcp_client(f"{server.url}/mcp", world.tokens["alice"], MODERN) as alice, \
                    mcp_client(url, world.tokens["bob"], LEGACY, fresh_connections=True,
                               message_handler=on_message) as bob:
                await plan_with_bob_subscribed(alice, bob)
                # The session lives in the serving gateway.
                (session,) = server.mcp.sessions.of_agent(bob_id)
                got: list[Any] = []

                async def wait() -> None:
                    got.append(data(await bob.call_tool("message.inbox.wait",
                                                        {"timeout_seconds": 20})))

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(wait)
                    await eventually(lambda: _true(server.mcp.watches.get(bob_id) is not None
                                                   and server.mcp.watches.get(bob_id).holders > 2))
                    posted = data(await alice.call_tool("message.post",
                                                        {"channel": "plan", "text": "hi"}))
                (result,) = got
                assert [d["message"]["id"] for d in result["deliveries"]] == [posted["id"]]
                await updated.wait()
            # bob's client said goodbye (DELETE) through the forwarder too.
            await eventually(lambda: _true(session.session_id not in server.mcp.sessions.sessions))


@asynccontextmanager
async def held_streams(tmp_path: Path, forwarder_options: dict[str, Any]
                       ) -> AsyncIterator[tuple[str, trio.Event]]:
    """A serving side that starts every answer and holds it open until the event is set (as
    an SSE stream, a listen stream or a wait does), behind a forwarder made with
    `forwarder_options`; yields the forwarding gateway's /mcp URL and the event."""
    socket = tmp_path / "mcp.sock"
    release = trio.Event()

    async def holding(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": b": open\n\n", "more_body": True})
        await release.wait()
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    forwarder = McpForwarder(str(socket), **forwarder_options)
    gateway = Starlette(routes=[Route("/mcp", forwarder)])
    async with serving(holding, f"unix:{socket}"), \
            serving(gateway, "127.0.0.1:0") as address:
        try:
            yield f"{address}/mcp", release
        finally:
            release.set()


async def test_mcp_forward_relays_more_long_requests_than_httpx_pools_by_default(
    tmp_path: Path
) -> None:
    """150 long requests held open at once through the forwarder all get their answer
    started (httpx's default pool of 100 connections would leave the 101st waiting for
    good), and they all end when the serving side ends them."""
    with trio.fail_after(60):
        async with held_streams(tmp_path, {}) as (url, release), \
                httpx.AsyncClient(limits=httpx.Limits(max_connections=None)) as client, \
                AsyncExitStack() as streams:
            responses = [await streams.enter_async_context(client.stream("GET", url))
                         for _ in range(150)]
            assert [r.status_code for r in responses] == [200] * 150
            release.set()
            bodies = [await r.aread() for r in responses]
            assert bodies == [b": open\n\n"] * 150


async def test_mcp_forward_with_every_connection_taken_answers_503(tmp_path: Path) -> None:
    """With a connection limit of 1 held by a long request, the next request is answered
    503 with a JSON-RPC error (not left waiting); once the first ends, requests go through."""
    with trio.fail_after(30):
        async with held_streams(tmp_path, {"max_connections": 1, "pool_timeout": 0.05}) \
                as (url, release), httpx.AsyncClient() as client:
            async with client.stream("GET", url) as held:
                assert held.status_code == 200
                busy = await client.get(url)
                assert busy.status_code == 503
                assert busy.json()["error"]["data"]["code"] == "unavailable"
                release.set()
                assert await held.aread() == b": open\n\n"
            after = await client.get(url)
            assert after.status_code == 200


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


@pytest.mark.one_process  # serves the in-process app behind a forwarder of its own
async def test_mcp_forward_answers_carry_the_relaying_servers_own_headers_once(
    server: BrokerServer, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    """Answers relayed from the serving gateway carry one `date` and one `server` line
    (this gateway's), and no header of the serving hop: an SSE answer, a JSON error, a 405."""
    world = await make_rest_world(client)
    headers = [("authorization", f"Bearer {world.tokens['alice']}"),
               ("content-type", "application/json"),
               ("accept", "application/json, text/event-stream")]
    initialize = (b'{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":'
                  b'"2025-11-25","capabilities":{},"clientInfo":{"name":"raw","version":"1"}}}')
    with trio.fail_after(30):
        async with forwarding_gateway(server, tmp_path / "mcp.sock") as url:
            port = port_of(url.removesuffix("/mcp"))
            answers = [
                await raw_request(port, "POST", "/mcp", headers, [initialize]),
                await raw_request(port, "POST", "/mcp", headers, [b'{"foo": 1}']),
                await raw_request(port, "PUT", "/mcp", headers),
            ]
    assert [answer.status for answer in answers] == [200, 400, 405]
    for answer in answers:
        for name in (b"date", b"server"):
            assert len(answer.header_lines(name)) == 1, (answer.status, name, answer.headers)
        assert answer.header_lines(b"connection") == [], answer.headers
    assert answers[0].header_lines(b"content-type") == [b"text/event-stream"]
    assert len(answers[0].header_lines(b"mcp-session-id")) == 1


EARLY_ANSWER = b'{"early": true}'


@asynccontextmanager
async def raw_serving_side(socket: Path, answer: bool) -> AsyncIterator[None]:
    """A serving side on `socket` that reads each request's head and then reads nothing
    more; answer: it answers 413 at once (as a server that refused a body by its length
    may, without closing), else it never answers."""

    async def handle(stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        while not isinstance(event := conn.next_event(), h11.Request):
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
        if answer:
            await stream.send_all(
                conn.send(h11.Response(status_code=413, headers=[
                    ("content-type", "application/json"),
                    ("content-length", str(len(EARLY_ANSWER)))]))
                + conn.send(h11.Data(data=EARLY_ANSWER)) + conn.send(h11.EndOfMessage()))
        await trio.sleep_forever()

    listening = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await listening.bind(str(socket))
    listening.listen()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, handle, [trio.SocketListener(listening)])
        yield
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def forwarding_to_raw(tmp_path: Path, answer: bool,
                            **options: Any) -> AsyncIterator[tuple[int, McpForwarder]]:
    """A forwarding gateway in front of `raw_serving_side`; yields its port and forwarder."""
    socket = tmp_path / "mcp.sock"
    forwarder = McpForwarder(str(socket), **options)
    gateway = Starlette(routes=[Route("/mcp", forwarder)])
    async with raw_serving_side(socket, answer), serving(gateway, "127.0.0.1:0") as address:
        yield port_of(address), forwarder


# Far more than the socket buffers on the way hold: most of it can only be sent if the
# serving side reads it.
LARGE_BODY = [b" " * 65536] * 128


async def test_mcp_forward_relays_an_answer_that_comes_before_the_body_is_sent(
    tmp_path: Path
) -> None:
    """The serving side answers after the head and reads no more of the 8 MiB body: the
    client gets that answer (the relay stops sending the body), declared or chunked."""
    with trio.fail_after(30):
        async with forwarding_to_raw(tmp_path, answer=True) as (port, forwarder):
            for chunked in (False, True):
                answer = await raw_request(port, "POST", "/mcp", [], LARGE_BODY,
                                           chunked=chunked)
                assert (answer.status, answer.body) == (413, EARLY_ANSWER)
            assert forwarder.forwarded == 2


async def test_mcp_forward_answers_503_when_the_serving_side_takes_no_body(
    tmp_path: Path
) -> None:
    """A serving side that takes none of the body for `stall_timeout` and gives no answer
    gets the request answered 503 (the relay does not wait for it for good)."""
    with trio.fail_after(30):
        async with forwarding_to_raw(tmp_path, answer=False, stall_timeout=0.2) \
                as (port, forwarder):
            answer = await raw_request(port, "POST", "/mcp", [], LARGE_BODY)
            assert answer.status == 503
            assert json.loads(answer.body)["error"]["data"]["code"] == "unavailable"
            assert forwarder.stalled == 1
