"""Rate limits and caps: the GCRA buckets alone, then over REST and WebSocket on a live server.

Time is a fake clock handed to the server's RateLimiter, so a refill is a
step of the clock, never a wait.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import msgspec
import pytest
import trio
import trio_websocket

from broker.config import HttpSettings, ServerSettings, Settings, load_settings
from broker.gateway.settings import GatewaySettings
from broker.ratelimit import (
    UNLIMITED,
    Bucket,
    RateLimited,
    RateLimiter,
    RateLimitSettings,
    client_address,
)
from broker.server import BrokerServer
from tests.helpers.daemon import FAST_ENGINE, run_server
from tests.helpers.engine import TEST_DEADLINE_S, make_world
from tests.helpers.realtime import Live, close_of, next_frame, raw_socket, send_json
from tests.helpers.rest import call, uploaded

SECOND = 1_000_000_000


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- the buckets alone --------------------------------------------------------------------


def test_bucket_allows_a_burst_of_the_limit_then_one_per_interval() -> None:
    """L per minute: L at once, the next refused until 60/L s later, full again after 60 s."""
    bucket = Bucket(3)
    now = 5 * SECOND
    verdicts = [bucket.take("k", now) for _ in range(3)]
    assert [v.allowed for v in verdicts] == [True, True, True]
    assert [v.remaining for v in verdicts] == [2, 1, 0]
    refused = bucket.take("k", now)
    assert not refused.allowed
    assert refused.retry_after_seconds == pytest.approx(20.0)
    assert refused.headers()["Retry-After"] == "20"
    assert refused.headers()["X-RateLimit-Reset"] == "60"
    assert not bucket.take("k", now + 20 * SECOND - 1).allowed
    assert bucket.take("k", now + 20 * SECOND).allowed
    assert bucket.peek("k", now + 80 * SECOND).remaining == 2  # full: one more than after a take


def test_bucket_retry_after_rounds_up_to_whole_seconds() -> None:
    bucket = Bucket(7)  # one every 8.57 s
    for _ in range(7):
        bucket.take("k", 0)
    refused = bucket.take("k", 0)
    assert refused.headers()["Retry-After"] == "9"
    assert refused.retry_after_ms == 8572


def test_bucket_memory_is_bounded_under_a_flood_of_distinct_keys() -> None:
    """Idle keys go at each sweep; past max_keys the least recently used go too."""
    bucket = Bucket(60, max_keys=2000)
    for i in range(50_000):
        bucket.take(f"10.0.{i // 256}.{i % 256}", i * 1000)  # all within one second
        assert len(bucket) <= bucket.max_keys
    # The most recent key is kept: its request still counts (a new key would show 59).
    assert bucket.peek(f"10.0.{49_999 // 256}.{49_999 % 256}", 49_999_000).remaining == 58
    # Once every key's time has passed, the next sweep drops them all.
    later = 3600 * SECOND
    for i in range(2048):
        bucket.take(("late", i), later)
        assert len(bucket) <= bucket.max_keys


def test_limiter_refuses_on_the_tightest_bucket_and_counts_nothing_then() -> None:
    clock = FakeClock()
    limiter = RateLimiter(RateLimitSettings(workspace_per_minute=2, agent_per_minute=10),
                          clock=clock)
    limiter.take_request("message.send", 1, 7, "a")
    verdict = limiter.take_request("message.send", 1, 8, "a")
    assert verdict is not None and verdict.limit == 2 and verdict.remaining == 0
    with pytest.raises(RateLimited) as refused:
        limiter.take_request("message.send", 1, 9, "a")
    assert refused.value.code == "rate_limit_exceeded"
    assert limiter.statistics().workspace == 1
    # The agent bucket was not charged for the refused request.
    assert limiter.agents is not None
    assert limiter.agents.peek(9, limiter._now()).remaining == 9


def test_limiter_never_limits_acks_mailbox_reads_and_heartbeats() -> None:
    limiter = RateLimiter(RateLimitSettings(workspace_per_minute=1, agent_per_minute=1),
                          clock=FakeClock())
    limiter.take_request("message.send", 1, 1, "a")
    for _ in range(10):
        for name in ("delivery.ack_one", "delivery.ack_up_to", "delivery.list",
                     "agent.heartbeat"):
            assert limiter.take_request(name, 1, 1, "a") is None


def test_limiter_counts_giving_deliveries_back() -> None:
    """delivery.fail and delivery.defer are writer commands: counted, and refused past the limit."""
    limiter = RateLimiter(RateLimitSettings(agent_per_minute=2), clock=FakeClock())
    assert limiter.take_request("delivery.fail", 1, 1, "a") is not None
    assert limiter.take_request("delivery.defer", 1, 1, "a") is not None
    for name in ("delivery.fail", "delivery.defer"):
        with pytest.raises(RateLimited):
            limiter.take_request(name, 1, 1, "a")
    assert limiter.statistics().agent == 2


def test_limiter_with_zero_limits_limits_nothing() -> None:
    limiter = RateLimiter(UNLIMITED, clock=FakeClock())
    for _ in range(1000):
        assert limiter.take_request("message.send", 1, 1, "a") is None
        assert limiter.take_request("workspace.create", None, None, "a") is None
        limiter.auth_failed("a")
    limiter.check_auth("a")  # does not raise
    assert limiter.statistics().tracked_keys == 0


def test_rate_limit_settings_from_the_environment() -> None:
    settings = load_settings(None, {"BROKER_RATE_LIMITS_AGENT_PER_MINUTE": "60",
                                    "BROKER_RATE_LIMITS_WORKSPACE_PER_MINUTE": "0",
                                    "BROKER_GATEWAY_MAX_SESSIONS_PER_AGENT": "2"})
    assert settings.rate_limits.agent_per_minute == 60
    assert settings.rate_limits.workspace_per_minute == 0
    assert settings.rate_limits.anonymous_per_minute == 60
    assert settings.gateway.max_sessions_per_agent == 2
    assert settings.gateway.max_sessions == 20_000


def test_client_address_is_the_tcp_peer_and_ipv6_by_64() -> None:
    assert client_address({"client": ("10.1.2.3", 5555)}) == "10.1.2.3"
    assert client_address({"client": ("2001:db8:1:2:aaaa::1", 1)}) == "2001:db8:1:2::/64"
    assert client_address({"client": ("2001:db8:1:2:bbbb::9", 1)}) == "2001:db8:1:2::/64"
    assert client_address({"client": ("::ffff:10.1.2.3", 1)}) == "10.1.2.3"
    assert client_address({"client": None}) == "unknown"


# -- a live server with small limits and a fake clock ---------------------------------------


class Limited(Live):
    """The shared `Live`, with the rate limiter's fake clock."""

    clock: FakeClock = msgspec.field(default_factory=FakeClock)


