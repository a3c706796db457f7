"""The delivery mailbox: pending list, cumulative and single acks, fail, defer, mailbox limit."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio

from broker.engine.config import EngineConfig, Limits
from broker.engine.conversations import SendDm
from broker.engine.engine import Engine
from broker.engine.facts import Fact
from broker.engine.mailbox import (
    MAX_MARK,
    AckDelivery,
    AckUpTo,
    AgentReceipts,
    DeferDelivery,
    FailDelivery,
    MarkDelivered,
    RecordReceipts,
    delivery_id,
    list_pending,
)
from broker.engine.maintenance import ExpireDeliveries
from broker.engine.messages import SendChannelMessage
from tests.helpers.daemon import serve
from tests.helpers.engine import (
    TEST_DEADLINE_S,
    Sql,
    World,
    delivery_rows,
    make_world,
    query_refused,
    refused,
)
from tests.helpers.realtime import eventually, next_frame, post, raw_socket, send_json


async def send_to_bob(engine: Engine, world: World, n: int) -> list[str]:
    ids = []
    for i in range(n):
        sent = await engine.submit(SendDm(workspace_id=world.workspace_id,
                                          agent_id=world.agents["alice"], to="bob",
                                          text=f"m{i}"))
        ids.append(sent.id)
    return ids


async def states(engine: Engine, agent_id: int) -> list[tuple[Any, ...]]:
    return await engine.read(lambda c: c.execute(
        "SELECT seq, state FROM deliveries WHERE agent_id = ? ORDER BY seq",
        (agent_id,)).fetchall())


def pushed_now() -> int:
    """A push time after every command committed so far (epoch ms)."""
    return int(time.time() * 1000) + 1


async def marks(engine: Engine, agent_id: int) -> tuple[Any, ...]:
    row = await engine.read(lambda c: c.execute(
        "SELECT last_seq, acked_seq, pending_count FROM mailboxes WHERE agent_id = ?",
        (agent_id,)).fetchone())
    assert row is not None
    return tuple(row)


async def test_list_pending_in_seq_order_with_payload(engine: Engine, world: World) -> None:
    wid, bob = world.workspace_id, world.agents["bob"]
    ids = await send_to_bob(engine, world, 3)
    await engine.submit(SendChannelMessage(workspace_id=wid, agent_id=world.agents["alice"],
                                           channel="general", text="channel"))
    pending = await engine.read(list_pending, wid, bob)
    assert [p.seq for p in pending] == [1, 2, 3, 4]
    assert [p.delivery_id for p in pending] == [delivery_id(bob, s) for s in (1, 2, 3, 4)]
    assert [p.type for p in pending] == ["dm.received"] * 3 + ["message.created"]
    assert [str(p.message_id) for p in pending[:3]] == ids
    event = msgspec.json.decode(pending[0].payload)
    assert event["type"] == "dm.received" and event["data"]["text"] == "m0"
    assert [p.seq for p in await engine.read(list_pending, wid, bob, 2)] == [3, 4]
    assert [p.seq for p in await engine.read(list_pending, wid, bob, 0, 2)] == [1, 2]
    await query_refused(engine, "invalid_limit", list_pending, wid, bob, None, 0)
    await query_refused(engine, "invalid_limit", list_pending, wid, bob, None, 1001)
    await query_refused(engine, "invalid_seq", list_pending, wid, bob, -1)


async def test_cumulative_ack(engine: Engine, world: World) -> None:
    wid, bob = world.workspace_id, world.agents["bob"]
    await send_to_bob(engine, world, 5)
    result = await engine.submit(AckUpTo(workspace_id=wid, agent_id=bob, up_to_seq=3))
    assert (result.acked, result.acked_seq, result.changed) == (3, 3, True)
    assert await states(engine, bob) == [(1, "acked"), (2, "acked"), (3, "acked"),
                                          (4, "queued"), (5, "queued")]
    assert await marks(engine, bob) == (5, 3, 2)
    assert [p.seq for p in await engine.read(list_pending, wid, bob)] == [4, 5]

    # A duplicate (or older) ack changes nothing and says so.
    before = await marks(engine, bob)
    for up_to in (3, 2, 0):
        dup = await engine.submit(AckUpTo(workspace_id=wid, agent_id=bob, up_to_seq=up_to))
        assert (dup.acked, dup.acked_seq, dup.changed) == (0, 3, False)
    assert await marks(engine, bob) == before

    # Above the highest seq: clamped to it, so a later delivery is not born acked.
    high = await engine.submit(AckUpTo(workspace_id=wid, agent_id=bob, up_to_seq=10**9))
    assert (high.acked, high.acked_seq) == (2, 5)
    assert await marks(engine, bob) == (5, 5, 0)
    await send_to_bob(engine, world, 1)
    assert await states(engine, bob) == [(s, "acked") for s in range(1, 6)] + [(6, "queued")]
    assert await marks(engine, bob) == (6, 5, 1)
    await refused(engine, AckUpTo(workspace_id=wid, agent_id=bob, up_to_seq=-1), "invalid_seq")


async def test_ack_fail_defer_one_delivery(engine: Engine, world: World) -> None:
    wid, bob = world.workspace_id, world.agents["bob"]
    await send_to_bob(engine, world, 4)
    d1, d2, d3, d4 = (delivery_id(bob, s) for s in (1, 2, 3, 4))

    acked = await engine.submit(AckDelivery(workspace_id=wid, agent_id=bob, delivery_id=d2))
    assert (acked.seq, acked.state, acked.changed) == (2, "acked", True)
    dup = await engine.submit(AckDelivery(workspace_id=wid, agent_id=bob, delivery_id=d2))
    assert (dup.state, dup.changed) == ("acked", False)
    # Acked is final: failing or deferring it changes nothing.
    before = await engine.read(lambda c: c.execute(
        "SELECT * FROM deliveries WHERE agent_id = ? AND seq = 2", (bob,)).fetchall())
    late = await engine.submit(FailDelivery(workspace_id=wid, agent_id=bob, delivery_id=d2,
                                            error="boom", retryable=False))
    assert (late.state, late.changed) == ("acked", False)
    deferred = await engine.submit(DeferDelivery(workspace_id=wid, agent_id=bob, delivery_id=d2,
                                                 until_ms=1))
    assert (deferred.state, deferred.changed) == ("acked", False)
    after = await engine.read(lambda c: c.execute(
        "SELECT * FROM deliveries WHERE agent_id = ? AND seq = 2", (bob,)).fetchall())
    assert after == before

    failed = await engine.submit(FailDelivery(workspace_id=wid, agent_id=bob, delivery_id=d1,
                                              error="busy"))
    assert (failed.state, failed.changed) == ("failed", True)
    same = await engine.submit(FailDelivery(workspace_id=wid, agent_id=bob, delivery_id=d1,
                                            error="busy"))
    assert same.changed is False
    dead = await engine.submit(FailDelivery(workspace_id=wid, agent_id=bob, delivery_id=d3,
                                            error="bad payload", retryable=False))
    assert (dead.state, dead.changed) == ("dead_lettered", True)
    row = await engine.read(lambda c: c.execute(
        "SELECT error, retryable FROM deliveries WHERE agent_id = ? AND seq = 3",
        (bob,)).fetchone())
    assert row == ("bad payload", 0)

    pending = await engine.read(list_pending, wid, bob)
    assert [(p.seq, p.state) for p in pending] == [(1, "failed"), (4, "queued")]
    assert await marks(engine, bob) == (4, 0, 2)

    # Defer: back to queued, hidden from a replay that honours the time.
    expires = pending[0].expires_at
    moved = await engine.submit(DeferDelivery(workspace_id=wid, agent_id=bob, delivery_id=d1,
                                              until_ms=expires - 1))
    assert (moved.state, moved.changed) == ("queued", True)
    still = await engine.submit(DeferDelivery(workspace_id=wid, agent_id=bob, delivery_id=d1,
                                              until_ms=expires - 1))
    assert still.changed is False
    now = pending[1].created_at
    assert [p.seq for p in await engine.read(list_pending, wid, bob, None, None, now)] == [4]
    assert [p.seq for p in await engine.read(list_pending, wid, bob)] == [1, 4]
    await refused(engine, DeferDelivery(workspace_id=wid, agent_id=bob, delivery_id=d4,
                                        until_ms=pending[1].expires_at + 1),
                  "invalid_available_at")
    await refused(engine, DeferDelivery(workspace_id=wid, agent_id=bob, delivery_id=d4,
                                        until_ms=-1), "invalid_available_at")
    await refused(engine, FailDelivery(workspace_id=wid, agent_id=bob, delivery_id=d4,
                                       error="e" * 4097), "invalid_error")

    # The cumulative ack skips the dead-lettered row and holds the deferred one.
    done = await engine.submit(AckUpTo(workspace_id=wid, agent_id=bob, up_to_seq=4))
    assert (done.acked, done.acked_seq) == (1, 0)
    assert await states(engine, bob) == [(1, "queued"), (2, "acked"), (3, "dead_lettered"),
                                          (4, "acked")]
    assert await marks(engine, bob) == (4, 0, 1)
    # Acking the held row one by one settles it and moves the mark past everything final.
    await engine.submit(AckDelivery(workspace_id=wid, agent_id=bob, delivery_id=d1))
    assert await marks(engine, bob) == (4, 4, 0)


async def test_cumulative_ack_holds_failed_and_deferred_rows(engine: Engine, world: World) -> None:
    """The Python client and the SDK ack cumulatively: that must not settle what bob gave back."""
    wid, bob = world.workspace_id, world.agents["bob"]
    await send_to_bob(engine, world, 7)
    d = {s: delivery_id(bob, s) for s in range(1, 8)}
    await engine.submit(MarkDelivered(workspace_id=wid, agent_id=bob, seqs=[1, 2, 3, 4, 5, 6],
                                      pushed_at=pushed_now()))
    await engine.submit(FailDelivery(workspace_id=wid, agent_id=bob, delivery_id=d[2],
                                     error="busy"))
    pending = await engine.read(list_pending, wid, bob)
    now = pending[0].created_at
    later = now + 60_000
    await engine.submit(DeferDelivery(workspace_id=wid, agent_id=bob, delivery_id=d[4],
                                      until_ms=later))
    # Deferred to a time already past: available at once, but still given back.
    await engine.submit(DeferDelivery(workspace_id=wid, agent_id=bob, delivery_id=d[5],
                                      until_ms=0))
    # A push mark that arrives after the defer (made before it) leaves the row deferred.
    stale = await engine.submit(MarkDelivered(workspace_id=wid, agent_id=bob, seqs=[4],
                                              pushed_at=now))
    assert stale.seqs == []

    acked = await engine.submit(AckUpTo(workspace_id=wid, agent_id=bob, up_to_seq=7))
    assert (acked.acked, acked.acked_seq, acked.changed) == (4, 1, True)
    assert await states(engine, bob) == [
        (1, "acked"), (2, "failed"), (3, "acked"), (4, "queued"), (5, "queued"), (6, "acked"),
        (7, "acked")]
    assert await marks(engine, bob) == (7, 1, 3)
    # Replay (from the mark) brings them again: the failed one and the due one now,
    # the deferred one once its time has come.
    assert [p.seq for p in await engine.read(list_pending, wid, bob, None, None, now)] == [2, 5]
    assert [p.seq for p in await engine.read(list_pending, wid, bob, 0, None, later)] == [2, 4, 5]
    # A repeated ack changes nothing and never moves the mark back.
    again = await engine.submit(AckUpTo(workspace_id=wid, agent_id=bob, up_to_seq=7))
    assert (again.acked, again.acked_seq, again.changed) == (0, 1, False)
    assert await marks(engine, bob) == (7, 1, 3)

    # Pushed again, the failed row is delivered, and the next cumulative ack takes it.
    await engine.submit(MarkDelivered(workspace_id=wid, agent_id=bob, seqs=[2],
                                      pushed_at=pushed_now()))
    moved = await engine.submit(AckUpTo(workspace_id=wid, agent_id=bob, up_to_seq=7))
    assert (moved.acked, moved.acked_seq, moved.changed) == (1, 3, True)
    # One by one: the row right above the mark lets it move to the next pending row.
    await engine.submit(FailDelivery(workspace_id=wid, agent_id=bob, delivery_id=d[4],
                                     retryable=False))
    assert await marks(engine, bob) == (7, 4, 1)
    await engine.submit(AckDelivery(workspace_id=wid, agent_id=bob, delivery_id=d[5]))
    assert await marks(engine, bob) == (7, 7, 0)
    assert await engine.read(list_pending, wid, bob) == []


async def test_cumulative_ack_after_held_row_expires(
    engine: Engine, world: World
) -> None:
    """A held row that expires takes the mark past itself and the acked rows behind it.

    Expiry moves the mark like any other settling at the mark, so a later
    cumulative ack below it changes nothing.
    """
    wid, bob = world.workspace_id, world.agents["bob"]
    await send_to_bob(engine, world, 3)
    await engine.submit(FailDelivery(workspace_id=wid, agent_id=bob,
                                     delivery_id=delivery_id(bob, 1)))
    first = await engine.submit(AckUpTo(workspace_id=wid, agent_id=bob, up_to_seq=2))
    assert (first.acked, first.acked_seq) == (1, 0)
    (row,) = await engine.read(list_pending, wid, bob, 0, 1)
    expired = await engine.submit(ExpireDeliveries(10, row.expires_at + 60_000))
    assert expired.expired == 2  # seq 1 (held) and seq 3 (never acked)
    assert await marks(engine, bob) == (3, 3, 0)
    done = await engine.submit(AckUpTo(workspace_id=wid, agent_id=bob, up_to_seq=2))
    assert (done.acked, done.acked_seq, done.changed) == (0, 3, False)
    assert await marks(engine, bob) == (3, 3, 0)
    assert await engine.read(list_pending, wid, bob) == []


async def test_expiry_stops_the_mark_at_a_held_row_it_leaves(
    engine: Engine, world: World
) -> None:
    """Expiry moves the mark up to the next row still pending, not past it."""
    wid, bob = world.workspace_id, world.agents["bob"]
    await send_to_bob(engine, world, 2)
    (first,) = await engine.read(list_pending, wid, bob, 0, 1)
    await engine.submit(FailDelivery(workspace_id=wid, agent_id=bob,
                                     delivery_id=delivery_id(bob, 2)))
    await engine.submit(Sql("UPDATE deliveries SET expires_at = expires_at + 86400000"
                            " WHERE agent_id = ? AND seq = 2", (bob,)))  # a day later
    assert (await engine.submit(ExpireDeliveries(10, first.expires_at + 1))).expired == 1
    assert await marks(engine, bob) == (2, 1, 1)
    assert [p.seq for p in await engine.read(list_pending, wid, bob)] == [2]


async def test_fail_and_defer_tell_the_agents_sessions(
    tmp_path: Path, engine_config: EngineConfig
) -> None:
    with trio.fail_after(TEST_DEADLINE_S):
        async with Engine.open(tmp_path, engine_config, with_facts=True) as eng:
            assert eng.facts is not None
            world = await make_world(eng)
            wid, bob = world.workspace_id, world.agents["bob"]
            await send_to_bob(eng, world, 3)
            drain(eng)
            d1, d2, d3 = (delivery_id(bob, s) for s in (1, 2, 3))
            await eng.submit(FailDelivery(workspace_id=wid, agent_id=bob, delivery_id=d1))
            (expires,) = await eng.read(lambda c: c.execute(
                "SELECT expires_at FROM deliveries WHERE agent_id = ? AND seq = 2",
                (bob,)).fetchone())
            await eng.submit(DeferDelivery(workspace_id=wid, agent_id=bob, delivery_id=d2,
                                           until_ms=expires))
            # Nothing went back to pending: no news.
            await eng.submit(FailDelivery(workspace_id=wid, agent_id=bob, delivery_id=d1))
            await eng.submit(DeferDelivery(workspace_id=wid, agent_id=bob, delivery_id=d2,
                                           until_ms=expires))
            await eng.submit(AckDelivery(workspace_id=wid, agent_id=bob, delivery_id=d3))
            await eng.submit(FailDelivery(workspace_id=wid, agent_id=bob, delivery_id=d3))
            facts = drain(eng)
    assert [(f.type, f.audience, f.deliveries, f.workspace_id) for f in facts] == [
        ("mailbox.changed", (bob,), (), wid)] * 2
    assert [msgspec.json.decode(f.payload) for f in facts] == [
        {"type": "mailbox.changed", "data": {"agent_id": str(bob), "seq": seq}}
        for seq in (1, 2)]


def drain(engine: Engine) -> list[Fact]:
    """Every fact published so far."""
    assert engine.facts is not None
    facts: list[Fact] = []
    while True:
        try:
            facts.extend(engine.facts.receive_nowait())
        except trio.WouldBlock:
            return facts


async def test_delivery_ids_name_only_the_callers_deliveries(
    engine: Engine, world: World
) -> None:
    wid, bob, carol = world.workspace_id, world.agents["bob"], world.agents["carol"]
    await send_to_bob(engine, world, 1)
    for bad in (delivery_id(bob, 1), delivery_id(carol, 9), f"{carol}:x", "1", ":", "x:1",
                f"{carol}:1:2"):
        await refused(engine, AckDelivery(workspace_id=wid, agent_id=carol, delivery_id=bad),
                      "delivery_not_found")
    await refused(engine, AckDelivery(workspace_id=wid, agent_id=bob,
                                      delivery_id=delivery_id(bob, 2)), "delivery_not_found")


async def test_mark_delivered_counts_attempts(engine: Engine, world: World) -> None:
    wid, bob = world.workspace_id, world.agents["bob"]
    await send_to_bob(engine, world, 3)
    await engine.submit(AckDelivery(workspace_id=wid, agent_id=bob,
                                    delivery_id=delivery_id(bob, 3)))
    marked = await engine.submit(MarkDelivered(workspace_id=wid, agent_id=bob,
                                               seqs=[1, 2, 3, 99], pushed_at=pushed_now()))
    assert marked.seqs == [1, 2]
    await engine.submit(MarkDelivered(workspace_id=wid, agent_id=bob, seqs=[1],
                                      pushed_at=pushed_now()))
    rows = await engine.read(lambda c: c.execute(
        "SELECT seq, state, attempts, delivered_at IS NOT NULL FROM deliveries"
        " WHERE agent_id = ? ORDER BY seq", (bob,)).fetchall())
    assert rows == [(1, "delivered", 2, 1), (2, "delivered", 1, 1), (3, "acked", 0, 0)]
    assert (await engine.submit(MarkDelivered(workspace_id=wid, agent_id=bob, seqs=[],
                                              pushed_at=pushed_now()))).seqs == []
    await refused(engine, MarkDelivered(workspace_id=wid, agent_id=bob,
                                        seqs=list(range(MAX_MARK + 1)), pushed_at=pushed_now()),
                  "too_many_seqs")


async def test_record_receipts_folds_marks_into_the_ack(engine: Engine, world: World) -> None:
    wid, bob, carol = world.workspace_id, world.agents["bob"], world.agents["carol"]
    await send_to_bob(engine, world, 6)
    await engine.submit(MarkDelivered(workspace_id=wid, agent_id=bob, seqs=[1],
                                      pushed_at=pushed_now()))
    await engine.submit(FailDelivery(workspace_id=wid, agent_id=bob,
                                     delivery_id=delivery_id(bob, 3)))
    await engine.submit(FailDelivery(workspace_id=wid, agent_id=bob,
                                     delivery_id=delivery_id(bob, 4)))
    # 1 was marked before; 2 and 5 pushed and acked (folded); 3 failed, then
    # marked by a late ordinary push (left failed: held); 4 failed and
    # pushed again (marked, then acked); 6 pushed, above the ack (delivered).
    results = await engine.submit(RecordReceipts((
        AgentReceipts(workspace_id=wid, agent_id=bob, pushed=[2, 3, 5, 6],
                      pushed_again=[(4, pushed_now())], up_to_seq=5),
        AgentReceipts(workspace_id=wid, agent_id=carol, pushed=[], up_to_seq=None),
    )))
    # 1, 2, 4 and 5 acked; the mark stops below the held 3
    assert (results[0].acked, results[0].acked_seq) == (4, 2)
    assert results[1] is None
    assert await delivery_rows(engine, bob) == [
        (1, "acked", 1, 1, 1), (2, "acked", 1, 1, 1), (3, "failed", 0, 0, 0),
        (4, "acked", 1, 1, 1), (5, "acked", 1, 1, 1), (6, "delivered", 1, 1, 0)]
    assert await marks(engine, bob) == (6, 2, 2)


async def test_mark_delivered_late_leaves_given_back_row(
    engine: Engine, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A late push mark leaves a row given back after the push held.

    Push, fail again, then the push's mark: the mark is late and changes nothing.

    A held row is pushed again; before the recorder writes that push's
    mark, the agent fails the row again (or defers it). The mark, written
    after, must leave the row held, or the next cumulative ack settles what
    the agent gave back. The writer's wall clock is injected, so the three
    steps are milliseconds apart by construction.
    """
    wall_ms = [1_800_000_000_000]
    monkeypatch.setattr(time, "time", lambda: wall_ms[0] / 1000)
    wid, bob = world.workspace_id, world.agents["bob"]
    await send_to_bob(engine, world, 4)
    d2, d3 = delivery_id(bob, 2), delivery_id(bob, 3)
    await engine.submit(FailDelivery(workspace_id=wid, agent_id=bob, delivery_id=d2))
    await engine.submit(DeferDelivery(workspace_id=wid, agent_id=bob, delivery_id=d3,
                                      until_ms=0))
    wall_ms[0] += 5
    pushed_at = wall_ms[0]  # both pushed again, after they were given back
    wall_ms[0] += 5
    await engine.submit(FailDelivery(workspace_id=wid, agent_id=bob, delivery_id=d2,
                                     error="still busy"))
    await engine.submit(DeferDelivery(workspace_id=wid, agent_id=bob, delivery_id=d3,
                                      until_ms=1))
    wall_ms[0] += 5
    # The late marks, as MarkDelivered and as the recorder's RecordReceipts.
    late = await engine.submit(MarkDelivered(workspace_id=wid, agent_id=bob, seqs=[2, 3],
                                             pushed_at=pushed_at))
    assert late.seqs == []
    (acked,) = await engine.submit(RecordReceipts((AgentReceipts(
        workspace_id=wid, agent_id=bob, pushed_again=[(2, pushed_at), (3, pushed_at)],
        up_to_seq=4),)))
    assert acked is not None and not isinstance(acked, Exception)
    assert (acked.acked, acked.acked_seq) == (2, 1)
    assert await delivery_rows(engine, bob) == [
        (1, "acked", 0, 0, 1), (2, "failed", 0, 0, 0), (3, "queued", 0, 0, 0),
        (4, "acked", 0, 0, 1)]
    # A push made after the second fail and defer takes, and the next ack settles both.
    (again,) = await engine.submit(RecordReceipts((AgentReceipts(
        workspace_id=wid, agent_id=bob, pushed_again=[(2, wall_ms[0]), (3, wall_ms[0])],
        up_to_seq=4),)))
    assert again is not None and not isinstance(again, Exception)
    assert (again.acked, again.acked_seq) == (2, 4)
    assert await delivery_rows(engine, bob) == [
        (1, "acked", 0, 0, 1), (2, "acked", 1, 1, 1), (3, "acked", 1, 1, 1),
        (4, "acked", 0, 0, 1)]


