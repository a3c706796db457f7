"""MCP on /mcp: the SDK's client in both protocol revisions, against a live daemon."""

from __future__ import annotations

import json
import warnings
from typing import Any

import httpx
import mcp_types as types
import msgspec
import pytest
import trio
from mcp.shared.exceptions import MCPDeprecationWarning, MCPError
from prometheus_client.parser import text_string_to_metric_families

from broker.config import Settings
from broker.mcp import tools as mcp_tools
from broker.operations import OPERATIONS
from broker.server import BrokerServer
from tests.helpers.daemon import run_server
from tests.helpers.engine import TEST_DEADLINE_S, make_world
from tests.helpers.mcp import (
    LEGACY,
    MODERN,
    SDK_CLIENT_STREAMS,
    data,
    error_code,
    mcp_client,
    mcp_url,
    raw_request,
    texts,
)
from tests.helpers.realtime import eventually
from tests.helpers.rest import call, make_rest_world

pytestmark = [SDK_CLIENT_STREAMS]

BOTH = pytest.mark.parametrize("mode", [MODERN, LEGACY])


async def count(server: BrokerServer, sql: str, *args: Any) -> int:
    return int(await server.engine.read(lambda c: c.execute(sql, args).fetchone()[0]))


@pytest.mark.both_process_models  # MCP in gateway 0, forwarded by the others
@BOTH
async def test_mcp_two_agents_converse(
    server: BrokerServer, client: httpx.AsyncClient, mode: str
) -> None:
    """Post, inbox check, thread reply, DM, reaction, mark read: each tool writes what REST
    would, and bob's results carry the unread notice while he has unread messages."""
    world = await make_rest_world(client)
    url = mcp_url(server)
    async with mcp_client(url, world.tokens["alice"], mode) as alice, \
            mcp_client(url, world.tokens["bob"], mode) as bob:
        data(await alice.call_tool("channel.create", {"name": "plan"}))
        data(await bob.call_tool("channel.join", {"channel": "plan"}))
        posted = await alice.call_tool("message.post", {"channel": "plan", "text": "ship it?"})
        message = data(posted)
        assert texts(posted)[0] == f"#plan alice: ship it? (id {message['id']})"

        inbox = await bob.call_tool("message.inbox.check", {})
        assert [(c["channel_name"], c["unread_count"]) for c in data(inbox)["unread_channels"]] \
            == [("plan", 1)]
        assert texts(inbox)[-1] == "1 unread: 1 in #plan"

        reply = data(await bob.call_tool("message.reply",
                                         {"message_id": message["id"], "text": "yes"}))
        assert reply["thread_id"] == message["id"]
        # A legacy Relaycast name reaches the same tool.
        dm = data(await alice.call_tool("send_dm", {"to": "bob", "text": "thanks"}))
        assert dm["message"]["text"] == "thanks"
        data(await bob.call_tool("message.reaction.add",
                                 {"message_id": message["id"], "emoji": "rocket"}))
        checked = await bob.call_tool("message.list", {"channel": "plan"})
        assert "DM from alice" in texts(checked)[-1]
        data(await bob.call_tool("message.inbox.mark_read", {"message_id": message["id"]}))
        thread = data(await alice.call_tool("message.get_thread", {"message_id": message["id"]}))
        assert [r["text"] for r in thread["replies"]] == ["yes"]

    assert await count(server, "SELECT count(*) FROM messages") == 3
    assert await count(server, "SELECT count(*) FROM reactions") == 1
    assert await count(server, "SELECT count(*) FROM read_receipts") == 1