@asynccontextmanager
async def limited(
    tmp_path: Path, limits: RateLimitSettings,
    gateway: GatewaySettings | None = None,
) -> AsyncIterator[Limited]:
    settings = Settings(
        data_dir=str(tmp_path / "data"), engine=FAST_ENGINE, server=ServerSettings(workers=1),
        http=HttpSettings(host="127.0.0.1", port=0, shutdown_grace_seconds=1.0),
        gateway=gateway or GatewaySettings(), rate_limits=limits,
    )
    clock = FakeClock()
    with trio.fail_after(TEST_DEADLINE_S):
        async with run_server(settings, limiter=RateLimiter(limits, clock=clock)) as server:
            world = await make_world(server.engine)
            async with httpx.AsyncClient(base_url=str(server.url), timeout=10) as http:
                yield Limited(server, world, http, clock)


async def count(server: BrokerServer, table: str) -> int:
    row = await server.engine.read(
        lambda c: c.execute(f"SELECT count(*) FROM {table}").fetchone())
    return int(row[0])


async def metric(live: Limited, reason: str) -> float:
    text = (await live.http.get("/metrics")).text
    line = f'broker_refusals_total{{reason="{reason}"}} '
    found = [row for row in text.splitlines() if row.startswith(line)]
    assert found, text
    return float(found[0][len(line):])


