"""Presence: an agent is active while it holds at least one socket, offline after its last one.

The hub says when an agent's first session attaches and its last one
detaches; `PresenceReporter` turns those edges into `SetPresence` commands,
which emit the ephemeral `agent.status.*` events. Transitions are handed
over without waiting and applied by one task, coalesced per agent (a
connect and disconnect in quick succession commit only the final state),
and every transition waiting when the task looks goes in one command (up
to PRESENCE_BATCH agents): while one command is in the writer the next
connects pile up behind it, so a storm of N connects costs a few commands,
not N, and a flapping client cannot flood the writer. No artificial wait:
a lone connect is committed at once.

Those events reach sessions through `PresenceFeed`, not one frame per
transition to every session of the workspace (a workspace of N agents
connecting would cost O(N^2) frames). The feed gathers the transitions
of each workspace and, at most once per `presence_interval`, gives each
session that asked for presence one `PresenceBatch`: a native session
sends it as one coalesced `presence` event, a Relaycast node socket as
the SDK's per-agent `context.update` frames. Observers see every
transition as before, straight from the hub. The feed reports net
changes: an agent whose state at the end of the interval is the state
last reported (it connected and disconnected within one interval) is
left out.

Every coalesced transition is committed, even when it names the status
this actor committed last: the database is not this actor's alone (a REST
`agent.disconnect` or heartbeat sets the status too, and the daemon resets
everyone to offline when it starts), so a cache of "what was reported"
would drift from it and skip the command that puts it right.
`SetPresence` emits its event only when the status really changes, so
the extra command costs a write, never a duplicate event.

An agent can be online with no socket at all: it heartbeats over REST
(`POST /v1/agents/heartbeat`), and no edge ever says that it went away. So
the actor also times out agents whose last_seen is older than
`heartbeat_timeout`: a read lists the agents not offline and not seen since
the cutoff, the ones with a live socket here are dropped (a socket agent's
last_seen is its connect, and its socket's close is what sets it offline),
and one `ExpirePresence` command sets the rest offline with the same
`agent.status.offline` event, taking the cutoff again in its transaction
so that a heartbeat committed after the read wins. It runs on a deadline,
not a polling tick: the next time an agent could expire is the earliest
last_seen after the cutoff plus the timeout, and an agent that comes
online after the read cannot expire before the read plus the timeout, so
nothing needs to wake the actor early. Passes are at least
`EXPIRY_SPACING` of a timeout apart, so however many agents heartbeat at
scattered times, the read runs at most a few times per timeout, and an
agent goes offline at most that much after its timeout.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Protocol

import msgspec
import trio

from broker.engine.agents import ExpirePresence, SetPresence, stale_presence
from broker.engine.engine import Engine
from broker.engine.errors import BrokerError
from broker.engine.events import encode_payload
from broker.fanout import FanoutHub
from broker.gateway.views import FactView

log = logging.getLogger(__name__)

# The statuses SetPresence takes for "has a socket" and "has none".
ACTIVE = "online"
OFFLINE = "offline"
# Passes of the heartbeat timeout are at least this fraction of the timeout
# apart: an agent goes offline between 1 and 1.1 timeouts after its last
# heartbeat, and the read runs at most ten times per timeout.
EXPIRY_SPACING = 0.1
# Agents set offline per ExpirePresence command, so a crowd that timed out
# together (the network dropped) does not make one long transaction.
EXPIRY_BATCH = 500
# Agents per SetPresence command, so a storm of connects does not make one
# long transaction.
PRESENCE_BATCH = 1000
# The coalesced event a native session that asked for presence gets.
PRESENCE_EVENT = "presence"
# An agent.status.* event's status -> the REST status a presence event lists it under.
REST_STATUS = {"active": "online", "idle": "away", "offline": "offline"}


class StaleAgents(msgspec.Struct, frozen=True, kw_only=True):
    """Agents to time out (none with a live socket here), and when the next could expire."""

    agents: list[tuple[int, int]]  # (workspace_id, agent_id)
    next_due_ms: int  # wall clock, ms since the epoch


class PresenceReporter:
    """Start with `await nursery.start(presence.run)`; it runs until cancelled.

    hub: the gateway's hub, which knows the live sockets; with it (and a
    heartbeat_timeout_seconds), `run` also times out agents with none.
    """

    def __init__(self, engine: Engine, hub: FanoutHub[Any] | None = None, *,
                 heartbeat_timeout_seconds: float | None = None) -> None:
        self.engine = engine
        self.hub = hub
        self.heartbeat_timeout_seconds = heartbeat_timeout_seconds
        self._wanted: dict[int, tuple[int, str]] = {}
        self._wake = trio.Event()
        self._flushing = 0  # flushes running (the actor's, a caller's)
        self._flush_lock = trio.Lock()
        self._idle = trio.Event()
        self._idle.set()
        self.commands = 0
        self.transitions = 0  # agent transitions sent in those commands
        self.failures = 0
        self.expired = 0  # agents set offline by the heartbeat timeout

    def report(self, workspace_id: int, agent_id: int, status: str) -> None:
        """The agent's status is now `status` (committed soon, by the actor)."""
        self._wanted[agent_id] = (workspace_id, status)
        self._wake.set()
        if self._idle.is_set():
            self._idle = trio.Event()

    async def wait_idle(self) -> None:
        """Until every transition reported so far is committed (or refused)."""
        await self._idle.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            if self.hub is not None and self.heartbeat_timeout_seconds:
                nursery.start_soon(self._expire_when_due, self.heartbeat_timeout_seconds)
            task_status.started()
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                await self.flush()

    async def _expire_when_due(self, timeout_s: float) -> None:
        spacing = timeout_s * EXPIRY_SPACING
        while True:
            try:
                stale = await self.find_stale()
                await self.expire(stale.agents)
            except BrokerError as exc:
                # The read or the command failed (the writer is stopping, say):
                # nothing was written, the next pass finds the same agents.
                log.info("presence: heartbeat timeout pass failed: %s", exc)
                await trio.sleep(spacing)
                continue
            # The wall clock's distance to the next expiry, on trio's clock.
            await trio.sleep(max(spacing, stale.next_due_ms / 1000 - time.time()))

    async def find_stale(self) -> StaleAgents:
        """The agents past the heartbeat timeout with no live socket, and the next due time.

        Raises ValueError without a hub and a timeout; BrokerError from the read.
        """
        if self.hub is None or not self.heartbeat_timeout_seconds:
            raise ValueError("timing out agents takes the hub and a heartbeat timeout")
        timeout_ms = int(self.heartbeat_timeout_seconds * 1000)
        now_ms = int(time.time() * 1000)
        read = await self.engine.read(stale_presence, now_ms - timeout_ms)
        hub = self.hub
        agents = [(w, a) for w, a in read.agents if not hub.sessions_of(a)]
        # An agent online after this read has last_seen >= now_ms: it cannot
        # expire before now_ms + timeout, so that is the latest next look.
        next_due = now_ms + timeout_ms
        if read.next_seen is not None:
            next_due = min(next_due, read.next_seen + timeout_ms)
        return StaleAgents(agents=agents, next_due_ms=next_due)

    async def expire(self, agents: list[tuple[int, int]]) -> int:
        """Set offline those of `agents` (from `find_stale`) still past the timeout; how many.

        The timeout is checked again at commit (`ExpirePresence`). Raises
        BrokerError when a command fails (the ones before it are committed).
        """
        if not agents:
            return 0
        assert self.heartbeat_timeout_seconds
        timeout_ms = int(self.heartbeat_timeout_seconds * 1000)
        count = 0
        for start in range(0, len(agents), EXPIRY_BATCH):
            chunk = tuple(agents[start:start + EXPIRY_BATCH])
            expired = await self.engine.submit(ExpirePresence(agents=chunk, timeout_ms=timeout_ms))
            count += len(expired)
        if count:
            self.expired += count
            log.info("presence: %d agents set offline after %.0f s without a heartbeat",
                     count, self.heartbeat_timeout_seconds)
        return count

    async def flush(self) -> None:
        """Commit every pending transition (what piles up meanwhile goes in the next command)."""
        self._flushing += 1
        try:
            # One flush at a time (the actor's, and the one at shutdown): two would
            # commit their snapshots in any order, an older status after a newer one.
            async with self._flush_lock:
                while self._wanted:
                    wanted, self._wanted = self._wanted, {}
                    changes = [(agent_id, status) for agent_id, (_, status) in wanted.items()]
                    for start in range(0, len(changes), PRESENCE_BATCH):
                        await self._commit(tuple(changes[start:start + PRESENCE_BATCH]))
        finally:
            self._flushing -= 1
            if not self._flushing and not self._wanted:
                self._idle.set()

    async def _commit(self, changes: tuple[tuple[int, str], ...]) -> None:
        self.commands += 1
        self.transitions += len(changes)
        try:
            await self.engine.submit(SetPresence(changes=changes))
        except BrokerError as exc:
            self.failures += 1
            log.info("presence: %d transitions refused: %s", len(changes), exc)
        except Exception as exc:
            self.failures += 1
            log.exception("presence: %d transitions failed: %r", len(changes), exc)


