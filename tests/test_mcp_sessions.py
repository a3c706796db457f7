"""MCP sessions are bounded per agent and end with the token that opened them."""

from __future__ import annotations

from typing import Any

import httpx
import msgspec
import pytest
import trio
from mcp.shared.exceptions import MCPError

from broker.config import Settings
from broker.engine.config import EngineConfig, Limits
from broker.mcp.settings import McpSettings
from broker.server import BrokerServer
from tests.helpers.daemon import run_server
from tests.helpers.mcp import LEGACY, SDK_CLIENT_STREAMS, data, mcp_client, mcp_url
from tests.helpers.realtime import eventually
from tests.helpers.rest import call, make_rest_world

pytestmark = [SDK_CLIENT_STREAMS]


@pytest.fixture
def engine_config() -> EngineConfig:
    # A rotated token dies at once: its sessions must close at once.
    return EngineConfig(synchronous="NORMAL", limits=Limits(token_grace_seconds=0))


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return msgspec.structs.replace(settings, mcp=McpSettings(max_sessions_per_agent=2))


async def _true(value: bool) -> bool:
    return value


async def test_mcp_sessions_per_agent_are_capped(
    server: BrokerServer, client: httpx.AsyncClient
) -> None:
    """A third session of alice is refused (429, too_many_sessions); bob is not affected,
    and alice gets her place back when a session ends."""
    world = await make_rest_world(client)
    url = mcp_url(server)
    async with mcp_client(url, world.tokens["alice"], LEGACY), \
            mcp_client(url, world.tokens["alice"], LEGACY):
        refused = await client.post("/mcp", json={
            "jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
                "protocolVersion": "2025-11-25", "capabilities": {},
                "clientInfo": {"name": "t", "version": "1"}}},
            headers={"Authorization": f"Bearer {world.tokens['alice']}",
                     "Accept": "application/json, text/event-stream"})
        assert refused.status_code == 429
        assert refused.json()["error"]["data"]["code"] == "too_many_sessions"
        async with mcp_client(url, world.tokens["bob"], LEGACY) as bob:
            assert data(await bob.call_tool("agent.me", {}))["name"] == "bob"
    async with mcp_client(url, world.tokens["alice"], LEGACY) as alice:
        assert data(await alice.call_tool("agent.me", {}))["name"] == "alice"


@pytest.mark.one_process  # reads the in-process MCP surface
async def test_mcp_token_rotation_closes_the_old_tokens_session_and_wait(
    server: BrokerServer, client: httpx.AsyncClient
) -> None:
    """bob's wait (old token) ends when his token is rotated, his session is closed, and a
    session with the new token works."""
    world = await make_rest_world(client)
    url = mcp_url(server)
    assert server.mcp is not None
    bob_id = int(world.agents["bob"])
    outcome: list[Any] = []
    async with mcp_client(url, world.tokens["bob"], LEGACY) as bob:
        data(await bob.call_tool("agent.me", {}))

        async def wait() -> None:
            try:
                outcome.append(await bob.call_tool("message.inbox.wait",
                                                   {"timeout_seconds": 120}))
            except MCPError as exc:
                outcome.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait)
            await eventually(lambda: _true(server.mcp.watches.get(bob_id) is not None
                                           and server.mcp.watches.get(bob_id).holders > 1))
            rotated = await call(client, "POST", "/v1/agents/bob/rotate-token", world.key)
            assert rotated.status == 200
            with trio.fail_after(10):
                await eventually(lambda: _true(bool(outcome)))
        assert not server.mcp.sessions.of_agent(bob_id)
        with pytest.raises(MCPError):
            await bob.call_tool("agent.me", {})
    async with mcp_client(url, rotated.data["token"], LEGACY) as bob:
        assert data(await bob.call_tool("agent.me", {}))["name"] == "bob"


@pytest.mark.one_process  # reads the in-process MCP surface
async def test_mcp_stop_ends_waits_and_streams_within_the_grace(settings: Settings) -> None:
    """A stop while an agent waits (and holds a GET stream) ends them: the daemon stops
    within its grace period instead of waiting out the wait's timeout."""
    with trio.fail_after(30):
        async with run_server(settings) as server:
            assert server.url is not None
            async with httpx.AsyncClient(base_url=server.url) as http:
                world = await make_rest_world(http)
            bob_id = int(world.agents["bob"])
            outcome: list[Any] = []

            async def wait() -> None:
                try:
                    async with mcp_client(mcp_url(server), world.tokens["bob"], LEGACY) as bob:
                        outcome.append(await bob.call_tool("message.inbox.wait",
                                                           {"timeout_seconds": 300}))
                except Exception as exc:  # the daemon went away under the client
                    outcome.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait)
                assert server.mcp is not None
                await eventually(lambda: _true(server.mcp.watches.get(bob_id) is not None
                                               and server.mcp.watches.get(bob_id).holders > 1))
                stopped_at = trio.current_time()
                server.stop()
        # The wait did not run to its 300 s: the stop ended it.
        assert trio.current_time() - stopped_at < settings.http.shutdown_grace_seconds + 5
        assert outcome


@pytest.mark.one_process  # reads the in-process MCP surface
async def test_mcp_session_delete_by_another_agent_leaves_the_owners_session(
    server: BrokerServer, client: httpx.AsyncClient
) -> None:
    """bob's DELETE with alice's session id is refused (404) and changes nothing: alice's
    session still works, still counts toward her cap, and her deactivation still closes it."""
    world = await make_rest_world(client)
    url = mcp_url(server)
    assert server.mcp is not None
    alice_id = int(world.agents["alice"])
    async with mcp_client(url, world.tokens["alice"], LEGACY) as alice:
        data(await alice.call_tool("agent.me", {}))
        (session,) = server.mcp.sessions.of_agent(alice_id)
        refused = await client.delete("/mcp", headers={
            "Authorization": f"Bearer {world.tokens['bob']}",
            "mcp-session-id": session.session_id})
        assert refused.status_code == 404
        assert server.mcp.sessions.of_agent(alice_id) == [session]
        assert data(await alice.call_tool("agent.me", {}))["name"] == "alice"
        async with mcp_client(url, world.tokens["alice"], LEGACY):
            third = await client.post("/mcp", json={
                "jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
                    "protocolVersion": "2025-11-25", "capabilities": {},
                    "clientInfo": {"name": "t", "version": "1"}}},
                headers={"Authorization": f"Bearer {world.tokens['alice']}",
                         "Accept": "application/json, text/event-stream"})
            assert third.status_code == 429
        deactivated = await call(client, "DELETE", "/v1/agents/alice", world.key)
        assert deactivated.status == 200
        with trio.fail_after(10):
            await eventually(lambda: _true(not server.mcp.sessions.of_agent(alice_id)))
        assert server.mcp.statistics().sessions == 0
        with pytest.raises(MCPError):
            await alice.call_tool("agent.me", {})