@pytest.mark.one_process  # reads the in-process MCP surface
@BOTH
async def test_mcp_inbox_wait_returns_when_the_other_agent_posts(
    server: BrokerServer, client: httpx.AsyncClient, mode: str
) -> None:
    """A wait blocks on the hub (no delivery yet), returns with alice's message once she
    posts, and acks it when asked: the next wait finds nothing."""
    world = await make_rest_world(client)
    bob_id = int(world.agents["bob"])
    url = mcp_url(server)
    assert server.mcp is not None
    async with mcp_client(url, world.tokens["alice"], mode) as alice, \
            mcp_client(url, world.tokens["bob"], mode) as bob:
        data(await alice.call_tool("channel.create", {"name": "plan"}))
        data(await bob.call_tool("channel.join", {"channel": "plan"}))
        empty = data(await bob.call_tool("message.inbox.wait", {"timeout_seconds": 0}))
        assert empty == {"deliveries": [], "next_after_seq": None, "acked": False}
        got: list[Any] = []

        async def wait() -> None:
            got.append(data(await bob.call_tool(
                "message.inbox.wait", {"timeout_seconds": 60, "ack": True})))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait)
            await eventually(lambda: _true(server.mcp.watches.get(bob_id) is not None))
            assert got == []
            data(await alice.call_tool("message.post", {"channel": "plan", "text": "standup"}))
        (result,) = got
        assert [d["message"]["text"] for d in result["deliveries"]] == ["standup"]
        assert result["acked"] is True
        assert result["next_after_seq"] == result["deliveries"][0]["seq"]
        again = data(await bob.call_tool("message.inbox.wait", {"timeout_seconds": 0}))
        assert again["deliveries"] == []
    # The watch is let go with the last wait and session.
    await eventually(lambda: _true(server.mcp.watches.get(bob_id) is None))


async def _true(value: bool) -> bool:
    return value


@pytest.mark.one_process  # reads the in-process MCP surface
async def test_mcp_resource_subscription_gets_updated_2025(
    server: BrokerServer, client: httpx.AsyncClient
) -> None:
    """resources/subscribe in a session: a delivery to bob sends resources/updated for his
    inbox and for the channel, on his session only."""
    world = await make_rest_world(client)
    url = mcp_url(server)
    updated: list[str] = []
    arrived = trio.Event()

    async def on_message(message: Any) -> None:
        if isinstance(message, types.ResourceUpdatedNotification):
            updated.append(str(message.params.uri))
            arrived.set()

    async with mcp_client(url, world.tokens["alice"], LEGACY) as alice, \
            mcp_client(url, world.tokens["bob"], LEGACY, message_handler=on_message) as bob:
        data(await alice.call_tool("channel.create", {"name": "plan"}))
        data(await bob.call_tool("channel.join", {"channel": "plan"}))
        with warnings.catch_warnings():
            # Removed in the 2026 revision, still the way of the 2025 one.
            warnings.simplefilter("ignore", MCPDeprecationWarning)
            await bob.subscribe_resource("broker://inbox")
        resource = await bob.read_resource("broker://inbox")
        assert resource.contents[0].text == "nothing unread"  # type: ignore[union-attr]
        data(await alice.call_tool("message.post", {"channel": "plan", "text": "news"}))
        with trio.fail_after(10):
            await arrived.wait()
        assert updated == ["broker://inbox"]
        assert server.mcp is not None
        stats = server.mcp.statistics()
        assert (stats.subscribed_sessions, stats.notifications_sent) == (1, 1)
        resource = await bob.read_resource("broker://inbox")
        assert resource.contents[0].text == "1 unread: 1 in #plan"  # type: ignore[union-attr]
        channel = await bob.read_resource("broker://channels/plan")
        assert "#plan alice: news" in channel.contents[0].text  # type: ignore[union-attr]
    # Both sessions ended (the clients' DELETE): nothing is held any more.
    stats = server.mcp.statistics()
    assert (stats.sessions, stats.subscribed_sessions, stats.watched_agents) == (0, 0, 0)


