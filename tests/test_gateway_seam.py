"""The seam between replay and live push, and a daemon restart, over real sockets.

- 5,000 deliveries pending, the agent connects while sends continue: every
  seq arrives exactly once, in order, on the one socket (no gap, no
  duplicate, no reordering where replay hands over to live push).
- 1,000 messages to an offline agent, the daemon restarts on the same data
  directory: all arrive in order; acked ones never come again, across
  another restart.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import trio

from broker.engine.channels import CreateChannel, JoinChannel
from broker.engine.engine import Engine
from broker.engine.messages import SendChannelMessage
from broker.gateway.frame_queue import Mode
from broker.gateway.settings import GatewaySettings
from tests.helpers.daemon import serve
from tests.helpers.engine import World, make_world
from tests.helpers.realtime import eventually, gateway_of, next_frame, raw_socket, send_json

SEAM_DEADLINE_S = 120


async def pair_channel(engine: Engine, world: World, name: str = "pair") -> None:
    """A channel of alice and bob only: each send gives bob exactly one delivery."""
    await engine.submit(CreateChannel(workspace_id=world.workspace_id,
                                      agent_id=world.agents["alice"], name=name))
    await engine.submit(JoinChannel(workspace_id=world.workspace_id,
                                    agent_id=world.agents["bob"], channel=name))


async def send_many(engine: Engine, world: World, first: int, count: int, tasks: int = 20,
                    channel: str = "pair") -> None:
    """`count` sends from alice, `tasks` at a time (so the writer batches them)."""
    numbers = iter(range(first, first + count))

    async def sender() -> None:
        for n in numbers:
            await engine.submit(SendChannelMessage(
                workspace_id=world.workspace_id, agent_id=world.agents["alice"],
                channel=channel, text=f"m{n}"))

    async with trio.open_nursery() as nursery:
        for _ in range(tasks):
            nursery.start_soon(sender)


async def test_replay_hands_over_to_live_push_with_no_gap_and_no_duplicate(
    tmp_path: Path,
) -> None:
    pending, after_seam = 5000, 500
    with trio.fail_after(SEAM_DEADLINE_S):
        # A small replay page makes the replay take many round trips, so
        # live sends land during it.
        async with serve(tmp_path, GatewaySettings(replay_page=200)) as server:
            engine, gateway = server.engine, gateway_of(server)
            world = await make_world(engine, agents=("alice", "bob"))
            await pair_channel(engine, world)
            await send_many(engine, world, 0, pending)
            sent = pending
            stop = trio.Event()
            seqs: list[int] = []
            message_ids: list[int] = []

            async def keep_sending() -> None:
                nonlocal sent
                while not stop.is_set():
                    sent += 1
                    await engine.submit(SendChannelMessage(
                        workspace_id=world.workspace_id, agent_id=world.agents["alice"],
                        channel="pair", text=f"m{sent}"))

            async def referee() -> None:
                # Sends go on through the replay and `after_seam` sends past the
                # moment the session went live.
                async def live() -> bool:
                    return any(s.queue.mode is Mode.LIVE for s in gateway.sessions)
                await eventually(live)
                target = sent + after_seam
                await eventually(lambda: _at_least(lambda: sent, target))
                stop.set()

            async with raw_socket(server, world.tokens["bob"], queue=100_000) as bob:

                async def read() -> None:
                    while True:
                        frame = await next_frame(bob, "deliver")
                        seqs.append(frame["seq"])
                        message_ids.append(int(frame["payload"]["data"]["id"]))

                async with trio.open_nursery() as reading:
                    reading.start_soon(read)
                    async with trio.open_nursery() as sending:
                        for _ in range(4):
                            sending.start_soon(keep_sending)
                        sending.start_soon(referee)
                    await eventually(lambda: _at_least(lambda: len(seqs), sent))
                    reading.cancel_scope.cancel()
                (session,) = gateway.sessions
                stats = session.statistics()
                # Nothing more comes: no duplicate after the last one either.
                await send_json(bob, {"v": 1, "id": "end", "type": "ping"})
                assert (await next_frame(bob, "pong", "deliver"))["type"] == "pong"
    assert seqs == list(range(1, sent + 1))
    assert message_ids == sorted(message_ids)  # seq order is commit order
    assert stats.replayed >= pending
    assert stats.queue.live_deliveries >= after_seam  # pushed live, past the seam
    assert stats.replayed + stats.queue.live_deliveries == sent
    assert stats.queue.max_depth <= stats.queue.capacity


async def _at_least(value: Callable[[], int], target: int) -> bool:
    return value() >= target


async def test_restart_keeps_offline_messages(
    tmp_path: Path,
) -> None:
    """Messages to an offline agent survive a restart, and acked ones never return."""
    count, acked = 1000, 600
    data_dir = tmp_path / "data"
    with trio.fail_after(SEAM_DEADLINE_S):
        async with serve(data_dir) as server:
            world = await make_world(server.engine, agents=("alice", "bob"))
            await pair_channel(server.engine, world)
            await send_many(server.engine, world, 0, count)

        async with serve(data_dir) as server:  # a new daemon on the same file
            async with raw_socket(server, world.tokens["bob"], queue=count) as bob:
                frames = [await next_frame(bob, "deliver") for _ in range(count)]
                assert [f["seq"] for f in frames] == list(range(1, count + 1))
                assert [f["payload"]["data"]["text"] for f in frames] == sorted(
                    (f"m{n}" for n in range(count)), key=lambda t: int(t[1:]))
                await send_json(bob, {"v": 1, "id": "a", "type": "delivery.ack",
                                      "up_to_seq": acked})
                reply = await next_frame(bob, "reply")
                assert reply["data"]["acked_seq"] == acked

        async with serve(data_dir) as server:
            async with raw_socket(server, world.tokens["bob"], queue=count) as bob:
                rest = [await next_frame(bob, "deliver") for _ in range(count - acked)]
                assert [f["seq"] for f in rest] == list(range(acked + 1, count + 1))
                await send_json(bob, {"v": 1, "id": "end", "type": "ping"})
                assert (await next_frame(bob, "pong", "deliver"))["type"] == "pong"
