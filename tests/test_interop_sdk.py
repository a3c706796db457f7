"""The real @relaycast/sdk@6.0.2 (Node) against a daemon started by the test.

tests/interop/sdk_flow.mjs drives the whole REST surface an agent uses
through the SDK's public API and prints what it got back as JSON; the SDK
itself parses every envelope, so a wrong path, body, status or envelope
shows up as a thrown error in the results. The Node dependencies are
installed from the committed package-lock.json by `make interop-deps` (or
here, with `npm ci`, when they are missing). Skipped only when `node` is
not installed.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio

from broker.server import BrokerServer
from tests.helpers.interop import INTEROP, NODE, ensure_sdk_installed, needs_node

FLOW_DEADLINE_S = 60

pytestmark = [needs_node, pytest.mark.both_process_models]


async def run_flow(base_url: str) -> dict[str, Any]:
    assert NODE is not None
    with trio.fail_after(FLOW_DEADLINE_S):
        done = await trio.run_process(
            [NODE, "--experimental-websocket", str(INTEROP / "sdk_flow.mjs"), base_url],
            cwd=INTEROP, capture_stdout=True, capture_stderr=True, check=False,
        )
    if done.returncode != 0:
        raise AssertionError(
            f"sdk_flow.mjs exited {done.returncode}:\n{done.stderr.decode(errors='replace')}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


async def test_sdk_drives_the_rest_api(server: BrokerServer) -> None:
    await ensure_sdk_installed()
    assert server.url is not None
    r = await run_flow(server.url)
    thrown = {k: v for k, v in r.items() if isinstance(v, dict) and v.get("thrown")}
    assert set(thrown) == {"missingMessage", "wrongKind"}, thrown

    # Workspace: created (the key is returned once), found by name, unknown name -> null.
    assert r["createWorkspace"]["apiKey"].startswith("rk_live_")
    workspace_id = r["createWorkspace"]["workspaceId"]
    assert r["lookupWorkspace"] == {"id": workspace_id, "name": "interop",
                                    "createdAt": r["createWorkspace"]["createdAt"]}
    assert r["lookupMissing"] is None
    assert r["ensureWorkspace"] == {
        "workspaceId": workspace_id, "name": "interop",
        "createdAt": r["createWorkspace"]["createdAt"], "existed": True}
    assert r["workspaceInfo"]["id"] == workspace_id

    # Agents.
    alice, bob = r["registerAlice"], r["registerBob"]
    assert alice["token"].startswith("at_live_") and bob["token"].startswith("at_live_")
    assert [a["name"] for a in r["listAgents"]] == ["alice", "bob"]
    assert r["aliceMe"]["id"] == alice["id"]

    # Channels.
    assert r["createChannel"]["name"] == "ops"
    assert r["joinChannel"] == {"channel": "ops", "agentId": bob["id"], "alreadyMember": False}
    assert [c["name"] for c in r["listChannels"]] == ["general", "ops"]
    assert sorted(m["agentName"] for m in r["getChannel"]["members"]) == ["alice", "bob"]

    # Messages.
    sent = r["send"]
    assert (sent["text"], sent["channelName"], sent["mentions"]) == (
        "hello @bob, deploy at noon", "ops", ["bob"])
    assert [m["text"] for m in r["listMessages"]] == ["second message", sent["text"]]
    assert r["getMessage"]["id"] == sent["id"]

    # Threads.
    assert r["reply"]["threadId"] == sent["id"]
    assert r["thread"]["parent"]["id"] == sent["id"]
    assert r["thread"]["parent"]["replyCount"] == 1
    assert [m["text"] for m in r["thread"]["replies"]] == ["ack, watching the deploy"]

    # DMs.
    dm = r["dm"]
    assert dm["message"]["text"] == "psst, a secret"
    (conversation,) = r["conversations"]
    assert conversation["id"] == dm["conversationId"]
    assert conversation["unreadCount"] == 1
    assert conversation["lastMessage"]["text"] == "psst, a secret"

    # Reactions and reads.
    assert (r["react"]["emoji"], r["react"]["agentName"]) == ("rocket", "bob")
    assert r["reactions"] == [{"emoji": "rocket", "count": 1, "agents": ["bob"]}]
    assert r["markRead"]["messageId"] == sent["id"]
    assert [x["agentName"] for x in r["readers"]] == ["bob"]
    assert {s["agentName"]: s["lastReadId"] for s in r["readStatus"]} == {
        "alice": None, "bob": sent["id"]}

    # Inbox: bob read the first message, so one unread in ops, and one unread DM;
    # alice sees bob's reaction and bob's reply as unread.
    bob_inbox = r["bobInbox"]
    assert [(c["channelName"], c["unreadCount"]) for c in bob_inbox["unreadChannels"]] == [
        ("ops", 1)]
    assert [(d["from"], d["unreadCount"]) for d in bob_inbox["unreadDms"]] == [("alice", 1)]
    alice_inbox = r["aliceInbox"]
    assert [(x["emoji"], x["agentName"]) for x in alice_inbox["recentReactions"]] == [
        ("rocket", "bob")]
    assert [(c["channelName"], c["unreadCount"]) for c in alice_inbox["unreadChannels"]] == [
        ("ops", 1)]

    # Search.
    assert {m["text"] for m in r["search"]} == {sent["text"], "ack, watching the deploy"}

    # Mailbox: bob's first delivery was acked by the read; the rest are pending.
    assert r["deliveries"][0]["message"]["text"] == "second message"
    assert r["ackDelivery"]["state"] == "acked"
    # The settled ones are listed too (the contract's statuses), newest first.
    acked = r["ackedDeliveries"]
    assert {d["status"] for d in acked} == {"acked"}
    assert r["deliveries"][0]["id"] in [d["id"] for d in acked]
    assert [d["seq"] for d in acked] == sorted((d["seq"] for d in acked), reverse=True)
    assert len(acked) == 2

    # Errors reach the SDK as RelayError with the broker's code and HTTP status.
    assert r["missingMessage"]["name"] == "RelayError"
    assert (r["missingMessage"]["rawCode"], r["missingMessage"]["statusCode"]) == (
        "message_not_found", 404)
    assert (r["wrongKind"]["rawCode"], r["wrongKind"]["statusCode"]) == ("forbidden", 403)


def test_lockfile_pins_the_sdk() -> None:
    """Exact versions, locked: the Relaycast SDK and the MCP Inspector CLI
    (tests/test_mcp_inspector.py)."""
    lock = json.loads((INTEROP / "package-lock.json").read_text())
    assert lock["packages"]["node_modules/@relaycast/sdk"]["version"] == "6.0.2"
    assert lock["packages"]["node_modules/@modelcontextprotocol/inspector-cli"]["version"] \
        == "1.0.3"
    assert json.loads((INTEROP / "package.json").read_text())["dependencies"] == {
        "@relaycast/sdk": "6.0.2", "@modelcontextprotocol/inspector-cli": "1.0.3"}
