"""Session liveness with the default timeouts, on trio's autojump clock and an in-memory socket.

- a client whose socket accepts nothing for slow_client_timeout (60 s) is
  closed with 4008, and the connection is reset when even the close frame
  cannot get out (close_grace later);
- the server pings native sessions; no pong (or any frame) within
  pong_timeout closes with 4408; a client that answers stays;
- Relaycast sockets are not pinged; they close with 4408 after
  idle_timeout without any frame;
- a client that sends and never reads is not read either;
- a socket opened with a token that was rotated out closes with 4401 when
  the grace ends.
"""

from __future__ import annotations

import time
from typing import Any, cast

import trio
import trio.testing

from broker.engine.engine import Engine
from broker.engine.events import encode_payload
from broker.gateway import Gateway
from broker.gateway.frame_queue import Mode
from broker.gateway.native import AgentSession
from broker.gateway.node import NodeSession
from broker.gateway.session import Session
from broker.gateway.settings import GatewaySettings
from broker.gateway.views import FactView
from protocol.codec import CloseCode
from tests.helpers.realtime import FakeWebSocket

DEFAULTS = GatewaySettings()


class StubEngine:
    """Sessions that never catch up from the database need no engine."""

    facts = None


def gateway() -> Gateway:
    return Gateway(cast(Engine, StubEngine()), DEFAULTS)


def live(session: Session) -> Session:
    session.queue.mode = Mode.LIVE  # as after the replay on connect: nothing to replay
    return session


def agent_session(gw: Gateway, ws: FakeWebSocket) -> Session:
    return live(AgentSession(gw, ws, gw.native_json, workspace_id=1, agent_id=2,
                             agent_name="bob"))


def node_session(gw: Gateway, ws: FakeWebSocket) -> Session:
    return live(NodeSession(gw, ws, gw.node_codec, workspace_id=1, agent_id=2,
                            agent_name="bob", node_id="node_2", node_name="bob-direct"))


def delivery() -> FactView:
    return FactView("message.created", 1, encode_payload("message.created", {"text": "hi"}))


async def test_liveness_non_reader_closed_4008_then_reset(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A client that reads nothing is closed with 4008, then reset."""
    gw, ws = gateway(), FakeWebSocket()
    session = agent_session(gw, ws)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.serve)
        await trio.sleep(1)
        ws.reads_nothing = True
        session.offer_delivery(1, delivery())
        await trio.sleep(DEFAULTS.slow_client_timeout_seconds - 2)
        assert session.close_code is None  # not yet
        await session.ending.wait()
        assert session.close_code == CloseCode.SLOW_CLIENT
        assert trio.current_time() <= 1 + DEFAULTS.slow_client_timeout_seconds * 1.25
        assert gw.slow_closes == 1
        assert gw.hub.sessions_of(2) == frozenset()  # let go of at once
        assert not ws.aborted  # the close frame gets its grace
        await session.finished.wait()
    assert ws.aborted  # it could not get out: the connection was reset
    assert trio.current_time() >= (DEFAULTS.slow_client_timeout_seconds
                                   + DEFAULTS.close_grace_seconds)


async def test_liveness_back_within_grace_gets_close_frame(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A client that comes back within the grace gets the close frame."""
    gw, ws = gateway(), FakeWebSocket()
    session = agent_session(gw, ws)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.serve)
        ws.reads_nothing = True
        session.offer_delivery(1, delivery())
        await session.ending.wait()
        assert session.close_code == CloseCode.SLOW_CLIENT
        ws.reads_nothing = False
        ws._unblocked.set()  # the client reads again
        await session.finished.wait()
    assert ws.close_code == CloseCode.SLOW_CLIENT and not ws.aborted
    assert [f["seq"] for f in ws.sent if f["type"] == "deliver"] == [1]


async def test_liveness_ping_without_pong_closes_4408(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The server pings, and closes with 4408 without a pong."""
    gw, ws = gateway(), FakeWebSocket()
    session = agent_session(gw, ws)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.serve)
        await session.finished.wait()
    assert {"v": 1, "type": "ping"} in ws.sent
    assert ws.close_code == CloseCode.PONG_TIMEOUT
    limit = DEFAULTS.ping_interval_seconds + DEFAULTS.pong_timeout_seconds
    assert limit <= trio.current_time() <= limit + DEFAULTS.ping_interval_seconds


async def test_liveness_client_answering_pings_stays(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A client that answers pings stays."""
    gw, ws = gateway(), FakeWebSocket()
    session = agent_session(gw, ws)

    async def answer() -> None:
        answered = 0
        while True:
            await trio.sleep(1)
            pings = sum(1 for f in ws.sent if f["type"] == "ping")
            for _ in range(pings - answered):
                await ws.inbound_send.send('{"v":1,"type":"pong"}')
            answered = pings

    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.serve)
        nursery.start_soon(answer)
        await trio.sleep(10 * DEFAULTS.ping_interval_seconds)
        assert session.close_code is None
        assert sum(1 for f in ws.sent if f["type"] == "ping") >= 9
        nursery.cancel_scope.cancel()


