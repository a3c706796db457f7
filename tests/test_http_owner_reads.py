"""REST: the workspace key reads everything of its workspace, and nothing of another.

The owner's reads (history, threads, reactions, readers, read status, DMs,
search, every agent's mailbox and deliveries) next to what an agent still
gets refused on the same routes, and another workspace's key on them.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import httpx
import pytest

from tests.helpers.rest import Scene, call, make_rest_world, make_scene


@pytest.fixture
async def scene(client: httpx.AsyncClient) -> Scene:
    return await make_scene(client)


async def test_owner_reads_channel_history_thread_reactions_and_readers(
        client: httpx.AsyncClient, scene: Scene) -> None:
    """The key reads #ops, which it is no member of, down to reactions and receipts."""
    key = scene.acme.key
    history = await call(client, "GET", "/v1/channels/ops/messages", key)
    assert history.status == 200
    assert [(m["text"], m["agent_name"], m["reply_count"]) for m in history.data] == [
        ("deploying now", "alice", 1)]
    assert history.data[0]["reactions"] == [{"emoji": "+1", "count": 1, "agents": ["bob"]}]
    one = await call(client, "GET", f"/v1/messages/{scene.root}", key)
    assert one.data["text"] == "deploying now"
    thread = await call(client, "GET", f"/v1/messages/{scene.reply}/replies", key)
    assert thread.data["parent"]["id"] == scene.root
    assert [r["text"] for r in thread.data["replies"]] == ["ack from bob"]
    reactions = await call(client, "GET", f"/v1/messages/{scene.root}/reactions", key)
    assert reactions.data == [{"emoji": "+1", "count": 1, "agents": ["bob"]}]
    readers = await call(client, "GET", f"/v1/messages/{scene.root}/readers", key)
    assert [r["agent_name"] for r in readers.data] == ["bob"]
    status = await call(client, "GET", "/v1/channels/ops/read-status", key)
    assert {s["agent_name"]: s["last_read_id"] for s in status.data} == {
        "alice": None, "bob": scene.root}
    # A DM's message too, by id.
    dm_one = await call(client, "GET", f"/v1/messages/{scene.dm_message}", key)
    assert (dm_one.data["text"], dm_one.data["conversation_id"]) == ("psst", scene.dm)
    # An archived channel's history stays readable.
    assert (await call(client, "DELETE", "/v1/channels/ops", key)).status == 200
    archived = await call(client, "GET", "/v1/channels/ops/messages", key, params={"limit": 5})
    assert [m["id"] for m in archived.data] == [scene.root]


async def test_owner_lists_every_conversation_and_reads_them(
        client: httpx.AsyncClient, scene: Scene) -> None:
    """Every DM and group DM of the workspace, newest activity first, filtered and paged."""
    key = scene.acme.key
    listed = await call(client, "GET", "/v1/dm/conversations", key)
    assert listed.status == 200
    assert [(c["id"], c["type"], c["last_message"]["text"], c["unread_count"])
            for c in listed.data] == [
        (scene.group, "group", "standup at ten", 0), (scene.dm, "1:1", "psst", 0)]
    assert sorted(p["agent_name"] for p in listed.data[0]["participants"]) == [
        "alice", "bob", "carol"]
    carols = await call(client, "GET", "/v1/dm/conversations", key, params={"agent": "carol"})
    assert [c["id"] for c in carols.data] == [scene.group]
    first = await call(client, "GET", "/v1/dm/conversations", key, params={"limit": 1})
    assert [c["id"] for c in first.data] == [scene.group]
    cursor = first.data[0]["last_message"]["id"]
    second = await call(client, "GET", "/v1/dm/conversations", key,
                        params={"limit": 1, "before": cursor})
    assert [c["id"] for c in second.data] == [scene.dm]
    last = await call(client, "GET", "/v1/dm/conversations", key,
                      params={"limit": 1, "before": second.data[0]["last_message"]["id"]})
    assert last.data == []
    messages = await call(client, "GET", f"/v1/dm/{scene.dm}/messages", key)
    assert [m["text"] for m in messages.data] == ["psst"]
    group = await call(client, "GET", f"/v1/dm/{scene.group}/messages", key)
    assert [m["text"] for m in group.data] == ["standup at ten"]
    # An agent pages its own list the same way, and still sees only its own.
    carol = scene.acme.tokens["carol"]
    mine = await call(client, "GET", "/v1/dm/conversations", carol, params={"limit": 5})
    assert [c["id"] for c in mine.data] == [scene.group]


