"""Optional fields of list answers are left out, not null, as the Relaycast types declare."""

from __future__ import annotations

import httpx

from tests.helpers.rest import call, make_rest_world


async def test_lists_leave_out_members_and_channels(client: httpx.AsyncClient) -> None:
    world = await make_rest_world(client, agents=("alice",))
    channels = await call(client, "GET", "/v1/channels", world.key)
    assert channels.status == 200
    assert channels.body["data"] and all("members" not in c for c in channels.body["data"])
    agents = await call(client, "GET", "/v1/agents", world.key)
    assert agents.status == 200
    assert agents.body["data"] and all("channels" not in a for a in agents.body["data"])
    # where a read asks for them, they are there
    one = await call(client, "GET", "/v1/channels/general", world.key)
    assert [m["agent_name"] for m in one.body["data"]["members"]] == ["alice"]
    me = await call(client, "GET", "/v1/agents/alice", world.key)
    assert [c["name"] for c in me.body["data"]["channels"]] == ["general"]
