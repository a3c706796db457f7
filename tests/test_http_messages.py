"""REST: channel messages, threads, reactions and read receipts, with idempotency keys."""

from __future__ import annotations

import httpx
import pytest

from broker.server import BrokerServer
from tests.helpers.rest import call, make_rest_world

# The same tests in one process and with two gateway processes (conftest.py).
pytestmark = pytest.mark.both_process_models

GENERAL = "/v1/channels/general/messages"


async def count(server: BrokerServer, table: str) -> int:
    return int(await server.engine.read(
        lambda c: c.execute(f"SELECT count(*) FROM {table}").fetchone()[0]))


async def test_send_returns_the_message_and_reaches_members(
    server: BrokerServer, client: httpx.AsyncClient
) -> None:
    world = await make_rest_world(client)
    reply = await call(client, "POST", GENERAL, world.tokens["alice"],
                       json={"text": "hi @bob", "mode": "steer", "data": {"k": [1]}})
    assert reply.status == 201
    msg = reply.data
    assert (msg["text"], msg["agent_name"], msg["channel_name"]) == ("hi @bob", "alice", "general")
    assert (msg["mentions"], msg["injection_mode"], msg["data"]) == (["bob"], "steer", {"k": [1]})
    assert await count(server, "deliveries") == 2  # bob and carol


async def test_send_errors_write_nothing(server: BrokerServer, client: httpx.AsyncClient) -> None:
    world = await make_rest_world(client)
    alice = world.tokens["alice"]
    cases = [
        ({"text": ""}, 400, "invalid_text"),
        ({"text": "x" * 40_000}, 400, "text_too_long"),
        ({"text": "x", "mode": "shout"}, 400, "invalid_request"),
        ({"text": "x", "data": [1]}, 400, "invalid_request"),
        ({"text": "x", "data": {"b": "y" * 70_000}}, 400, "data_too_large"),
        ({"text": "x", "attachments": ["123"]}, 404, "file_not_found"),
        ({}, 400, "invalid_request"),
    ]
    for body, status, code in cases:
        reply = await call(client, "POST", GENERAL, alice, json=body)
        assert (reply.status, reply.code) == (status, code), body
    await call(client, "POST", "/v1/channels", world.tokens["bob"], json={"name": "ops"})
    outsider = await call(client, "POST", "/v1/channels/ops/messages", alice, json={"text": "x"})
    assert (outsider.status, outsider.code) == (403, "not_a_member")
    missing = await call(client, "POST", "/v1/channels/nope/messages", alice, json={"text": "x"})
    assert (missing.status, missing.code) == (404, "channel_not_found")
    assert await count(server, "messages") == 0
    assert await count(server, "deliveries") == 0


async def test_send_idempotency_key_replays_first_result(
    server: BrokerServer, client: httpx.AsyncClient
) -> None:
    """An idempotency key replays the first result."""
    world = await make_rest_world(client)
    alice = world.tokens["alice"]
    first = await call(client, "POST", GENERAL, alice, json={"text": "once"},
                       headers={"Idempotency-Key": "k-1"})
    again = await call(client, "POST", GENERAL, alice, json={"text": "once"},
                       headers={"X-Idempotency-Key": "k-1"})
    assert first.status == again.status == 201
    assert again.data["id"] == first.data["id"]
    assert await count(server, "messages") == 1
    other = await call(client, "POST", GENERAL, alice, json={"text": "different"},
                       headers={"Idempotency-Key": "k-1"})
    assert (other.status, other.code) == (409, "idempotency_key_reused")
    too_long = await call(client, "POST", GENERAL, alice, json={"text": "x"},
                          headers={"Idempotency-Key": "k" * 300})
    assert (too_long.status, too_long.code) == (400, "invalid_idempotency_key")
    blank = await call(client, "POST", GENERAL, alice, json={"text": "x"},
                       headers={"Idempotency-Key": ""})
    assert (blank.status, blank.code) == (400, "invalid_idempotency_key")
    assert await count(server, "messages") == 1


async def test_list_messages_pages_newest_first(client: httpx.AsyncClient) -> None:
    world = await make_rest_world(client, agents=("alice", "bob"))
    alice = world.tokens["alice"]
    ids = []
    for i in range(5):
        sent = await call(client, "POST", GENERAL, alice, json={"text": f"m{i}"})
        ids.append(sent.data["id"])
    page = await call(client, "GET", GENERAL, world.tokens["bob"], params={"limit": 2})
    assert page.status == 200
    assert [m["text"] for m in page.data] == ["m4", "m3"]
    older = await call(client, "GET", GENERAL, alice, params={"limit": "2", "before": ids[3]})
    assert [m["text"] for m in older.data] == ["m2", "m1"]
    newer = await call(client, "GET", GENERAL, alice, params={"after": ids[2]})
    assert [m["text"] for m in newer.data] == ["m4", "m3"]
    bad = await call(client, "GET", GENERAL, alice, params={"limit": 500})
    assert (bad.status, bad.code) == (400, "invalid_limit")
    not_int = await call(client, "GET", GENERAL, alice, params={"limit": "ten"})
    assert (not_int.status, not_int.code) == (400, "invalid_request")
    cursor = await call(client, "GET", GENERAL, alice, params={"before": "abc"})
    assert (cursor.status, cursor.code) == (400, "invalid_cursor")


