"""The Python client (broker.client) against a live server, and fake servers for failures."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
import trio
import trio_websocket

from broker.client import BrokerClient, ConnectionLost, RequestError, connect
from protocol.codec import CloseCode
from tests.helpers.daemon import serve
from tests.helpers.engine import TEST_DEADLINE_S, make_world
from tests.helpers.realtime import Live, eventually, gateway_of, post, ws_url


@pytest.mark.one_process  # closes sockets through the in-process gateway
async def test_client_reconnects_yields_each_once(live: Live) -> None:
    """Reconnects after a drop and yields each delivery once."""
    engine, world = live.server.engine, live.world
    async with connect(live.url, world.tokens["bob"], auto_ack=False) as bob:
        for i in range(3):
            await post(engine, world.workspace_id, world.agents["alice"], "general", f"m{i}")
        deliveries = bob.deliveries()
        first = [await deliveries.__anext__() for _ in range(3)]
        # The server drops every session (nothing was acked): the client reconnects,
        # the server replays 1..3, the client drops them as duplicates.
        await gateway_of(live.server).close_all(CloseCode.GOING_AWAY)
        await eventually(lambda: _at_least(lambda: bob.connections, 2))
        await post(engine, world.workspace_id, world.agents["alice"], "general", "m3")
        fourth = await deliveries.__anext__()
        assert [d.seq for d in first] + [fourth.seq] == [1, 2, 3, 4]
        assert fourth.data["text"] == "m3"
        await eventually(lambda: _at_least(lambda: bob.duplicates, 3))


async def test_client_manual_ack_waits_until_durable(live: Live) -> None:
    """Manual ack waits until durable."""
    engine, world = live.server.engine, live.world
    async with connect(live.url, world.tokens["bob"], auto_ack=False) as bob:
        for i in range(3):
            await post(engine, world.workspace_id, world.agents["alice"], "general", f"m{i}")
        deliveries = bob.deliveries()
        for _ in range(3):
            await deliveries.__anext__()
        result = await bob.ack(2, wait=True)
        assert result == {"acked": 2, "acked_seq": 2, "changed": True}
        assert await live.acked("bob") == 2


async def test_client_auto_ack_acks_what_was_processed(live: Live) -> None:
    """Auto ack acks what was processed."""
    engine, world = live.server.engine, live.world
    async with connect(live.url, world.tokens["bob"]) as bob:
        for i in range(10):
            await post(engine, world.workspace_id, world.agents["alice"], "general", f"m{i}")
        seen = 0
        async for _ in bob.deliveries():
            seen += 1
            if seen == 10:
                break
    # The tenth was handed over but not processed (the loop broke out): 9 acked.
    await eventually(lambda: _acked_exactly(live, 9))


async def test_client_auto_ack_runs_with_run_alone(live: Live) -> None:
    """Auto ack runs with run alone."""
    # The load generator and other embedders start `run` themselves, without
    # `connect`: auto-ack is part of `run`, so their deliveries are acked too.
    engine, world = live.server.engine, live.world
    bob = BrokerClient(live.url, world.tokens["bob"])
    async with trio.open_nursery() as nursery:
        await nursery.start(bob.run)
        for i in range(5):
            await post(engine, world.workspace_id, world.agents["alice"], "general", f"m{i}")
        deliveries = bob.deliveries()
        for _ in range(5):
            await deliveries.__anext__()
        # five handed over, four processed (the fifth is until the next is asked for)
        await eventually(lambda: _acked_exactly(live, 4))
        await bob.close()


async def _acked_exactly(live: Live, seq: int) -> bool:
    acked = await live.acked("bob")
    assert acked <= seq
    return acked == seq


async def test_client_msgpack(live: Live) -> None:
    """The MessagePack client."""
    engine, world = live.server.engine, live.world
    async with connect(live.url, world.tokens["bob"], msgpack=True) as bob:
        me = await bob.request("agent.me")
        assert me["name"] == "bob"
        await post(engine, world.workspace_id, world.agents["alice"], "general", "packed")
        texts = []
        async for delivery in bob.deliveries():
            texts.append(delivery.data["text"])
            break
        assert texts == ["packed"]  # not vacuous: the iterator did not just end


async def test_client_events_on_their_own_iterator(live: Live) -> None:
    """Events arrive on their own iterator."""
    async with connect(live.url, live.world.tokens["bob"], presence=True) as bob:
        async with connect(live.url, live.world.tokens["carol"]):
            about_carol = []
            async for event in bob.events():
                if "carol" in event["data"].get("online", ()):
                    about_carol.append(event["type"])
                    break
            assert about_carol == ["presence"]  # the iterator did not just end


async def test_client_refused_token_raises_not_retried(live: Live) -> None:
    """A refused token raises and is not retried."""
    with pytest.raises(trio_websocket.ConnectionRejected) as refused:
        async with connect(live.url, "at_live_wrong"):
            pass
    assert refused.value.status_code == 401


async def test_client_refusals_raise_request_error(live: Live) -> None:
    """Refusals raise RequestError with the code."""
    async with connect(live.url, live.world.tokens["bob"]) as bob:
        with pytest.raises(RequestError) as refused:
            await bob.request("dm.send", to="nobody", text="hi")
        assert refused.value.code == "agent_not_found"


async def test_client_stopping_server_closes_1001(tmp_path: Path) -> None:
    """A stopping server closes with 1001."""
    with trio.fail_after(TEST_DEADLINE_S):
        async with serve(tmp_path) as server:
            world = await make_world(server.engine)
            async with connect(ws_url(server), world.tokens["bob"], reconnect=False) as bob:
                await bob.ping()
                server.stop()
                async for _ in bob.deliveries():
                    pass  # ends when the connection ends for good
                assert bob.close_code == CloseCode.GOING_AWAY


# -- against fake servers -----------------------------------------------------------------


async def _fake_server(
    nursery: trio.Nursery, handler: object
) -> int:
    server = await nursery.start(trio_websocket.serve_websocket, handler, "127.0.0.1", 0, None)
    return int(server.port)


async def test_client_request_without_reply_times_out(nursery: trio.Nursery) -> None:
    """A request without reply times out."""
    async def silent(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        try:
            while True:
                await ws.get_message()
        except trio_websocket.ConnectionClosed:
            pass

    port = await _fake_server(nursery, silent)
    with trio.fail_after(TEST_DEADLINE_S):
        async with connect(f"ws://127.0.0.1:{port}/v1/ws", "at_live_x",
                           request_timeout=0.2) as client:
            with pytest.raises(trio.TooSlowError):
                await client.request("agent.me")


async def test_client_request_in_flight_fails_on_drop(nursery: trio.Nursery) -> None:
    """A request in flight when the connection drops fails."""
    async def hang_up(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        await ws.get_message()
        await ws.aclose(CloseCode.INTERNAL_ERROR)

    port = await _fake_server(nursery, hang_up)
    with trio.fail_after(TEST_DEADLINE_S):
        async with connect(f"ws://127.0.0.1:{port}/v1/ws", "at_live_x",
                           reconnect=False) as client:
            with pytest.raises(ConnectionLost) as lost:
                await client.request("agent.me")
            assert lost.value.code == CloseCode.INTERNAL_ERROR


async def test_client_reconnects_with_backoff(nursery: trio.Nursery) -> None:
    """Reconnects with backoff until the server is back."""
    attempts = 0

    async def flaky(request: trio_websocket.WebSocketRequest) -> None:
        nonlocal attempts
        attempts += 1
        ws = await request.accept()
        if attempts < 4:
            await ws.aclose(CloseCode.GOING_AWAY)
            return
        try:
            while True:
                message = msgspec.json.decode(await ws.get_message())
                await ws.send_message(msgspec.json.encode(
                    {"v": 1, "type": "reply", "re": message["id"], "ok": True,
                     "data": {"attempt": attempts}}).decode())
        except trio_websocket.ConnectionClosed:
            pass

    port = await _fake_server(nursery, flaky)
    with trio.fail_after(TEST_DEADLINE_S):
        async with connect(f"ws://127.0.0.1:{port}/v1/ws", "at_live_x") as client:
            await eventually(lambda: _at_least(lambda: client.connections, 4))
            reply = await client.request("agent.me")
            assert reply == {"attempt": 4}


async def _at_least(value: object, target: int) -> bool:
    assert callable(value)
    return int(value()) >= target


class _PingThenGone:
    """A socket that delivers a server ping, then turns out to be closed (1001)."""

    def __init__(self) -> None:
        self.reads = 0

    async def get_message(self) -> str:
        self.reads += 1
        if self.reads == 1:
            return '{"v":1,"type":"ping"}'
        raise trio_websocket.ConnectionClosed(trio_websocket.CloseReason(1001, "going away"))

    async def send_message(self, data: object) -> None:
        raise trio_websocket.ConnectionClosed(trio_websocket.CloseReason(1001, "going away"))


async def test_client_unsendable_pong_not_an_error() -> None:
    """A pong that cannot go out is not an error.

    A ping read just before the close: the pong fails, the connection ends normally.
    """
    client = BrokerClient("ws://127.0.0.1:1/v1/ws", "at_live_x", reconnect=False)
    socket = _PingThenGone()
    await client._read(socket)  # type: ignore[arg-type]
    assert socket.reads == 2
    assert (client.close_code, client.close_reason) == (1001, "going away")


async def test_client_reads_a_large_frame_in_few_socket_reads(
    live: Live, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A frame of 30 KiB takes a handful of reads from the socket, not one per 4 KiB
    (trio-websocket's default, which cost the load generator about 8% of its CPU)."""
    engine, world = live.server.engine, live.world
    reads: list[int] = []
    receive_some = trio.SocketStream.receive_some

    async def counted(self: trio.SocketStream, max_bytes: int | None = None) -> bytes:
        data = await receive_some(self, max_bytes)
        reads.append(len(data))
        return data

    monkeypatch.setattr(trio.SocketStream, "receive_some", counted)
    text = "x" * (30 * 1024)
    async with connect(live.url, world.tokens["bob"], auto_ack=False) as bob:
        deliveries = bob.deliveries()
        reads.clear()
        await post(engine, world.workspace_id, world.agents["alice"], "general", text)
        delivery = await deliveries.__anext__()
        assert delivery.data["text"] == text
    assert sum(reads) >= len(text)
    assert len(reads) <= 8, reads  # 4 KiB reads: at least 8 for the frame alone
