"""The daemon behind the shipped deploy/nginx.conf, run by the test on loopback: the console
and REST over https, a file upload and a Range download, an MCP event stream passed at
once, a wss:// session that is replayed after the daemon restarts behind nginx, and the
client address the daemon sees: the real one only while nginx is a trusted proxy."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import httpx2
import trio
from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client

from broker.client import connect
from broker.config import HttpSettings, ServerSettings, Settings
from broker.console import CONTENT_SECURITY_POLICY
from broker.engine.engine import Engine
from broker.engine.mailbox import seq_marks
from broker.ratelimit import RateLimiter, RateLimitSettings
from broker.server import BrokerServer
from tests.helpers.daemon import FAST_ENGINE
from tests.helpers.engine import make_world
from tests.helpers.mcp import MODERN, SDK_CLIENT_STREAMS, data
from tests.helpers.nginx import free_port, nginx_binary, run_nginx, site_config
from tests.helpers.realtime import post
from tests.helpers.rest import call
from tests.helpers.tls import Certificates, make_certificates

# The address the test's client connects to nginx from: not nginx's own (127.0.0.1).
CLIENT_ADDRESS = "127.0.0.2"
DEADLINE_S = 60
BAD_TOKEN = "at_live_" + "x" * 40


def remaining(limiter: RateLimiter, address: str) -> int:
    """Refused tokens `address` may still present (the throttle's bucket for it)."""
    assert limiter.auth_failures is not None
    return limiter.auth_failures.peek(address, limiter._now()).remaining


@asynccontextmanager
async def mcp_over(url: str, token: str, certs: Certificates) -> AsyncIterator[Client]:
    """The MCP SDK's client on `url` over https trusting the test CA."""
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"},
                                  verify=certs.client_context(),
                                  timeout=httpx2.Timeout(30, read=300)) as http:
        async with Client(streamable_http_client(url, http_client=http), mode=MODERN,
                          cache=None) as client:
            yield client