async def test_get_message(client: httpx.AsyncClient) -> None:
    world = await make_rest_world(client, agents=("alice", "bob"))
    sent = await call(client, "POST", GENERAL, world.tokens["alice"], json={"text": "x"})
    got = await call(client, "GET", f"/v1/messages/{sent.data['id']}", world.tokens["bob"])
    assert got.status == 200
    assert got.data["id"] == sent.data["id"]
    for bad in ("999", "not-an-id"):
        missing = await call(client, "GET", f"/v1/messages/{bad}", world.tokens["bob"])
        assert (missing.status, missing.code) == (404, "message_not_found")


async def test_thread_reply_and_read(client: httpx.AsyncClient) -> None:
    world = await make_rest_world(client, agents=("alice", "bob"))
    alice, bob = world.tokens["alice"], world.tokens["bob"]
    root = await call(client, "POST", GENERAL, alice, json={"text": "root"})
    rid = root.data["id"]
    r1 = await call(client, "POST", f"/v1/messages/{rid}/replies", bob, json={"text": "r1"},
                    headers={"Idempotency-Key": "r-1"})
    assert r1.status == 201
    assert r1.data["thread_id"] == rid
    replay = await call(client, "POST", f"/v1/messages/{rid}/replies", bob, json={"text": "r1"},
                        headers={"Idempotency-Key": "r-1"})
    assert replay.data["id"] == r1.data["id"]
    # A reply to a reply joins the root's thread.
    r2 = await call(client, "POST", f"/v1/messages/{r1.data['id']}/replies", alice,
                    json={"text": "r2"})
    assert r2.data["thread_id"] == rid
    thread = await call(client, "GET", f"/v1/messages/{rid}/replies", alice)
    assert thread.status == 200
    assert thread.data["parent"]["id"] == rid
    assert thread.data["parent"]["reply_count"] == 2
    assert [r["text"] for r in thread.data["replies"]] == ["r1", "r2"]
    paged = await call(client, "GET", f"/v1/messages/{rid}/replies", alice, params={"limit": 1})
    assert [r["text"] for r in paged.data["replies"]] == ["r1"]
    # Replies are not top-level history.
    history = await call(client, "GET", GENERAL, alice)
    assert [m["text"] for m in history.data] == ["root"]
    missing = await call(client, "POST", "/v1/messages/1/replies", bob, json={"text": "x"})
    assert (missing.status, missing.code) == (404, "message_not_found")
    empty = await call(client, "POST", f"/v1/messages/{rid}/replies", bob, json={"text": ""})
    assert (empty.status, empty.code) == (400, "invalid_text")


async def test_reactions_add_list_remove(client: httpx.AsyncClient) -> None:
    world = await make_rest_world(client, agents=("alice", "bob", "carol"))
    alice, bob, carol = (world.tokens[n] for n in ("alice", "bob", "carol"))
    sent = await call(client, "POST", GENERAL, alice, json={"text": "react"})
    path = f"/v1/messages/{sent.data['id']}/reactions"
    added = await call(client, "POST", path, bob, json={"emoji": "👍"})
    assert added.status == 201
    assert (added.data["emoji"], added.data["agent_name"], added.data["created"]) == (
        "👍", "bob", True)
    repeat = await call(client, "POST", path, bob, json={"emoji": "👍"})
    assert repeat.data["created"] is False
    await call(client, "POST", path, carol, json={"emoji": "👍"})
    await call(client, "POST", path, carol, json={"emoji": "eyes"})
    listed = await call(client, "GET", path, alice)
    assert listed.data == [
        {"emoji": "👍", "count": 2, "agents": ["bob", "carol"]},
        {"emoji": "eyes", "count": 1, "agents": ["carol"]},
    ]
    # The SDK percent-encodes the emoji in the path.
    removed = await call(client, "DELETE", f"{path}/%F0%9F%91%8D", bob)
    assert removed.status == 204
    again = await call(client, "DELETE", f"{path}/%F0%9F%91%8D", bob)
    assert (again.status, again.code) == (404, "reaction_not_found")
    bad = await call(client, "POST", path, bob, json={"emoji": " "})
    assert (bad.status, bad.code) == (400, "invalid_emoji")
    missing = await call(client, "GET", "/v1/messages/5/reactions", bob)
    assert (missing.status, missing.code) == (404, "message_not_found")


async def test_mark_read_and_readers(server: BrokerServer, client: httpx.AsyncClient) -> None:
    world = await make_rest_world(client, agents=("alice", "bob"))
    alice, bob = world.tokens["alice"], world.tokens["bob"]
    sent = await call(client, "POST", GENERAL, alice, json={"text": "read me"})
    mid = sent.data["id"]
    read = await call(client, "POST", f"/v1/messages/{mid}/read", bob)
    assert read.status == 200
    assert (read.data["message_id"], read.data["agent_id"], read.data["already_read"]) == (
        mid, world.agents["bob"], False)
    again = await call(client, "POST", f"/v1/messages/{mid}/read", bob)
    assert again.data["already_read"] is True
    readers = await call(client, "GET", f"/v1/messages/{mid}/readers", alice)
    assert [(r["agent_name"], r["agent_id"]) for r in readers.data] == [
        ("bob", world.agents["bob"])]
    # bob's delivery of the message is acked by the read.
    states = await server.engine.read(lambda c: c.execute(
        "SELECT state FROM deliveries WHERE agent_id = ? AND message_id = ?",
        (int(world.agents["bob"]), int(mid))).fetchall())
    assert states == [("acked",)]
    missing = await call(client, "POST", "/v1/messages/77/read", bob)
    assert (missing.status, missing.code) == (404, "message_not_found")