async def test_record_receipts_refuses_one_agent_and_commits_the_others(
    engine: Engine, world: World
) -> None:
    wid, bob = world.workspace_id, world.agents["bob"]
    await send_to_bob(engine, world, 2)
    results = await engine.submit(RecordReceipts((
        AgentReceipts(workspace_id=wid, agent_id=10**12, pushed=[1], up_to_seq=1),
        AgentReceipts(workspace_id=wid + 1, agent_id=bob, pushed=[1], up_to_seq=1),
        AgentReceipts(workspace_id=wid, agent_id=bob, pushed=[1], up_to_seq=-1),
        AgentReceipts(workspace_id=wid, agent_id=bob, pushed=[1, 2], up_to_seq=1),
    )))
    assert [getattr(r, "code", None) for r in results[:3]] == [
        "agent_not_found", "agent_not_found", "invalid_seq"]
    assert (results[3].acked, results[3].acked_seq) == (1, 1)
    assert await states(engine, bob) == [(1, "acked"), (2, "delivered")]
    assert await marks(engine, bob) == (2, 1, 1)


async def test_pending_count_matches_rows_through_random_transitions(
    engine: Engine, world: World
) -> None:
    wid, bob = world.workspace_id, world.agents["bob"]
    await send_to_bob(engine, world, 30)
    rng = random.Random(7)
    for _ in range(60):
        seq = rng.randint(1, 32)
        did = delivery_id(bob, seq)
        choice = rng.randrange(6)
        try:
            if choice == 0:
                await engine.submit(AckDelivery(workspace_id=wid, agent_id=bob, delivery_id=did))
            elif choice == 1:
                await engine.submit(FailDelivery(workspace_id=wid, agent_id=bob, delivery_id=did,
                                                 retryable=rng.random() < 0.5))
            elif choice == 2:
                await engine.submit(MarkDelivered(workspace_id=wid, agent_id=bob, seqs=[seq],
                                                  pushed_at=pushed_now()))
            elif choice == 3:
                await engine.submit(DeferDelivery(workspace_id=wid, agent_id=bob,
                                                  delivery_id=did, until_ms=0))
            elif choice == 4:
                await engine.submit(AckUpTo(workspace_id=wid, agent_id=bob, up_to_seq=seq))
            else:
                pushed = rng.sample(range(1, 33), 4)
                await engine.submit(RecordReceipts((AgentReceipts(
                    workspace_id=wid, agent_id=bob, pushed=sorted(pushed[:3]),
                    pushed_again=[(pushed[3], pushed_now())],
                    up_to_seq=rng.choice([None, seq])),)))
        except Exception as exc:  # unknown seqs 31, 32
            assert getattr(exc, "code", None) == "delivery_not_found"
        last_seq, acked_seq, pending = await marks(engine, bob)
        rows = await states(engine, bob)
        assert pending == sum(s in ("queued", "delivered", "failed") for _, s in rows)
        # The module's invariant: everything at or below the ack mark is final.
        assert all(s in ("acked", "dead_lettered") for q, s in rows if q <= acked_seq)


