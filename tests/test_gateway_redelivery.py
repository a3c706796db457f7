"""Deliveries the agent gives back (fail, defer) come again on live sockets, flagged `redelivery`.

Over real sockets: the engine's `mailbox.changed` makes a live session push
the delivery again, at or below the seqs the client has seen, and nothing
else; the Python client takes it although its seq is old, and its ack then
settles it. On the autojump clock with a scripted database: a delivery
deferred to later is pushed when its time comes, and a held delivery is
pushed once per version (not again while its push mark is on its way).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast

import trio
import trio.testing
import trio_websocket

from broker.client import connect
from broker.engine.engine import Engine
from broker.engine.events import encode_payload
from broker.engine.mailbox import AckUpTo, FailDelivery
from broker.gateway import Gateway
from broker.gateway.frame_queue import Mode
from broker.gateway.native import AgentSession
from broker.gateway.recorder import DeliveryRecorder
from broker.gateway.redelivery import HeldDelivery, HeldPage, held_deliveries
from broker.gateway.settings import GatewaySettings
from broker.gateway.views import FactView
from tests.helpers.engine import (
    delivery_rows,
    hold_writer,
    wait_queued,
)
from tests.helpers.realtime import (
    FakeWebSocket,
    Live,
    eventually,
    next_frame,
    raw_socket,
    send_json,
    ws_url,
)


async def request(ws: trio_websocket.WebSocketConnection, request_id: str, type_: str,
                  **fields: Any) -> dict[str, Any]:
    await send_json(ws, {"v": 1, "id": request_id, "type": type_, **fields})
    while True:
        frame = await next_frame(ws, "reply")
        if frame["re"] == request_id:
            assert frame["ok"] is True, frame
            return cast(dict[str, Any], frame["data"])


async def test_redelivery_of_failed_or_deferred_only(
    live: Live,
) -> None:
    """A failed or deferred delivery comes again, flagged, and nothing else does."""
    async with raw_socket(live.server, live.world.tokens["bob"]) as bob:
        for text in ("one", "two", "three"):
            await live.post("alice", text)
        assert [(await next_frame(bob, "deliver"))["seq"] for _ in range(3)] == [1, 2, 3]
        # The agent gives them back after their pushes were recorded (a push
        # mark that lands after a fail overrides it: the engine's business).
        await eventually(lambda: _marked(live, 1, 2, 3))

        await request(bob, "f", "delivery.fail", delivery_id=live.delivery_id("bob", 2),
                      error="busy")
        again = await next_frame(bob, "deliver")
        assert again["seq"] == 2 and again["redelivery"] is True
        assert again["payload"]["data"]["text"] == "two"

        # Deferred to a time already past: due at once, pushed again at once.
        await request(bob, "d", "delivery.defer", delivery_id=live.delivery_id("bob", 3),
                      available_at="2020-01-01T00:00:00Z")
        again = await next_frame(bob, "deliver")
        assert again["seq"] == 3 and again["redelivery"] is True

        # Nothing else came again: the next delivery is the next new one.
        await live.post("alice", "four")
        frame = await next_frame(bob, "deliver")
        assert frame["seq"] == 4 and "redelivery" not in frame
        # Pushed again, the held ones are settled by the next cumulative ack.
        await eventually(lambda: _marked(live, 4))  # (the push of 4, before acking it)
        assert (await request(bob, "a", "delivery.ack", up_to_seq=4))["acked_seq"] == 4


async def _marked(live: Live, *seqs: int) -> bool:
    """Whether the pushes of these deliveries are recorded (state delivered)."""
    rows = await live.server.engine.read(lambda c: c.execute(
        "SELECT seq FROM deliveries WHERE agent_id = ? AND state = 'delivered'",
        (live.world.agents["bob"],)).fetchall())
    return set(seqs) <= {int(r[0]) for r in rows}


async def test_redelivery_below_last_seq_settled_by_client_ack(
    live: Live,
) -> None:
    """The Python client takes a redelivery below its last seq, and its ack settles it."""
    engine, world = live.server.engine, live.world
    async with connect(ws_url(live.server), world.tokens["bob"]) as bob:
        for text in ("one", "two", "three"):
            await live.post("alice", text)
        deliveries = bob.deliveries()
        got = [await deliveries.__anext__() for _ in range(3)]
        assert [d.seq for d in got] == [1, 2, 3]
        # 1 and 2 are processed (and may be acked already); 3 is in the
        # consumer's hands, and the agent gives it back once its push is recorded.
        await eventually(lambda: _marked(live, 3))
        await engine.submit(FailDelivery(workspace_id=world.workspace_id,
                                         agent_id=world.agents["bob"],
                                         delivery_id=live.delivery_id("bob", 3),
                                         error="try later"))
        again = await deliveries.__anext__()
        assert (again.seq, again.redelivery, again.data["text"]) == (3, True, "three")
        assert bob.redeliveries == 1 and bob.duplicates == 0
        await live.post("alice", "four")
        fourth = await deliveries.__anext__()  # asking for it processed the redelivery
        assert fourth.seq == 4 and not fourth.redelivery

        async def settled() -> bool:  # everything processed is acked, seq 1 included
            return await live.acked("bob") >= 3

        await eventually(settled)


async def test_redelivery_held_settled_by_ack_in_same_flush(
    live: Live,
) -> None:
    """A held delivery pushed again is settled by an ack in the same flush."""
    # The push mark and the ack of one agent go out as one command, marks
    # first: the ack finds the pushed-again delivery `delivered`, not held.
    engine, wid, bob, recorder = await _three_pushes_recorded(live)
    await recorder.flush()
    await engine.submit(FailDelivery(workspace_id=wid, agent_id=bob,
                                     delivery_id=live.delivery_id("bob", 2)))
    assert (await engine.submit(AckUpTo(workspace_id=wid, agent_id=bob, up_to_seq=3))
            ).acked_seq == 1  # 2 is held
    # Pushed again, stamped after the fail as a session stamps it (at least 1 ms
    # after the updated_at it read: within one millisecond the mark would be late)...
    (failed_at,) = engine.writer.connection.execute(
        "SELECT updated_at FROM deliveries WHERE agent_id = ? AND seq = 2", (bob,)).fetchone()
    recorder.delivered(wid, bob, 2, redelivery=True, pushed_at=int(failed_at) + 1)
    recorder.ack_nowait(wid, bob, 3)  # ...and acked, before the recorder ran
    await recorder.flush()
    assert await live.acked("bob") == 3
    assert recorder.statistics().commands == 2  # the first flush, then this one


async def _three_pushes_recorded(
    live: Live, **settings: float
) -> tuple[Engine, int, int, DeliveryRecorder]:
    """Three messages to bob, and a recorder (not running, with these settings) told of
    their pushes."""
    engine, world = live.server.engine, live.world
    wid, bob = world.workspace_id, world.agents["bob"]
    for text in ("one", "two", "three"):
        await live.post("alice", text)
    recorder = DeliveryRecorder(engine, **settings)
    for seq in (1, 2, 3):
        recorder.delivered(wid, bob, seq)
    return engine, wid, bob, recorder


@asynccontextmanager
async def running(recorder: DeliveryRecorder) -> AsyncIterator[trio.Nursery]:
    """The recorder's actor runs for the block and is cancelled after it; the nursery is
    there for the block's own tasks."""
    async with trio.open_nursery() as nursery:
        await nursery.start(recorder.run)
        yield nursery
        nursery.cancel_scope.cancel()