async def test_rest_over_the_agent_limit_is_429_with_retry_after_and_writes_nothing(
    tmp_path: Path,
) -> None:
    """Three sends pass with X-RateLimit-*, the fourth is 429 and writes no row.

    20 s later (one interval) one more passes.
    """
    async with limited(tmp_path, RateLimitSettings(agent_per_minute=3)) as live:
        alice = live.world.tokens["alice"]
        for remaining in (2, 1, 0):
            sent = await live.http.post("/v1/dm", json={"to": "bob", "text": "hi"},
                                        headers={"Authorization": f"Bearer {alice}"})
            assert sent.status_code == 201, sent.text
            assert sent.headers["X-RateLimit-Limit"] == "3"
            assert sent.headers["X-RateLimit-Remaining"] == str(remaining)
        messages, deliveries = await count(live.server, "messages"), \
            await count(live.server, "deliveries")
        refused = await live.http.post("/v1/dm", json={"to": "bob", "text": "hi"},
                                       headers={"Authorization": f"Bearer {alice}"})
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert refused.headers["Retry-After"] == "20"
        assert refused.headers["X-RateLimit-Limit"] == "3"
        assert refused.headers["X-RateLimit-Remaining"] == "0"
        assert refused.headers["X-RateLimit-Reset"] == "60"
        assert await count(live.server, "messages") == messages
        assert await count(live.server, "deliveries") == deliveries
        # Bob's own bucket spent on counted requests: his next counted request
        # is refused, while his mailbox reads and acks still pass.
        bob = live.world.tokens["bob"]
        for _ in range(3):
            assert (await call(live.http, "GET", "/v1/channels", bob)).status == 200
        spent = await call(live.http, "GET", "/v1/channels", bob)
        assert (spent.status, spent.code) == (429, "rate_limit_exceeded")
        for _ in range(5):
            listed = await call(live.http, "GET", "/v1/deliveries", bob)
            assert listed.status == 200, listed.body
        acked = await call(live.http, "POST", "/v1/deliveries/ack", bob, json={"up_to_seq": 3})
        assert acked.status == 200, acked.body
        assert (await call(live.http, "GET", "/v1/channels", bob)).status == 429
        assert await metric(live, "agent") == 3
        # Another agent of the workspace has its own bucket.
        other = await call(live.http, "POST", "/v1/dm", live.world.tokens["carol"],
                           json={"to": "bob", "text": "hi"})
        assert other.status == 201
        live.clock.now += 20
        again = await call(live.http, "POST", "/v1/dm", alice, json={"to": "bob", "text": "hi"})
        assert again.status == 201


async def test_rest_anonymous_routes_are_limited_by_address(tmp_path: Path) -> None:
    """workspace.create past anonymous_per_minute is 429 and creates nothing.

    X-Forwarded-For is not trusted: it changes nothing.
    """
    async with limited(tmp_path, RateLimitSettings(anonymous_per_minute=2)) as live:
        for i in range(2):
            made = await call(live.http, "POST", "/v1/workspaces", json={"name": f"w{i}"})
            assert made.status == 201
        before = await count(live.server, "workspaces")
        refused = await call(live.http, "POST", "/v1/workspaces", json={"name": "w9"},
                             headers={"X-Forwarded-For": "203.0.113.9"})
        assert refused.status == 429 and refused.code == "rate_limit_exceeded"
        assert refused.body["error"]["message"].startswith(
            "rate limit exceeded: 2 requests per minute per client address"
            " (requests without a token); retry in ")
        assert await count(live.server, "workspaces") == before
        lookup = await call(live.http, "GET", "/v1/workspaces/by-name/w0")
        assert lookup.status == 429
        assert await metric(live, "anonymous") == 2
        # Authenticated requests are not the anonymous bucket's business.
        me = await call(live.http, "GET", "/v1/agent", live.world.tokens["alice"])
        assert me.status == 200
        live.clock.now += 30
        assert (await call(live.http, "GET", "/v1/workspaces/by-name/w0")).status == 200


