"""The native agent session on /v1/ws over real sockets: handshake, requests, deliveries."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import trio
import trio_websocket
from hypercorn.events import RawData
from hypercorn.trio.tcp_server import TCPServer

from broker.client import RequestError, connect
from broker.engine.agents import DeactivateAgent, RotateToken, SetAgentStatus
from broker.engine.config import EngineConfig, Limits
from broker.engine.workspaces import DeleteWorkspace
from broker.gateway.native import AgentSession
from broker.gateway.presence import ACTIVE, OFFLINE, PresenceReporter
from broker.server import BrokerServer
from protocol.codec import MSGPACK_SUBPROTOCOL, CloseCode
from tests.helpers.daemon import serve
from tests.helpers.engine import TEST_DEADLINE_S, make_world
from tests.helpers.realtime import (
    FakeWebSocket,
    Live,
    closed_with,
    eventually,
    gateway_of,
    next_frame,
    raw_socket,
    send_json,
)

# Over real sockets in one process and with two gateway processes (conftest.py);
# tests marked one_process read the in-process gateway.
pytestmark = pytest.mark.both_process_models


async def acked_at_least(live: Live, name: str, seq: int) -> bool:
    return (await live.marks(name))[1] >= seq


async def count(server: BrokerServer, table: str) -> int:
    row = await server.engine.read(
        lambda c: c.execute(f"SELECT count(*) FROM {table}").fetchone())
    return int(row[0])


# -- the handshake -----------------------------------------------------------------------------


@pytest.mark.parametrize("token", [None, "at_live_nope", "rk_live_nope", "garbage"])
async def test_handshake_refuses_bad_or_missing_token(
    live: Live, token: str | None
) -> None:
    """A bad or missing token is refused at the handshake."""
    with pytest.raises(trio_websocket.ConnectionRejected) as refused:
        async with raw_socket(live.server, token):
            pass
    assert refused.value.status_code == 401
    body = msgspec.json.decode(refused.value.body or b"{}")
    assert body["ok"] is False
    assert body["error"]["code"] in ("unauthorized", "invalid_token")


async def test_handshake_token_in_authorization_header(live: Live) -> None:
    """The token may come in the Authorization header."""
    async with connect(live.url, live.token("bob")) as bob:  # the client uses the header
        me = await bob.request("agent.me")
    assert me["name"] == "bob"


# -- requests ----------------------------------------------------------------------------------


async def test_socket_requests_take_rest_fields_and_data(live: Live) -> None:
    """Requests take the REST fields and reply with the REST data."""
    assert live.server.url is not None
    async with httpx.AsyncClient(base_url=live.server.url) as http:
        response = await http.post(
            "/v1/channels/general/messages", json={"text": "over rest"},
            headers={"Authorization": f"Bearer {live.token('alice')}"})
    rest = response.json()["data"]
    async with connect(live.url, live.token("alice")) as alice:
        ws = await alice.request("message.send", channel="general", text="over ws")
        assert set(ws) == set(rest)
        assert ws["text"] == "over ws" and ws["agent_name"] == "alice"
        got = await alice.request("message.get", message_id=ws["id"])
        assert got["id"] == ws["id"]
        listed = await alice.request("message.list", channel="general")
        assert [m["text"] for m in listed][:2] == ["over ws", "over rest"]


async def test_socket_requests_are_timed_by_operation_in_the_metrics(live: Live) -> None:
    async with connect(live.url, live.token("alice")) as alice:
        await alice.request("message.send", channel="general", text="timed")
        await alice.request("message.send", channel="general", text="timed again")
        with pytest.raises(RequestError):
            await alice.request("message.send", channel="nowhere", text="refused, timed too")
        await alice.request("message.list", channel="general")
    text = (await live.server.metrics.render()).decode()
    assert 'broker_ws_request_seconds_count{operation="message.send"} 3.0' in text
    assert 'broker_ws_request_seconds_count{operation="message.list"} 1.0' in text


async def test_socket_refusals_carry_rest_error_codes(live: Live) -> None:
    """Refusals carry the REST error codes."""
    async with connect(live.url, live.token("alice")) as alice:
        with pytest.raises(RequestError) as refused:
            await alice.request("message.send", channel="nowhere", text="hi")
        assert refused.value.code == "channel_not_found"
        with pytest.raises(RequestError) as refused:
            await alice.request("message.send", channel="general", text="")
        assert refused.value.code.startswith("invalid_")
        with pytest.raises(RequestError) as refused:
            await alice.request("message.send", channel="general", text=5)
        assert refused.value.code == "invalid_request"
        with pytest.raises(RequestError) as refused:
            await alice.request("agent.register", name="eve")  # needs the workspace key
        assert refused.value.code == "unknown_type"
        await alice.ping()


async def test_socket_send_idempotency_key(live: Live) -> None:
    """Idempotency key on a socket send."""
    async with connect(live.url, live.token("alice")) as alice:
        first = await alice.request("message.send", channel="general", text="once",
                                    idempotency_key="k1")
        again = await alice.request("message.send", channel="general", text="once",
                                    idempotency_key="k1")
        assert again["id"] == first["id"]
        with pytest.raises(RequestError) as refused:
            await alice.request("message.send", channel="general", text="other",
                                idempotency_key="k1")
        assert refused.value.code == "idempotency_key_reused"
        # as REST refuses its header: empty, blank or too long is the same code
        # (a blank key was taken as a key, and an empty one was invalid_request)
        for bad in ("", "   ", "k" * 256):
            with pytest.raises(RequestError) as refused:
                await alice.request("message.send", channel="general", text="other",
                                    idempotency_key=bad)
            assert refused.value.code == "invalid_idempotency_key", bad
    assert await count(live.server, "messages") == 1


@pytest.mark.one_process
async def test_socket_request_types_all_available(live: Live) -> None:
    """The issue's request types are all available."""
    wanted = {
        "message.send", "message.list", "message.get", "thread.reply", "thread.get", "dm.send",
        "dm.conversations", "dm.messages", "group_dm.create", "group_dm.send", "message.read",
        "reaction.add", "reaction.remove", "channel.create", "channel.join", "channel.leave",
        "channel.invite", "channel.list", "inbox.get", "search", "agent.me", "agent.list",
    }
    assert wanted <= gateway_of(live.server).request_types