async def test_owner_searches_the_whole_workspace(client: httpx.AsyncClient, scene: Scene) -> None:
    key = scene.acme.key
    found = await call(client, "GET", "/v1/search", key, params={"q": "deploying"})
    assert [m["id"] for m in found.data] == [scene.root]
    dm = await call(client, "GET", "/v1/search", key, params={"q": "psst"})
    assert [m["id"] for m in dm.data] == [scene.dm_message]
    by_channel = await call(client, "GET", "/v1/search", key,
                            params={"q": "ack", "channel": "ops", "from": "bob"})
    assert [m["id"] for m in by_channel.data] == [scene.reply]
    # carol is in neither #ops nor the DM: the same query finds nothing for her.
    carol = scene.acme.tokens["carol"]
    assert (await call(client, "GET", "/v1/search", carol, params={"q": "deploying"})).data == []
    assert (await call(client, "GET", "/v1/search", carol, params={"q": "psst"})).data == []


def _future_iso(seconds: int) -> str:
    return (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)).isoformat()


async def test_owner_reads_every_mailbox(client: httpx.AsyncClient, scene: Scene) -> None:
    """Counts by state, the oldest unacked row and presence, as the agent's own list shows."""
    key, bob = scene.acme.key, scene.acme.tokens["bob"]
    for n in range(3):
        assert (await call(client, "POST", "/v1/channels/ops/messages", scene.acme.tokens["alice"],
                           json={"text": f"step {n}"})).status == 201
    pending = (await call(client, "GET", "/v1/deliveries", bob)).data
    assert len(pending) >= 4
    failed, dead, deferred = pending[-1], pending[-2], pending[-3]
    assert (await call(client, "POST", f"/v1/deliveries/{failed['id']}/fail", bob,
                       json={"error": "busy", "retryable": True})).data["state"] == "failed"
    assert (await call(client, "POST", f"/v1/deliveries/{dead['id']}/fail", bob,
                       json={"error": "bad", "retryable": False})).data["state"] == "dead_lettered"
    assert (await call(client, "POST", f"/v1/deliveries/{deferred['id']}/defer", bob,
                       json={"available_at": _future_iso(3600)})).status == 200
    assert (await call(client, "POST", "/v1/agents/heartbeat", bob)).status == 200

    summary = await call(client, "GET", "/v1/agents/bob/mailbox", key)
    assert summary.status == 200
    got = summary.data
    assert (got["agent_name"], got["agent_id"], got["status"]) == (
        "bob", scene.acme.agents["bob"], "online")
    assert got["last_seen"] is not None
    assert got["pending"] == len(pending) - 1
    assert (got["failed"], got["dead_lettered"], got["deferred"]) == (1, 1, 1)
    assert got["queued"] + got["delivered"] + got["failed"] == got["pending"]
    assert got["oldest_unacked_at"] == pending[0]["created_at"]
    assert got["oldest_unacked_age_ms"] >= 0
    assert got["last_seq"] == pending[-1]["seq"]

    every = await call(client, "GET", "/v1/mailboxes", key)
    assert [m["agent_name"] for m in every.data] == ["alice", "bob", "carol"]
    assert every.data[1] == {**got, "oldest_unacked_age_ms": every.data[1]["oldest_unacked_age_ms"]}

    # The deliveries behind the counts, as bob himself lists them.
    dead_listed = await call(client, "GET", "/v1/agents/bob/deliveries", key,
                             params={"status": "dead_lettered"})
    assert [d["id"] for d in dead_listed.data] == [dead["id"]]
    mine = await call(client, "GET", "/v1/deliveries", bob, params={"status": "dead_lettered"})
    assert dead_listed.data == mine.data
    failed_listed = await call(client, "GET", "/v1/agents/bob/deliveries", key,
                               params={"status": "failed"})
    assert [d["id"] for d in failed_listed.data] == [failed["id"]]
    page = await call(client, "GET", "/v1/agents/bob/deliveries", key,
                      params={"limit": 2, "after_seq": pending[0]["seq"]})
    assert [d["seq"] for d in page.data] == [d["seq"] for d in pending[1:3]]
    # Reading settles nothing: bob's own list is as it was (less the dead letter).
    again = await call(client, "GET", "/v1/deliveries", bob)
    assert [d["id"] for d in again.data] == [d["id"] for d in pending if d["id"] != dead["id"]]


