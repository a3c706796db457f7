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
"""

from __future__ import annotations

import logging

import trio

from broker.engine.agents import SetAgentStatus
from broker.engine.engine import Engine
from broker.engine.errors import BrokerError

log = logging.getLogger(__name__)

# The statuses SetAgentStatus takes for "has a socket" and "has none".
ACTIVE = "online"
OFFLINE = "offline"


class PresenceReporter:
    """Start with `await nursery.start(presence.run)`; it runs until cancelled."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._wanted: dict[int, tuple[int, str]] = {}
        self._wake = trio.Event()
        self.commands = 0
        self.failures = 0

    def report(self, workspace_id: int, agent_id: int, status: str) -> None:
        """The agent's status is now `status` (committed soon, by the actor)."""
        self._wanted[agent_id] = (workspace_id, status)
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            await self.flush()

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
