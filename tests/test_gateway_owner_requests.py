"""The observer socket (`/v1/ws` with the workspace key) answers the owner's requests.

The same operations as REST, with the native request and reply frames; an
agent-only operation is refused, another workspace's observer finds
nothing of this one, and an agent's socket keeps its rules.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import trio_websocket

from broker.server import BrokerServer
from tests.helpers.realtime import next_frame, raw_socket, send_json
from tests.helpers.rest import call, make_scene

_ids = iter(range(1_000_000))


async def request(ws: trio_websocket.WebSocketConnection, type_: str, **fields: Any
                  ) -> dict[str, Any]:
    """Send one request frame; its reply (events in between are skipped)."""
    rid = f"r{next(_ids)}"
    await send_json(ws, {"v": 1, "id": rid, "type": type_, **fields})
    while True:
        frame = await next_frame(ws, "reply")
        if frame["re"] == rid:
            return frame


def error_of(reply: dict[str, Any]) -> str:
    assert reply["ok"] is False, reply
    return str(reply["error"]["code"])


async def test_observer_requests_read_what_rest_reads(
        server: BrokerServer, client: httpx.AsyncClient) -> None:
    """Each owner read over the observer socket answers what the REST route answers."""
    scene = await make_scene(client)
    key = scene.acme.key
    rest = {
        "message.list": ("/v1/channels/ops/messages", {"channel": "ops"}),
        "thread.get": (f"/v1/messages/{scene.root}/replies", {"message_id": scene.root}),
        "reaction.list": (f"/v1/messages/{scene.root}/reactions", {"message_id": scene.root}),
        "message.readers": (f"/v1/messages/{scene.root}/readers", {"message_id": scene.root}),
        "dm.conversations": ("/v1/dm/conversations", {}),
        "dm.messages": (f"/v1/dm/{scene.group}/messages", {"conversation_id": scene.group}),
        "search": ("/v1/search?q=deploying", {"q": "deploying"}),
        "agent.deliveries": ("/v1/agents/bob/deliveries", {"name": "bob"}),
    }
    async with raw_socket(server, key, subprotocols=[]) as observer:
        for type_, (path, fields) in rest.items():
            expected = (await call(client, "GET", path, key)).data
            reply = await request(observer, type_, **fields)
            assert reply == {"v": 1, "type": "reply", "re": reply["re"], "ok": True,
                             "data": expected}, type_
        assert [m["text"] for m in (await request(
            observer, "message.list", channel="ops"))["data"]] == ["deploying now"]
        summary = (await request(observer, "agent.mailbox", name="bob"))["data"]
        assert (summary["agent_name"], summary["pending"]) == ("bob", 2)
        every = (await request(observer, "mailbox.list"))["data"]
        assert [m["agent_name"] for m in every] == ["alice", "bob", "carol"]
        # Events keep flowing on the same socket, between the replies.
        sent = await call(client, "POST", "/v1/channels/ops/messages", scene.acme.tokens["bob"],
                          json={"text": "rolled back"})
        event = await next_frame(observer, "message.created")
        assert event["message"]["text"] == "rolled back"
        listed = await request(observer, "message.list", channel="ops", limit=1)
        assert [m["id"] for m in listed["data"]] == [sent.data["id"]]


async def test_observer_requests_refused(server: BrokerServer, client: httpx.AsyncClient) -> None:
    """Agent-only operations, bad input and another workspace's ids: error replies, no writes."""
    scene = await make_scene(client)
    async with raw_socket(server, scene.acme.key, subprotocols=[]) as observer:
        send = await request(observer, "message.send", channel="ops", text="as the owner")
        assert error_of(send) == "forbidden"
        assert error_of(await request(observer, "delivery.list")) == "forbidden"
        assert error_of(await request(observer, "inbox.get")) == "forbidden"
        assert error_of(await request(observer, "no.such.thing")) == "unknown_type"
        assert error_of(await request(observer, "message.list")) == "invalid_request"
        assert error_of(await request(observer, "message.list", channel="ops",
                                      before="abc")) == "invalid_cursor"
        assert error_of(await request(observer, "dm.conversations",
                                      before="x")) == "invalid_cursor"
        assert error_of(await request(observer, "agent.deliveries", name="bob",
                                      after_seq=-1)) == "invalid_seq"
        assert error_of(await request(observer, "agent.mailbox", name="nobody")) \
            == "agent_not_found"
        assert error_of(await request(observer, "thread.get", message_id="123")) \
            == "message_not_found"
        # The socket is still open, and nothing was written.
        assert (await request(observer, "message.list", channel="ops"))["ok"] is True
    history = await call(client, "GET", "/v1/channels/ops/messages", scene.acme.key)
    assert [m["text"] for m in history.data] == ["deploying now"]

    async with raw_socket(server, scene.globex.key, subprotocols=[]) as other:
        foreign = {
            "message.list": {"channel": "ops"},
            "message.get": {"message_id": scene.root},
            "thread.get": {"message_id": scene.root},
            "reaction.list": {"message_id": scene.root},
            "dm.messages": {"conversation_id": scene.dm},
            "agent.mailbox": {"name": "bob"},
            "agent.deliveries": {"name": "bob"},
        }
        codes = {t: error_of(await request(other, t, **f)) for t, f in foreign.items()}
        assert codes == {
            "message.list": "channel_not_found", "message.get": "message_not_found",
            "thread.get": "message_not_found", "reaction.list": "message_not_found",
            "dm.messages": "conversation_not_found", "agent.mailbox": "agent_not_found",
            "agent.deliveries": "agent_not_found"}
        assert (await request(other, "dm.conversations"))["data"] == []
        assert (await request(other, "search", q="deploying"))["data"] == []

    # A deleted workspace's key, and one never minted, open no socket to ask on.
    assert (await call(client, "DELETE", "/v1/workspace", scene.globex.key)).status == 200
    for dead in (scene.globex.key, "rk_live_" + "0" * 40):
        with pytest.raises(trio_websocket.ConnectionRejected) as refused:
            async with raw_socket(server, dead, subprotocols=[]):
                pass
        assert refused.value.status_code == 401


async def test_agent_sockets_keep_their_rules(
        server: BrokerServer, client: httpx.AsyncClient) -> None:
    """An agent's socket is refused where it was, and has none of the owner's requests."""
    scene = await make_scene(client)
    async with raw_socket(server, scene.acme.tokens["carol"]) as carol:
        assert error_of(await request(carol, "message.list", channel="ops")) == "not_a_member"
        assert error_of(await request(carol, "dm.messages", conversation_id=scene.dm)) \
            == "not_a_participant"
        assert error_of(await request(carol, "reaction.list", message_id=scene.root)) \
            == "message_not_found"
        assert error_of(await request(carol, "agent.mailbox", name="bob")) == "unknown_type"
        assert error_of(await request(carol, "dm.conversations", agent="bob")) == "forbidden"
        mine = await request(carol, "dm.conversations")
        assert [c["id"] for c in mine["data"]] == [scene.group]