async def test_mcp_resource_listen_gets_updated_2026(
    server: BrokerServer, client: httpx.AsyncClient
) -> None:
    """subscriptions/listen: bob's stream names his inbox and the channel when alice posts;
    carol, listening to her own inbox, hears nothing of it."""
    world = await make_rest_world(client)
    url = mcp_url(server)
    async with mcp_client(url, world.tokens["alice"]) as alice, \
            mcp_client(url, world.tokens["bob"]) as bob:
        data(await alice.call_tool("channel.create", {"name": "plan"}))
        data(await bob.call_tool("channel.join", {"channel": "plan"}))
        async with bob.listen(resource_subscriptions=["broker://inbox",
                                                      "broker://channels/plan"]) as stream:
            data(await alice.call_tool("message.post", {"channel": "plan", "text": "news"}))
            seen: set[str] = set()
            with trio.fail_after(10):
                async for event in stream:
                    seen.add(str(getattr(event, "uri", "")))
                    if len(seen) == 2:
                        break
        assert seen == {"broker://inbox", "broker://channels/plan"}


async def test_mcp_bad_input_is_refused_and_changes_nothing(
    server: BrokerServer, client: httpx.AsyncClient
) -> None:
    """Each bad call is a tool error with its code (an unknown tool: invalid params);
    nothing is written and the session keeps working."""
    world = await make_rest_world(client)
    async with mcp_client(mcp_url(server), world.tokens["alice"], LEGACY) as alice:
        data(await alice.call_tool("channel.create", {"name": "plan"}))
        data(await alice.call_tool("channel.create", {"name": "old"}))
        data(await alice.call_tool("channel.archive", {"channel": "old"}))
        await call(client, "POST", "/v1/channels", world.tokens["bob"], json={"name": "bobs"})
        before = await count(server, "SELECT count(*) FROM messages")
        with pytest.raises(MCPError) as unknown:
            await alice.call_tool("message.shout", {"text": "x"})
        assert unknown.value.error.code == types.INVALID_PARAMS
        cases = [
            ({"channel": "plan", "text": 5}, "invalid_request"),
            ({"channel": "plan"}, "invalid_request"),
            ({"channel": "plan", "text": "x" * 40_000}, "text_too_long"),
            ({"channel": "old", "text": "x"}, "channel_archived"),
            ({"channel": "bobs", "text": "x"}, "not_a_member"),
            ({"channel": "nowhere", "text": "x"}, "channel_not_found"),
        ]
        for arguments, code in cases:
            assert error_code(await alice.call_tool("message.post", arguments)) == code, arguments
        assert error_code(await alice.call_tool(
            "message.inbox.wait", {"timeout_seconds": 301})) == "invalid_request"
        assert error_code(await alice.call_tool(
            "message.inbox.wait", {"timeout_seconds": "soon"})) == "invalid_request"
        assert await count(server, "SELECT count(*) FROM messages") == before
        # The session still works.
        assert data(await alice.call_tool("message.post", {"channel": "plan", "text": "ok"}))


async def test_mcp_workspace_key_gets_the_workspace_tools(
    server: BrokerServer, client: httpx.AsyncClient
) -> None:
    world = await make_rest_world(client)
    async with mcp_client(mcp_url(server), world.key) as admin:
        names = {tool.name for tool in (await admin.list_tools()).tools}
        assert {"agent.register", "subscription.list", "webhook.create", "channel.list"} <= names
        assert not names & {"message.post", "message.inbox.check", "message.inbox.wait"}
        registered = data(await admin.call_tool("agent.register", {"name": "dave"}))
        assert registered["token"].startswith("at_live_")
        refused = await admin.call_tool("message.post", {"channel": "plan", "text": "x"})
        assert error_code(refused) == "forbidden"


