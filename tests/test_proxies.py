"""Forwarding headers (`http.trusted_proxies`): ignored from untrusted peers (no spoofing the
rate limits or the refused-token throttle), believed from trusted ones, refused when a
trusted proxy's header cannot be read; and `http.public_url` in the URLs handed out."""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import msgspec
import pytest
import trio
import trio_websocket

from broker.client import connect
from broker.config import ConfigError, Settings, load_settings
from broker.http.proxies import (
    MalformedForwarding,
    TrustedProxies,
    forwarded_by_us,
    node_address,
    parse_forwarded,
)
from broker.ratelimit import RateLimiter, RateLimitSettings
from broker.server import BrokerServer
from tests.helpers.daemon import run_server
from tests.helpers.engine import TEST_DEADLINE_S
from tests.helpers.mcp import SDK_CLIENT_STREAMS, data, mcp_client, mcp_url
from tests.helpers.realtime import raw_socket
from tests.helpers.rest import Reply, call, make_rest_world

LIMITS = RateLimitSettings(anonymous_per_minute=3, auth_failures_per_minute=3)
BAD_TOKEN = "at_live_" + "x" * 40


class Serving(msgspec.Struct):
    server: BrokerServer
    http: httpx.AsyncClient
    limiter: RateLimiter

    def blocked(self, address: str) -> bool:
        """Whether the refused-token throttle blocks `address` now."""
        assert self.limiter.auth_failures is not None
        return not self.limiter.auth_failures.peek(address, self.limiter._now()).allowed

    def remaining(self, address: str) -> int:
        assert self.limiter.auth_failures is not None
        return self.limiter.auth_failures.peek(address, self.limiter._now()).remaining


@asynccontextmanager
async def serving(settings: Settings, **http: Any) -> AsyncIterator[Serving]:
    """A server with LIMITS on a clock that stands still, `http` settings changed, a client."""
    changed = msgspec.structs.replace(
        settings, http=msgspec.structs.replace(settings.http, **http))
    limiter = RateLimiter(LIMITS, clock=lambda: 1000.0)
    with trio.fail_after(TEST_DEADLINE_S):
        async with run_server(changed, limiter=limiter) as server:
            assert server.url is not None
            async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
                yield Serving(server, client, limiter)


async def create(http: httpx.AsyncClient, name: str, headers: dict[str, str]) -> Reply:
    return await call(http, "POST", "/v1/workspaces", json={"name": name}, headers=headers)


async def me(http: httpx.AsyncClient, token: str, headers: dict[str, str]) -> int:
    return (await call(http, "GET", "/v1/agents", token, headers=headers)).status


@pytest.mark.one_process  # an injected rate limiter with a fixed clock
async def test_proxies_spoofed_headers_ignored_from_untrusted_peer(settings: Settings) -> None:
    """With no trusted proxy, a client that sends a new X-Forwarded-For or Forwarded on each
    request is still one address: the anonymous limit and the refused-token throttle stop it
    (a malformed Forwarded is ignored too, not refused)."""
    spoofs = [{"X-Forwarded-For": "198.51.100.1"}, {"Forwarded": "for=198.51.100.2"},
              {"Forwarded": 'for="[2001:db8::1'}, {"X-Forwarded-For": "198.51.100.3",
                                                  "X-Forwarded-Proto": "https"}]
    async with serving(settings) as s:
        world = await make_rest_world(s.http, agents=("alice",))  # one anonymous request
        assert [(await create(s.http, f"w{i}", spoofs[i])).status for i in range(3)] \
            == [201, 201, 429]
        for spoof in spoofs[:3]:
            assert await me(s.http, BAD_TOKEN, spoof) == 401
        assert s.blocked("127.0.0.1")
        assert not s.blocked("198.51.100.3")
        # A good token from the blocked address is refused whatever it claims to be.
        refused = await call(s.http, "GET", "/v1/agents", world.tokens["alice"],
                             headers=spoofs[3])
        assert (refused.status, refused.code) == (429, "rate_limit_exceeded")
        ticket = await call(s.http, "GET", "/openapi.json", headers=spoofs[3])
        assert "servers" not in ticket.body


