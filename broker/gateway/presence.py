"""Presence: an agent is active while it holds at least one socket, offline after its last one.

The hub says when an agent's first session attaches and its last one
detaches; this actor turns those edges into `SetAgentStatus` commands,
which emit the ephemeral `agent.status.*` events. Transitions are handed
over without waiting and applied by one task, in order, coalesced per
agent (a connect and disconnect in quick succession commit only the final
state), so a flapping client cannot flood the writer.

Every coalesced transition is committed, even when it names the status
this actor committed last: the database is not this actor's alone (a REST
`agent.disconnect` or heartbeat sets the status too, and the daemon resets
everyone to offline when it starts), so a cache of "what was reported"
would drift from it and skip the command that puts it right.
`SetAgentStatus` emits its event only when the status really changes, so
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
import time
from typing import Any

import msgspec
import trio

from broker.engine.agents import ExpirePresence, SetAgentStatus, stale_presence
from broker.engine.engine import Engine
from broker.engine.errors import BrokerError
from broker.fanout import FanoutHub

log = logging.getLogger(__name__)

# The statuses SetAgentStatus takes for "has a socket" and "has none".
ACTIVE = "online"
OFFLINE = "offline"
# Passes of the heartbeat timeout are at least this fraction of the timeout
# apart: an agent goes offline between 1 and 1.1 timeouts after its last
# heartbeat, and the read runs at most ten times per timeout.
EXPIRY_SPACING = 0.1
# Agents set offline per ExpirePresence command, so a crowd that timed out
# together (the network dropped) does not make one long transaction.
EXPIRY_BATCH = 500


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
        self.commands = 0
        self.failures = 0
        self.expired = 0  # agents set offline by the heartbeat timeout

    def report(self, workspace_id: int, agent_id: int, status: str) -> None:
        """The agent's status is now `status` (committed soon, by the actor)."""
        self._wanted[agent_id] = (workspace_id, status)
        self._wake.set()

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
        """Commit every pending transition."""
        while self._wanted:
            wanted, self._wanted = self._wanted, {}
            async with trio.open_nursery() as nursery:
                for agent_id, (workspace_id, status) in wanted.items():
                    nursery.start_soon(self._commit, workspace_id, agent_id, status)

    async def _commit(self, workspace_id: int, agent_id: int, status: str) -> None:
        self.commands += 1
        try:
            await self.engine.submit(SetAgentStatus(
                workspace_id=workspace_id, agent_id=agent_id, status=status))
        except BrokerError as exc:
            self.failures += 1
            log.info("presence: agent %d -> %s refused: %s", agent_id, status, exc)
            return
        except Exception as exc:
            self.failures += 1
            log.exception("presence: agent %d -> %s failed: %r", agent_id, status, exc)