class PresenceBatch:
    """The net presence changes of one workspace in one interval, as sessions send them.

    changes: the last `agent.status.*` view of each agent whose state
    changed, in the order of their first transition in the interval (a
    Relaycast node socket sends each as a `context.update`).
    `coalesced` is the one `presence` event a native session sends, made
    once and shared by every session of the workspace.
    """

    __slots__ = ("workspace_id", "changes", "_lists", "_coalesced")

    def __init__(self, workspace_id: int, changes: list[tuple[str, str, FactView]]) -> None:
        self.workspace_id = workspace_id
        self._coalesced: FactView | None = None
        self.changes = [view for _, _, view in changes]
        self._lists: dict[str, list[str]] = {"online": [], "away": [], "offline": []}
        for name, status, _ in changes:
            self._lists[status].append(name)

    @property
    def coalesced(self) -> FactView:
        """`{"type":"presence","data":{"online":[...],"away":[...],"offline":[...]}}`."""
        if self._coalesced is None:
            self._coalesced = FactView(PRESENCE_EVENT, self.workspace_id,
                                       encode_payload(PRESENCE_EVENT, self._lists))
        return self._coalesced


class PresenceSubscriber(Protocol):
    """A session as the feed sees it (`Session.offer_presence`)."""

    workspace_id: int

    def offer_presence(self, batch: PresenceBatch) -> None: ...


class PresenceFeedStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of the feed (`PresenceFeed.statistics()`).

    subscribers: sessions that get presence (native ones that asked, node sockets).
    transitions: agent.status.* events taken from the hub since start.
    batches: PresenceBatch handed to sessions since start (one per session per flush).
    flushes: workspace flushes with at least one net change.
    """

    subscribers: int
    transitions: int
    batches: int
    flushes: int


class PresenceFeed:
    """Coalesces the workspace's `agent.status.*` events for the sessions that asked.

    `offer` takes each event from the hub (synchronous, never blocks);
    `run` (start with `await nursery.start(feed.run)`) hands the net changes
    to the subscribers of each workspace at most once per `interval_seconds`:
    the first transition after a quiet interval goes out at once, the ones
    that follow within the interval wait for its end.
    """

    def __init__(self, interval_seconds: float) -> None:
        self.interval_seconds = interval_seconds
        self._subscribers: dict[int, set[PresenceSubscriber]] = {}
        # Per workspace: agent name -> (its last status, its last view), this interval.
        self._pending: dict[int, dict[str, tuple[str, FactView]]] = {}
        # Per workspace: the agents last reported not offline, and as what
        # (absent: offline, as every agent is when the daemon starts).
        self._reported: dict[int, dict[str, str]] = {}
        self._wake = trio.Event()
        self._last_flush = -math.inf
        self.transitions = 0
        self.batches = 0
        self.flushes = 0

    def subscribe(self, sub: PresenceSubscriber) -> None:
        """Give `sub` the presence batches of its workspace from the next flush on."""
        self._subscribers.setdefault(sub.workspace_id, set()).add(sub)

    def unsubscribe(self, sub: PresenceSubscriber) -> None:
        """Stop giving `sub` batches (idempotent)."""
        members = self._subscribers.get(sub.workspace_id)
        if members is not None:
            members.discard(sub)
            if not members:
                del self._subscribers[sub.workspace_id]

    def offer(self, view: FactView) -> None:
        """One committed `agent.status.*` event (the hub's presence route)."""
        data = view.data
        agent = data.get("agent") if isinstance(data, dict) else None
        name = agent.get("name") if isinstance(agent, dict) else None
        status = REST_STATUS.get(str(data.get("status"))) if isinstance(data, dict) else None
        if not isinstance(name, str) or status is None:
            log.warning("presence: event %s without an agent name or status", view.type)
            return
        self.transitions += 1
        self._pending.setdefault(view.workspace_id, {})[name] = (status, view)
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await self._wake.wait()
            await trio.sleep_until(max(self._last_flush + self.interval_seconds,
                                       trio.current_time()))
            self._wake = trio.Event()
            self.flush()

    def flush(self) -> None:
        """Hand every workspace's net changes to its subscribers now (synchronous)."""
        self._last_flush = trio.current_time()
        pending, self._pending = self._pending, {}
        for workspace_id, agents in pending.items():
            reported = self._reported.setdefault(workspace_id, {})
            changes: list[tuple[str, str, FactView]] = []
            for name, (status, view) in agents.items():
                if reported.get(name, "offline") == status:
                    continue  # back where it was last reported: nothing to say
                if status == "offline":
                    del reported[name]
                else:
                    reported[name] = status
                changes.append((name, status, view))
            if not reported:
                del self._reported[workspace_id]
            if not changes:
                continue
            self.flushes += 1
            batch = PresenceBatch(workspace_id, changes)
            # Copied: a session may close (and unsubscribe) while it is offered.
            for sub in tuple(self._subscribers.get(workspace_id, ())):
                self.batches += 1
                sub.offer_presence(batch)

    def statistics(self) -> PresenceFeedStatistics:
        """A snapshot of the counts (see `PresenceFeedStatistics`)."""
        return PresenceFeedStatistics(
            subscribers=sum(len(s) for s in self._subscribers.values()),
            transitions=self.transitions, batches=self.batches, flushes=self.flushes)