@pytest.mark.one_process  # reads the in-process MCP surface
async def test_mcp_http_refusals(server: BrokerServer, client: httpx.AsyncClient) -> None:
    """No token, a bad token, a deactivated agent's token: 401 before any MCP message; a
    malformed body, an unknown session, a closed session: JSON-RPC errors; the daemon
    keeps serving."""
    world = await make_rest_world(client)
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    for token in (None, "at_live_nope"):
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        refused = await client.post("/mcp", json=body, headers=headers)
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"].startswith("Bearer")
        assert refused.json()["error"]["data"]["code"] in ("unauthorized", "invalid_token")

    accept = {"Accept": "application/json, text/event-stream",
              "Authorization": f"Bearer {world.tokens['carol']}"}
    garbage = await client.post("/mcp", content=b"{not json",
                                headers={**accept, "Content-Type": "application/json"})
    assert garbage.status_code == 400
    assert garbage.json()["error"]["code"] == types.PARSE_ERROR
    unknown = await client.post("/mcp", json=body,
                                headers={**accept, "mcp-session-id": "f" * 32})
    assert unknown.status_code == 404

    assert server.mcp is not None
    carol_id = int(world.agents["carol"])
    async with mcp_client(mcp_url(server), world.tokens["carol"], LEGACY) as carol:
        assert data(await carol.call_tool("agent.me", {}))["name"] == "carol"
        (session,) = server.mcp.sessions.of_agent(carol_id)
        # Another agent presenting carol's session id: as if it did not exist.
        stolen = await client.post("/mcp", json=body, headers={
            **accept, "Authorization": f"Bearer {world.tokens['bob']}",
            "mcp-session-id": session.session_id, "mcp-protocol-version": "2025-11-25"})
        assert stolen.status_code == 404
        deactivated = await call(client, "DELETE", "/v1/agents/carol", world.key)
        assert deactivated.status == 200
        await eventually(lambda: _true(not server.mcp.sessions.of_agent(carol_id)))
        late = await client.post("/mcp", json=body, headers={
            **accept, "mcp-session-id": session.session_id, "mcp-protocol-version": "2025-11-25"})
        assert late.status_code == 401
    # The daemon and other callers are unaffected.
    async with mcp_client(mcp_url(server), world.tokens["alice"]) as alice:
        assert data(await alice.call_tool("agent.me", {}))["name"] == "alice"


MIB = 1 << 20
INITIALIZE = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": "2025-11-25", "capabilities": {},
    "clientInfo": {"name": "raw", "version": "1"}}}).encode()


def post_headers(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}"), ("content-type", "application/json"),
            ("accept", "application/json, text/event-stream")]