class TestMailboxFull:
    @pytest.fixture
    def engine_config(self) -> EngineConfig:
        return EngineConfig(synchronous="NORMAL", limits=Limits(mailbox_depth=2))

    async def test_mailbox_limit_full_gets_no_delivery(
        self, engine: Engine, world: World
    ) -> None:
        """A full mailbox gets no delivery and is named."""
        wid, bob = world.workspace_id, world.agents["bob"]
        await send_to_bob(engine, world, 2)
        third = await engine.submit(SendDm(workspace_id=wid, agent_id=world.agents["alice"],
                                           to="bob", text="too many"))
        assert third.mailbox_full == ["bob"]
        assert await engine.read(lambda c: c.execute(
            "SELECT count(*) FROM deliveries WHERE message_id = ?",
            (int(third.id),)).fetchone()) == (0,)
        # The message itself exists (the sender's write succeeded), seqs have no gap.
        assert await engine.read(lambda c: c.execute(
            "SELECT count(*) FROM messages WHERE id = ?", (int(third.id),)).fetchone()) == (1,)
        assert await marks(engine, bob) == (2, 0, 2)
        # Once bob acks, the next send gets seq 3: no gap, nothing reused.
        await engine.submit(AckUpTo(workspace_id=wid, agent_id=bob, up_to_seq=1))
        fourth = await engine.submit(SendDm(workspace_id=wid, agent_id=world.agents["alice"],
                                            to="bob", text="room again"))
        assert fourth.mailbox_full == []
        assert [s for s, _ in await states(engine, bob)] == [1, 2, 3]
        # In a channel send, only the full recipient is skipped.
        sent = await engine.submit(SendChannelMessage(
            workspace_id=wid, agent_id=world.agents["carol"], channel="general", text="all"))
        assert sent.mailbox_full == ["bob"]
        got = await engine.read(lambda c: c.execute(
            "SELECT agent_id FROM deliveries WHERE message_id = ? ORDER BY agent_id",
            (int(sent.id),)).fetchall())
        assert got == sorted([(world.agents["alice"],), (world.agents["dave"],)])