async def test_another_workspace_key_sees_nothing(client: httpx.AsyncClient, scene: Scene) -> None:
    """globex's key gets the not-found codes an unknown name gets, and its own (empty) lists."""
    other = scene.globex.key
    expected: dict[str, tuple[int, str]] = {
        "/v1/channels/ops/messages": (404, "channel_not_found"),
        "/v1/channels/ops/read-status": (404, "channel_not_found"),
        f"/v1/messages/{scene.root}": (404, "message_not_found"),
        f"/v1/messages/{scene.root}/replies": (404, "message_not_found"),
        f"/v1/messages/{scene.root}/reactions": (404, "message_not_found"),
        f"/v1/messages/{scene.root}/readers": (404, "message_not_found"),
        f"/v1/messages/{scene.dm_message}": (404, "message_not_found"),
        f"/v1/dm/{scene.dm}/messages": (404, "conversation_not_found"),
        f"/v1/dm/{scene.group}/messages": (404, "conversation_not_found"),
        "/v1/agents/bob/mailbox": (404, "agent_not_found"),
        "/v1/agents/bob/deliveries": (404, "agent_not_found"),
    }
    got: dict[str, tuple[int, str]] = {}
    for path in expected:
        reply = await call(client, "GET", path, other)
        got[path] = (reply.status, reply.code)
        assert "deploying" not in str(reply.body) and "psst" not in str(reply.body)
    assert got == expected
    assert (await call(client, "GET", "/v1/dm/conversations", other)).data == []
    assert (await call(client, "GET", "/v1/dm/conversations", other,
                       params={"agent": "bob"})).code == "agent_not_found"
    assert (await call(client, "GET", "/v1/search", other, params={"q": "deploying"})).data == []
    assert [m["agent_name"] for m in
            (await call(client, "GET", "/v1/mailboxes", other)).data] == ["zed"]


async def test_agents_keep_their_rules(client: httpx.AsyncClient, scene: Scene) -> None:
    """What an agent was refused before, it is still refused; owner-only reads refuse agents."""
    carol = scene.acme.tokens["carol"]
    expected: dict[tuple[str, str], tuple[int, str]] = {
        ("GET", "/v1/channels/ops/messages"): (403, "not_a_member"),
        ("GET", "/v1/channels/ops/read-status"): (403, "not_a_member"),
        ("GET", f"/v1/messages/{scene.root}"): (404, "message_not_found"),
        ("GET", f"/v1/messages/{scene.root}/replies"): (404, "message_not_found"),
        ("GET", f"/v1/messages/{scene.root}/reactions"): (404, "message_not_found"),
        ("GET", f"/v1/messages/{scene.root}/readers"): (404, "message_not_found"),
        ("GET", f"/v1/dm/{scene.dm}/messages"): (403, "not_a_participant"),
        ("GET", "/v1/mailboxes"): (403, "forbidden"),
        ("GET", "/v1/agents/bob/mailbox"): (403, "forbidden"),
        ("GET", "/v1/agents/bob/deliveries"): (403, "forbidden"),
    }
    got = {}
    for method, path in expected:
        reply = await call(client, method, path, carol)
        got[(method, path)] = (reply.status, reply.code)
    assert got == expected
    named = await call(client, "GET", "/v1/dm/conversations", carol, params={"agent": "bob"})
    assert (named.status, named.code) == (403, "forbidden")
    # The owner reads; it does not act as an agent.
    key = scene.acme.key
    for method, path, body in (
        ("POST", "/v1/channels/ops/messages", {"text": "x"}),
        ("POST", f"/v1/messages/{scene.root}/replies", {"text": "x"}),
        ("POST", f"/v1/messages/{scene.root}/reactions", {"emoji": "+1"}),
        ("POST", f"/v1/messages/{scene.root}/read", {}),
        ("GET", "/v1/inbox", None),
        ("GET", "/v1/deliveries", None),
    ):
        refused = await call(client, method, path, key, json=body)
        assert (refused.status, refused.code) == (403, "forbidden"), path