async def test_recorder_folds_pushes_acked_in_window(
    live: Live,
) -> None:
    """Pushes acked within the fold window are written once with the ack."""
    engine, wid, bob, recorder = await _three_pushes_recorded(live, fold_window=3600)
    async with trio.open_nursery() as nursery:
        await nursery.start(recorder.run)
        # The actor runs: nothing is due, nothing is written.
        await trio.testing.wait_all_tasks_blocked()
        assert recorder.statistics().commands == 0
        assert await delivery_rows(engine, bob) == [(s, "queued", 0, 0, 0) for s in (1, 2, 3)]
        recorder.ack_nowait(wid, bob, 2)
        await eventually(lambda: _acked_at_least(live, 2))
        stats = recorder.statistics()
        assert (stats.commands, stats.marks_folded, stats.pending_marks) == (1, 2, 1)
        assert await delivery_rows(engine, bob) == [
            (1, "acked", 1, 1, 1), (2, "acked", 1, 1, 1), (3, "queued", 0, 0, 0)]
        await recorder.aclose()  # the last flush writes the mark still waiting
    assert await delivery_rows(engine, bob) == [
        (1, "acked", 1, 1, 1), (2, "acked", 1, 1, 1), (3, "delivered", 1, 1, 0)]


async def test_recorder_holds_unawaited_acks(
    live: Live,
) -> None:
    """Acks nobody waits for are held, and an awaited ack takes them along."""
    engine, world = live.server.engine, live.world
    wid, bob = world.workspace_id, world.agents["bob"]
    for text in ("one", "two", "three"):
        await live.post("alice", text)
    recorder = DeliveryRecorder(engine, fold_window=3600, ack_delay=3600)
    async with running(recorder):
        recorder.ack_nowait(wid, bob, 1)
        recorder.ack_nowait(wid, bob, 2)
        await trio.testing.wait_all_tasks_blocked()  # the actor runs: no ack is due yet
        assert recorder.statistics().commands == 0
        assert await live.acked("bob") == 0
        result = await recorder.ack(wid, bob, 3)
        assert (result.acked, result.acked_seq) == (3, 3)
        assert recorder.statistics().commands == 1