@pytest.mark.one_process  # an injected rate limiter with a fixed clock
async def test_proxies_trusted_peer_names_the_client(settings: Settings) -> None:
    """From a trusted proxy, the rightmost untrusted address of the chain is the client: the
    throttle blocks that address only, an address the client wrote to its left is not read,
    Forwarded (IPv6 too) is read like X-Forwarded-For, and the protocol makes the URLs https."""
    async with serving(settings, trusted_proxies=["127.0.0.0/8", "10.0.0.0/8"]) as s:
        world = await make_rest_world(s.http, agents=("alice",))
        alice = world.tokens["alice"]
        for _ in range(3):
            assert await me(s.http, BAD_TOKEN, {"X-Forwarded-For": "203.0.113.7"}) == 401
        assert s.blocked("203.0.113.7") and not s.blocked("127.0.0.1")
        assert await me(s.http, alice, {"X-Forwarded-For": "203.0.113.7"}) == 429
        assert await me(s.http, alice, {"X-Forwarded-For": "203.0.113.8"}) == 200
        assert await me(s.http, alice, {}) == 200  # the proxy's own requests
        # Over trusted hops to the client; a spoofed address left of it is never read.
        assert await me(s.http, alice, {"X-Forwarded-For": "203.0.113.7, 10.1.2.3"}) == 429
        assert await me(s.http, alice, {"X-Forwarded-For": "203.0.113.7, 198.51.100.9"}) \
            == 200
        assert await me(s.http, alice, {"X-Forwarded-For": "garbage, 198.51.100.9"}) == 200
        assert await me(s.http, alice, {"Forwarded": 'for=203.0.113.7;proto=https'}) == 429
        assert await me(s.http, alice, {"Forwarded": 'For="203.0.113.7:4711", for=10.0.0.1'}) \
            == 429
        # `unknown` stops at the proxy that reported it (here the peer).
        assert await me(s.http, alice, {"Forwarded": "for=unknown"}) == 200
        assert await me(s.http, BAD_TOKEN, {"Forwarded": 'for="[2001:db8::1]:4711"'}) == 401
        assert s.remaining("2001:db8::/64") == s.remaining("2001:db8:1::/64") - 1
        # The scheme the client used, from the same hop.
        for headers in ({"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https"},
                        {"Forwarded": "for=203.0.113.9;proto=https"}):
            ticket = await call(s.http, "POST", "/v1/files/upload", alice, headers=headers,
                                json={"filename": "a.txt", "content_type": "text/plain",
                                      "size_bytes": 1})
            assert ticket.data["upload_url"].startswith(
                f"https://127.0.0.1:{s.server.port}/v1/files/"), headers


@pytest.mark.one_process  # an injected rate limiter with a fixed clock
@pytest.mark.parametrize(("headers", "scheme", "client"), [
    ({"X-Forwarded-Proto": "https"}, "https", "127.0.0.1"),
    ({"Forwarded": "proto=https"}, "https", "127.0.0.1"),
    ({"X-Forwarded-Proto": "HTTPS"}, "https", "127.0.0.1"),
    ({"X-Forwarded-For": "203.0.113.9"}, "http", "203.0.113.9"),
    ({"Forwarded": "for=203.0.113.9"}, "http", "203.0.113.9"),
    ({"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https"}, "https", "203.0.113.9"),
    ({"Forwarded": "for=203.0.113.9;proto=https"}, "https", "203.0.113.9"),
    # The client's hop names no protocol: the nearest one that does is read.
    ({"Forwarded": "for=203.0.113.9, for=10.0.0.1;proto=https"}, "https", "203.0.113.9"),
    # Not one protocol per address: the nearest proxy's.
    ({"X-Forwarded-For": "203.0.113.9, 10.0.0.1", "X-Forwarded-Proto": "https"}, "https",
     "203.0.113.9"),
])
async def test_proxies_scheme_and_client_read_apart(
    settings: Settings, headers: dict[str, str], scheme: str, client: str
) -> None:
    """From a trusted proxy the forwarded protocol sets the scheme of the URLs handed out with
    or without a forwarded address, and the address sets the client with or without a
    protocol."""
    async with serving(settings, trusted_proxies=["127.0.0.1", "10.0.0.0/8"]) as s:
        world = await make_rest_world(s.http, agents=("alice",))
        ticket = await call(s.http, "POST", "/v1/files/upload", world.tokens["alice"],
                            headers=headers, json={"filename": "a.txt",
                                                   "content_type": "text/plain",
                                                   "size_bytes": 1})
        assert ticket.data["upload_url"].startswith(
            f"{scheme}://127.0.0.1:{s.server.port}/v1/files/")
        # The refused token counts against the client read, and only against it.
        before = {address: s.remaining(address) for address in ("127.0.0.1", "203.0.113.9")}
        assert await me(s.http, BAD_TOKEN, headers) == 401
        assert {address: before[address] - s.remaining(address) for address in before} \
            == {address: int(address == client) for address in before}


