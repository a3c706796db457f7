"""The HTTP server itself: health, readiness, metrics, envelopes for bad requests, limits."""

from __future__ import annotations

import json
from typing import Any

import h11
import httpx
import pytest
import trio
import trio_websocket

from broker.server import BrokerServer
from tests.helpers.rest import call, make_rest_world


async def test_healthz_answers(client: httpx.AsyncClient) -> None:
    reply = await call(client, "GET", "/healthz")
    assert reply.status == 200
    assert reply.data == {"status": "ok"}


async def test_readyz_is_ready_while_the_writer_runs(client: httpx.AsyncClient) -> None:
    reply = await call(client, "GET", "/readyz")
    assert reply.status == 200
    assert reply.data == {"status": "ready"}


async def test_readyz_is_503_when_the_writer_has_stopped(
    server: BrokerServer, client: httpx.AsyncClient
) -> None:
    # Closed for commands: readiness fails whether or not the task has ended yet.
    await server.engine.writer.aclose()
    reply = await call(client, "GET", "/readyz")
    assert reply.status == 503
    assert reply.code == "not_ready"


async def test_readyz_is_503_when_the_database_is_not_writable(
    server: BrokerServer, client: httpx.AsyncClient
) -> None:
    # Another connection holds the write lock: the writer cannot begin a
    # write transaction within the readiness timeout.
    import apsw

    engine = server.engine
    path = engine.writer.db_path
    other = apsw.Connection(str(path))
    other.set_busy_timeout(0)
    other.execute("BEGIN IMMEDIATE")
    try:
        reply = await call(client, "GET", "/readyz")
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert reply.status == 503
    assert reply.code == "not_ready"
    assert (await call(client, "GET", "/readyz")).status == 200


async def test_server_unknown_route_404(client: httpx.AsyncClient) -> None:
    """Unknown route is 404 in the envelope."""
    reply = await call(client, "GET", "/v1/nothing-here")
    assert reply.status == 404
    assert reply.code == "not_found"
    trailing = await call(client, "POST", "/v1/workspaces/")
    assert trailing.status == 404


async def test_server_wrong_method_405(client: httpx.AsyncClient) -> None:
    """Wrong method is 405 in the envelope."""
    response = await client.request("PUT", "/v1/workspaces")
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"
    assert "POST" in response.headers["allow"]


@pytest.mark.parametrize(("method", "path", "allowed"), [
    ("PUT", "/v1/workspaces", "POST"),
    ("PUT", "/v1/channels", "GET, HEAD, POST"),
    ("PUT", "/v1/workspace", "GET, HEAD, PATCH, DELETE"),
    ("PUT", "/v1/channels/ops", "GET, HEAD, PATCH, DELETE"),
    ("DELETE", "/v1/channels/ops/messages", "GET, HEAD, POST"),
    ("POST", "/v1/files/1/content", "GET, HEAD, PUT"),
    ("POST", "/healthz", "GET, HEAD"),
])
async def test_server_405_allow_lists_every_method_of_the_path(
    client: httpx.AsyncClient, method: str, path: str, allowed: str
) -> None:
    """A 405's Allow names every method the path serves, HEAD with GET; each is served."""
    response = await client.request(method, path)
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"
    assert response.headers["allow"] == allowed
    for other in allowed.split(", "):
        assert (await client.request(other, path)).status_code != 405, other


async def test_body_malformed_json_400(client: httpx.AsyncClient) -> None:
    """Malformed JSON is 400 invalid_json."""
    reply = await call(client, "POST", "/v1/workspaces", content=b'{"name": ')
    assert reply.status == 400
    assert reply.code == "invalid_json"


async def test_body_not_an_object_invalid_request(
    client: httpx.AsyncClient,
) -> None:
    """A body that is not an object is invalid_request."""
    reply = await call(client, "POST", "/v1/workspaces", json=["acme"])
    assert reply.status == 400
    assert reply.code == "invalid_request"


async def test_body_missing_field_named(client: httpx.AsyncClient) -> None:
    """A missing field is invalid_request, naming it."""
    reply = await call(client, "POST", "/v1/workspaces", json={})
    assert reply.status == 400
    assert reply.code == "invalid_request"
    assert "name" in reply.body["error"]["message"]