async def test_auth_failures_block_the_address_even_for_a_good_token(tmp_path: Path) -> None:
    """Past auth_failures_per_minute refused tokens: REST 429, WebSocket 4429, even a good token."""
    async with limited(tmp_path, RateLimitSettings(auth_failures_per_minute=3)) as live:
        alice = live.world.tokens["alice"]
        for _ in range(3):
            bad = await call(live.http, "GET", "/v1/agent", "at_live_guess")
            assert bad.status == 401
        blocked = await live.http.get("/v1/agent", headers={"Authorization": f"Bearer {alice}"})
        assert blocked.status_code == 429
        assert blocked.json()["error"]["code"] == "rate_limit_exceeded"
        assert blocked.headers["Retry-After"] == "20"
        async with raw_socket(live.server, alice) as ws:
            closed = await close_of(ws)
        assert closed[0] == 4429 and "refused tokens" in closed[1]
        # A request without a token is no guess: the open routes still answer.
        assert (await call(live.http, "GET", "/v1/workspaces/by-name/acme")).status == 200
        assert await metric(live, "auth_failures") == 2
        live.clock.now += 20
        assert (await call(live.http, "GET", "/v1/agent", alice)).status == 200


async def test_websocket_auth_failures_count_too(tmp_path: Path) -> None:
    async with limited(tmp_path, RateLimitSettings(auth_failures_per_minute=2)) as live:
        for token in ("at_live_guess", "nt_live_guess"):
            path = "/v1/node/ws" if token.startswith("nt_") else "/v1/ws"
            with pytest.raises(trio_websocket.ConnectionRejected) as rejected:
                async with raw_socket(live.server, token, path=path):
                    pass
            assert rejected.value.status_code == 401
        async with raw_socket(live.server, live.world.tokens["alice"]) as ws:
            assert (await close_of(ws))[0] == 4429
        blocked = await call(live.http, "GET", "/v1/agent", live.world.tokens["alice"])
        assert blocked.status == 429


async def test_websocket_over_the_limit_gets_an_error_reply_and_stays_open(
    tmp_path: Path,
) -> None:
    """A refused request gets rate_limit_exceeded with retry_after_ms; pings and acks still pass."""
    async with limited(tmp_path, RateLimitSettings(agent_per_minute=2)) as live:
        async with raw_socket(live.server, live.world.tokens["bob"]) as bob, \
                raw_socket(live.server, live.world.tokens["alice"]) as ws:
            for n in range(2):
                await send_json(ws, {"v": 1, "id": f"s{n}", "type": "dm.send", "to": "bob",
                                     "text": "hi"})
                reply = await next_frame(ws, "reply")
                assert reply["ok"] is True, reply
            messages = await count(live.server, "messages")
            await send_json(ws, {"v": 1, "id": "s2", "type": "dm.send", "to": "bob",
                                 "text": "hi"})
            reply = await next_frame(ws, "reply")
            assert reply["re"] == "s2" and reply["ok"] is False
            assert reply["error"]["code"] == "rate_limit_exceeded"
            assert reply["error"]["retry_after_ms"] == 30_000
            assert await count(live.server, "messages") == messages
            # Still open: pings answered.
            await send_json(ws, {"v": 1, "id": "p", "type": "ping"})
            assert (await next_frame(ws, "pong"))["re"] == "p"
            seqs = [(await next_frame(bob, "deliver"))["seq"] for _ in range(2)]
            # Bob spends his own bucket on counted requests: his next counted
            # request is refused, while his pings, acks and mailbox reads pass.
            for n in range(3):
                await send_json(bob, {"v": 1, "id": f"c{n}", "type": "channel.list"})
                reply = await next_frame(bob, "reply")
                assert reply["ok"] is (n < 2), reply
            assert reply["error"]["code"] == "rate_limit_exceeded"
            await send_json(bob, {"v": 1, "id": "bp", "type": "ping"})
            assert (await next_frame(bob, "pong"))["re"] == "bp"
            for seq in seqs:
                await send_json(bob, {"v": 1, "id": f"a{seq}", "type": "delivery.ack",
                                      "up_to_seq": seq})
                assert (await next_frame(bob, "reply"))["ok"] is True
            await send_json(bob, {"v": 1, "id": "l", "type": "delivery.list"})
            listed = await next_frame(bob, "reply")
            assert listed["ok"] is True, listed
            await send_json(bob, {"v": 1, "id": "c3", "type": "channel.list"})
            assert (await next_frame(bob, "reply"))["ok"] is False
            live.clock.now += 30
            await send_json(ws, {"v": 1, "id": "s3", "type": "dm.send", "to": "bob",
                                 "text": "hi"})
            assert (await next_frame(ws, "reply"))["ok"] is True
        assert await metric(live, "agent") == 3


