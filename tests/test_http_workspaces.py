"""REST: workspaces (create, look up by name, get, update, delete)."""

from __future__ import annotations

import httpx

from tests.helpers.rest import call, make_rest_world


async def test_create_workspace_returns_its_key_once(client: httpx.AsyncClient) -> None:
    reply = await call(client, "POST", "/v1/workspaces", json={"name": "acme"})
    assert reply.status == 201
    data = reply.data
    assert data["api_key"].startswith("rk_live_")
    assert data["name"] == "acme"
    assert set(data) >= {"workspace_id", "api_key", "created_at"}
    # The key works; the general channel exists.
    channels = await call(client, "GET", "/v1/channels", data["api_key"])
    assert [c["name"] for c in channels.data] == ["general"]


async def test_create_workspace_twice_is_409(client: httpx.AsyncClient) -> None:
    await call(client, "POST", "/v1/workspaces", json={"name": "acme"})
    again = await call(client, "POST", "/v1/workspaces", json={"name": "acme"})
    assert again.status == 409
    assert again.code == "workspace_already_exists"


async def test_create_workspace_again_with_own_key_finds_it(client: httpx.AsyncClient) -> None:
    """Create again with its own key finds it."""
    # What the SDK's ensureWorkspace does: 200 and no new key, nothing created.
    created = await call(client, "POST", "/v1/workspaces", json={"name": "acme"})
    key = created.data["api_key"]
    again = await call(client, "POST", "/v1/workspaces", key, json={"name": "acme"})
    assert again.status == 200
    assert again.data == {"workspace_id": created.data["workspace_id"], "name": "acme",
                          "created_at": created.data["created_at"]}
    # Another workspace's key, or a bad one, does not open it.
    other = await call(client, "POST", "/v1/workspaces", json={"name": "other"})
    foreign = await call(client, "POST", "/v1/workspaces", other.data["api_key"],
                         json={"name": "acme"})
    assert (foreign.status, foreign.code) == (409, "workspace_already_exists")
    bogus = await call(client, "POST", "/v1/workspaces", "rk_live_nope", json={"name": "acme"})
    assert (bogus.status, bogus.code) == (409, "workspace_already_exists")
    # A bad token does not stop an open operation.
    fresh = await call(client, "POST", "/v1/workspaces", "rk_live_nope", json={"name": "new"})
    assert fresh.status == 201


async def test_create_workspace_with_a_blank_name_is_400(client: httpx.AsyncClient) -> None:
    reply = await call(client, "POST", "/v1/workspaces", json={"name": "   "})
    assert reply.status == 400
    assert reply.code == "invalid_workspace_name"


async def test_lookup_by_name_needs_no_token_and_shows_little(
    client: httpx.AsyncClient,
) -> None:
    world = await make_rest_world(client, agents=())
    await call(client, "PATCH", "/v1/workspace", world.key, json={"system_prompt": "secret"})
    reply = await call(client, "GET", "/v1/workspaces/by-name/acme")
    assert reply.status == 200
    assert reply.data == {
        "id": world.workspace_id, "name": "acme", "created_at": reply.data["created_at"],
    }


async def test_lookup_of_an_unknown_name_is_404(client: httpx.AsyncClient) -> None:
    reply = await call(client, "GET", "/v1/workspaces/by-name/nobody")
    assert reply.status == 404
    assert reply.code == "workspace_not_found"


async def test_get_workspace_with_the_key_or_an_agent_token(client: httpx.AsyncClient) -> None:
    world = await make_rest_world(client, agents=("alice",))
    for token in (world.key, world.tokens["alice"]):
        reply = await call(client, "GET", "/v1/workspace", token)
        assert reply.status == 200
        assert reply.data["id"] == world.workspace_id
        assert reply.data["name"] == "acme"
        assert set(reply.data) >= {"system_prompt", "plan", "created_at", "metadata"}


async def test_update_workspace_name_and_system_prompt(client: httpx.AsyncClient) -> None:
    world = await make_rest_world(client, agents=())
    reply = await call(
        client, "PATCH", "/v1/workspace", world.key,
        json={"name": "acme2", "system_prompt": "be brief"},
    )
    assert reply.status == 200
    assert reply.data["name"] == "acme2"
    assert reply.data["system_prompt"] == "be brief"
    # Leaving a field out keeps it; null clears the prompt.
    cleared = await call(client, "PATCH", "/v1/workspace", world.key,
                         json={"system_prompt": None})
    assert cleared.data == {**reply.data, "system_prompt": None}


async def test_update_workspace_taken_name_409(client: httpx.AsyncClient) -> None:
    """Renaming to a taken name is 409."""
    world = await make_rest_world(client, agents=())
    await call(client, "POST", "/v1/workspaces", json={"name": "other"})
    reply = await call(client, "PATCH", "/v1/workspace", world.key, json={"name": "other"})
    assert reply.status == 409
    assert reply.code == "workspace_already_exists"


async def test_update_workspace_wrong_type_invalid_request(client: httpx.AsyncClient) -> None:
    """An update with a wrong type is invalid_request."""
    world = await make_rest_world(client, agents=())
    reply = await call(client, "PATCH", "/v1/workspace", world.key, json={"name": 3})
    assert reply.status == 400
    assert reply.code == "invalid_request"
    assert "$.name" in reply.body["error"]["message"]


async def test_delete_workspace_revokes_its_key_and_tokens(client: httpx.AsyncClient) -> None:
    world = await make_rest_world(client, agents=("alice",))
    reply = await call(client, "DELETE", "/v1/workspace", world.key)
    assert reply.status == 200
    assert reply.data == {"workspace_id": world.workspace_id, "name": "acme"}
    for token in (world.key, world.tokens["alice"]):
        gone = await call(client, "GET", "/v1/workspace", token)
        assert gone.status == 401
        assert gone.code == "invalid_token"
    assert (await call(client, "GET", "/v1/workspaces/by-name/acme")).status == 404
