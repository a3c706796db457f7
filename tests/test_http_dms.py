"""REST: 1:1 DMs and group DMs."""

from __future__ import annotations

import httpx

from tests.helpers.rest import call, make_rest_world


async def test_dm_send_creates_the_conversation(client: httpx.AsyncClient) -> None:
    world = await make_rest_world(client)
    alice, bob = world.tokens["alice"], world.tokens["bob"]
    sent = await call(client, "POST", "/v1/dm", alice, json={"to": "bob", "text": "psst"},
                      headers={"Idempotency-Key": "dm-1"})
    assert sent.status == 201
    # Relaycast SendDmResponse: {conversation_id, message, created_at}.
    data = sent.data
    assert data["message"]["text"] == "psst"
    assert data["message"]["agent_name"] == "alice"
    assert data["message"]["conversation_id"] == data["conversation_id"]
    replay = await call(client, "POST", "/v1/dm", alice, json={"to": "bob", "text": "psst"},
                        headers={"Idempotency-Key": "dm-1"})
    assert replay.data["message"]["id"] == data["message"]["id"]
    answer = await call(client, "POST", "/v1/dm", bob, json={"to": "alice", "text": "yes?"})
    assert answer.data["conversation_id"] == data["conversation_id"]
    history = await call(client, "GET", f"/v1/dm/{data['conversation_id']}/messages", bob)
    assert history.status == 200
    assert [m["text"] for m in history.data] == ["yes?", "psst"]
    convs = await call(client, "GET", "/v1/dm/conversations", bob)
    assert convs.status == 200
    (conv,) = convs.data
    assert conv["id"] == data["conversation_id"]
    assert conv["type"] == "1:1"
    assert sorted(p["agent_name"] for p in conv["participants"]) == ["alice", "bob"]
    assert conv["last_message"]["text"] == "yes?"


async def test_dm_errors(client: httpx.AsyncClient) -> None:
    world = await make_rest_world(client)
    alice, carol = world.tokens["alice"], world.tokens["carol"]
    me = await call(client, "POST", "/v1/dm", alice, json={"to": "alice", "text": "x"})
    assert (me.status, me.code) == (400, "cannot_dm_self")
    nobody = await call(client, "POST", "/v1/dm", alice, json={"to": "zed", "text": "x"})
    assert (nobody.status, nobody.code) == (404, "agent_not_found")
    no_to = await call(client, "POST", "/v1/dm", alice, json={"text": "x"})
    assert (no_to.status, no_to.code) == (400, "invalid_request")
    sent = await call(client, "POST", "/v1/dm", alice, json={"to": "bob", "text": "x"})
    private = await call(client, "GET", f"/v1/dm/{sent.data['conversation_id']}/messages", carol)
    assert (private.status, private.code) == (403, "not_a_participant")
    missing = await call(client, "GET", "/v1/dm/123/messages", carol)
    assert (missing.status, missing.code) == (404, "conversation_not_found")
    group_send = await call(client, "POST", f"/v1/dm/{sent.data['conversation_id']}/messages",
                            alice, json={"text": "x"})
    assert (group_send.status, group_send.code) == (400, "not_a_group_dm")


async def test_group_dm_lifecycle(client: httpx.AsyncClient) -> None:
    world = await make_rest_world(client, agents=("alice", "bob", "carol", "dave"))
    alice, bob, dave = world.tokens["alice"], world.tokens["bob"], world.tokens["dave"]
    created = await call(client, "POST", "/v1/dm/group", alice,
                         json={"participants": ["bob", "carol"], "name": "trio"})
    assert created.status == 201
    group = created.data
    assert (group["dm_type"], group["name"]) == ("group", "trio")
    assert [p["agent_name"] for p in group["participants"]] == ["alice", "bob", "carol"]
    gid = group["id"]
    sent = await call(client, "POST", f"/v1/dm/{gid}/messages", bob, json={"text": "hey all"},
                      headers={"Idempotency-Key": "g-1"})
    assert sent.status == 201
    assert (sent.data["conversation_id"], sent.data["message"]["text"]) == (gid, "hey all")
    outsider = await call(client, "POST", f"/v1/dm/{gid}/messages", dave, json={"text": "x"})
    assert (outsider.status, outsider.code) == (403, "not_a_participant")
    # The SDK sends {agentName} as agent_name.
    added = await call(client, "POST", f"/v1/dm/{gid}/participants", alice,
                       json={"agent_name": "dave"})
    assert added.status == 200
    assert added.data == {"conversation_id": gid, "agent": "dave", "already_member": False}
    assert (await call(client, "GET", f"/v1/dm/{gid}/messages", dave)).status == 200
    removed = await call(client, "DELETE", f"/v1/dm/{gid}/participants/dave", alice)
    assert removed.status == 200
    assert removed.data["removed"] is True
    gone = await call(client, "GET", f"/v1/dm/{gid}/messages", dave)
    assert (gone.status, gone.code) == (403, "not_a_participant")


async def test_group_dm_errors(client: httpx.AsyncClient) -> None:
    world = await make_rest_world(client)
    alice = world.tokens["alice"]
    few = await call(client, "POST", "/v1/dm/group", alice, json={"participants": ["bob"]})
    assert (few.status, few.code) == (400, "too_few_participants")
    unknown = await call(client, "POST", "/v1/dm/group", alice,
                         json={"participants": ["bob", "zed"]})
    assert (unknown.status, unknown.code) == (404, "agent_not_found")
    wrong = await call(client, "POST", "/v1/dm/group", alice, json={"participants": "bob"})
    assert (wrong.status, wrong.code) == (400, "invalid_request")
    missing = await call(client, "POST", "/v1/dm/42/participants", alice,
                         json={"agent_name": "bob"})
    assert (missing.status, missing.code) == (404, "conversation_not_found")