async def test_body_wrong_type_names_field(
    client: httpx.AsyncClient,
) -> None:
    """A wrong type is invalid_request, naming the field."""
    world = await make_rest_world(client, agents=("alice",))
    reply = await call(
        client, "POST", "/v1/channels/general/messages", world.tokens["alice"], json={"text": 5}
    )
    assert reply.status == 400
    assert reply.code == "invalid_request"
    assert "$.text" in reply.body["error"]["message"]


async def raw_post(port: int, path: str, token: str, head: bytes, body_chunks: list[bytes],
                   chunked: bool) -> tuple[int, dict[str, Any]]:
    """POST over a raw socket, reading the response while the body is still being sent.

    (httpx stops reading when its write fails, and the server closes the
    connection as soon as it refused the body, so a raw socket shows what a
    client that reads concurrently, like curl, sees.)
    """
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    framing = b"Transfer-Encoding: chunked" if chunked else (
        b"Content-Length: %d" % sum(len(c) for c in body_chunks))
    await stream.send_all(
        b"POST " + path.encode() + b" HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer "
        + token.encode() + b"\r\n" + framing + b"\r\n\r\n" + head
    )
    received = bytearray()

    async def send_body() -> None:
        try:
            for chunk in body_chunks:
                await stream.send_all(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    def complete() -> bool:
        # the whole response is in: the server may keep the connection open
        # (having drained the body) instead of closing it
        header, found, payload = bytes(received).partition(b"\r\n\r\n")
        if not found:
            return False
        for line in header.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                return len(payload) >= int(value)
        return False

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_body)
        try:
            while not complete() and (data := await stream.receive_some(65536)):
                received += data
        except trio.BrokenResourceError:
            pass
        nursery.cancel_scope.cancel()
    await stream.aclose()
    header, _, payload = bytes(received).partition(b"\r\n\r\n")
    status = int(header.split(b" ")[1])
    return status, json.loads(payload)


async def test_body_over_the_limit_is_413_and_writes_nothing(
    server: BrokerServer, client: httpx.AsyncClient
) -> None:
    world = await make_rest_world(client, agents=("alice",))
    limit = server.settings.http.max_body_bytes
    assert server.port is not None
    status, body = await raw_post(
        server.port, "/v1/channels/general/messages", world.tokens["alice"],
        b"", [b'{"text": "', b"x" * limit, b'"}'], chunked=False,
    )
    assert status == 413
    assert body["error"]["code"] == "payload_too_large"
    count = await server.engine.read(
        lambda c: c.execute("SELECT count(*) FROM messages").fetchone()[0]
    )
    assert count == 0
    # The daemon keeps serving.
    assert (await call(client, "GET", "/healthz")).status == 200