async def test_recorder_window_end_marks_take_held_ack(
    live: Live,
) -> None:
    """Marks leaving at the end of their window take the held ack along."""
    # The client acked (the ack is held, not due for an hour) and the marks'
    # window ends: marks and ack go together, so the rows are folded.
    engine, world = live.server.engine, live.world
    wid, bob = world.workspace_id, world.agents["bob"]
    for text in ("one", "two"):
        await live.post("alice", text)
    recorder = DeliveryRecorder(engine, fold_window=0.05, ack_delay=3600)
    async with running(recorder):
        recorder.delivered(wid, bob, 1)
        recorder.delivered(wid, bob, 2)
        recorder.ack_nowait(wid, bob, 2)
        await eventually(lambda: _acked_at_least(live, 2))
        assert recorder.statistics().commands == 1
        assert await delivery_rows(engine, bob) == [(1, "acked", 1, 1, 1), (2, "acked", 1, 1, 1)]


async def test_recorder_flush_waits_for_committing_receipts(live: Live) -> None:
    """Flush waits for receipts the actor is already committing."""
    engine, world = live.server.engine, live.world
    wid, bob = world.workspace_id, world.agents["bob"]
    await live.post("alice", "one")
    recorder = DeliveryRecorder(engine)
    async with running(recorder) as nursery:
        release = await hold_writer(engine, nursery)
        recorder.delivered(wid, bob, 1, redelivery=True)  # due at once
        await wait_queued(engine, 1)  # the actor took it; its commit waits
        flushed = trio.Event()

        async def flush() -> None:
            await recorder.flush()
            flushed.set()

        nursery.start_soon(flush)
        await trio.testing.wait_all_tasks_blocked()
        assert not flushed.is_set()  # nothing left to take, but not committed yet
        release.set()
        await flushed.wait()
        assert await delivery_rows(engine, bob) == [(1, "delivered", 1, 1, 0)]


async def test_recorder_marks_unacked_push_after_window(
    live: Live,
) -> None:
    """A push nobody acks is marked once the fold window has passed."""
    engine, world = live.server.engine, live.world
    wid, bob = world.workspace_id, world.agents["bob"]
    await live.post("alice", "one")
    recorder = DeliveryRecorder(engine, fold_window=0.05)
    async with running(recorder):
        recorder.delivered(wid, bob, 1)

        async def marked() -> bool:
            return await delivery_rows(engine, bob) == [(1, "delivered", 1, 1, 0)]

        await eventually(marked)
        assert recorder.statistics().commands == 1


async def _acked_at_least(live: Live, seq: int) -> bool:
    return await live.acked("bob") >= seq


async def test_recorder_late_mark_keeps_row_failed_since(
    live: Live,
) -> None:
    """A late mark of an ordinary push does not release a row failed since."""
    # Pushed, then failed by the agent before the recorder wrote the push's
    # mark: the mark must not turn the failed row back into `delivered`,
    # or the next cumulative ack would settle what the agent gave back.
    engine, wid, bob, recorder = await _three_pushes_recorded(live)
    await engine.submit(FailDelivery(workspace_id=wid, agent_id=bob,
                                     delivery_id=live.delivery_id("bob", 2)))
    recorder.ack_nowait(wid, bob, 3)
    await recorder.flush()
    assert await delivery_rows(engine, bob) == [
        (1, "acked", 1, 1, 1), (2, "failed", 0, 0, 0), (3, "acked", 1, 1, 1)]
    assert await live.acked("bob") == 1