async def test_relaycast_sockets_are_not_pinged_but_close_when_idle(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gw, quiet, chatty = gateway(), FakeWebSocket(), FakeWebSocket()
    quiet_session, chatty_session = node_session(gw, quiet), node_session(gw, chatty)

    async def heartbeat() -> None:  # what the SDK does every 30 s
        while True:
            await trio.sleep(30)
            await chatty.inbound_send.send(
                '{"v":1,"type":"node.heartbeat","load":0,"active_agents":1,'
                '"handlers_live":false}')

    async with trio.open_nursery() as nursery:
        nursery.start_soon(quiet_session.serve)
        nursery.start_soon(chatty_session.serve)
        nursery.start_soon(heartbeat)
        await quiet_session.finished.wait()
        assert quiet.close_code == CloseCode.PONG_TIMEOUT
        assert trio.current_time() >= DEFAULTS.idle_timeout_seconds
        await trio.sleep(5 * DEFAULTS.idle_timeout_seconds)
        assert chatty_session.close_code is None
        nursery.cancel_scope.cancel()
    assert quiet.sent == [] and chatty.sent == []  # no pings on Relaycast sockets


async def test_liveness_sender_never_reading_not_read(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A client that sends and never reads is not read either."""
    # Pings and bad frames with an id each owe the client a frame back
    # (a pong, an error reply) and take no request slot: without a bound,
    # the outbox would hold one frame per frame sent until the 4008 close.
    spam = 600
    gw, ws = gateway(), FakeWebSocket(inbound=spam)
    session = agent_session(gw, ws)
    for n in range(spam // 2):
        ws.inbound_send.send_nowait(f'{{"v":1,"id":"p{n}","type":"ping"}}')
        ws.inbound_send.send_nowait(f'{{"v":1,"id":"x{n}","type":"nope"}}')
    ws.reads_nothing = True
    bound = DEFAULTS.max_requests_in_flight + 1
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.serve)
        await trio.sleep(1)  # on the autojump clock: until nothing moves any more
        stalled = session.statistics()
        ws.reads_nothing = False
        ws._unblocked.set()  # the client reads again: every frame is answered, in order
        await trio.sleep(1)
        assert session.close_code is None
        nursery.cancel_scope.cancel()
    assert stalled.frames_received < spam  # the rest waited, unread, on the client's side
    assert stalled.queue.max_own <= bound
    assert stalled.queue.max_depth <= bound
    assert stalled.read_pauses >= 1
    answers = [(f["type"], f["re"]) for f in ws.sent]
    assert answers == [frame for n in range(spam // 2)
                       for frame in (("pong", f"p{n}"), ("reply", f"x{n}"))]
    assert session.statistics().queue.max_depth <= bound


class ReadingStub:
    """An engine whose reads answer `answer(fn, *args)` at once (no database)."""

    facts = None

    def __init__(self, answer: Any) -> None:
        self.answer = answer

    async def read(self, fn: Any, *args: Any) -> Any:
        return self.answer(fn, *args)


async def test_liveness_rotated_token_closes_4401_at_grace_end(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A socket of a rotated out token closes with 4401 when the grace ends."""
    grace_s = 120
    settings = GatewaySettings(ping_interval_seconds=1000, pong_timeout_seconds=1000)
    expires: dict[bytes, int | None] = {b"old": None, b"new": None}  # both current at first
    engine = ReadingStub(lambda fn, ws_id, agent_id, digest: expires[digest])
    gw = Gateway(cast(Engine, engine), settings)
    old_ws, new_ws = FakeWebSocket(), FakeWebSocket()
    old, new = (live(AgentSession(gw, ws, gw.native_json, workspace_id=1, agent_id=2,
                                  agent_name="bob", credential=digest))
                for ws, digest in ((old_ws, b"old"), (new_ws, b"new")))
    rotated = FactView("agent.token_rotated", 1, encode_payload(
        "agent.token_rotated", {"agent_id": "2", "name": "bob"}))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(old.serve)
        nursery.start_soon(new.serve)
        await trio.sleep(10)
        # The rotation: "old" works for the grace, "new" is the current token.
        expires[b"old"] = int(time.time() * 1000) + grace_s * 1000
        rotated_at = trio.current_time()
        old.offer_event(rotated)
        new.offer_event(rotated)
        await trio.sleep(grace_s - 5)
        assert old.close_code is None  # still within the grace
        await old.finished.wait()
        assert old.close_code == CloseCode.UNAUTHORIZED
        tick = settings.slow_client_timeout_seconds / 4
        assert grace_s - 1 <= trio.current_time() - rotated_at <= grace_s + tick
        await trio.sleep(5 * grace_s)
        assert new.close_code is None
        nursery.cancel_scope.cancel()
    assert old_ws.close_code == CloseCode.UNAUTHORIZED
    events = [f["payload"]["type"] for f in new_ws.sent if f["type"] == "event"]
    assert events == ["agent.token_rotated"]  # the client is told; it may take the new token


async def test_liveness_non_reader_ends_when_socket_fails(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A session not reading ends when its socket fails under the pump."""
    # The receive loop waits for room; if the pump then loses the socket,
    # nobody would take the outbox again: the pump ends the session itself.
    spam = 300
    gw, ws = gateway(), FakeWebSocket(inbound=spam)
    session = agent_session(gw, ws)
    for n in range(spam):
        ws.inbound_send.send_nowait(f'{{"v":1,"id":"p{n}","type":"ping"}}')
    ws.reads_nothing = True
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.serve)
        await trio.sleep(1)
        assert session.read_pauses >= 1
        ws.closing = True  # the connection is gone: the next write fails
        ws._unblocked.set()
        with trio.move_on_after(10):
            await session.finished.wait()
        ended, sessions = session.finished.is_set(), set(gw.sessions)
        nursery.cancel_scope.cancel()
    assert ended and sessions == set()