@pytest.mark.parametrize("headers", [
    {"Forwarded": 'for="[2001:db8::1'},
    {"Forwarded": "for=198.51.100.999"},
    {"Forwarded": "for"},
    {"Forwarded": "for=198.51.100.1;for=198.51.100.2"},
    {"Forwarded": "for=198.51.100.1 by=x"},
    {"Forwarded": "for=198.51.100.1;proto=gopher"},
    {"X-Forwarded-For": "not-an-address"},
    {"X-Forwarded-For": "198.51.100.1:99999"},
    {"X-Forwarded-For": "198.51.100.1", "X-Forwarded-Proto": "gopher"},
    {"X-Forwarded-Proto": "gopher"},
    {"Forwarded": "proto=gopher"},
    {"Forwarded": "proto=gopher, for=127.0.0.1"},
])
@pytest.mark.one_process  # an injected rate limiter with a fixed clock
async def test_proxies_malformed_header_from_trusted_proxy_refused(
    settings: Settings, headers: dict[str, str]
) -> None:
    """A trusted proxy's header that cannot be read is 400 invalid_forwarded (the client is
    unknown), writes nothing, and a WebSocket handshake gets the same answer."""
    async with serving(settings, trusted_proxies=["127.0.0.1"]) as s:
        refused = await create(s.http, "acme", headers)
        assert (refused.status, refused.code) == (400, "invalid_forwarded")
        assert "cannot be read" in refused.body["error"]["message"]
        with pytest.raises(trio_websocket.ConnectionRejected) as rejected:
            async with raw_socket(s.server, BAD_TOKEN, headers=[
                    (name.lower().encode(), value.encode()) for name, value in headers.items()]):
                pass
        assert rejected.value.status_code == 400
        assert b"invalid_forwarded" in (rejected.value.body or b"")
        # Nothing was written: the name is still free.
        assert (await create(s.http, "acme", {})).status == 201


def test_proxies_forwarded_grammar() -> None:
    """RFC 7239: quoted strings with quoted pairs, several elements, names in any case."""
    assert parse_forwarded('for=192.0.2.60;proto=http;by=203.0.113.43') == [
        {"for": "192.0.2.60", "proto": "http", "by": "203.0.113.43"}]
    assert parse_forwarded('for=192.0.2.43, FOR="[2001:db8:cafe::17]:4711";host="a\\"b"') == [
        {"for": "192.0.2.43"}, {"for": "[2001:db8:cafe::17]:4711", "host": 'a"b'}]
    assert parse_forwarded("for=_hidden, for=unknown;;") == [{"for": "_hidden"},
                                                             {"for": "unknown"}]
    assert node_address("[2001:db8:cafe::17]:4711") == ipaddress.ip_address("2001:db8:cafe::17")
    assert node_address("192.0.2.43:_port") == ipaddress.ip_address("192.0.2.43")
    assert node_address("_hidden") is None and node_address("unknown") is None
    for bad in ('for="x', "for=a b", "=x", "for=x,,;y"):
        with pytest.raises(MalformedForwarding):
            parse_forwarded(bad)
    for node in ("[2001:db8::1", "[2001:db8::1]x", "host.example", "1.2.3.4:http"):
        with pytest.raises(MalformedForwarding):
            node_address(node)