async def test_socket_ack_holds_deferred_row_for_replay(
    tmp_path: Path,
) -> None:
    """A socket ack holds a deferred row and the next connection replays it."""
    with trio.fail_after(TEST_DEADLINE_S):
        async with serve(tmp_path) as server:
            engine = server.engine
            world = await make_world(engine)
            wid, alice, bob = world.workspace_id, world.agents["alice"], world.agents["bob"]
            async with raw_socket(server, world.tokens["bob"]) as first:
                for text in ("one", "two", "three"):
                    await post(engine, wid, alice, "general", text)
                assert [(await next_frame(first, "deliver"))["seq"] for _ in range(3)] == [
                    1, 2, 3]
                await engine.submit(DeferDelivery(
                    workspace_id=wid, agent_id=bob, delivery_id=delivery_id(bob, 2),
                    until_ms=int(time.time() * 1000) + 60_000))
                await send_json(first, {"v": 1, "id": "a", "type": "delivery.ack",
                                        "up_to_seq": 3})
                assert (await next_frame(first, "reply"))["data"] == {
                    "acked": 2, "acked_seq": 1, "changed": True}
            # Due now (and still held: it was not pushed again since).
            await engine.submit(DeferDelivery(workspace_id=wid, agent_id=bob,
                                              delivery_id=delivery_id(bob, 2), until_ms=0))
            async with raw_socket(server, world.tokens["bob"]) as second:
                again = await next_frame(second, "deliver")
                assert again["seq"] == 2 and again["payload"]["data"]["text"] == "two"

                async def recorded() -> bool:  # the push is marked: the row is delivered
                    return (2, "delivered") in await states(engine, bob)

                await eventually(recorded)
                await send_json(second, {"v": 1, "id": "b", "type": "delivery.ack",
                                         "up_to_seq": 3})
                assert (await next_frame(second, "reply"))["data"] == {
                    "acked": 1, "acked_seq": 3, "changed": True}