async def test_session_cap_per_agent_closes_the_next_with_4429(tmp_path: Path) -> None:
    """Native and node sockets of one agent count together; another agent is not affected."""
    gateway = GatewaySettings(max_sessions_per_agent=2)
    async with limited(tmp_path, RateLimitSettings(), gateway) as live:
        alice = live.world.tokens["alice"]
        node = await call(live.http, "POST", "/v1/agent/node-token", alice)
        assert node.status == 201, node.body
        async with raw_socket(live.server, alice) as first, \
                raw_socket(live.server, node.data["token"], path="/v1/node/ws") as second:
            await send_json(first, {"v": 1, "id": "p", "type": "ping"})
            await next_frame(first, "pong")
            await send_json(second, {"v": 1, "type": "node.register", "id": "r"})
            await next_frame(second)
            async with raw_socket(live.server, alice) as third:
                code, reason = await close_of(third)
            assert code == 4429 and "limit of 2 sockets" in reason
            async with raw_socket(live.server, live.world.tokens["bob"]) as bob:
                await send_json(bob, {"v": 1, "id": "p", "type": "ping"})
                assert (await next_frame(bob, "pong"))["re"] == "p"
        assert await metric(live, "sessions_per_agent") == 1
        # Closed sockets give their places back.
        async with raw_socket(live.server, alice) as again:
            await send_json(again, {"v": 1, "id": "p", "type": "ping"})
            assert (await next_frame(again, "pong"))["re"] == "p"


async def test_total_session_cap_closes_the_next_with_1013(tmp_path: Path) -> None:
    """Observers count toward max_sessions too."""
    gateway = GatewaySettings(max_sessions=2)
    async with limited(tmp_path, RateLimitSettings(), gateway) as live:
        async with raw_socket(live.server, live.world.tokens["alice"]) as one, \
                raw_socket(live.server, live.world.key) as observer:
            await send_json(one, {"v": 1, "id": "p", "type": "ping"})
            await next_frame(one, "pong")
            await send_json(observer, {"type": "ping"})
            await next_frame(observer, "pong")
            async with raw_socket(live.server, live.world.tokens["bob"]) as bob:
                code, reason = await close_of(bob)
            assert code == 1013 and "try again later" in reason
        assert await metric(live, "sessions") == 1


# -- the routes bound outside the operation table -------------------------------------------


async def test_file_content_route_is_behind_the_refused_token_limit(tmp_path: Path) -> None:
    """GET /v1/files/{id}/content: bad bearer tokens and bad signatures count towards the
    block, and a blocked address gets 429 there, for a good token as for a good signed URL,
    so the route no longer tells a good token from a bad one."""
    async with limited(tmp_path, RateLimitSettings(auth_failures_per_minute=3)) as live:
        alice = live.world.tokens["alice"]
        done = await uploaded(live.http, alice, b"hello")
        path = f"/v1/files/{done['id']}/content"
        signed = str(done["download_url"])
        assert (await live.http.get(signed)).content == b"hello"
        bad = await live.http.get(path, headers={"Authorization": "Bearer at_live_guess"})
        assert bad.status_code == 401
        forged = await live.http.get(path, params={"token": "9999999999999.forged"})
        assert (forged.status_code, forged.json()["error"]["code"]) == (
            403, "url_token_invalid")
        # The third refusal comes from a REST operation: one limit for every route.
        assert (await call(live.http, "GET", "/v1/agent", "at_live_guess")).status == 401
        for blocked in (await live.http.get(path, headers={"Authorization": f"Bearer {alice}"}),
                        await live.http.get(signed)):
            assert blocked.status_code == 429
            assert blocked.json()["error"]["code"] == "rate_limit_exceeded"
            assert blocked.headers["Retry-After"] == "20"
        assert (await call(live.http, "GET", "/v1/agent", alice)).status == 429
        live.clock.now += 20
        fine = await live.http.get(path, headers={"Authorization": f"Bearer {alice}"})
        assert fine.status_code == 200 and fine.content == b"hello"