@pytest.mark.one_process  # an injected rate limiter with a fixed clock
@SDK_CLIENT_STREAMS
async def test_proxies_public_url_in_handed_out_urls(settings: Settings) -> None:
    """With public_url, file URLs over REST, WebSocket and MCP and the OpenAPI `servers`
    use it."""
    base = "https://broker.example.com/agents"
    async with serving(settings, public_url=base + "/") as s:
        world = await make_rest_world(s.http, agents=("alice",))
        ticket = await call(s.http, "POST", "/v1/files/upload", world.tokens["alice"],
                            json={"filename": "a.txt", "content_type": "text/plain",
                                  "size_bytes": 1})
        assert ticket.data["upload_url"].startswith(f"{base}/v1/files/{ticket.data['id']}/")
        document = (await s.http.get("/openapi.json")).json()
        assert document["servers"] == [{"url": base}]
        url = f"ws://127.0.0.1:{s.server.port}/v1/ws"
        async with connect(url, world.tokens["alice"]) as alice:
            over_ws = await alice.request("file.upload", filename="b.txt",
                                          content_type="text/plain", size_bytes=1)
        assert over_ws["upload_url"].startswith(f"{base}/v1/files/{over_ws['id']}/")
        async with mcp_client(mcp_url(s.server), world.tokens["alice"]) as tools:
            over_mcp = data(await tools.call_tool("file.upload", {
                "filename": "c.txt", "content_type": "text/plain", "size_bytes": 1}))
        assert over_mcp["upload_url"].startswith(f"{base}/v1/files/{over_mcp['id']}/")


@pytest.mark.parametrize(("variable", "value", "message"), [
    ("BROKER_HTTP_TRUSTED_PROXIES", "10.0.0.0/8,proxy.local",
     "'proxy.local' is not an address or a network"),
    ("BROKER_HTTP_PUBLIC_URL", "broker.example.com", "is not an http:// or https:// URL"),
    ("BROKER_HTTP_PUBLIC_URL", "https://b.example.com/?x=1", "without query or fragment"),
])
def test_proxies_bad_settings_refused(variable: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as refused:
        load_settings(None, {variable: value})
    assert str(refused.value).startswith(variable)


async def test_proxies_unix_socket_peer_is_trusted() -> None:
    """A request over a Unix socket (no peer address: one of the daemon's own processes
    passing a request on) names its client in Forwarded, even with no trusted proxies;
    over TCP the same header is ignored."""
    seen: list[tuple[Any, str]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append((scope["client"], scope["scheme"]))

    middleware = TrustedProxies(app, trusted=[])
    headers = [(b"forwarded", b'for="[2001:db8::5]";proto=https')]
    for client in (None, ("198.51.100.4", 5000)):
        await middleware({"type": "http", "client": client, "scheme": "http",
                          "headers": headers}, None, None)  # type: ignore[arg-type]
    await middleware({"type": "http", "client": None, "scheme": "http", "headers": []},
                     None, None)  # type: ignore[arg-type]
    assert seen == [(("2001:db8::5", 0), "https"), (("198.51.100.4", 5000), "http"),
                    (None, "http")]


async def test_proxies_forwarded_between_processes_keeps_the_client() -> None:
    """A gateway passing a request on (forwarded_by_us) drops what the client sent and
    names the client and scheme it resolved; gateway 0, reached over its Unix socket,
    sees exactly those."""
    seen: list[tuple[Any, str]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append((scope["client"], scope["scheme"]))

    middleware = TrustedProxies(app, trusted=[])
    spoofed = [(b"host", b"broker.example.com"), (b"x-forwarded-for", b"10.9.9.9"),
               (b"forwarded", b"for=10.9.9.9;proto=http")]
    for client, scheme in ((("2001:db8::7", 4000), "https"), (("198.51.100.8", 4000), "http")):
        headers = forwarded_by_us({"client": client, "scheme": scheme}, spoofed)
        assert [h for h in headers if h[0] in (b"x-forwarded-for", b"host")] == [
            (b"host", b"broker.example.com")]
        await middleware({"type": "http", "client": None, "scheme": "http",
                          "headers": headers}, None, None)
    assert seen == [(("2001:db8::7", 0), "https"), (("198.51.100.8", 0), "http")]
