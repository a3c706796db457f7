"""REST: channels (create, list, get, update, topic, archive, join, leave, invite, members,
mute, unmute, read status)."""

from __future__ import annotations

import httpx

from tests.helpers.rest import call, make_rest_world


async def test_create_channel_as_an_agent_makes_it_the_owner(client: httpx.AsyncClient) -> None:
    world = await make_rest_world(client, agents=("alice",))
    reply = await call(client, "POST", "/v1/channels", world.tokens["alice"],
                       json={"name": "ops", "topic": "deploys", "metadata": {"tier": 1}})
    assert reply.status == 201
    data = reply.data
    assert (data["name"], data["topic"], data["metadata"]) == ("ops", "deploys", {"tier": 1})
    assert data["created_by"] == world.agents["alice"]
    assert data["member_count"] == 1
    got = await call(client, "GET", "/v1/channels/ops", world.key)
    assert [(m["agent_name"], m["role"]) for m in got.data["members"]] == [("alice", "owner")]


async def test_create_channel_with_the_workspace_key(client: httpx.AsyncClient) -> None:
    world = await make_rest_world(client, agents=())
    reply = await call(client, "POST", "/v1/channels", world.key, json={"name": "ops"})
    assert reply.status == 201
    assert (reply.data["created_by"], reply.data["member_count"]) == (None, 0)


async def test_create_channel_errors(client: httpx.AsyncClient) -> None:
    world = await make_rest_world(client, agents=("alice",))
    token = world.tokens["alice"]
    await call(client, "POST", "/v1/channels", token, json={"name": "ops"})
    dup = await call(client, "POST", "/v1/channels", token, json={"name": "ops"})
    assert (dup.status, dup.code) == (409, "channel_already_exists")
    bad = await call(client, "POST", "/v1/channels", token, json={"name": "Not Valid"})
    assert (bad.status, bad.code) == (400, "invalid_channel_name")
    missing = await call(client, "POST", "/v1/channels", token, json={"topic": "x"})
    assert (missing.status, missing.code) == (400, "invalid_request")
    assert "name" in missing.body["error"]["message"]


async def test_list_channels_hides_archived_unless_asked(client: httpx.AsyncClient) -> None:
    world = await make_rest_world(client, agents=("alice",))
    token = world.tokens["alice"]
    await call(client, "POST", "/v1/channels", token, json={"name": "old"})
    await call(client, "DELETE", "/v1/channels/old", token)
    listed = await call(client, "GET", "/v1/channels", token)
    assert [c["name"] for c in listed.data] == ["general"]
    everything = await call(client, "GET", "/v1/channels", token,
                            params={"include_archived": "true"})
    assert [(c["name"], c["is_archived"]) for c in everything.data] == [
        ("general", False), ("old", True)]


async def test_get_unknown_channel_is_404(client: httpx.AsyncClient) -> None:
    world = await make_rest_world(client, agents=("alice",))
    reply = await call(client, "GET", "/v1/channels/nope", world.tokens["alice"])
    assert (reply.status, reply.code) == (404, "channel_not_found")


async def test_update_channel_and_set_topic(client: httpx.AsyncClient) -> None:
    world = await make_rest_world(client, agents=("alice",))
    token = world.tokens["alice"]
    await call(client, "POST", "/v1/channels", token, json={"name": "ops", "topic": "a"})
    updated = await call(client, "PATCH", "/v1/channels/ops", token,
                         json={"metadata": {"x": 1}})
    assert (updated.data["topic"], updated.data["metadata"]) == ("a", {"x": 1})
    topic = await call(client, "PATCH", "/v1/channels/ops/topic", token, json={"topic": "b"})
    assert topic.status == 200
    assert topic.data["topic"] == "b"
    long = await call(client, "PATCH", "/v1/channels/ops/topic", token, json={"topic": "t" * 5000})
    assert (long.status, long.code) == (400, "invalid_topic")
    no_topic = await call(client, "PATCH", "/v1/channels/ops/topic", token, json={})
    assert (no_topic.status, no_topic.code) == (400, "invalid_request")


async def test_archive_channel_and_its_errors(client: httpx.AsyncClient) -> None:
    world = await make_rest_world(client, agents=("alice", "bob"))
    alice, bob = world.tokens["alice"], world.tokens["bob"]
    await call(client, "POST", "/v1/channels", alice, json={"name": "ops"})
    outsider = await call(client, "DELETE", "/v1/channels/ops", bob)
    assert (outsider.status, outsider.code) == (403, "not_a_member")
    archived = await call(client, "DELETE", "/v1/channels/ops", alice)
    assert archived.status == 200
    assert archived.data["is_archived"] is True
    post = await call(client, "POST", "/v1/channels/ops/messages", alice, json={"text": "hi"})
    assert (post.status, post.code) == (409, "channel_archived")
    join = await call(client, "POST", "/v1/channels/ops/join", bob)
    assert (join.status, join.code) == (409, "channel_archived")
    general = await call(client, "DELETE", "/v1/channels/general", world.key)
    assert (general.status, general.code) == (400, "cannot_archive_general")


