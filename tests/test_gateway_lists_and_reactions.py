"""The WebSocket binding of the mailbox lists and of reactions takes the same checks as REST."""

from __future__ import annotations

import httpx
import pytest

from broker.client import RequestError, connect
from broker.engine.mailbox import AckUpTo
from broker.server import BrokerServer
from tests.helpers.realtime import Live, post, ws_url
from tests.helpers.rest import call


async def reactions(server: BrokerServer) -> int:
    row = await server.engine.read(
        lambda c: c.execute("SELECT count(*) FROM reactions").fetchone())
    return int(row[0])


async def test_delivery_list_of_acked_rows_over_the_socket(
    live: Live,
) -> None:
    server, world = live.server, live.world
    alice, bob = world.agents["alice"], world.agents["bob"]
    for text in ("one", "two", "three"):
        await post(server.engine, world.workspace_id, alice, "general", text)
    await server.engine.submit(AckUpTo(workspace_id=world.workspace_id, agent_id=bob,
                                       up_to_seq=2))
    async with connect(ws_url(server), world.tokens["bob"]) as session:
        acked = await session.request("delivery.list", status="acked")
        assert [(i["seq"], i["status"]) for i in acked] == [(2, "acked"), (1, "acked")]
        older = await session.request("delivery.list", status="acked", before=acked[0]["id"])
        assert [i["seq"] for i in older] == [1]
        for fields, code in (({"limit": 0}, "invalid_limit"), ({"limit": -1}, "invalid_limit"),
                             ({"status": "acked", "before": "nope"}, "invalid_cursor"),
                             ({"status": "bogus"}, "invalid_request")):
            with pytest.raises(RequestError) as refused:
                await session.request("delivery.list", **fields)
            assert refused.value.code == code
        # The session is still usable after the refusals.
        assert [i["seq"] for i in await session.request("delivery.list")] == [3]


@pytest.mark.parametrize("bad", ["\u0000", "\u202e", "a\nb", "x" * 65])
async def test_reaction_emoji_refused_on_rest_and_socket_writes_nothing(
    live: Live, bad: str,
) -> None:
    server, world = live.server, live.world
    message = await post(server.engine, world.workspace_id, world.agents["alice"], "general",
                         "react to me")
    assert server.url is not None
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        reply = await call(client, "POST", f"/v1/messages/{message}/reactions",
                           world.tokens["bob"], json={"emoji": bad})
        assert (reply.status, reply.code) == (400, "invalid_emoji")
    async with connect(ws_url(server), world.tokens["bob"]) as session:
        with pytest.raises(RequestError) as refused:
            await session.request("reaction.add", message_id=str(message), emoji=bad)
        assert refused.value.code == "invalid_emoji"
        assert await reactions(server) == 0
        await session.request("reaction.add", message_id=str(message), emoji="ok")
    assert await reactions(server) == 1