@SDK_CLIENT_STREAMS
async def test_nginx_proxies_rest_files_sockets_and_client_address(tmp_path: Path) -> None:
    nginx_binary()  # skips (or fails in CI) before anything starts
    certs = make_certificates(tmp_path / "tls")
    data_dir = tmp_path / "data"
    https_port, http_port = free_port(), free_port()
    base = f"https://127.0.0.1:{https_port}"
    limits = RateLimitSettings(auth_failures_per_minute=5)

    def settings(port: int, trusted: list[str]) -> Settings:
        return Settings(data_dir=str(data_dir), engine=FAST_ENGINE, rate_limits=limits,
                        server=ServerSettings(workers=1),
                        http=HttpSettings(host="127.0.0.1", port=port, trusted_proxies=trusted,
                                          shutdown_grace_seconds=1.0))

    transport = httpx.AsyncHTTPTransport(local_address=CLIENT_ADDRESS,
                                         verify=certs.client_context())
    trusting, untrusting = RateLimiter(limits), RateLimiter(limits)
    with trio.fail_after(DEADLINE_S):
        async with trio.open_nursery() as daemons:
            first = BrokerServer(settings(0, ["127.0.0.1"]), limiter=trusting)
            first_stopped = trio.Event()

            async def run_first(*, task_status: trio.TaskStatus[None]) -> None:
                await first.run(task_status=task_status)
                first_stopped.set()

            await daemons.start(run_first)
            port = first.port
            assert port is not None
            access_log = tmp_path / "site-access.log"
            site = site_config(port, https_port, http_port, certs.certfile, certs.keyfile,
                               access_log)
            async with run_nginx(tmp_path / "nginx", site, https_port), \
                    httpx.AsyncClient(base_url=base, transport=transport, timeout=10) as http:
                # Plain HTTP only redirects to https.
                async with httpx.AsyncClient() as plain:
                    moved = await plain.get(f"http://127.0.0.1:{http_port}/v1/agents")
                assert moved.status_code == 301
                assert moved.headers["location"] == "https://127.0.0.1/v1/agents"

                # The console at /, with its own security headers unchanged.
                page = await http.get("/")
                assert page.status_code == 200
                assert page.headers["content-type"].startswith("text/html")
                assert page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY

                # REST over https; nginx is trusted, so the daemon sees the client.
                created = await call(http, "POST", "/v1/workspaces", json={"name": "acme"})
                assert created.status == 201, created.body
                bob = await call(http, "POST", "/v1/agents", created.data["api_key"],
                                 json={"name": "bob"})
                token = bob.data["token"]
                assert (await call(http, "GET", "/v1/agents", BAD_TOKEN)).status == 401
                assert remaining(trusting, CLIENT_ADDRESS) \
                    == remaining(trusting, "127.0.0.1") - 1

                # A file through nginx: the URLs handed out are nginx's https ones.
                blob = bytes(range(256)) * 1000
                ticket = await call(http, "POST", "/v1/files/upload", token, json={
                    "filename": "blob.bin", "content_type": "application/octet-stream",
                    "size_bytes": len(blob)})
                assert ticket.data["upload_url"].startswith(
                    f"{base}/v1/files/{ticket.data['id']}/content?token=")
                put = await http.put(ticket.data["upload_url"], content=blob)
                assert put.status_code == 200, put.text
                done = await call(http, "POST", f"/v1/files/{ticket.data['id']}/complete",
                                  token)
                part = await http.get(done.data["download_url"],
                                      headers={"Range": "bytes=1000-1999"})
                assert part.status_code == 206
                assert part.headers["content-range"] == f"bytes 1000-1999/{len(blob)}"
                assert part.content == blob[1000:2000]

                # MCP through nginx: a listen stream hears of a post at once (unbuffered).
                carol = await call(http, "POST", "/v1/agents", created.data["api_key"],
                                   json={"name": "carol"})
                mcp = f"{base}/mcp"
                async with mcp_over(mcp, token, certs) as bob_mcp, \
                        mcp_over(mcp, carol.data["token"], certs) as carol_mcp:
                    data(await bob_mcp.call_tool("channel.create", {"name": "plan"}))
                    data(await carol_mcp.call_tool("channel.join", {"channel": "plan"}))
                    async with bob_mcp.listen(
                            resource_subscriptions=["broker://channels/plan"]) as stream:
                        data(await carol_mcp.call_tool("message.post",
                                                       {"channel": "plan", "text": "news"}))
                        with trio.fail_after(10):
                            event = await anext(aiter(stream))
                        assert str(getattr(event, "uri", "")) == "broker://channels/plan"

                # A wss:// session through nginx; the daemon behind it restarts.
                world = await make_world(first.engine, name="socket", agents=("ann", "ben"))
                ann, ben_id = world.agents["ann"], world.agents["ben"]
                url = f"wss://127.0.0.1:{https_port}/v1/ws"
                async with connect(url, world.tokens["ben"], auto_ack=False,
                                   ssl_context=certs.client_context()) as ben:
                    deliveries = ben.deliveries()
                    for text in ("one", "two"):
                        await post(first.engine, world.workspace_id, ann, "general", text)
                    got = [await anext(deliveries) for _ in range(2)]
                    assert [(d.seq, d.data["text"]) for d in got] == [(1, "one"), (2, "two")]
                    await ben.ack(1, wait=True)
                    first.stop()
                    await first_stopped.wait()
                    async with Engine.open(data_dir, FAST_ENGINE) as offline:
                        await post(offline, world.workspace_id, ann, "general", "three")
                    # The second daemon does not trust nginx.
                    second = BrokerServer(settings(port, []), limiter=untrusting)
                    await daemons.start(second.run)
                    third = await anext(deliveries)
                    assert (third.seq, third.data["text"]) == (3, "three")
                    # Seq 2 was never acked: replayed on the new connection, and dropped
                    # by the client as a duplicate.
                    assert (ben.connections, ben.duplicates) == (2, 1)
                    await ben.ack(3, wait=True)
                marks = await second.engine.read(seq_marks, world.workspace_id, ben_id)
                assert marks.acked_seq == 3

                # Untrusted, nginx's own address is the client's for the daemon.
                assert (await call(http, "GET", "/v1/agents", BAD_TOKEN)).status == 401
                assert remaining(untrusting, "127.0.0.1") \
                    == remaining(untrusting, CLIENT_ADDRESS) - 1
                listed = await call(http, "GET", "/v1/agents", token)
                assert [a["name"] for a in listed.data] == ["bob", "carol"]
                second.stop()

            # The site's access log has the socket and the signed download, without
            # the tokens their query strings carried.
            logged = access_log.read_text()
            assert " /v1/ws " in logged and "/content " in logged
            assert "token=" not in logged and token not in logged
