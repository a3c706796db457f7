"""Session lifetime: the one state transition, deadlines that move, spawn after the end."""

from __future__ import annotations

import math
from typing import cast

import trio
import trio.testing

from broker.engine.engine import Engine
from broker.gateway import Gateway
from broker.gateway.deadline import Alarms
from broker.gateway.frame_queue import Mode
from broker.gateway.native import AgentSession
from broker.gateway.session import SessionState
from protocol.codec import CloseCode
from tests.helpers.realtime import FakeWebSocket


class StubEngine:
    """Sessions that never catch up from the database need no engine."""

    facts = None


def agent_session(ws: FakeWebSocket) -> AgentSession:
    gw = Gateway(cast(Engine, StubEngine()))
    session = AgentSession(gw, ws, gw.native_json, workspace_id=1, agent_id=2,
                           agent_name="bob")
    session.queue.mode = Mode.LIVE  # nothing to replay
    return session


async def test_deadline_moves_earlier_and_later_while_waited_on(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A move takes effect on the waiting task at once, earlier or later; never means never."""
    alarms = Alarms()
    passed_at: list[float] = []
    deadline = alarms.deadline(lambda: passed_at.append(trio.current_time()))
    other = alarms.deadline(lambda: passed_at.append(-trio.current_time()))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(alarms.run)
        await trio.sleep(100)
        assert passed_at == []  # at infinity: never
        deadline.move(500)
        other.move(400)
        await trio.sleep(1)
        deadline.move(150)  # earlier
        await trio.sleep(1)
        deadline.move(200)  # later again, before it passed
        other.move(math.inf)  # and the other one never
        await trio.sleep(1000)
        nursery.cancel_scope.cancel()
    assert passed_at == [200]  # once: back at infinity after it fired


async def test_alarms_stopped_by_a_handler_fire_nothing_more_in_that_pass(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Two deadlines pass together and the first handler ends the owner: the second never
    fires (a close followed by a stall would have counted a slow client that was not)."""
    alarms = Alarms()
    fired: list[str] = []

    def first() -> None:
        fired.append("first")
        alarms.stop()

    early = alarms.deadline(first)
    late = alarms.deadline(lambda: fired.append("second"))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(alarms.run)
        early.move(10)
        late.move(10)
        await trio.sleep(20)
    assert fired == ["first"]


async def test_session_runs_one_task_for_all_its_deadlines(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An idle native session: receive loop, pump and one deadline task (memory per socket)."""
    ws = FakeWebSocket()
    session = agent_session(ws)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.serve)
        await trio.testing.wait_all_tasks_blocked()
        assert session._work is not None
        names = sorted(t.name.rsplit(".", 1)[-1] for t in session._work.child_tasks)
        assert names == ["_pump", "_receive_loop", "run"]
        nursery.cancel_scope.cancel()


async def test_session_close_then_peer_close_is_one_transition(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """close() makes it CLOSING with its code; the peer's close after it changes nothing."""
    ws = FakeWebSocket()
    session = agent_session(ws)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.serve)
        await trio.testing.wait_all_tasks_blocked()
        assert session.state is SessionState.OPEN
        session.close(CloseCode.UNAUTHORIZED, "gone")
        assert session.state is SessionState.CLOSING
        session._peer_closed(CloseCode.NORMAL)
        session.close(CloseCode.GOING_AWAY)
        await session.finished.wait()
    assert session.state is SessionState.CLOSED
    assert session.close_code == ws.close_code == CloseCode.UNAUTHORIZED
    assert session.statistics().state == "closed"


async def test_session_peer_close_ends_it_and_a_later_close_sends_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The peer going away is the same transition: CLOSED, no close frame, no spawn after."""
    ws = FakeWebSocket()
    session = agent_session(ws)
    spawned: list[str] = []

    async def note() -> None:
        spawned.append("ran")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.serve)
        await trio.testing.wait_all_tasks_blocked()
        session.spawn(note)
        await ws.inbound_send.aclose()  # the client went away
        await session.finished.wait()
        session.close(CloseCode.GOING_AWAY)
        session.spawn(note)
        await trio.testing.wait_all_tasks_blocked()
    assert session.state is SessionState.CLOSED
    assert session.close_code == CloseCode.NORMAL
    assert ws.close_code is None  # nothing was sent after the peer left
    assert spawned == ["ran"]
