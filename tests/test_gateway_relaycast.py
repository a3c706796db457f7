"""Relaycast compatibility over real sockets: node tokens, /v1/node/ws, and the workspace observer.

Frame shapes are those of @relaycast/types@6.0.2 (fleet-wire.d.ts, events.d.ts).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import trio
import trio.testing
import trio_websocket

from broker.engine import secrets
from broker.engine.agents import RotateToken
from broker.engine.channels import CreateChannel
from broker.engine.config import EngineConfig, Limits
from broker.engine.conversations import SendDm
from broker.engine.engine import Engine
from broker.engine.errors import BrokerError
from broker.engine.mailbox import SeqMarks, seq_marks
from broker.engine.node_tokens import (
    DEFAULT_NODE_TOKEN_TTL_S,
    IssueNodeToken,
    agent_by_node_token,
)
from broker.engine.reactions import AddReaction
from broker.engine.threads import ReplyToThread
from broker.gateway import Gateway
from broker.gateway.delivery import marks_and_expiry
from broker.gateway.node import NodeSession, node_token_cut
from broker.gateway.settings import GatewaySettings
from protocol.codec import CloseCode
from tests.helpers.daemon import serve
from tests.helpers.engine import TEST_DEADLINE_S, make_world
from tests.helpers.realtime import (
    FakeWebSocket,
    Live,
    eventually,
    next_frame,
    post,
    raw_socket,
    send_json,
)

# The same tests in one process and with two gateway processes (conftest.py).
pytestmark = pytest.mark.both_process_models

# -- node tokens ----------------------------------------------------------------------------


async def test_node_token_stored_only_hashed(live: Live) -> None:
    """An agent gets a node token, stored only hashed."""
    issued = await live.node_token("bob")
    bob_id = live.world.agents["bob"]
    assert issued == {"node_id": f"node_{bob_id}", "node_name": "bob-direct",
                      "token": issued["token"]}
    assert issued["token"].startswith("nt_live_")
    stored = await live.server.engine.read(lambda c: c.execute(
        "SELECT token_hash FROM node_tokens WHERE agent_id = ?", (bob_id,)).fetchall())
    assert stored == [(secrets.digest(issued["token"]),)]


@pytest.mark.parametrize(("token", "status", "code"), [
    (None, 401, "unauthorized"),
    ("at_live_nope", 401, "invalid_token"),
    ("workspace-key", 403, "forbidden"),
])
async def test_node_tokens_need_an_agent_token(
    live: Live, token: str | None, status: int, code: str
) -> None:
    if token == "workspace-key":
        token = live.world.key
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    assert live.server.url is not None
    async with httpx.AsyncClient(base_url=live.server.url) as http:
        response = await http.post("/v1/agent/node-token", json={}, headers=headers)
    assert response.status_code == status
    assert response.json()["error"]["code"] == code


@pytest.mark.parametrize("token", [None, "nt_live_nope", "at_live_nope"])
async def test_node_socket_refuses_bad_tokens(live: Live, token: str | None) -> None:
    """The node socket refuses bad tokens."""
    with pytest.raises(trio_websocket.ConnectionRejected) as refused:
        async with raw_socket(live.server, token, path="/v1/node/ws", subprotocols=[]):
            pass
    assert refused.value.status_code == 401


# -- the node socket ------------------------------------------------------------------------


async def test_node_register_deliver_and_ack_in_the_sdk_shapes(live: Live) -> None:
    issued = await live.node_token("bob")
    bob_id = str(live.world.agents["bob"])
    async with raw_socket(live.server, issued["token"], path="/v1/node/ws",
                          subprotocols=[]) as node:
        await send_json(node, {
            "v": 1, "id": "sdk-direct-1", "type": "node.register", "node_id": issued["node_id"],
            "name": issued["node_name"], "capabilities": [{"name": "deploy"}], "max_agents": 1,
            "tags": ["implicit", "direct", "sdk"], "version": "sdk-typescript/6.0.2"})
        reply = await next_frame(node, "reply")
        assert reply["id"] == "sdk-direct-1" and reply["ok"] is True and reply["v"] == 1
        assert reply["data"]["node_id"] == issued["node_id"]
        assert reply["data"]["accepted_capabilities"] == [{
            "name": "deploy", "kind": "action", "accepted": False,
            "reason": "this broker does not run node capabilities"}]

        message_id = await post(live.server.engine, live.world.workspace_id,
                                live.world.agents["alice"], "general", "for the node")
        deliver = await next_frame(node, "deliver")
        assert set(deliver) == {"v", "type", "delivery_id", "agent_id", "agent", "msg_id", "seq",
                                "mode", "payload"}
        assert deliver["delivery_id"] == f"{bob_id}:1"
        assert (deliver["agent_id"], deliver["agent"]) == (bob_id, "bob")
        assert (deliver["msg_id"], deliver["seq"], deliver["mode"]) == (str(message_id), 1, "wait")
        payload = deliver["payload"]
        assert payload["type"] == "message.created"
        # What ws.js transformServerLikeEvent reads.
        data = payload["data"]
        assert (data["id"], data["from_name"], data["text"], data["channel_name"]) == (
            str(message_id), "alice", "for the node", "general")

        await send_json(node, {"v": 1, "type": "delivery.ack", "agent": "bob", "up_to_seq": 1})
        await send_json(node, {"v": 1, "id": "hb", "type": "node.heartbeat", "load": 0,
                               "active_agents": 1, "handlers_live": False})
        assert (await next_frame(node, "reply"))["id"] == "hb"
        await send_json(node, {"v": 1, "id": "wrong", "type": "delivery.ack", "agent": "carol",
                               "up_to_seq": 1})
        error = await next_frame(node, "error")
        assert error == {"v": 1, "type": "error", "id": "wrong", "ok": False,
                         "code": "agent_not_found", "message": error["message"]}
        # Fleet frames this broker does not implement are ignored, the socket stays.
        await send_json(node, {"v": 1, "type": "inventory.sync", "agents": []})
        await send_json(node, {"v": 1, "id": "hb2", "type": "node.heartbeat", "load": 0,
                               "active_agents": 1, "handlers_live": False})
        assert (await next_frame(node, "reply"))["id"] == "hb2"

    async def acked() -> bool:
        marks = await live.server.engine.read(seq_marks, live.world.workspace_id, int(bob_id))
        return marks.acked_seq == 1

    await eventually(acked)


async def test_node_socket_context_updates(
    live: Live,
) -> None:
    """A node gets DMs, threads, reactions and events as context updates."""
    engine, world = live.server.engine, live.world
    issued = await live.node_token("bob")
    async with raw_socket(live.server, issued["token"], path="/v1/node/ws",
                          subprotocols=[]) as node:
        root = await post(engine, world.workspace_id, world.agents["bob"], "general", "root")
        await engine.submit(SendDm(workspace_id=world.workspace_id,
                                   agent_id=world.agents["alice"], to="bob", text="psst"))
        await engine.submit(ReplyToThread(workspace_id=world.workspace_id,
                                          agent_id=world.agents["alice"],
                                          message_id=str(root), text="in thread"))
        await engine.submit(AddReaction(workspace_id=world.workspace_id,
                                        agent_id=world.agents["alice"], message_id=str(root),
                                        emoji="eyes"))
        frames = [await next_frame(node, "deliver") for _ in range(3)]
        kinds = [f["payload"]["type"] for f in frames]
        assert kinds == ["dm.received", "thread.reply", "message.reacted"]
        dm, reply, reaction = (f["payload"]["data"] for f in frames)
        assert (dm["from_name"], dm["text"], dm["conversation_id"] is not None) == (
            "alice", "psst", True)
        assert (reply["thread_id"], reply["from_name"]) == (str(root), "alice")
        assert (reaction["message_id"], reaction["emoji"], reaction["agent_name"]) == (
            str(root), "eyes", "alice")
        assert frames[2]["msg_id"] == str(root)

        async with raw_socket(live.server, world.tokens["carol"]):
            update = await next_frame(node, "context.update")
            while update["data"]["agent"]["name"] != "carol":
                update = await next_frame(node, "context.update")
        assert update["topic"] == "presence" and update["event"].startswith("agent.status.")


# -- the workspace observer --------------------------------------------------------------------


async def test_observer_flat_events_filtered_by_subscription(live: Live) -> None:
    """The observer sees flat events and filters by subscription."""
    engine, world = live.server.engine, live.world
    async with raw_socket(live.server, world.key, subprotocols=[]) as observer:
        message_id = await post(engine, world.workspace_id, world.agents["alice"], "general",
                                "to everyone")
        event = await next_frame(observer, "message.created")
        assert event == {
            "type": "message.created", "id": str(message_id), "channel": "general",
            "message": {"id": str(message_id), "agent_id": str(world.agents["alice"]),
                        "agent_name": "alice", "text": "to everyone", "attachments": [],
                        "injection_mode": "wait"}}
        await engine.submit(SendDm(workspace_id=world.workspace_id,
                                   agent_id=world.agents["alice"], to="bob", text="psst"))
        dm = await next_frame(observer, "dm.received")
        assert dm["message"]["text"] == "psst" and dm["conversation_id"]

        await send_json(observer, {"type": "ping"})
        assert await next_frame(observer, "pong") == {"type": "pong"}
        await send_json(observer, {"type": "resync", "last_seen_seq": 7})
        assert await next_frame(observer, "resync_ack") == {
            "type": "resync_ack", "last_seen_seq": 7, "current_seq": 0, "replayed": 0,
            "gap_detected": False}

        # Subscribed to another channel: general's messages are left out, DMs still pass.
        await engine.submit(CreateChannel(workspace_id=world.workspace_id,
                                          agent_id=world.agents["alice"], name="ops"))
        created = await next_frame(observer, "channel.created")
        assert created["channel"]["name"] == "ops"
        await send_json(observer, {"type": "subscribe", "channels": ["#ops"]})
        await send_json(observer, {"type": "ping"})
        await next_frame(observer, "pong")  # the subscription is in place
        await post(engine, world.workspace_id, world.agents["alice"], "general", "skipped")
        await post(engine, world.workspace_id, world.agents["alice"], "ops", "kept")
        await engine.submit(SendDm(workspace_id=world.workspace_id,
                                   agent_id=world.agents["alice"], to="bob", text="also kept"))
        assert (await next_frame(observer, "message.created"))["message"]["text"] == "kept"
        assert (await next_frame(observer, "dm.received"))["message"]["text"] == "also kept"
        await send_json(observer, {"type": "unsubscribe", "channels": ["ops"]})
        await send_json(observer, {"type": "ping"})
        await next_frame(observer, "pong")
        await post(engine, world.workspace_id, world.agents["alice"], "general", "all again")
        assert (await next_frame(observer, "message.created"))["message"]["text"] == "all again"


async def test_observer_ignores_unknown_closes_on_garbage(live: Live) -> None:
    """The observer ignores unknown frames and closes on garbage."""
    async with raw_socket(live.server, live.world.key, subprotocols=[]) as observer:
        await send_json(observer, {"type": "something.new"})
        await send_json(observer, {"type": "subscribe", "channels": "not-a-list"})
        error = await next_frame(observer, "error")
        assert error["code"] == "invalid_request"
        await observer.send_message("{not json")
        with pytest.raises(trio_websocket.ConnectionClosed) as closed:
            while True:
                await next_frame(observer)
        assert closed.value.reason is not None and closed.value.reason.code == 1007


# -- token rotation -------------------------------------------------------------------------


async def test_rotation_closes_node_sockets_when_the_grace_ends(tmp_path: Path) -> None:
    """A node socket opened with a node token minted before a rotation closes at the grace end.

    The grace is 0 here, so it ends with the rotation: the socket closes at
    once, with the close code and reason of a native session whose token
    was rotated out; a node token minted with the new token keeps its socket.
    """
    no_grace = EngineConfig(synchronous="NORMAL", limits=Limits(token_grace_seconds=0))
    with trio.fail_after(TEST_DEADLINE_S):
        async with serve(tmp_path, engine=no_grace) as server:
            live = Live(server, await make_world(server.engine))
            before = await live.node_token("bob")
            carols = await live.node_token("carol")
            async with raw_socket(server, before["token"], path="/v1/node/ws",
                                  subprotocols=[]) as node, \
                    raw_socket(server, carols["token"], path="/v1/node/ws",
                               subprotocols=[]) as carol:
                await send_json(node, {"v": 1, "id": "p0", "type": "ping"})
                await next_frame(node, "pong")
                rotated = await server.engine.submit(RotateToken(
                    workspace_id=live.world.workspace_id, agent_id=live.world.agents["bob"]))
                with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                    while True:
                        await node.get_message()
                assert closed.value.reason is not None
                assert closed.value.reason.code == CloseCode.UNAUTHORIZED
                assert closed.value.reason.reason == "the token was rotated and its grace ended"
                # Another agent's node socket stays.
                await send_json(carol, {"v": 1, "id": "c1", "type": "ping"})
                await next_frame(carol, "pong")
            # The node token minted before is refused from now on; a new one works.
            with pytest.raises(trio_websocket.HandshakeError):
                async with raw_socket(server, before["token"], path="/v1/node/ws",
                                      subprotocols=[]):
                    pass
            live.world.tokens["bob"] = rotated.token
            after = await live.node_token("bob")
            async with raw_socket(server, after["token"], path="/v1/node/ws",
                                  subprotocols=[]) as node:
                await send_json(node, {"v": 1, "id": "p1", "type": "ping"})
                await next_frame(node, "pong")
                await send_json(node, {"v": 1, "id": "p2", "type": "ping"})
                await next_frame(node, "pong")


async def test_node_socket_stays_open_through_the_grace_and_closes_at_its_end(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """On the autojump clock: a node socket whose token was cut closes at the cut, not before."""
    grace_s = 300
    cut_ms = int(time.time() * 1000) + grace_s * 1000

    class CutEngine:
        facts = None

        async def read(self, fn: Any, *args: Any) -> Any:
            # On connect the session reads its marks (nothing pending) with
            # its credential's expiry; later checks read the expiry alone.
            if fn is marks_and_expiry:
                return SeqMarks(0, 0), cut_ms
            assert fn is node_token_cut
            return cut_ms

    gw = Gateway(cast(Engine, CutEngine()), GatewaySettings(idle_timeout_seconds=10 * grace_s))
    ws = FakeWebSocket()
    session = NodeSession(gw, ws, gw.node_codec, workspace_id=1, agent_id=2, agent_name="bob",
                          node_id="n", node_name="bob-direct", credential=b"digest")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.serve)
        await trio.sleep(grace_s - 10)
        assert session.close_code is None
        await trio.sleep(20)
        assert session.close_code == CloseCode.UNAUTHORIZED
        nursery.cancel_scope.cancel()
    assert ws.close_code == CloseCode.UNAUTHORIZED


async def test_node_token_minted_with_old_token_ends_with_grace(live: Live) -> None:
    """A node token minted with the old token ends with its grace.

    `POST /v1/agent/node-token` with a token rotated out: the node token ends with the grace.

    The old token may have leaked; during its grace it still mints, but not
    a credential that outlives it (before, it got the full 24 h that no
    rotation cut). Minted with the new token, a node token gets its full
    lifetime.
    """
    engine, bob = live.server.engine, live.world.agents["bob"]
    rotated = await engine.submit(RotateToken(workspace_id=live.world.workspace_id,
                                              agent_id=bob))
    with_old = (await live.node_token("bob"))["token"]  # the world still holds the old token
    live.world.tokens["bob"] = rotated.token
    with_new = (await live.node_token("bob"))["token"]

    def rows(conn: Any) -> tuple[int, dict[str, tuple[int, int]]]:
        (grace_end,) = conn.execute("SELECT prev_token_expires_at FROM agents WHERE id = ?",
                                    (bob,)).fetchone()
        return grace_end, {
            token: conn.execute("SELECT expires_at, created_at FROM node_tokens"
                                " WHERE token_hash = ?", (secrets.digest(token),)).fetchone()
            for token in (with_old, with_new)
        }

    grace_end, expiry = await engine.read(rows)
    assert expiry[with_old][0] == grace_end
    assert expiry[with_new][0] == expiry[with_new][1] + DEFAULT_NODE_TOKEN_TTL_S * 1000
    # Refused from the grace end on, and a socket opened with it is cut then.
    assert await engine.read(agent_by_node_token, with_old, grace_end - 1) is not None
    assert await engine.read(agent_by_node_token, with_old, grace_end) is None
    assert await engine.read(agent_by_node_token, with_new, grace_end) is not None
    assert await engine.read(node_token_cut, live.world.workspace_id, bob,
                             secrets.digest(with_old)) == grace_end
    assert await engine.read(node_token_cut, live.world.workspace_id, bob,
                             secrets.digest(with_new)) is None
    # Checked again in the transaction: a token rotated out past its grace mints nothing.
    with pytest.raises(BrokerError) as gone:
        await engine.submit(IssueNodeToken(workspace_id=live.world.workspace_id, agent_id=bob,
                                           minted_with=secrets.digest("at_live_gone")))
    assert gone.value.code == "invalid_token"


async def test_node_socket_of_a_token_minted_in_the_grace_closes_at_its_end(
    tmp_path: Path, mock_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a mock clock, a real engine: the socket of a node token minted with the old
    token during the grace closes (4401) when the grace ends, not before; that token is
    refused from then on; the socket of one minted with the new token stays open."""
    # The clock jumps only after the loop has idled a while: with 0, it would
    # jump while a read runs in a worker thread (the loop counts it as
    # blocked), up to the sockets' idle deadline.
    mock_clock.autojump_threshold = 0.2
    epoch = time.time()
    monkeypatch.setattr(time, "time", lambda: epoch + mock_clock.current_time())
    grace_s = Limits().token_grace_seconds
    async with Engine.open(tmp_path, EngineConfig(synchronous="NORMAL")) as engine:
        world = await make_world(engine)
        bob = world.agents["bob"]
        rotated = await engine.submit(RotateToken(workspace_id=world.workspace_id, agent_id=bob))
        minted = {
            name: await engine.submit(IssueNodeToken(
                workspace_id=world.workspace_id, agent_id=bob,
                minted_with=secrets.digest(token)))
            for name, token in (("old", world.tokens["bob"]), ("new", rotated.token))
        }
        gw = Gateway(engine, GatewaySettings(idle_timeout_seconds=10 * grace_s))
        sockets = {name: FakeWebSocket() for name in minted}
        sessions = {
            name: NodeSession(gw, sockets[name], gw.node_codec, workspace_id=world.workspace_id,
                              agent_id=bob, agent_name="bob", node_id="n",
                              node_name="bob-direct",
                              credential=secrets.digest(minted[name].token))
            for name in minted
        }
        async with trio.open_nursery() as nursery:
            for session in sessions.values():
                nursery.start_soon(session.serve)
            await trio.sleep(grace_s - 10)
            assert sessions["old"].close_code is None
            assert await engine.read(agent_by_node_token, minted["old"].token,
                                     int(time.time() * 1000)) is not None
            await trio.sleep(20)
            assert sessions["old"].close_code == CloseCode.UNAUTHORIZED
            assert sessions["new"].close_code is None
            assert await engine.read(agent_by_node_token, minted["old"].token,
                                     int(time.time() * 1000)) is None
            assert await engine.read(agent_by_node_token, minted["new"].token,
                                     int(time.time() * 1000)) is not None
            nursery.cancel_scope.cancel()
        assert sockets["old"].close_code == CloseCode.UNAUTHORIZED
