"""Slow consumers: one agent stops reading, the others do not notice; then it catches up.

The slow client sets a tiny TCP receive buffer and lets trio-websocket read
ahead one message only, so the server's writes to it block quickly. Its
session's outbox (64 frames here) fills, the session stops taking live
deliveries (`overflows`), the hub, the writer and the twenty other agents
go on, and once the client reads again the session catches up from the
database: every delivery arrives once, in order.

Meanwhile the slow client also sends pings and frames the server refuses,
each of which owes it a frame back: the server stops reading it once those
answers reach its bound, so the session's memory stays bounded by
`outbox_frames + max_requests_in_flight + 1` whatever the client sends.

A client that reads nothing for slow_client_timeout is closed with 4008;
its deliveries wait in the database for the next connection.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio_websocket

from broker.client import BrokerClient, connect
from broker.engine.channels import CreateChannel, JoinChannel
from broker.engine.engine import Engine
from broker.engine.messages import SendChannelMessage
from broker.gateway.settings import GatewaySettings
from broker.server import BrokerServer
from protocol.codec import CloseCode
from tests.helpers.daemon import serve
from tests.helpers.engine import World, make_world
from tests.helpers.realtime import (
    closed_with,
    eventually,
    gateway_of,
    next_frame,
    raw_socket,
    send_json,
    ws_url,
)
from tests.helpers.tls import make_certificates

SLOW_DEADLINE_S = 120
OUTBOX = 64
PAIRS = 10  # twenty agents, two per channel
PER_AGENT = 500  # messages each of them sends: 10,000 in all
TO_SLOW = 1000
BIG_TEXT = "x" * 1000
SPAM = 300  # pings and refused frames (each) that the slow client sends and does not read


async def channel_of(engine: Engine, world: World, name: str, members: list[str]) -> None:
    await engine.submit(CreateChannel(workspace_id=world.workspace_id,
                                      agent_id=world.agents[members[0]], name=name))
    for member in members[1:]:
        await engine.submit(JoinChannel(workspace_id=world.workspace_id,
                                        agent_id=world.agents[member], channel=name))


async def chat(engine: Engine, world: World, client: BrokerClient, channel: str, me: str,
               received: list[str]) -> None:
    """Send PER_AGENT messages to `channel` while reading what the partner sends.

    The sends go straight to the writer: what is under test is the push side,
    and the one event loop that runs both the server and forty sockets here
    is the bottleneck of this test.
    """

    async def read() -> None:
        async for delivery in client.deliveries():
            received.append(delivery.data["text"])
            if len(received) == PER_AGENT:
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        for n in range(PER_AGENT):
            await engine.submit(SendChannelMessage(
                workspace_id=world.workspace_id, agent_id=world.agents[me], channel=channel,
                text=f"{me}:{n}"))


async def test_slow_consumer_isolated_and_catches_up(
    tmp_path: Path,
) -> None:
    """A slow consumer does not slow the others, and catches up later."""
    settings = GatewaySettings(outbox_frames=OUTBOX, slow_client_timeout_seconds=SLOW_DEADLINE_S)
    names = [f"a{i}" for i in range(2 * PAIRS)]
    with trio.fail_after(SLOW_DEADLINE_S):
        async with serve(tmp_path, settings) as server:
            engine = server.engine
            world = await make_world(engine, agents=("slow", "hose", *names))
            await channel_of(engine, world, "hose", ["hose", "slow"])
            for p in range(PAIRS):
                await channel_of(engine, world, f"p{p}", [names[2 * p], names[2 * p + 1]])

            async with raw_socket(server, world.tokens["slow"], queue=1,
                                  receive_buffer=4096) as slow, trio.open_nursery() as spamming:
                await eventually(lambda: _has_session(server, world.agents["slow"]))
                (session,) = [s for s in gateway_of(server).sessions
                              if s.agent_id == world.agents["slow"]]
                # Its sends may block once the server stops reading it: they
                # finish after it reads again, outside the firehose's nursery.
                spamming.start_soon(_spam, slow)
                received = {name: [] for name in names}
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_firehose, engine, world)
                    for p in range(PAIRS):
                        nursery.start_soon(_pair, server, world, names[2 * p],
                                           names[2 * p + 1], received)

                # Everyone else got everything, in order.
                for p in range(PAIRS):
                    one, two = names[2 * p], names[2 * p + 1]
                    assert received[one] == [f"{two}:{n}" for n in range(PER_AGENT)]
                    assert received[two] == [f"{one}:{n}" for n in range(PER_AGENT)]

                stalled = session.statistics()
                lagging = stalled.queue
                assert lagging.overflows >= 1  # it did fall behind...
                # ...and its memory stayed bounded: OUTBOX deliveries and events at
                # most, plus its own frames (the answers to what it sent, bounded
                # like requests in flight, and a ping), however much it sent.
                assert lagging.max_own <= settings.max_requests_in_flight + 1
                assert lagging.max_depth <= OUTBOX + settings.max_requests_in_flight + 1
                assert lagging.max_buffered <= OUTBOX
                assert stalled.read_pauses >= 1  # it was not read while it did not read

                # Now it reads: every delivery once, in order, and every answer.
                seqs: list[int] = []
                answers: list[str] = []
                while len(seqs) < TO_SLOW or len(answers) < 2 * SPAM:
                    frame = await next_frame(slow, "deliver", "pong", "reply")
                    if frame["type"] == "deliver":
                        seqs.append(frame["seq"])
                    else:
                        answers.append(frame["re"])
                assert seqs == list(range(1, TO_SLOW + 1))
                assert answers == [re for n in range(SPAM) for re in (f"p{n}", f"x{n}")]
                await send_json(slow, {"v": 1, "id": "end", "type": "ping"})
                assert (await next_frame(slow, "pong", "deliver", "reply"))["re"] == "end"
                assert session.statistics().queue.catch_ups >= 2


async def _spam(ws: trio_websocket.WebSocketConnection) -> None:
    """Frames that each owe an answer and take no request slot: pings, unknown types."""
    for n in range(SPAM):
        await send_json(ws, {"v": 1, "id": f"p{n}", "type": "ping"})
        await send_json(ws, {"v": 1, "id": f"x{n}", "type": "nope"})


async def _has_session(server: BrokerServer, agent_id: int) -> bool:
    return any(s.agent_id == agent_id for s in gateway_of(server).sessions)


async def _firehose(engine: Engine, world: World) -> None:
    numbers = iter(range(TO_SLOW))

    async def sender() -> None:
        for n in numbers:
            await engine.submit(SendChannelMessage(
                workspace_id=world.workspace_id, agent_id=world.agents["hose"],
                channel="hose", text=f"{n}:{BIG_TEXT}"))

    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(sender)


async def _pair(server: BrokerServer, world: World, one: str, two: str,
                received: dict[str, list[str]]) -> None:
    p = f"p{_pair_index(one)}"
    async with connect(ws_url(server), world.tokens[one]) as a, \
            connect(ws_url(server), world.tokens[two]) as b:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(chat, server.engine, world, a, p, one, received[one])
            nursery.start_soon(chat, server.engine, world, b, p, two, received[two])


def _pair_index(name: str) -> int:
    return int(name[1:]) // 2


async def test_slow_consumer_closed_4008_loses_nothing(
    tmp_path: Path,
) -> None:
    """A client that reads nothing is closed with 4008 and loses nothing."""
    settings = GatewaySettings(outbox_frames=16, slow_client_timeout_seconds=0.5,
                               close_grace_seconds=30)
    with trio.fail_after(SLOW_DEADLINE_S):
        async with serve(tmp_path, settings) as server:
            engine = server.engine
            world = await make_world(engine, agents=("slow", "hose"))
            await channel_of(engine, world, "hose", ["hose", "slow"])
            gateway = gateway_of(server)
            async with raw_socket(server, world.tokens["slow"], queue=1,
                                  receive_buffer=4096) as slow:
                await eventually(lambda: _has_session(server, world.agents["slow"]))
                sent = 0
                while gateway.slow_closes == 0:
                    await _firehose_some(engine, world, 50)
                    sent += 50
                # The client reads again: what was already on its way, then 4008.
                seqs = []
                while True:
                    try:
                        frame = await next_frame(slow, "deliver")
                    except trio_websocket.ConnectionClosed:
                        break
                    seqs.append(frame["seq"])
                assert await closed_with(slow) == CloseCode.SLOW_CLIENT
                assert seqs == list(range(1, len(seqs) + 1))
            # Nothing is lost: nothing was acked, so a new connection gets it all again.
            async with raw_socket(server, world.tokens["slow"], queue=sent) as again:
                replayed = [(await next_frame(again, "deliver"))["seq"] for _ in range(sent)]
                assert replayed == list(range(1, sent + 1))


async def _firehose_some(engine: Engine, world: World, count: int) -> None:
    for n in range(count):
        await engine.submit(SendChannelMessage(
            workspace_id=world.workspace_id, agent_id=world.agents["hose"], channel="hose",
            text=f"{n}:{BIG_TEXT}"))


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
async def test_slow_consumer_never_reading_is_reset(tmp_path: Path, tls: bool) -> None:
    """A client that never reads again is reset and its session ends, over TLS too."""
    # hypercorn writes inside a shielded scope: without the reset, the stuck
    # write would hold the session (and a graceful stop) forever.
    settings = GatewaySettings(outbox_frames=16, slow_client_timeout_seconds=0.5,
                               close_grace_seconds=0.5)
    certs = make_certificates(tmp_path / "tls") if tls else None
    with trio.fail_after(SLOW_DEADLINE_S):
        async with serve(tmp_path, settings, tls=certs.settings() if certs else None) as server:
            engine = server.engine
            world = await make_world(engine, agents=("slow", "hose"))
            await channel_of(engine, world, "hose", ["hose", "slow"])
            gateway = gateway_of(server)
            async with raw_socket(server, world.tokens["slow"], queue=1, receive_buffer=4096,
                                  ssl_context=certs.client_context() if certs else None):
                await eventually(lambda: _has_session(server, world.agents["slow"]))
                (session,) = gateway.sessions
                while gateway.slow_closes == 0:
                    await _firehose_some(engine, world, 50)
                with trio.fail_after(10):
                    await session.finished.wait()
                assert session.close_code == CloseCode.SLOW_CLIENT
                assert gateway.sessions == set()
