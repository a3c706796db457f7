"""Presence that scales (issue 17, item 4): a connect storm costs O(N) frames, not O(N^2).

Each connect used to send an `agent.status.active` event to every session
of the workspace: N agents connecting sent N^2/2 frames. Now the gateway's
presence feed gives each session that asked for presence at most one
`presence` frame per `presence_interval`, listing the agents whose state
changed; a session that did not ask gets none; observers still get every
transition as a flat event. Counted here on a real engine and gateway with
sessions that count what they are offered (and, for a few, real sessions
on in-memory sockets), on trio's mock clock moved by hand, so an interval
ends exactly when the test says so.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import cast

import msgspec
import pytest
import trio
import trio.testing
import trio_websocket

from broker.engine.agents import SetPresence
from broker.engine.config import EngineConfig
from broker.engine.engine import Engine
from broker.engine.errors import BrokerError
from broker.engine.workspaces import CreateWorkspace, RegisterAgent
from broker.gateway import Gateway
from broker.gateway.frame_queue import Mode
from broker.gateway.native import AgentSession
from broker.gateway.observer import ObserverSession
from broker.gateway.presence import PRESENCE_BATCH, PresenceBatch, PresenceReporter
from broker.gateway.session import Session
from broker.gateway.settings import GatewaySettings
from broker.gateway.views import FactView
from tests.helpers.realtime import FakeWebSocket, Live, next_frame, raw_socket, send_json

INTERVAL_S = 1.0
SETTINGS = GatewaySettings(presence_interval_seconds=INTERVAL_S)


class Counting:
    """A session as the hub and the presence feed see it; it counts what it is offered.

    asks: it asked for presence (`?presence=1`); agent_id None: an observer.
    """

    def __init__(self, workspace_id: int, agent_id: int | None, asks: bool = True) -> None:
        self.workspace_id = workspace_id
        self.agent_id = agent_id
        self.wants_presence = asks and agent_id is not None
        self.presence: list[dict[str, list[str]]] = []  # the presence frames, decoded
        self.events: list[str] = []  # other ephemeral events, by type
        self.facts: list[bytes] = []  # an observer's flat events

    def offer_delivery(self, seq: int, view: FactView) -> None:
        pass

    def offer_event(self, view: FactView) -> None:
        self.events.append(view.type)

    def offer_fact(self, view: FactView) -> None:
        self.facts.append(view.flat_event()[0])

    def offer_presence(self, batch: PresenceBatch) -> None:
        self.presence.append(msgspec.json.decode(batch.coalesced.payload)["data"])


class Storm:
    """An engine, a running gateway and a workspace of `n` agents, on the mock clock."""

    def __init__(self, engine: Engine, gateway: Gateway, clock: trio.testing.MockClock,
                 workspace_id: int, agents: list[tuple[int, str]]) -> None:
        self.engine = engine
        self.gateway = gateway
        self.clock = clock
        self.workspace_id = workspace_id
        self.agents = agents  # (agent_id, name)
        self.started = trio.current_time()

    def attach(self, session: Counting | Session) -> None:
        self.gateway.attach(cast(Session, session))

    def detach(self, session: Counting | Session) -> None:
        self.gateway.detach(cast(Session, session))

    async def settle(self) -> None:
        """Every transition committed and routed; the feed has sent what is due now.

        (Sessions just started attach, and report, once the tasks run.)
        """
        await trio.testing.wait_all_tasks_blocked()
        await self.gateway.presence.wait_idle()
        await trio.testing.wait_all_tasks_blocked()

    async def next_interval(self) -> None:
        """Move the clock to the end of the interval: the feed sends what it held."""
        self.clock.jump(INTERVAL_S)
        await trio.testing.wait_all_tasks_blocked()

    @property
    def intervals(self) -> int:
        """Intervals begun since the storm started (the feed sends at most one frame each)."""
        return math.floor((trio.current_time() - self.started) / INTERVAL_S) + 1

    async def status(self, agent_id: int) -> str:
        row = await self.engine.read(lambda c: c.execute(
            "SELECT status FROM agents WHERE id = ?", (agent_id,)).fetchone())
        return str(row[0])


async def open_storm(tmp_path: Path, clock: trio.testing.MockClock, n: int,
                     nursery: trio.Nursery) -> Storm:
    engine = await nursery.start(_engine, tmp_path)
    ws = await engine.submit(CreateWorkspace("storm"))
    wid = int(ws.workspace_id)
    agents: list[tuple[int, str]] = [(0, "")] * n

    async def register(i: int) -> None:
        created = await engine.submit(RegisterAgent(workspace_id=wid, name=f"a{i:04d}"))
        agents[i] = (int(created.id), created.name)

    async with trio.open_nursery() as registering:  # concurrent: group commit
        for i in range(n):
            registering.start_soon(register, i)
    gateway = Gateway(engine, SETTINGS)
    await nursery.start(gateway.run)
    return Storm(engine, gateway, clock, wid, agents)


async def _engine(tmp_path: Path, *, task_status: trio.TaskStatus[Engine]) -> None:
    async with Engine.open(tmp_path, EngineConfig(synchronous="OFF"), with_facts=True) as engine:
        task_status.started(engine)
        await trio.sleep_forever()


# -- connect and disconnect storms ---------------------------------------------------------


@pytest.mark.parametrize("n", [10, 100, 1000])
async def test_presence_connect_storm_costs_linear_frames(
    tmp_path: Path, mock_clock: trio.testing.MockClock, n: int,
) -> None:
    """N agents connect in 10 waves across 2 intervals: O(N) presence frames in total.

    Each session gets at most one frame per interval, every session learns
    of every agent that connected after it, nobody gets a per-agent
    `agent.status.*` event, and the writer gets a few presence commands,
    not N.
    """
    async with trio.open_nursery() as nursery:
        storm = await open_storm(tmp_path, mock_clock, n, nursery)
        sessions = [Counting(storm.workspace_id, agent_id) for agent_id, _ in storm.agents]
        waves = 10
        size = math.ceil(n / waves)
        for wave in range(waves):
            for session in sessions[wave * size:(wave + 1) * size]:
                storm.attach(session)
            await storm.settle()
            if wave == waves // 2:
                await storm.next_interval()
        await storm.next_interval()
        await storm.next_interval()  # nothing more is sent: all of it went out

        frames = [len(s.presence) for s in sessions]
        assert sum(frames) <= 3 * n
        assert max(frames) <= storm.intervals
        names = [name for _, name in storm.agents]
        for index, session in enumerate(sessions):
            seen = {name for frame in session.presence for name in frame["online"]}
            later = set(names[index + 1:])
            assert later <= seen, "an agent that connected later went unreported"
            assert not any(frame["offline"] or frame["away"] for frame in session.presence)
            assert not [e for e in session.events if e.startswith("agent.status.")]
        assert storm.gateway.hub.statistics().events_routed == 0
        stats = storm.gateway.presence
        assert stats.transitions == n
        assert stats.commands <= waves * math.ceil(size / PRESENCE_BATCH)
        assert await storm.status(storm.agents[-1][0]) == "online"
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("n", [10, 100, 1000])
async def test_presence_disconnect_storm_costs_linear_frames(
    tmp_path: Path, mock_clock: trio.testing.MockClock, n: int,
) -> None:
    """Half the workspace disconnects at once: each remaining session gets one frame."""
    async with trio.open_nursery() as nursery:
        storm = await open_storm(tmp_path, mock_clock, n, nursery)
        sessions = [Counting(storm.workspace_id, agent_id) for agent_id, _ in storm.agents]
        for session in sessions:
            storm.attach(session)
        await storm.settle()
        await storm.next_interval()
        for session in sessions:
            session.presence.clear()
        leaving, staying = sessions[: n // 2], sessions[n // 2:]
        for session in leaving:
            storm.detach(session)
        await storm.settle()
        await storm.next_interval()
        await storm.next_interval()

        gone = sorted(name for _, name in storm.agents[: n // 2])
        for session in staying:
            assert session.presence == [{"online": [], "away": [], "offline": gone}]
        assert all(s.presence == [] for s in leaving)  # detached: offered nothing more
        assert await storm.status(storm.agents[0][0]) == "offline"
        nursery.cancel_scope.cancel()


# -- who gets presence -----------------------------------------------------------------------


async def test_presence_reaches_only_sessions_that_asked_and_every_observer(
    tmp_path: Path, mock_clock: trio.testing.MockClock,
) -> None:
    """A session that did not ask gets no presence; an observer gets every transition, flat."""
    async with trio.open_nursery() as nursery:
        storm = await open_storm(tmp_path, mock_clock, 12, nursery)
        quiet = Counting(storm.workspace_id, storm.agents[0][0], asks=False)
        asking = Counting(storm.workspace_id, storm.agents[1][0])
        observer = Counting(storm.workspace_id, None)
        for session in (quiet, asking, observer):
            storm.attach(session)
        await storm.settle()
        others = [Counting(storm.workspace_id, agent_id) for agent_id, _ in storm.agents[2:]]
        for session in others:
            storm.attach(session)
        await storm.settle()
        await storm.next_interval()
        storm.detach(others[0])
        await storm.settle()
        await storm.next_interval()

        assert quiet.presence == [] and quiet.events == []
        assert asking.presence[-1] == {"online": [], "away": [], "offline": ["a0002"]}
        # The observer: one flat Relaycast event per transition, in commit order.
        flat = [msgspec.json.decode(f) for f in observer.facts]
        assert [e["agent"]["name"] for e in flat if e["type"] == "agent.status.active"] == [
            name for _, name in storm.agents]
        assert flat[-1] == {"agent": {"name": "a0002"}, "status": "offline",
                            "type": "agent.status.offline"}
        nursery.cancel_scope.cancel()


async def test_presence_agent_that_comes_and_goes_within_an_interval_is_not_reported(
    tmp_path: Path, mock_clock: trio.testing.MockClock,
) -> None:
    """Net state per interval: online and back offline before the interval ends says nothing.

    Both transitions are committed (the database and the observer saw
    them); a session that asked for presence gets no frame about it.
    """
    async with trio.open_nursery() as nursery:
        storm = await open_storm(tmp_path, mock_clock, 3, nursery)
        (alice_id, _), (bob_id, _), (carol_id, _) = storm.agents
        alice = Counting(storm.workspace_id, alice_id)
        observer = Counting(storm.workspace_id, None)
        storm.attach(alice)
        storm.attach(observer)
        await storm.settle()  # alice's own connect went out at once: the interval runs
        assert len(alice.presence) == 1
        bob = Counting(storm.workspace_id, bob_id, asks=False)
        storm.attach(bob)
        await storm.settle()
        assert await storm.status(bob_id) == "online"
        storm.detach(bob)
        await storm.settle()
        assert await storm.status(bob_id) == "offline"
        carol = Counting(storm.workspace_id, carol_id, asks=False)
        storm.attach(carol)  # stays: the interval's one frame says so
        await storm.settle()
        await storm.next_interval()

        assert alice.presence[1:] == [{"online": ["a0002"], "away": [], "offline": []}]
        kinds = [msgspec.json.decode(f)["type"] for f in observer.facts]
        assert kinds == ["agent.status.active", "agent.status.active",
                         "agent.status.offline", "agent.status.active"]
        nursery.cancel_scope.cancel()


# -- on real sessions: the frames on the socket ---------------------------------------------


async def test_presence_frames_on_native_sessions_and_observers(
    tmp_path: Path, mock_clock: trio.testing.MockClock,
) -> None:
    """The coalesced frame a native session writes; the per-agent frames of an observer.

    Ten agents connect at once: a native session that asked writes one
    `presence` event listing them; one that did not writes none; an
    observer writes the ten flat `agent.status.active` events it always did.
    """
    async with trio.open_nursery() as nursery:
        storm = await open_storm(tmp_path, mock_clock, 12, nursery)
        gw = storm.gateway
        sockets = {name: FakeWebSocket() for name in ("asked", "quiet", "observer")}
        (asked_id, asked_name), (quiet_id, quiet_name) = storm.agents[:2]
        asked = AgentSession(gw, sockets["asked"], gw.native_json,
                             workspace_id=storm.workspace_id, agent_id=asked_id,
                             agent_name=asked_name, presence=True)
        quiet = AgentSession(gw, sockets["quiet"], gw.native_json,
                             workspace_id=storm.workspace_id, agent_id=quiet_id,
                             agent_name=quiet_name)
        observer = ObserverSession(gw, sockets["observer"], gw.observer_codec,
                                   workspace_id=storm.workspace_id)
        for session in (asked, quiet, observer):
            session.queue.mode = Mode.LIVE  # nothing to replay
            nursery.start_soon(session.serve)
        await storm.settle()
        await storm.next_interval()
        for ws in sockets.values():
            ws.sent.clear()
        crowd = [Counting(storm.workspace_id, agent_id, asks=False)
                 for agent_id, _ in storm.agents[2:]]
        for session in crowd:
            storm.attach(session)
        await storm.settle()
        await storm.next_interval()

        names = [name for _, name in storm.agents[2:]]
        assert sockets["asked"].sent == [{"v": 1, "type": "event", "payload": {
            "type": "presence", "data": {"online": names, "away": [], "offline": []}}}]
        assert sockets["quiet"].sent == []
        assert sockets["observer"].sent == [
            {"agent": {"name": name}, "status": "active", "type": "agent.status.active"}
            for name in names]
        nursery.cancel_scope.cancel()


# -- the batched presence command ------------------------------------------------------------


async def test_set_presence_batches_changes_and_skips_agents_gone(
    tmp_path: Path, mock_clock: trio.testing.MockClock,
) -> None:
    """One command for many agents: an event per real change only; a bad status writes nothing."""
    async with trio.open_nursery() as nursery:
        storm = await open_storm(tmp_path, mock_clock, 3, nursery)
        (a, _), (b, _), (c, _) = storm.agents
        engine = storm.engine
        changed = await engine.submit(SetPresence(changes=((a, "online"), (b, "online"),
                                                           (999_999, "online"))))
        assert changed == [a, b]  # the unknown agent is skipped, not an error
        again = await engine.submit(SetPresence(changes=((a, "online"), (b, "offline"))))
        assert again == [b]
        with pytest.raises(BrokerError) as refused:
            await engine.submit(SetPresence(changes=((c, "online"), (a, "sleeping"))))
        assert refused.value.code == "invalid_status"
        assert [await storm.status(x) for x in (a, b, c)] == ["online", "offline", "offline"]
        nursery.cancel_scope.cancel()


def test_presence_interval_setting_is_named_and_positive() -> None:
    """`gateway.presence_interval_seconds`: 1 s by default; zero or less is refused."""
    assert GatewaySettings().presence_interval_seconds == 1.0
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"presence_interval_seconds": 0}, GatewaySettings)



async def test_presence_query_other_than_0_or_1_is_refused_before_the_upgrade(
    live: Live,
) -> None:
    """`?presence=yes` gets HTTP 400 invalid_request and opens nothing; 0 and 1 open."""
    token = live.token("bob")
    with pytest.raises(trio_websocket.ConnectionRejected) as refused:
        async with raw_socket(live.server, None, path=f"/v1/ws?presence=yes&token={token}"):
            pass
    assert refused.value.status_code == 400
    body = msgspec.json.decode(refused.value.body or b"{}")
    assert body["error"]["code"] == "invalid_request"
    for value in ("0", "1"):
        async with raw_socket(live.server, None,
                              path=f"/v1/ws?presence={value}&token={token}") as ws:
            await send_json(ws, {"v": 1, "id": "p", "type": "ping"})
            assert (await next_frame(ws, "pong"))["re"] == "p"


async def test_presence_reporter_flushes_one_at_a_time_in_report_order() -> None:
    """A flush while another is committing (the shutdown's, beside the actor's) waits for it:
    the newer status is committed last, never overwritten by the older one."""
    committed: list[tuple[tuple[int, str], ...]] = []
    first_held = trio.Event()
    release = trio.Event()

    class HeldEngine:
        async def submit(self, command: SetPresence) -> None:
            if not committed and not first_held.is_set():
                first_held.set()
                await release.wait()  # the first commit is slow
            committed.append(command.changes)

    reporter = PresenceReporter(cast(Engine, HeldEngine()))
    async with trio.open_nursery() as nursery:
        reporter.report(1, 7, "active")
        nursery.start_soon(reporter.flush)
        await first_held.wait()
        reporter.report(1, 7, "offline")
        nursery.start_soon(reporter.flush)
        await trio.testing.wait_all_tasks_blocked()
        release.set()
    assert committed == [((7, "active"),), ((7, "offline"),)]
