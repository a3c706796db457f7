"""Batched delivery frames: a native session opened with `?batch=1` sends `deliver.batch`.

- The codec's split rule, without sockets: order kept, each frame within
  the limit, a delivery too large for one frame alone in its own.
- Over real sockets: seq order across batches (replay, then live); no gap
  and no duplicate at the replay seam under concurrent sends; a batched and
  a plain session of one agent each get every delivery once, in order;
  MessagePack batches; a batch over `max_frame_bytes` split in order; a
  held delivery pushed again inside a batch, flagged; the Python client
  asks for batches by default; a `batch` value other than 0 or 1 refused.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
import trio_websocket

from broker.client import connect
from broker.engine.messages import SendChannelMessage
from broker.gateway.frame_queue import Mode
from broker.gateway.settings import GatewaySettings
from protocol import frames as fr
from protocol.codec import MSGPACK_SUBPROTOCOL, Codec
from tests.helpers.daemon import serve
from tests.helpers.engine import make_world
from tests.helpers.realtime import (
    Live,
    eventually,
    gateway_of,
    next_deliveries,
    next_frame,
    raw_socket,
)
from tests.helpers.rest import call
from tests.test_gateway_redelivery import _marked, request
from tests.test_gateway_seam import SEAM_DEADLINE_S, pair_channel, send_many

# -- the split rule, sans IO ------------------------------------------------------------------


def _deliver(codec: Codec, seq: int, text: str = "x") -> bytes:
    payload = msgspec.json.encode({"type": "message.created", "data": {"text": text}})
    return codec.encode_bytes(fr.Deliver(seq=seq, delivery_id=f"1:{seq}",
                                         payload=codec.payload(payload)))


@pytest.mark.parametrize("msgpack", [False, True])
def test_encode_batch_splits_in_order_within_the_limit(msgpack: bool) -> None:
    """Frames never exceed the limit, keep the order, and a delivery too big goes alone."""
    codec = Codec(fr.NATIVE_CONTROL_FRAMES, msgpack=msgpack)
    items = [_deliver(codec, seq) for seq in range(1, 41)]
    items.insert(20, _deliver(codec, 999, "y" * 1000))  # larger than a frame by itself
    limit = 500
    frames = codec.encode_batch(items, limit)
    decode = msgspec.msgpack.decode if msgpack else msgspec.json.decode
    decoded = [decode(frame) for frame in frames]
    assert all(d["type"] == "deliver.batch" and d["v"] == 1 for d in decoded)
    seqs = [item["seq"] for d in decoded for item in d["deliveries"]]
    assert seqs == [*range(1, 21), 999, *range(21, 41)]
    for frame, d in zip(frames, decoded, strict=True):
        size = len(frame.encode() if isinstance(frame, str) else frame)
        if [item["seq"] for item in d["deliveries"]] == [999]:
            assert size > limit  # alone: it would not fit any frame
        else:
            assert size <= limit
    assert len(frames) > 3
    assert codec.encode_batch([], limit) == []


def test_batch_item_is_deliver_frame_as_sent_alone() -> None:
    """A batch item is the deliver frame as sent alone."""
    codec = Codec(fr.NATIVE_CONTROL_FRAMES)
    item = _deliver(codec, 7)
    (frame,) = codec.encode_batch([item], 1 << 20)
    assert frame == '{"v":1,"type":"deliver.batch","deliveries":[' + item.decode() + "]}"


# -- over real sockets ------------------------------------------------------------------------


@pytest.mark.one_process  # reads the in-process gateway
async def test_batch_seq_order_and_replay_shares_frame(
    live: Live,
) -> None:
    """Batches keep seq order across batches, and replay shares a frame.

    Deliveries pending on connect come in one frame; later ones follow in seq order.
    """
    for n in range(20):
        await live.post("alice", f"m{n}")
    async with raw_socket(live.server, live.token("bob"), batch="1") as bob:
        first = await next_frame(bob, "deliver", "deliver.batch")
        assert first["type"] == "deliver.batch"
        assert [d["seq"] for d in first["deliveries"]] == list(range(1, 21))
        assert all(d["type"] == "deliver" and d["delivery_id"] == live.delivery_id("bob", d["seq"])
                   for d in first["deliveries"])

        async with trio.open_nursery() as nursery:
            for n in range(20, 60):
                nursery.start_soon(live.post, "alice", f"m{n}")
        seqs = [d["seq"] for d in first["deliveries"]]
        texts = [d["payload"]["data"]["text"] for d in first["deliveries"]]
        frames = 1
        while len(seqs) < 60:
            frame = await next_frame(bob, "deliver", "deliver.batch")
            assert frame["type"] == "deliver.batch"  # never a plain deliver on this session
            frames += 1
            seqs += [d["seq"] for d in frame["deliveries"]]
            texts += [d["payload"]["data"]["text"] for d in frame["deliveries"]]
        assert seqs == list(range(1, 61))
        assert len(set(texts)) == 60
        session = next(iter(gateway_of(live.server).sessions))
        assert session.batch is True
        assert session.statistics().frames_sent >= frames


async def test_replay_seam_under_concurrent_sends_with_batches(tmp_path: Path) -> None:
    """The seam test of test_gateway_seam with batches on: every seq once, in order."""
    pending, after_seam = 2000, 500
    with trio.fail_after(SEAM_DEADLINE_S):
        async with serve(tmp_path, GatewaySettings(replay_page=200)) as server:
            engine, gateway = server.engine, gateway_of(server)
            world = await make_world(engine, agents=("alice", "bob"))
            await pair_channel(engine, world)
            await send_many(engine, world, 0, pending)
            sent = pending
            stop = trio.Event()
            seqs: list[int] = []
            frames = 0

            async def keep_sending() -> None:
                nonlocal sent
                while not stop.is_set():
                    sent += 1
                    await engine.submit(SendChannelMessage(
                        workspace_id=world.workspace_id, agent_id=world.agents["alice"],
                        channel="pair", text=f"m{sent}"))

            async def referee() -> None:
                async def live() -> bool:
                    return any(s.queue.mode is Mode.LIVE for s in gateway.sessions)
                await eventually(live)
                target = sent + after_seam
                await eventually(lambda: _at_least(lambda: sent, target))
                stop.set()

            async with raw_socket(server, world.tokens["bob"], queue=100_000,
                                  batch="1") as bob:

                async def read() -> None:
                    nonlocal frames
                    while True:
                        frame = await next_frame(bob, "deliver", "deliver.batch")
                        assert frame["type"] == "deliver.batch"
                        frames += 1
                        seqs.extend(d["seq"] for d in frame["deliveries"])

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
                # Nothing more was queued for bob: the next delivery is a marker sent now
                # (a pong would not tell, since replies go out before queued deliveries).
                await engine.submit(SendChannelMessage(
                    workspace_id=world.workspace_id, agent_id=world.agents["alice"],
                    channel="pair", text="marker"))
                marker = await next_frame(bob, "deliver", "deliver.batch")
                assert [d["seq"] for d in marker["deliveries"]] == [sent + 1]
    assert seqs == list(range(1, sent + 1))
    assert stats.replayed >= pending
    assert stats.queue.live_deliveries >= after_seam
    assert stats.replayed + stats.queue.live_deliveries == sent
    assert frames < sent  # batches carried several deliveries


async def _at_least(value: Callable[[], int], target: int) -> bool:
    return value() >= target


async def test_batch_and_plain_sessions_each_get_everything_once(
    live: Live,
) -> None:
    """A batched and a plain session of one agent each get everything once."""
    for n in range(10):
        await live.post("alice", f"m{n}")
    async with raw_socket(live.server, live.token("bob"), batch="1") as batched, \
            raw_socket(live.server, live.token("bob"), batch="0") as plain:
        async with trio.open_nursery() as nursery:
            for n in range(10, 40):
                nursery.start_soon(live.post, "alice", f"m{n}")

        got: dict[str, list[int]] = {"deliver.batch": [], "deliver": []}
        for ws, kind in ((batched, "deliver.batch"), (plain, "deliver")):
            while len(got[kind]) < 40:
                frame = await next_frame(ws, "deliver", "deliver.batch")
                assert frame["type"] == kind
                items = frame["deliveries"] if kind == "deliver.batch" else [frame]
                got[kind] += [d["seq"] for d in items]
        assert got["deliver.batch"] == got["deliver"] == list(range(1, 41))
        # Nothing more on either, no duplicate: the next delivery of each is a marker sent now
        # (a pong would not tell, since replies go out before queued deliveries).
        await live.post("alice", "marker")
        for ws, kind in ((batched, "deliver.batch"), (plain, "deliver")):
            frame = await next_frame(ws, "deliver", "deliver.batch")
            items = frame["deliveries"] if kind == "deliver.batch" else [frame]
            assert [d["seq"] for d in items] == [41]


async def test_batch_msgpack_sessions_get_binary(live: Live) -> None:
    """MessagePack sessions get binary batches."""
    for n in range(5):
        await live.post("alice", f"m{n}")
    async with raw_socket(live.server, live.token("bob"), batch="1",
                          subprotocols=[MSGPACK_SUBPROTOCOL]) as bob:
        message = await bob.get_message()
        assert isinstance(message, bytes)
        frame = msgspec.msgpack.decode(message)
        assert frame["type"] == "deliver.batch"
        assert [d["seq"] for d in frame["deliveries"]] == [1, 2, 3, 4, 5]
        assert [d["payload"]["data"]["text"] for d in frame["deliveries"]] == [
            f"m{n}" for n in range(5)]
        assert all(d["type"] == "deliver" for d in frame["deliveries"])


async def test_batch_over_frame_limit_split_in_order(tmp_path: Path) -> None:
    """A batch over the frame limit is split in order."""
    limit = 2048
    async with serve(tmp_path, GatewaySettings(max_frame_bytes=limit)) as server:
        world = await make_world(server.engine)
        for n in range(30):
            await server.engine.submit(SendChannelMessage(
                workspace_id=world.workspace_id, agent_id=world.agents["alice"],
                channel="general", text=f"m{n}" if n != 10 else "z" * 3000))
        async with raw_socket(server, world.tokens["bob"], batch="1") as bob:
            sizes: list[tuple[int, list[int]]] = []
            seqs: list[int] = []
            while len(seqs) < 30:
                message = await bob.get_message()
                assert isinstance(message, str)
                frame = msgspec.json.decode(message)
                if frame["type"] != "deliver.batch":
                    continue
                batch = [d["seq"] for d in frame["deliveries"]]
                sizes.append((len(message.encode()), batch))
                seqs += batch
    assert seqs == list(range(1, 31))
    assert len(sizes) > 2
    for size, batch in sizes:
        if batch == [11]:
            assert size > limit  # the one too large for any frame comes alone
        else:
            assert size <= limit
    assert max(len(batch) for _, batch in sizes) > 1


async def test_batch_held_delivery_comes_again_flagged(live: Live) -> None:
    """A held delivery comes again flagged inside a batch."""
    async with raw_socket(live.server, live.token("bob"), batch="1") as bob:
        for text in ("one", "two", "three"):
            await live.post("alice", text)
        seqs: list[int] = []
        while len(seqs) < 3:
            seqs += [d["seq"] for d in await next_deliveries(bob)]
        assert seqs == [1, 2, 3]
        await eventually(lambda: _marked(live, 1, 2, 3))

        await request(bob, "f", "delivery.fail", delivery_id=live.delivery_id("bob", 2),
                      error="busy")
        frame = await next_frame(bob, "deliver", "deliver.batch")
        assert frame["type"] == "deliver.batch"
        (again,) = frame["deliveries"]
        assert again["seq"] == 2 and again["redelivery"] is True
        assert again["payload"]["data"]["text"] == "two"

        await live.post("alice", "four")
        (fresh,) = await next_deliveries(bob)
        assert fresh["seq"] == 4 and "redelivery" not in fresh


async def test_batch_replay_sends_held_delivery_flagged(live: Live) -> None:
    """A replay sends a held delivery flagged in its batch."""
    for text in ("one", "two", "three"):
        await live.post("alice", text)
    async with raw_socket(live.server, live.token("bob")) as bob:  # plain, to mark them
        assert [(await next_frame(bob, "deliver"))["seq"] for _ in range(3)] == [1, 2, 3]
        await eventually(lambda: _marked(live, 1, 2, 3))
    # Given back with no session open: still held when the next one replays.
    assert live.http is not None
    await call(live.http, "POST", f"/v1/deliveries/{live.delivery_id('bob', 2)}/fail",
               live.token("bob"), json={"error": "busy"})
    async with raw_socket(live.server, live.token("bob"), batch="1") as bob:
        frame = await next_frame(bob, "deliver", "deliver.batch")
        assert frame["type"] == "deliver.batch"
        assert [(d["seq"], d.get("redelivery", False)) for d in frame["deliveries"]] == [
            (1, False), (2, True), (3, False)]


@pytest.mark.one_process  # reads the in-process gateway
async def test_client_asks_for_batches_by_default(live: Live) -> None:
    """The Python client asks for batches by default."""
    for n in range(20):
        await live.post("alice", f"m{n}")
    gateway = gateway_of(live.server)
    async with connect(live.url, live.token("bob"), auto_ack=False) as bob:
        deliveries = bob.deliveries()
        got = [await deliveries.__anext__() for _ in range(20)]
        assert [d.seq for d in got] == list(range(1, 21))
        assert [d.data["text"] for d in got] == [f"m{n}" for n in range(20)]
        (session,) = gateway.sessions
        assert session.batch is True
        assert session.statistics().frames_sent < 20  # the replay shared frames
    async with connect(live.url, live.token("bob"), auto_ack=False, batch=False) as bob:
        deliveries = bob.deliveries()
        assert (await deliveries.__anext__()).seq == 1
        (session,) = gateway.sessions
        assert session.batch is False


@pytest.mark.one_process  # reads the in-process gateway
@pytest.mark.parametrize("value", ["2", "yes", "true", "01", "", "1&batch=2", "1&batch=1"])
async def test_handshake_refuses_batch_other_than_0_or_1(
    live: Live, value: str,
) -> None:
    """A batch value other than 0 or 1 is refused at the handshake: a blank one, and one given
    twice (even twice the same: an ambiguous option is not guessed at), too."""
    with pytest.raises(trio_websocket.ConnectionRejected) as refused:
        async with raw_socket(live.server, live.token("bob"), batch=value):
            pass
    assert refused.value.status_code == 400
    body: dict[str, Any] = msgspec.json.decode(refused.value.body or b"{}")
    assert body == {"ok": False, "error": {
        "code": "invalid_request",
        "message": f"batch must be 0 or 1, not {value.replace('&batch=', ',')!r}"}}
    assert not gateway_of(live.server).sessions
    assert gateway_of(live.server).limiter.sockets() == 0
