"""Agents that heartbeat over REST time out to offline (issue 16, defect 7).

An agent kept online by `POST /v1/agents/heartbeat` has no socket whose
close would set it offline; the presence reporter sets it offline once its
last heartbeat is `heartbeat_timeout` old, with the same
`agent.status.offline` event as a closed socket:

- on a live server, with the wall clock moved forward: the REST agent goes
  offline and a connected agent's socket sees the event, while that
  connected agent (whose last_seen is as old) stays online; a heartbeat
  within the timeout keeps the agent online; a heartbeat committed between
  the reporter's read and its command wins;
- on trio's autojump clock with a scripted engine: the reporter looks when
  the next agent could expire, not on a polling tick.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, cast

import pytest
import trio
import trio.testing
import trio_websocket

from broker.engine.agents import ExpirePresence, StalePresence, stale_presence
from broker.engine.engine import Engine
from broker.fanout import FanoutHub
from broker.gateway.presence import EXPIRY_SPACING, PresenceReporter
from broker.gateway.settings import GatewaySettings
from tests.helpers.realtime import Live, next_frame, raw_socket

TIMEOUT_S = GatewaySettings().heartbeat_timeout_seconds


@pytest.fixture
def gateway_settings() -> GatewaySettings:
    """Presence events coalesced over a short interval: the live tests move the wall
    clock by the timeout give or take a second, and must not wait that second out."""
    return GatewaySettings(presence_interval_seconds=0.02)


class WallClock:
    """time.time moved forward by `offset` seconds (the writer's clock too)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real = time.time
        self.offset = 0.0
        monkeypatch.setattr(time, "time", lambda: real() + self.offset)

    def advance(self, seconds: float) -> None:
        self.offset += seconds


async def status_event(ws: trio_websocket.WebSocketConnection, name: str) -> dict[str, Any]:
    """The next coalesced `presence` event that lists agent `name`: its type and data.

    (A native session that asked for presence gets these, not one
    `agent.status.*` event per transition.)
    """
    while True:
        frame = await next_frame(ws, "event")
        payload = frame["payload"]
        if payload["type"] == "presence" \
                and any(name in names for names in payload["data"].values()):
            return {"type": payload["type"], "data": payload["data"]}


@pytest.mark.one_process  # reads the in-process gateway
async def test_presence_timeout_sets_a_rest_agent_offline_and_spares_a_socket(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bob heartbeats over REST and stops; alice holds a socket: only bob goes offline."""
    wall = WallClock(monkeypatch)
    asked = f"/v1/ws?presence=1&token={live.world.tokens['alice']}"
    async with raw_socket(live.server, None, path=asked) as alice:
        await live.heartbeat("bob")
        assert (await status_event(alice, "bob"))["data"]["online"] == ["bob"]
        assert await live.status("alice") == "online"
        wall.advance(TIMEOUT_S - 1)
        assert await live.timeout_pass() == 0  # not yet
        wall.advance(2)
        assert await live.timeout_pass() == 1
        assert await live.status("bob") == "offline"
        # alice's last_seen is her connect, as old as bob's heartbeat, but her
        # socket is live: its close, not the timeout, sets her offline.
        assert await live.status("alice") == "online"
        # The same event as when a socket agent's last socket closes.
        assert await status_event(alice, "bob") == {
            "type": "presence",
            "data": {"online": [], "away": [], "offline": ["bob"]}}
        # Offline already: a later pass leaves bob alone.
        wall.advance(TIMEOUT_S)
        assert await live.timeout_pass() == 0


@pytest.mark.one_process  # reads the in-process gateway
async def test_presence_timeout_spares_an_agent_that_heartbeats_within_it(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each heartbeat moves the deadline: the agent is offline a timeout after the last one."""
    wall = WallClock(monkeypatch)
    await live.heartbeat("bob")
    wall.advance(TIMEOUT_S - 10)
    await live.heartbeat("bob")
    wall.advance(20)  # past the first heartbeat's timeout, within the second's
    assert await live.timeout_pass() == 0
    assert await live.status("bob") == "online"
    wall.advance(TIMEOUT_S)
    assert await live.timeout_pass() == 1
    assert await live.status("bob") == "offline"


@pytest.mark.one_process  # reads the in-process gateway
async def test_presence_timeout_loses_to_a_heartbeat_between_its_read_and_its_command(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The command takes the cutoff again in its transaction: a heartbeat that raced in wins."""
    wall = WallClock(monkeypatch)
    await live.heartbeat("bob")
    wall.advance(TIMEOUT_S + 1)
    stale = await live.presence.find_stale()
    assert (live.world.workspace_id, live.world.agents["bob"]) in stale.agents
    await live.heartbeat("bob")  # committed after the read, before the command
    assert await live.presence.expire(stale.agents) == 0
    assert await live.status("bob") == "online"


# -- when the reporter looks: on the autojump clock, with a scripted engine -----------------


class ScriptedPresence:
    """The agents table's presence columns in memory, on a wall clock that follows trio's.

    `read` answers `stale_presence` and `submit` applies `ExpirePresence`
    the way the engine does, counting the reads.
    """

    facts = None

    def __init__(self, wall_ms: Callable[[], int]) -> None:
        self.wall_ms = wall_ms
        self.agents: dict[int, tuple[str, int]] = {}  # agent_id: (status, last_seen)
        self.reads = 0

    def heartbeat(self, agent_id: int) -> None:
        self.agents[agent_id] = ("online", self.wall_ms())

    async def read(self, fn: Any, cutoff_ms: int) -> StalePresence:
        assert fn is stale_presence
        self.reads += 1
        online = {a: seen for a, (status, seen) in self.agents.items() if status != "offline"}
        later = [seen for seen in online.values() if seen > cutoff_ms]
        return StalePresence(agents=[(1, a) for a, seen in sorted(online.items())
                                     if seen <= cutoff_ms],
                             next_seen=min(later) if later else None)

    async def submit(self, command: ExpirePresence) -> list[int]:
        cutoff = self.wall_ms() - command.timeout_ms
        expired = [a for _, a in command.agents
                   if self.agents[a][0] != "offline" and self.agents[a][1] <= cutoff]
        for agent_id in expired:
            self.agents[agent_id] = ("offline", self.agents[agent_id][1])
        return expired


async def test_presence_timeout_looks_when_the_next_agent_could_expire(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Offline within a timeout and its spacing after the last heartbeat; few reads, no tick."""
    epoch = 1_800_000_000.0
    monkeypatch.setattr(time, "time", lambda: epoch + autojump_clock.current_time())
    engine = ScriptedPresence(lambda: int(time.time() * 1000))
    presence = PresenceReporter(cast(Engine, engine), FanoutHub(),
                                heartbeat_timeout_seconds=TIMEOUT_S)
    late = TIMEOUT_S * EXPIRY_SPACING + 1  # the most a pass may come after a deadline
    async with trio.open_nursery() as nursery:
        await nursery.start(presence.run)
        engine.heartbeat(2)
        await trio.sleep(40)
        engine.heartbeat(3)
        await trio.sleep(TIMEOUT_S - 40 - 1)  # 1 s before agent 2's deadline
        assert engine.agents[2][0] == "online"
        await trio.sleep(1 + late)
        assert engine.agents[2][0] == "offline"  # agent 3 heartbeat 40 s later
        assert engine.agents[3][0] == "online"
        engine.heartbeat(3)  # the reporter is not told: its next look is due anyway
        await trio.sleep(TIMEOUT_S - late - 1)
        assert engine.agents[3][0] == "online"
        await trio.sleep(late + 1 + late)
        assert engine.agents[3][0] == "offline"
        # Nobody online: a look per timeout, however long nothing happens.
        reads, idle_s = engine.reads, 100 * TIMEOUT_S
        await trio.sleep(idle_s)
        assert engine.reads - reads <= idle_s / TIMEOUT_S + 1
        nursery.cancel_scope.cancel()
    assert presence.expired == 2