async def test_body_over_the_limit_is_refused_while_streaming(
    server: BrokerServer, client: httpx.AsyncClient
) -> None:
    # Chunked, no Content-Length: the limit is enforced as the bytes arrive,
    # before the body ends (the sender would go on for 4x the limit).
    world = await make_rest_world(client, agents=("alice",))
    limit = server.settings.http.max_body_bytes
    assert server.port is not None
    chunks = [b'{"text": "'] + [b"y" * 65536] * (4 * limit // 65536) + [b'"}']
    status, body = await raw_post(
        server.port, "/v1/channels/general/messages", world.tokens["alice"],
        b"", chunks, chunked=True,
    )
    assert status == 413
    assert body["error"]["code"] == "payload_too_large"
    assert (await call(client, "GET", "/healthz")).status == 200


async def test_body_just_under_limit_is_read(
    server: BrokerServer, client: httpx.AsyncClient
) -> None:
    """A body just under the limit is read."""
    # At the limit the body is read and judged by the domain rules instead.
    world = await make_rest_world(client, agents=("alice",))
    limit = server.settings.http.max_body_bytes
    text = "z" * (limit - len('{"text": ""}'))
    reply = await call(
        client, "POST", "/v1/channels/general/messages", world.tokens["alice"],
        content=('{"text": "' + text + '"}').encode(),
    )
    assert reply.status == 400
    assert reply.code == "text_too_long"


async def test_metrics_report_requests_writer_and_deliveries(
    client: httpx.AsyncClient,
) -> None:
    world = await make_rest_world(client, agents=("alice", "bob"))
    sent = await call(
        client, "POST", "/v1/channels/general/messages", world.tokens["alice"],
        json={"text": "hello"},
    )
    assert sent.status == 201
    await call(client, "GET", "/v1/nothing-here")
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert (
        'broker_http_requests_total{method="POST",route="/v1/channels/{channel}/messages",'
        'status="201"} 1.0' in text
    )
    assert 'broker_http_requests_total{method="GET",route="unmatched",status="404"} 1.0' in text
    assert "broker_writer_queue_depth 0.0" in text
    assert 'broker_writer_batch_size_bucket{le="+Inf"}' in text
    assert "broker_writer_commit_seconds_count" in text
    for stage in ("queue", "apply", "sync"):
        assert f"broker_writer_{stage}_seconds_count" in text
    samples = {name: float(value) for name, value in
               (line.split(" ") for line in text.splitlines() if line.startswith("broker_writer_"))}
    for stage in ("apply", "sync"):
        assert samples[f"broker_writer_{stage}_cpu_seconds_total"] > 0
    assert "broker_open_sessions 0.0" in text
    # bob got one delivery of alice's message and has not acknowledged it.
    assert "broker_pending_deliveries 1.0" in text


async def shows(client: httpx.AsyncClient, line: str, attempts: int = 500) -> bool:
    """Whether /metrics shows `line` within `attempts` scrapes, 10 ms apart."""
    for _ in range(attempts):
        if line in (await client.get("/metrics")).text:
            return True
        await trio.sleep(0.01)
    return False


async def test_metrics_open_sessions_count_websockets(
    server: BrokerServer, client: httpx.AsyncClient
) -> None:
    """open_sessions counts WebSocket sessions."""
    world = await make_rest_world(client, agents=("alice",))
    url = f"ws://127.0.0.1:{server.port}/v1/ws?token={world.tokens['alice']}"
    async with trio_websocket.open_websocket_url(url):
        assert await shows(client, "broker_open_sessions 1.0")
    assert await shows(client, "broker_open_sessions 0.0")


async def test_server_reports_its_real_port(server: BrokerServer) -> None:
    assert server.port is not None and server.port > 0
    assert server.url == f"http://127.0.0.1:{server.port}"


async def _answer(stream: trio.SocketStream, conn: h11.Connection) -> h11.Response:
    """Read the response head off a raw connection."""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.Response):
            return event


async def test_body_early_413_closes_connection(
    server: BrokerServer, client: httpx.AsyncClient
) -> None:
    """An early 413 says Connection: close, and the next connection works.

    The server drops a connection whose body it did not read: the answer must say so.
    """
    world = await make_rest_world(client, agents=("alice",))
    limit = server.settings.http.max_body_bytes
    assert server.port is not None
    # Refused on the declared length, with most of the body still unsent.
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    conn = h11.Connection(h11.CLIENT)
    await stream.send_all(conn.send(h11.Request(
        method="POST", target="/v1/channels/general/messages",
        headers=[("host", "broker"), ("authorization", f"Bearer {world.tokens['alice']}"),
                 ("content-length", str(limit + 1))])))
    await stream.send_all(conn.send(h11.Data(data=b'{"text": "' + b"x" * 100)))
    answer = await _answer(stream, conn)
    assert answer.status_code == 413
    assert (b"connection", b"close") in list(answer.headers)
    # And the server does close it: the rest of the answer, then end of stream.
    while await stream.receive_some(65536):
        pass
    await stream.aclose()

    # A new connection works; on it, an answer given after the body was read
    # keeps the connection alive, and one given before says close again.
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    conn = h11.Connection(h11.CLIENT)
    body = b'{"text": "hi"}'
    for token, status, close in ((world.tokens["alice"], 201, False),
                                 ("at_live_nope", 401, True)):
        # One write: the request whole, before the server may answer it.
        await stream.send_all(b"".join((
            conn.send(h11.Request(
                method="POST", target="/v1/channels/general/messages",
                headers=[("host", "broker"), ("authorization", f"Bearer {token}"),
                         ("content-length", str(len(body)))])) or b"",
            conn.send(h11.Data(data=body)) or b"", conn.send(h11.EndOfMessage()) or b"")))
        answer = await _answer(stream, conn)
        assert answer.status_code == status
        assert ((b"connection", b"close") in list(answer.headers)) is close
        while not isinstance(event := conn.next_event(), h11.EndOfMessage):
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
        if not close:
            conn.start_next_cycle()
    await stream.aclose()
    assert (await call(client, "GET", "/healthz")).status == 200