@pytest.mark.both_process_models  # through the relay, the serving gateway's answer
async def test_mcp_body_over_max_body_bytes_is_refused_413(
    server: BrokerServer, client: httpx.AsyncClient
) -> None:
    """A body over `http.max_body_bytes`, declared or counted as a chunked one arrives, is
    refused 413 with a JSON-RPC error naming `payload_too_large` and Connection: close
    (the rest of it is never read); one at the limit is served."""
    world = await make_rest_world(client)
    limit = server.settings.http.max_body_bytes
    assert server.port is not None
    headers = post_headers(world.tokens["alice"])
    # Eight times the limit: more than the buffers on the way take in, so the answer
    # comes while the body is still being sent.
    oversized = [INITIALIZE, *[b" " * 65536] * (8 * limit // 65536)]
    for chunked in (False, True):
        answer = await raw_request(server.port, "POST", "/mcp", headers, oversized,
                                   chunked=chunked)
        assert answer.status == 413, chunked
        assert answer.header_lines(b"connection") == [b"close"]
        assert json.loads(answer.body) == {"jsonrpc": "2.0", "id": None, "error": {
            "code": types.INVALID_REQUEST,
            "message": f"payload_too_large: the body is over the limit of {limit} bytes",
            "data": {"code": "payload_too_large"}}}
    at_limit = INITIALIZE + b" " * (limit - len(INITIALIZE))
    served = await raw_request(server.port, "POST", "/mcp", headers, [at_limit], chunked=True)
    assert served.status == 200
    assert served.header_lines(b"mcp-session-id")


async def test_mcp_body_limit_set_above_the_sdks_default_is_the_limit(
    settings: Settings
) -> None:
    """`http.max_body_bytes` set above the SDK's own default (4 MiB) is the limit: a 5 MiB
    body is served (the SDK's bound follows the daemon's)."""
    roomy = msgspec.structs.replace(
        settings, http=msgspec.structs.replace(settings.http, max_body_bytes=6 * MIB))
    with trio.fail_after(TEST_DEADLINE_S):
        async with run_server(roomy) as server:
            world = await make_world(server.engine)
            assert server.port is not None
            body = INITIALIZE + b" " * (5 * MIB)
            served = await raw_request(server.port, "POST", "/mcp",
                                       post_headers(world.tokens["alice"]), [body])
    assert served.status == 200


async def test_mcp_body_that_is_not_a_jsonrpc_message_gets_a_short_error(
    server: BrokerServer, client: httpx.AsyncClient
) -> None:
    """A body that is not JSON is -32700 (`invalid_json`); JSON that is not one JSON-RPC
    message is -32600 (`invalid_request`): each a one-line JSON-RPC error with its code."""
    world = await make_rest_world(client)
    headers = dict(post_headers(world.tokens["alice"]))
    cases = [
        (b"{not json", types.PARSE_ERROR, "invalid_json"),
        (b'{"foo": 1}', types.INVALID_REQUEST, "invalid_request"),
        (b'{"jsonrpc": "1.0", "id": 1, "method": "tools/list"}', types.INVALID_REQUEST,
         "invalid_request"),
        (b'{"jsonrpc": "2.0", "id": 1}', types.INVALID_REQUEST, "invalid_request"),
        (b'[{"jsonrpc": "2.0", "id": 1, "method": "tools/list"}]', types.INVALID_REQUEST,
         "invalid_request"),
        (b"5", types.INVALID_REQUEST, "invalid_request"),
    ]
    for body, rpc_code, code in cases:
        refused = await client.post("/mcp", content=body, headers=headers)
        assert refused.status_code == 400, body
        error = refused.json()["error"]
        assert (error["code"], error["data"]) == (rpc_code, {"code": code}), body
        assert error["message"].startswith(f"{code}: the body ")
        assert "\n" not in error["message"] and "http" not in error["message"], body


async def test_mcp_arguments_not_an_object_is_an_invalid_params_error(
    server: BrokerServer, client: httpx.AsyncClient
) -> None:
    """`arguments` that is not an object fails the SDK's own check of the request: a
    JSON-RPC error -32602 with no broker code (docs/mcp.md says so), unlike a field of the
    wrong type, which is the tool's `invalid_request` result."""
    world = await make_rest_world(client)
    headers = {**dict(post_headers(world.tokens["alice"])), "mcp-protocol-version": MODERN,
               "mcp-method": "tools/call", "mcp-name": "message.post"}
    meta = {"io.modelcontextprotocol/protocolVersion": MODERN,
            "io.modelcontextprotocol/clientCapabilities": {}}
    for arguments in ("oops", [1], 5):
        answer = await client.post("/mcp", headers=headers, json={
            "jsonrpc": "2.0", "id": 7, "method": "tools/call",
            "params": {"name": "message.post", "arguments": arguments, "_meta": meta}})
        error = answer.json()["error"]
        assert (error["code"], error.get("data")) == (types.INVALID_PARAMS, ""), arguments
    async with mcp_client(mcp_url(server), world.tokens["alice"]) as alice:
        wrong = await alice.call_tool("message.post", {"channel": "general", "text": 5})
        assert error_code(wrong) == "invalid_request"


@pytest.mark.one_process  # reads the in-process MCP surface
async def test_mcp_closed_session_answers_404(
    server: BrokerServer, client: httpx.AsyncClient
) -> None:
    world = await make_rest_world(client)
    assert server.mcp is not None
    bob_id = int(world.agents["bob"])
    async with mcp_client(mcp_url(server), world.tokens["bob"], LEGACY) as bob:
        data(await bob.call_tool("agent.me", {}))
        (session,) = server.mcp.sessions.of_agent(bob_id)
        await server.mcp.sessions.close(session.session_id)
        with pytest.raises(MCPError):
            await bob.call_tool("agent.me", {})
    late = await client.post("/mcp", json={"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
                             headers={"Accept": "application/json, text/event-stream",
                                      "Authorization": f"Bearer {world.tokens['bob']}",
                                      "mcp-session-id": session.session_id,
                                      "mcp-protocol-version": "2025-11-25"})
    assert late.status_code == 404


async def test_mcp_tool_annotations_mark_only_pure_reads_read_only(
    server: BrokerServer, client: httpx.AsyncClient
) -> None:
    """A GET is read-only, a DELETE destructive; the wait is neither (with `ack: true` it
    acknowledges deliveries, and an editor may run a read-only tool without asking)."""
    world = await make_rest_world(client)
    async with mcp_client(mcp_url(server), world.tokens["alice"]) as alice:
        hints = {tool.name: tool.annotations for tool in (await alice.list_tools()).tools}
    wait, listing, delete = (hints["message.inbox.wait"], hints["message.list"],
                             hints["file.delete"])
    assert wait is not None and listing is not None and delete is not None
    assert (wait.read_only_hint, wait.destructive_hint) == (False, False)
    assert (listing.read_only_hint, listing.destructive_hint) == (True, False)
    assert (delete.read_only_hint, delete.destructive_hint) == (False, True)


def test_mcp_tools_stay_in_step_with_the_operation_table() -> None:
    """Every operation has a tool, described; every tool but the wait has an operation;
    every legacy name reaches a tool."""
    table = mcp_tools.tools()
    by_operation = {t.operation.name: t for t in table.values() if t.operation is not None}
    assert set(by_operation) == set(OPERATIONS)
    assert {n for n, t in table.items() if t.operation is None} == {mcp_tools.WAIT_TOOL}
    assert set(mcp_tools.DESCRIPTIONS) <= set(OPERATIONS)
    for alias, target in mcp_tools.LEGACY_ALIASES.items():
        assert mcp_tools.resolve(alias) is table[target], alias
    for tool in table.values():
        assert tool.input_schema["type"] == "object", tool.name
        assert tool.description and tool.description != tool.name, tool.name


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """A /metrics text as (sample name, labels) -> value."""
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


@pytest.mark.both_process_models  # gateway 0's figures reach /metrics through the writer process
async def test_mcp_metrics_count_tool_calls_by_outcome_and_open_sessions(
    server: BrokerServer, client: httpx.AsyncClient
) -> None:
    """/metrics counts each tool call under its tool's name (an alias under the tool it
    names) and its outcome, `ok` or the error code, times it, and shows the open sessions."""
    world = await make_rest_world(client)
    async with mcp_client(mcp_url(server), world.tokens["alice"], LEGACY) as alice:
        data(await alice.call_tool("channel.create", {"name": "plan"}))
        data(await alice.call_tool("post_message", {"channel": "plan", "text": "one"}))
        data(await alice.call_tool("message.post", {"channel": "plan", "text": "two"}))
        assert error_code(await alice.call_tool("channel.join", {"channel": "nope"})) \
            == "channel_not_found"
        with pytest.raises(MCPError):
            await alice.call_tool("no.such.tool", {})
        during = samples((await client.get("/metrics")).text)
    after = samples((await client.get("/metrics")).text)

    def calls(tool: str, outcome: str) -> float:
        key = ("broker_mcp_tool_calls_total",
               frozenset({("tool", tool), ("outcome", outcome)}))
        return during.get(key, 0.0)

    assert calls("message.post", "ok") == 2
    assert calls("channel.create", "ok") == 1
    assert calls("channel.join", "channel_not_found") == 1
    assert not any(name == "broker_mcp_tool_calls_total" and ("tool", "no.such.tool") in labels
                   for name, labels in during)
    assert during[("broker_mcp_tool_seconds_count",
                   frozenset({("tool", "message.post")}))] == 2
    assert during[("broker_mcp_sessions", frozenset())] == 1
    assert after[("broker_mcp_sessions", frozenset())] == 0
    # No resource subscriptions here: the notification counters are there, at zero.
    assert after[("broker_mcp_notifications_total", frozenset())] == 0
    assert after[("broker_mcp_notifications_dropped_total", frozenset())] == 0