async def test_join_and_leave(client: httpx.AsyncClient) -> None:
    world = await make_rest_world(client, agents=("alice", "bob"))
    alice, bob = world.tokens["alice"], world.tokens["bob"]
    await call(client, "POST", "/v1/channels", alice, json={"name": "ops"})
    # The SDK posts join without a body.
    joined = await call(client, "POST", "/v1/channels/ops/join", bob)
    assert joined.status == 200
    assert joined.data == {"channel": "ops", "agent_id": world.agents["bob"],
                           "already_member": False}
    again = await call(client, "POST", "/v1/channels/ops/join", bob)
    assert again.data["already_member"] is True
    left = await call(client, "POST", "/v1/channels/ops/leave", bob)
    assert left.status == 200
    assert left.data == {"channel": "ops", "agent_id": world.agents["bob"]}
    not_member = await call(client, "POST", "/v1/channels/ops/leave", bob)
    assert (not_member.status, not_member.code) == (403, "not_a_member")
    missing = await call(client, "POST", "/v1/channels/nope/join", bob)
    assert (missing.status, missing.code) == (404, "channel_not_found")


async def test_invite_and_members(client: httpx.AsyncClient) -> None:
    world = await make_rest_world(client, agents=("alice", "bob", "carol"))
    alice = world.tokens["alice"]
    await call(client, "POST", "/v1/channels", alice, json={"name": "ops"})
    invited = await call(client, "POST", "/v1/channels/ops/invite", alice,
                         json={"agent_name": "bob"})
    assert invited.status == 200
    assert invited.data == {"channel": "ops", "agent": "bob", "already_member": False}
    by_key = await call(client, "POST", "/v1/channels/ops/invite", world.key,
                        json={"agent_name": "carol"})
    assert by_key.data["agent"] == "carol"
    members = await call(client, "GET", "/v1/channels/ops/members", alice)
    assert [m["agent_name"] for m in members.data] == ["alice", "bob", "carol"]
    unknown = await call(client, "POST", "/v1/channels/ops/invite", alice,
                         json={"agent_name": "zed"})
    assert (unknown.status, unknown.code) == (404, "agent_not_found")
    missing_field = await call(client, "POST", "/v1/channels/ops/invite", alice, json={})
    assert (missing_field.status, missing_field.code) == (400, "invalid_request")


async def test_mute_and_unmute(client: httpx.AsyncClient) -> None:
    world = await make_rest_world(client, agents=("alice", "bob"))
    bob = world.tokens["bob"]
    muted = await call(client, "POST", "/v1/channels/general/mute", bob)
    assert muted.status == 200
    assert (muted.data["muted"], muted.data["changed"]) == (True, True)
    members = await call(client, "GET", "/v1/channels/general/members", bob)
    assert {m["agent_name"]: m["is_muted"] for m in members.data} == {
        "alice": False, "bob": True}
    unmuted = await call(client, "POST", "/v1/channels/general/unmute", bob)
    assert (unmuted.data["muted"], unmuted.data["changed"]) == (False, True)
    await call(client, "POST", "/v1/channels", world.tokens["alice"], json={"name": "ops"})
    outsider = await call(client, "POST", "/v1/channels/ops/mute", bob)
    assert (outsider.status, outsider.code) == (403, "not_a_member")


async def test_read_status_follows_mark_read(client: httpx.AsyncClient) -> None:
    world = await make_rest_world(client, agents=("alice", "bob"))
    alice, bob = world.tokens["alice"], world.tokens["bob"]
    sent = await call(client, "POST", "/v1/channels/general/messages", alice,
                      json={"text": "read me"})
    await call(client, "POST", f"/v1/messages/{sent.data['id']}/read", bob)
    status = await call(client, "GET", "/v1/channels/general/read-status", alice)
    assert status.status == 200
    pointers = {s["agent_name"]: s["last_read_id"] for s in status.data}
    assert pointers == {"alice": None, "bob": sent.data["id"]}
    await call(client, "POST", "/v1/channels", alice, json={"name": "ops"})
    outsider = await call(client, "GET", "/v1/channels/ops/read-status", bob)
    assert (outsider.status, outsider.code) == (403, "not_a_member")