async def test_file_content_downloads_count_in_the_workspace_bucket(tmp_path: Path) -> None:
    """A download, by bearer token or signed URL, is a request of the file's workspace."""
    async with limited(tmp_path, RateLimitSettings(workspace_per_minute=5)) as live:
        alice = live.world.tokens["alice"]
        done = await uploaded(live.http, alice, b"hello")  # upload, PUT, complete: 3
        path = f"/v1/files/{done['id']}/content"
        by_token = await live.http.get(path, headers={"Authorization": f"Bearer {alice}"})
        assert by_token.status_code == 200 and by_token.headers["X-RateLimit-Remaining"] == "1"
        assert (await live.http.get(str(done["download_url"]))).status_code == 200
        refused = await live.http.get(path, headers={"Authorization": f"Bearer {alice}"})
        assert refused.status_code == 429 and "Retry-After" in refused.headers


async def test_inbound_hook_is_behind_the_refused_token_limit(tmp_path: Path) -> None:
    """POST /v1/hooks/{id}: a wrong hook token counts towards the block, and a blocked
    address gets 429 there even with the right token (nothing posted)."""
    async with limited(tmp_path, RateLimitSettings(auth_failures_per_minute=2)) as live:
        hook = (await call(live.http, "POST", "/v1/webhooks", live.world.key,
                           json={"channel": "general", "name": "CI"})).data
        wrong = await call(live.http, "POST", hook["url"], "wh_live_guess", json={"text": "x"})
        assert (wrong.status, wrong.code) == (401, "invalid_token")
        by_query = await live.http.post(hook["url"], params={"token": "wh_live_guess2"},
                                        json={"text": "x"})
        assert by_query.status_code == 401
        messages = await count(live.server, "messages")
        blocked = await call(live.http, "POST", hook["url"], hook["token"], json={"text": "x"})
        assert (blocked.status, blocked.code) == (429, "rate_limit_exceeded")
        rest = await call(live.http, "GET", "/v1/agent", live.world.tokens["alice"])
        assert rest.status == 429
        assert await count(live.server, "messages") == messages
        live.clock.now += 30
        posted = await call(live.http, "POST", hook["url"], hook["token"], json={"text": "x"})
        assert posted.status == 201, posted.body


async def test_inbound_hook_over_its_workspace_limit_is_429_and_writes_nothing(
    tmp_path: Path,
) -> None:
    """A hook's triggers are requests of its workspace: over the limit, 429 with Retry-After
    and no message, delivery or outbox row; the hook's own bucket (the per-agent rate)
    bounds one hook within the workspace."""
    async with limited(tmp_path, RateLimitSettings(workspace_per_minute=4,
                                                   agent_per_minute=2)) as live:
        made = [(await call(live.http, "POST", "/v1/webhooks", live.world.key,
                            json={"channel": "general", "name": name})).data
                for name in ("CI", "Deploy")]  # 2 requests of the workspace
        ci, deploy = made
        assert (await call(live.http, "POST", ci["url"], ci["token"],
                           json={"text": "one"})).status == 201
        assert (await call(live.http, "POST", ci["url"], ci["token"],
                           json={"text": "two"})).status == 201
        rows = [await count(live.server, t) for t in ("messages", "deliveries", "outbox")]
        workspace_full = await live.http.post(
            deploy["url"], json={"text": "three"},
            headers={"Authorization": f"Bearer {deploy['token']}"})
        assert workspace_full.status_code == 429
        assert workspace_full.json()["error"]["code"] == "rate_limit_exceeded"
        assert workspace_full.headers["Retry-After"] == "15"
        assert [await count(live.server, t) for t in ("messages", "deliveries", "outbox")] == rows
        live.clock.now += 60
        hook_full = None
        for text in ("four", "five", "six"):
            hook_full = await call(live.http, "POST", ci["url"], ci["token"], json={"text": text})
        assert hook_full is not None and (hook_full.status, hook_full.code) == (
            429, "rate_limit_exceeded")
        assert (await call(live.http, "POST", deploy["url"], deploy["token"],
                           json={"text": "seven"})).status == 201