async def test_owner_reads_bad_input(client: httpx.AsyncClient, scene: Scene) -> None:
    key = scene.acme.key
    bob_first = (await call(client, "GET", "/v1/deliveries", scene.acme.tokens["bob"])).data[0]
    cases: list[tuple[str, dict[str, Any], tuple[int, str]]] = [
        ("/v1/channels/nope/messages", {}, (404, "channel_not_found")),
        ("/v1/messages/123/replies", {}, (404, "message_not_found")),
        ("/v1/messages/abc/reactions", {}, (404, "message_not_found")),
        ("/v1/dm/999/messages", {}, (404, "conversation_not_found")),
        ("/v1/dm/x/messages", {}, (404, "conversation_not_found")),
        ("/v1/agents/nobody/mailbox", {}, (404, "agent_not_found")),
        ("/v1/agents/nobody/deliveries", {}, (404, "agent_not_found")),
        ("/v1/dm/conversations", {"agent": "nobody"}, (404, "agent_not_found")),
        ("/v1/channels/ops/messages", {"before": "abc"}, (400, "invalid_cursor")),
        (f"/v1/messages/{scene.root}/replies", {"after": "-1"}, (400, "invalid_cursor")),
        ("/v1/dm/conversations", {"before": "yesterday"}, (400, "invalid_cursor")),
        ("/v1/dm/conversations", {"limit": 0}, (400, "invalid_limit")),
        (f"/v1/dm/{scene.dm}/messages", {"after": "9" * 30}, (400, "invalid_cursor")),
        ("/v1/agents/bob/deliveries", {"after_seq": -1}, (400, "invalid_seq")),
        ("/v1/agents/bob/deliveries", {"limit": 1001}, (400, "invalid_limit")),
        # A delivery id of another agent is no cursor of bob's list.
        ("/v1/agents/alice/deliveries", {"status": "acked", "before": bob_first["id"]},
         (400, "invalid_cursor")),
        ("/v1/agents/bob/deliveries", {"status": "acked", "after_seq": 1},
         (400, "invalid_cursor")),
        ("/v1/agents/bob/deliveries", {"status": "lost"}, (400, "invalid_request")),
        ("/v1/search", {"q": "  "}, (400, "invalid_query")),
    ]
    got = []
    for path, params, _ in cases:
        reply = await call(client, "GET", path, key, params=params)
        got.append((path, params, (reply.status, reply.code)))
    assert got == cases


async def test_owner_reads_refuse_dead_keys(client: httpx.AsyncClient) -> None:
    """A key never minted and the key of a deleted workspace read nothing (401)."""
    world = await make_rest_world(client, agents=("alice",))
    made_up = "rk_live_" + "0" * 40
    refused = await call(client, "GET", "/v1/mailboxes", made_up)
    assert (refused.status, refused.code) == (401, "invalid_token")
    assert (await call(client, "DELETE", "/v1/workspace", world.key)).status == 200
    for path in ("/v1/mailboxes", "/v1/dm/conversations", "/v1/channels/general/messages",
                 "/v1/agents/alice/mailbox"):
        gone = await call(client, "GET", path, world.key)
        assert (gone.status, gone.code) == (401, "invalid_token"), path