# -- on the autojump clock, with a scripted database ------------------------------------------


class ScriptedEngine:
    """Answers `held_deliveries` from a script (the other reads are not expected)."""

    facts = None

    def __init__(self) -> None:
        self.pages: list[HeldPage] = []
        self.reads = 0

    async def read(self, fn: Any, *args: Any) -> Any:
        assert fn is held_deliveries
        self.reads += 1
        return self.pages.pop(0) if self.pages else HeldPage(rows=[], next_due=None)


class TimedWebSocket(FakeWebSocket):
    """Notes when (trio time) each frame was written."""

    def __init__(self) -> None:
        super().__init__()
        self.timed: list[tuple[float, Any]] = []

    async def send(self, data: str | bytes) -> None:
        await super().send(data)
        self.timed.append((trio.current_time(), self.sent[-1]))


def held(seq: int, attempts: int = 1, state: str = "failed") -> HeldDelivery:
    return HeldDelivery(seq=seq, state=state, attempts=attempts, available_at=None,
                        type="message.created", message_id=None,
                        payload=encode_payload("message.created", {"text": f"m{seq}"}))


def changed() -> FactView:
    return FactView("mailbox.changed", 1, encode_payload(
        "mailbox.changed", {"agent_id": "2", "seq": 2}))


async def test_redelivery_of_deferred_when_its_time_comes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A delivery deferred to later is pushed again when its time comes."""
    later_s = 90
    settings = GatewaySettings(ping_interval_seconds=1000, pong_timeout_seconds=1000)
    engine = ScriptedEngine()
    gw = Gateway(cast(Engine, engine), settings)
    ws = TimedWebSocket()
    session = AgentSession(gw, ws, gw.native_json, workspace_id=1, agent_id=2, agent_name="bob")
    session.queue.mode = Mode.LIVE
    session.queue.cursor = 5  # seqs 1..5 went out before
    # The defer: nothing due now, the next due in `later_s`; then it is due.
    engine.pages = [HeldPage(rows=[], next_due=int(time.time() * 1000) + later_s * 1000),
                    HeldPage(rows=[held(2, state="queued")], next_due=None)]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.serve)
        await trio.sleep(1)
        deferred_at = trio.current_time()
        session.offer_event(changed())
        await trio.sleep(later_s - 5)
        assert [f for f in ws.sent if f["type"] == "deliver"] == []
        await trio.sleep(5 + 1)
        nursery.cancel_scope.cancel()
    ((pushed_at, frame),) = [(at, f) for at, f in ws.timed if f["type"] == "deliver"]
    assert later_s - 1 <= pushed_at - deferred_at <= later_s + 1  # at its time, not on a tick
    assert frame == {"v": 1, "type": "deliver", "seq": 2, "delivery_id": "2:2",
                     "payload": {"type": "message.created", "data": {"text": "m2"}},
                     "redelivery": True}
    assert session.statistics().redelivered == 1


async def test_redelivery_held_once_per_version(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A held delivery is pushed again once per version."""
    engine = ScriptedEngine()
    gw = Gateway(cast(Engine, engine))
    ws = FakeWebSocket()
    session = AgentSession(gw, ws, gw.native_json, workspace_id=1, agent_id=2, agent_name="bob")
    session.queue.mode = Mode.LIVE
    session.queue.cursor = 5
    engine.pages = [
        HeldPage(rows=[held(2)], next_due=None),  # failed: pushed again
        HeldPage(rows=[held(2), held(4)], next_due=None),  # 2 unchanged (its mark is late)
        HeldPage(rows=[held(2, attempts=2)], next_due=None),  # failed again after the push
    ]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.serve)
        for _ in range(3):
            session.offer_event(changed())
            await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert [f["seq"] for f in ws.sent if f["type"] == "deliver"] == [2, 4, 2]
    events = [f["payload"]["type"] for f in ws.sent if f["type"] == "event"]
    assert events == ["mailbox.changed"] * 3  # the client is told too
    assert engine.reads == 3