async def test_every_agent_has_one_mailbox_row(engine: Engine, world: World) -> None:
    """Registered agents and an inbound hook's own agent each get exactly one mailbox row."""
    from broker.engine.inbound_hooks import CreateInboundWebhook

    await engine.submit(CreateInboundWebhook(workspace_id=world.workspace_id, channel="general"))
    agents, joined = await engine.read(lambda c: c.execute(
        "SELECT (SELECT count(*) FROM agents),"
        " (SELECT count(*) FROM agents a JOIN mailboxes m ON m.agent_id = a.id)").fetchone())
    assert agents == joined == len(world.agents) + 1
    assert await engine.read(lambda c: c.execute(
        "SELECT count(*) FROM mailboxes").fetchone()) == (agents,)


async def test_concurrent_sends_allocate_each_mailbox_gap_free_in_order(
    engine: Engine, world: World
) -> None:
    """Sends from every member at once (few batches): each recipient's seqs are 1..n, in
    the order of the events, and its marks count them."""
    wid = world.workspace_id
    senders = list(world.agents.values())
    async with trio.open_nursery() as nursery:
        for i in range(40):
            nursery.start_soon(engine.submit, SendChannelMessage(
                workspace_id=wid, agent_id=senders[i % len(senders)], channel="general",
                text=f"burst {i}"))
    assert engine.writer.statistics().mean_batch_size > 1
    for agent_id in senders:
        seqs = await engine.read(lambda c, a=agent_id: [r[0] for r in c.execute(
            "SELECT seq FROM deliveries WHERE agent_id = ? ORDER BY log_id", (a,))])
        assert seqs == list(range(1, len(seqs) + 1))
        assert len(seqs) == 30  # 40 sends, 10 of them its own
        assert await marks(engine, agent_id) == (30, 0, 30)