# -- deliveries and acks -----------------------------------------------------------------------


async def test_deliver_frame_documented_shape(live: Live) -> None:
    """A delivery frame has the documented shape."""
    async with raw_socket(live.server, live.token("bob")) as bob:
        message_id = await live.post("alice", "hello")
        frame = await next_frame(bob, "deliver")
    bob_id = live.world.agents["bob"]
    assert frame["v"] == 1 and frame["seq"] == 1
    assert frame["delivery_id"] == f"{bob_id}:1"
    assert frame["payload"]["type"] == "message.created"
    assert frame["payload"]["data"]["id"] == str(message_id)
    assert frame["payload"]["data"]["text"] == "hello"


@pytest.mark.one_process
async def test_socket_writes_frames_directly(
    live: Live, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Frames are written to the socket directly when it takes them."""
    # hypercorn's own write path (send lock, shielded send_all) is for what the
    # socket does not take at once; a reading client on loopback takes everything.
    through_hypercorn: list[bytes] = []
    protocol_send = TCPServer.protocol_send

    async def counting(self: TCPServer, event: Any) -> None:
        if isinstance(event, RawData):
            through_hypercorn.append(bytes(event.data))
        await protocol_send(self, event)

    monkeypatch.setattr(TCPServer, "protocol_send", counting)
    async with raw_socket(live.server, live.token("bob")) as bob:
        await send_json(bob, {"v": 1, "id": "p0", "type": "ping"})
        assert (await next_frame(bob, "pong"))["re"] == "p0"  # the session is live
        handshake = len(through_hypercorn)
        for i in range(50):
            await live.post("alice", f"m{i}")
        frames = [await next_frame(bob, "deliver") for _ in range(50)]
        assert [f["seq"] for f in frames] == list(range(1, 51))
        assert [f["payload"]["data"]["text"] for f in frames] == [f"m{i}" for i in range(50)]
        assert handshake >= 1  # the handshake's response did go through hypercorn
        assert through_hypercorn[handshake:] == []  # the pong and the 50 deliveries did not


async def test_msgpack_subprotocol_sends_binary_frames(live: Live) -> None:
    async with raw_socket(live.server, live.token("bob"),
                          subprotocols=[MSGPACK_SUBPROTOCOL]) as bob:
        assert bob.subprotocol == MSGPACK_SUBPROTOCOL
        await live.post("alice", "packed")
        message = await bob.get_message()
        while isinstance(message, bytes) and msgspec.msgpack.decode(message)["type"] != "deliver":
            message = await bob.get_message()
        assert isinstance(message, bytes)
        frame = msgspec.msgpack.decode(message)
        assert frame["payload"]["data"]["text"] == "packed"
        await bob.send_message(msgspec.msgpack.encode(
            {"v": 1, "id": "m1", "type": "message.send", "channel": "general", "text": "back"}))
        reply = await next_frame(bob, "reply")
        assert reply["re"] == "m1" and reply["ok"] is True
        assert reply["data"]["text"] == "back"


async def test_delivery_to_every_socket_any_ack_counts(live: Live) -> None:
    """Every socket of an agent gets every delivery and any ack counts."""
    async with raw_socket(live.server, live.token("bob")) as one, \
            raw_socket(live.server, live.token("bob")) as two:
        for i in range(3):
            await live.post("alice", f"m{i}")
        for ws in (one, two):
            seqs = [(await next_frame(ws, "deliver"))["seq"] for _ in range(3)]
            assert seqs == [1, 2, 3]
        await send_json(two, {"v": 1, "id": "a1", "type": "delivery.ack", "up_to_seq": 2})
        reply = await next_frame(two, "reply")
        assert reply["data"] == {"acked": 2, "acked_seq": 2, "changed": True}
    assert await live.marks("bob") == (3, 2)
    # A new socket replays only what is not acked.
    async with raw_socket(live.server, live.token("bob")) as three:
        frame = await next_frame(three, "deliver")
        assert frame["seq"] == 3


async def test_ack_duplicates_ignored_and_above_highest_clamped(
    live: Live,
) -> None:
    """Duplicate acks change nothing and acks above the highest seq are clamped."""
    async with raw_socket(live.server, live.token("bob")) as bob:
        await live.post("alice", "one")
        await live.post("alice", "two")
        await next_frame(bob, "deliver")
        await next_frame(bob, "deliver")
        await send_json(bob, {"v": 1, "id": "a", "type": "delivery.ack", "up_to_seq": 1})
        assert (await next_frame(bob, "reply"))["data"] == {
            "acked": 1, "acked_seq": 1, "changed": True}
        await send_json(bob, {"v": 1, "id": "b", "type": "delivery.ack", "up_to_seq": 1})
        assert (await next_frame(bob, "reply"))["data"] == {
            "acked": 0, "acked_seq": 1, "changed": False}
        # Above the highest seq allocated (2): clamped to 2, never pre-acks seq 3.
        await send_json(bob, {"v": 1, "id": "c", "type": "delivery.ack", "up_to_seq": 1000})
        assert (await next_frame(bob, "reply"))["data"] == {
            "acked": 1, "acked_seq": 2, "changed": True}
        await live.post("alice", "three")
        frame = await next_frame(bob, "deliver")
        assert frame["seq"] == 3
    assert await live.marks("bob") == (3, 2)
    async with raw_socket(live.server, live.token("bob")) as again:
        assert (await next_frame(again, "deliver"))["seq"] == 3


@pytest.mark.one_process
async def test_ack_without_id_coalesced(live: Live) -> None:
    """Acks without id are coalesced into few commands."""
    gateway = gateway_of(live.server)
    async with raw_socket(live.server, live.token("bob")) as bob:
        for i in range(20):
            await live.post("alice", f"m{i}")
        for _ in range(20):
            frame = await next_frame(bob, "deliver")
            await send_json(bob, {"v": 1, "type": "delivery.ack", "up_to_seq": frame["seq"]})
        await eventually(lambda: acked_at_least(live, "bob", 20))
    stats = gateway.recorder.statistics()
    assert stats.acks_received >= 20
    assert stats.commands < stats.acks_received


@pytest.mark.one_process
async def test_delivery_marks_in_batches(live: Live) -> None:
    """Delivered deliveries are marked in batches."""
    pushed = 50
    recorder = gateway_of(live.server).recorder
    for i in range(pushed):
        await live.post("alice", f"m{i}")
    before = recorder.statistics()
    # Connecting replays the 50 at once: the marks of the pushes made while
    # one MarkDelivered commits go out together in the next.
    async with raw_socket(live.server, live.token("bob"), queue=pushed) as bob:
        for _ in range(pushed):
            await next_frame(bob, "deliver")
        await recorder.flush()
    after = recorder.statistics()
    states = await live.server.engine.read(lambda c: c.execute(
        "SELECT state, attempts FROM deliveries WHERE agent_id = ? ORDER BY seq",
        (live.world.agents["bob"],)).fetchall())
    assert states == [("delivered", 1)] * pushed
    marks = after.marks_received - before.marks_received
    assert marks == pushed
    assert 1 <= after.commands - before.commands < marks


async def test_client_acks_automatically(live: Live) -> None:
    """The Python client acks automatically."""
    async with connect(live.url, live.token("bob")) as bob:
        for i in range(5):
            await live.post("alice", f"m{i}")
        got = []
        async for delivery in bob.deliveries():
            got.append(delivery.data["text"])
            if len(got) == 5:
                break
    assert got == [f"m{i}" for i in range(5)]
    await eventually(lambda: acked_at_least(live, "bob", 4))


# -- ephemeral events --------------------------------------------------------------------------


async def next_event(ws: trio_websocket.WebSocketConnection, event_type: str) -> Any:
    """The data of the next ephemeral event of `event_type`."""
    while True:
        frame = await next_frame(ws, "event")
        if frame["payload"]["type"] == event_type:
            return frame["payload"]["data"]


async def test_events_presence_and_channel_reach_workspace(live: Live) -> None:
    """Presence (to a session that asked, coalesced) and channel events reach the workspace."""
    asked = f"/v1/ws?presence=1&token={live.token('alice')}"
    async with raw_socket(live.server, None, path=asked) as alice:
        async with connect(live.url, live.token("bob")) as bob:
            data = await next_event(alice, "presence")
            while "bob" not in data["online"]:  # alice's own connect may come first
                data = await next_event(alice, "presence")
            assert data == {"online": ["bob"], "away": [], "offline": []}
            await bob.request("channel.create", name="ops")
            created = await next_event(alice, "channel.created")
            assert created["name"] == "ops"
            await bob.request("channel.leave", channel="ops")
            left = await next_event(alice, "member.left")
            assert left["agent_name"] == "bob"
        offline = await next_event(alice, "presence")
        assert offline == {"online": [], "away": [], "offline": ["bob"]}


async def test_presence_ends_at_database_truth(
    live: Live,
) -> None:
    """Presence ends at the truth when the database moved under the reporter."""
    engine, world = live.server.engine, live.world
    bob = world.agents["bob"]

    async def status() -> str:
        row = await engine.read(lambda c: c.execute(
            "SELECT status FROM agents WHERE id = ?", (bob,)).fetchone())
        return str(row[0])

    presence = PresenceReporter(engine)
    presence.report(world.workspace_id, bob, ACTIVE)  # bob's first socket
    await presence.flush()
    assert await status() == "online"
    # A REST agent.disconnect sets offline behind the gateway's back...
    await engine.submit(SetAgentStatus(workspace_id=world.workspace_id, agent_id=bob,
                                       status="offline"))
    # ...then bob's socket closes and a new one opens before the reporter
    # runs: the two transitions collapse into "online", which it reported
    # last, and which is not what the database says.
    presence.report(world.workspace_id, bob, OFFLINE)
    presence.report(world.workspace_id, bob, ACTIVE)
    await presence.flush()
    assert await status() == "online"


async def test_delivery_skips_the_sender(live: Live) -> None:
    """A sender gets no delivery of its own message."""
    async with raw_socket(live.server, live.token("alice")) as alice:
        await send_json(alice, {"v": 1, "id": "s", "type": "message.send", "channel": "general",
                                "text": "mine"})
        assert (await next_frame(alice, "reply"))["ok"] is True
        await send_json(alice, {"v": 1, "id": "p", "type": "ping"})
        pong = await next_frame(alice, "pong", "deliver")
        assert pong == {"v": 1, "type": "pong", "re": "p"}
    assert (await live.marks("alice"))[0] == 0


async def test_metrics_count_open_sessions(live: Live) -> None:
    """Open sessions are counted in the metrics."""
    assert live.server.url is not None

    async def gauge() -> str:
        async with httpx.AsyncClient(base_url=live.server.url or "") as http:
            text = (await http.get("/metrics")).text
        return next(line for line in text.splitlines()
                    if line.startswith("broker_open_sessions "))

    async with raw_socket(live.server, live.token("bob")), \
            raw_socket(live.server, live.token("carol")):
        assert await gauge() == "broker_open_sessions 2.0"
    await eventually(lambda: _gauge_is(gauge, "broker_open_sessions 0.0"))


async def _gauge_is(read: Any, wanted: str) -> bool:
    return bool(await read() == wanted)


async def test_sockets_closed_on_deactivate_or_workspace_delete(
    live: Live,
) -> None:
    """A deactivated agent and a deleted workspace lose their sockets."""
    engine, world = live.server.engine, live.world
    async with raw_socket(live.server, live.token("bob")) as bob, \
            raw_socket(live.server, live.token("carol")) as carol, \
            raw_socket(live.server, world.key, subprotocols=[]) as observer:
        await engine.submit(DeactivateAgent(workspace_id=world.workspace_id,
                                            agent_id=world.agents["bob"]))
        assert await closed_with(bob) == CloseCode.UNAUTHORIZED
        await send_json(carol, {"v": 1, "id": "still", "type": "agent.me"})
        assert (await next_frame(carol, "reply"))["data"]["name"] == "carol"
        await engine.submit(DeleteWorkspace(workspace_id=world.workspace_id))
        assert await closed_with(carol) == CloseCode.UNAUTHORIZED
        assert await closed_with(observer) == CloseCode.UNAUTHORIZED


@pytest.mark.one_process
@pytest.mark.parametrize("revoke", ["deactivate", "delete-workspace"])
async def test_handshake_revoked_before_replay_closes_4401(
    live: Live, revoke: str,
) -> None:
    """A credential revoked between the handshake and the replay closes with 4401."""
    # The handshake resolved bob's token; before his session attached and
    # replayed, he was deactivated (or the workspace deleted), so the event
    # that closes open sockets went by before this one could see it.
    engine, world, gateway = live.server.engine, live.world, gateway_of(live.server)
    if revoke == "deactivate":
        await engine.submit(DeactivateAgent(workspace_id=world.workspace_id,
                                            agent_id=world.agents["bob"]))
    else:
        await engine.submit(DeleteWorkspace(workspace_id=world.workspace_id))
    ws = FakeWebSocket()
    session = AgentSession(gateway, ws, gateway.native_json, workspace_id=world.workspace_id,
                           agent_id=world.agents["bob"], agent_name="bob")
    await gateway._run(session)  # the per-connection boundary: 1011 if the session raised
    assert ws.close_code == CloseCode.UNAUTHORIZED
    assert session.close_code == CloseCode.UNAUTHORIZED
    assert [f for f in ws.sent if f["type"] == "deliver"] == []
    assert session not in gateway.sessions


# -- token rotation ----------------------------------------------------------------------------


async def rotate(live: Live, name: str) -> str:
    rotated = await live.server.engine.submit(RotateToken(
        workspace_id=live.world.workspace_id, agent_id=live.world.agents[name]))
    return rotated.token


async def still_answers(ws: trio_websocket.WebSocketConnection, request_id: str) -> bool:
    await send_json(ws, {"v": 1, "id": request_id, "type": "ping"})
    return (await next_frame(ws, "pong"))["re"] == request_id


async def test_rotation_closes_old_token_sockets_at_grace_end(
    live: Live,
) -> None:
    """A rotation ends the old token's sockets when the grace ends and keeps the new."""
    # The default grace (5 minutes) is not waited for: a second rotation ends
    # the first token's grace at once (RotateToken), which is the moment its
    # sockets must close.
    first = live.token("bob")
    async with raw_socket(live.server, first) as old:
        second = await rotate(live, "bob")
        event = await next_event(old, "agent.token_rotated")
        assert event["name"] == "bob" and event["previous_token_expires_at"]
        assert "token" not in event
        assert await still_answers(old, "grace")  # within the grace: it stays
        async with raw_socket(live.server, second) as new, \
                raw_socket(live.server, first) as late:  # the old token, still in its grace
            assert await still_answers(new, "n1") and await still_answers(late, "l1")
            await rotate(live, "bob")  # `first` is dead now, `second` in its grace
            assert await closed_with(old) == CloseCode.UNAUTHORIZED
            assert await closed_with(late) == CloseCode.UNAUTHORIZED
            await next_event(new, "agent.token_rotated")
            assert await still_answers(new, "n2")


async def test_rotation_without_grace_closes_at_once(
    tmp_path: Path,
) -> None:
    """With no grace, a rotation closes the old token's sockets at once."""
    no_grace = EngineConfig(synchronous="NORMAL", limits=Limits(token_grace_seconds=0))
    with trio.fail_after(TEST_DEADLINE_S):
        async with serve(tmp_path, engine=no_grace) as server:
            live = Live(server, await make_world(server.engine))
            async with raw_socket(server, live.token("bob")) as old, \
                    raw_socket(server, live.token("carol")) as carol:
                new_token = await rotate(live, "bob")
                assert await closed_with(old) == CloseCode.UNAUTHORIZED
                async with raw_socket(server, new_token) as new:
                    assert await still_answers(new, "new")
                assert await still_answers(carol, "other")  # another agent's socket stays
