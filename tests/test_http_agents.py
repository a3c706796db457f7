"""REST: agents (register, list, get, self, update, rotate token, heartbeat, disconnect,
presence, deactivate)."""

from __future__ import annotations

import httpx

from tests.helpers.rest import call, make_rest_world


async def test_register_returns_the_token_once(client: httpx.AsyncClient) -> None:
    world = await make_rest_world(client, agents=())
    reply = await call(client, "POST", "/v1/agents", world.key,
                       json={"name": "alice", "type": "human", "persona": "helpful",
                             "metadata": {"team": "a"}})
    assert reply.status == 201
    assert reply.data["token"].startswith("at_live_")
    assert reply.data["name"] == "alice"
    assert set(reply.data) >= {"id", "status", "created_at"}
    me = await call(client, "GET", "/v1/agent", reply.data["token"])
    assert me.data["type"] == "human"
    assert me.data["persona"] == "helpful"
    assert me.data["metadata"] == {"team": "a"}


async def test_register_twice_is_409(client: httpx.AsyncClient) -> None:
    world = await make_rest_world(client, agents=("alice",))
    reply = await call(client, "POST", "/v1/agents", world.key, json={"name": "alice"})
    assert reply.status == 409
    assert reply.code == "agent_already_exists"


async def test_register_with_a_bad_name_or_type_is_400(client: httpx.AsyncClient) -> None:
    world = await make_rest_world(client, agents=())
    bad_name = await call(client, "POST", "/v1/agents", world.key, json={"name": "-x y"})
    assert (bad_name.status, bad_name.code) == (400, "invalid_agent_name")
    bad_type = await call(client, "POST", "/v1/agents", world.key,
                          json={"name": "x", "type": "robot"})
    assert (bad_type.status, bad_type.code) == (400, "invalid_request")
    assert "$.type" in bad_type.body["error"]["message"]
    missing = await call(client, "POST", "/v1/agents", world.key, json={})
    assert (missing.status, missing.code) == (400, "invalid_request")


async def test_list_agents_with_an_optional_status(client: httpx.AsyncClient) -> None:
    world = await make_rest_world(client, agents=("alice", "bob"))
    everyone = await call(client, "GET", "/v1/agents", world.key)
    assert [a["name"] for a in everyone.data] == ["alice", "bob"]
    await call(client, "POST", "/v1/agents/heartbeat", world.tokens["bob"])
    online = await call(client, "GET", "/v1/agents", world.tokens["alice"],
                        params={"status": "online"})
    assert [a["name"] for a in online.data] == ["bob"]
    bad = await call(client, "GET", "/v1/agents", world.key, params={"status": "sleepy"})
    assert (bad.status, bad.code) == (400, "invalid_status")


async def test_get_agent_by_name_with_its_channels(client: httpx.AsyncClient) -> None:
    world = await make_rest_world(client, agents=("alice",))
    reply = await call(client, "GET", "/v1/agents/alice", world.key)
    assert reply.status == 200
    assert reply.data["id"] == world.agents["alice"]
    assert [c["name"] for c in reply.data["channels"]] == ["general"]
    missing = await call(client, "GET", "/v1/agents/nobody", world.key)
    assert (missing.status, missing.code) == (404, "agent_not_found")


async def test_me_is_the_caller(client: httpx.AsyncClient) -> None:
    world = await make_rest_world(client, agents=("alice", "bob"))
    reply = await call(client, "GET", "/v1/agent", world.tokens["bob"])
    assert reply.status == 200
    assert reply.data["name"] == "bob"
    assert reply.data["id"] == world.agents["bob"]


async def test_update_agent_persona_and_metadata(client: httpx.AsyncClient) -> None:
    world = await make_rest_world(client, agents=("alice",))
    reply = await call(client, "PATCH", "/v1/agents/alice", world.key,
                       json={"persona": "terse", "metadata": {"k": 1}})
    assert reply.status == 200
    assert (reply.data["persona"], reply.data["metadata"]) == ("terse", {"k": 1})
    bad = await call(client, "PATCH", "/v1/agents/alice", world.key, json={"metadata": [1]})
    assert (bad.status, bad.code) == (400, "invalid_request")
    too_big = await call(client, "PATCH", "/v1/agents/alice", world.key,
                         json={"persona": "p" * 40_000})
    assert (too_big.status, too_big.code) == (400, "invalid_persona")


async def test_rotate_token_keeps_the_old_one_for_the_grace(client: httpx.AsyncClient) -> None:
    world = await make_rest_world(client, agents=("alice",))
    old = world.tokens["alice"]
    reply = await call(client, "POST", "/v1/agents/alice/rotate-token", world.key, json={})
    assert reply.status == 200
    new = reply.data["token"]
    assert new.startswith("at_live_") and new != old
    assert reply.data["name"] == "alice"
    # Default grace is 5 minutes: both work now.
    for token in (old, new):
        assert (await call(client, "GET", "/v1/agent", token)).data["name"] == "alice"
    missing = await call(client, "POST", "/v1/agents/nobody/rotate-token", world.key)
    assert (missing.status, missing.code) == (404, "agent_not_found")


async def test_heartbeat_and_disconnect_move_presence(client: httpx.AsyncClient) -> None:
    world = await make_rest_world(client, agents=("alice",))
    token = world.tokens["alice"]
    beat = await call(client, "POST", "/v1/agents/heartbeat", token, json={})
    assert beat.status == 200
    assert (beat.data["status"], beat.data["changed"]) == ("online", True)
    presence = await call(client, "GET", "/v1/agents/presence", world.key)
    assert presence.data[0]["agent_name"] == "alice"
    assert presence.data[0]["status"] == "online"
    gone = await call(client, "POST", "/v1/agents/disconnect", token)
    assert gone.data["status"] == "offline"
    presence = await call(client, "GET", "/v1/agents/presence", token)
    assert presence.data[0]["status"] == "offline"


async def test_deactivate_agent_revokes_its_token(client: httpx.AsyncClient) -> None:
    world = await make_rest_world(client, agents=("alice", "bob"))
    reply = await call(client, "DELETE", "/v1/agents/bob", world.key)
    assert reply.status == 200
    assert reply.data["name"] == "bob"
    dead = await call(client, "GET", "/v1/agent", world.tokens["bob"])
    assert (dead.status, dead.code) == (401, "invalid_token")
    missing = await call(client, "GET", "/v1/agents/bob", world.key)
    assert (missing.status, missing.code) == (404, "agent_not_found")
    # The name stays taken.
    again = await call(client, "POST", "/v1/agents", world.key, json={"name": "bob"})
    assert (again.status, again.code) == (409, "agent_already_exists")
