"""Request bodies that stop coming: a client that stalls mid-body gets 408, one that
closes mid-body is no server error.

Before, a body announced with Content-Length and never finished held its
request open for good (hypercorn times out headers, not bodies), and a
client that closed mid-body was logged as an ERROR with a traceback and
counted as a 500 in /metrics. In one process: the stall bound is patched
short for the test.
"""

from __future__ import annotations

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from broker.http import keepalive
from broker.server import BrokerServer
from tests.helpers.realtime import eventually
from tests.helpers.rest import make_rest_world

pytestmark = pytest.mark.one_process

SEND = "/v1/channels/general/messages"


def head(token: str, length: int) -> bytes:
    return (f"POST {SEND} HTTP/1.1\r\nHost: broker\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n").encode()


async def stalled(server: BrokerServer, request_head: bytes) -> bytes:
    """Send `request_head` and one byte of its body, then nothing; all the server answers."""
    assert server.port is not None
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    received = b""
    async with stream:
        await stream.send_all(request_head + b"{")
        with trio.fail_after(10):
            while data := await stream.receive_some(65536):
                received += data
    return received


async def messages(server: BrokerServer) -> int:
    return int(await server.engine.read(
        lambda conn: conn.execute("SELECT count(*) FROM messages").fetchone()[0]))


async def statuses(client: httpx.AsyncClient, route: str) -> dict[str, float]:
    text = (await client.get("/metrics")).text
    return {sample.labels["status"]: sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "broker_http_requests_total"
            and sample.labels.get("route") == route}


async def test_a_stalled_body_is_answered_408_and_writes_nothing(
    server: BrokerServer, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(keepalive, "BODY_STALL_SECONDS", 0.5)
    world = await make_rest_world(client, agents=("alice",))
    received = await stalled(server, head(world.tokens["alice"], 50))
    status_line, _, rest = received.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 408 ", received
    assert b'"code":"request_timeout"' in rest
    assert b"no byte of the body came for 0.5 seconds" in rest
    assert await messages(server) == 0
    # the daemon serves on
    sent = await client.post(SEND, json={"text": "after"},
                             headers={"Authorization": f"Bearer {world.tokens['alice']}"})
    assert sent.status_code == 201


async def test_a_stalled_mcp_body_is_answered_408(
    server: BrokerServer, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The MCP endpoint reads its bodies itself: the same bound."""
    monkeypatch.setattr(keepalive, "BODY_STALL_SECONDS", 0.5)
    world = await make_rest_world(client, agents=("alice",))
    received = await stalled(server, (
        f"POST /mcp HTTP/1.1\r\nHost: broker\r\nAuthorization: Bearer {world.tokens['alice']}"
        "\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream"
        "\r\nContent-Length: 50\r\n\r\n").encode())
    status_line, _, rest = received.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 408 ", received
    assert b"no byte of the body came for 0.5 seconds" in rest


async def test_a_client_closing_mid_body_is_not_a_server_error(
    server: BrokerServer, client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture,
) -> None:
    world = await make_rest_world(client, agents=("alice",))
    assert server.port is not None
    for _ in range(3):
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        await stream.send_all(head(world.tokens["alice"], 50) + b"{")
        await stream.aclose()

    route = SEND.replace("general", "{channel}")

    async def counted() -> bool:
        return (await statuses(client, route)).get("499", 0) >= 3

    await eventually(counted)
    found = await statuses(client, route)
    assert found.get("499") == 3 and "500" not in found, found
    assert await messages(server) == 0
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
