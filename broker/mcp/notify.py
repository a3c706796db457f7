"""Resource subscriptions and the `notifications/resources/updated` they get, in both revisions.

A 2025 client subscribes with `resources/subscribe` inside its session:
the subscription keeps that session's SDK object and the notifier calls
its `send_resource_updated(uri)`. A 2026 client opens a
`subscriptions/listen` stream instead: each agent has its own bus and
listen handler (the SDK's), so a URI such as `broker://inbox` names the
caller's own inbox and no agent can listen to another's.

Either way an agent's subscriptions hold its hub watch (broker.mcp.watch);
a delivery marks URIs as changed (`changed`, synchronous, coalesced in a
set) and the notifier task sends one notification per changed URI to each
subscriber, each send bounded by a timeout, so a session that does not
read can only lose its own notifications. A session whose send fails is
dropped (the SDK has no disconnect hook: a failed send is how one learns).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import trio
from mcp.server.session import ServerSession
from mcp.server.subscriptions import InMemorySubscriptionBus, ListenHandler, ResourceUpdated

from broker.mcp.watch import AgentWatch, Watches

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Subscriber:
    """One 2025 session's subscriptions."""

    session: ServerSession
    watch: AgentWatch
    uris: set[str] = field(default_factory=set)


@dataclass(eq=False)
class _Listeners:
    """One agent's 2026 listen streams."""

    bus: InMemorySubscriptionBus
    handler: ListenHandler
    watch: AgentWatch
    streams: int = 0


class ResourceNotifier:
    """Subscriptions by agent, and the task that sends their notifications (`run`)."""

    def __init__(self, watches: Watches, notify_timeout: float) -> None:
        self.watches = watches
        self.notify_timeout = notify_timeout
        # session id -> its subscriptions (2025), and the session ids by agent
        self._sessions: dict[str, _Subscriber] = {}
        self._sessions_of: dict[int, set[str]] = {}
        # agent id -> its listen streams (2026)
        self._listeners: dict[int, _Listeners] = {}
        self._changed: dict[int, set[str]] = {}
        self._wake = trio.Event()
        self.sent = 0
        self.dropped = 0

    # -- 2025: resources/subscribe ---------------------------------------------------------

    def subscribe(self, session_id: str, session: ServerSession, workspace_id: int,
                  agent_id: int, uri: str) -> None:
        sub = self._sessions.get(session_id)
        if sub is None:
            watch = self.watches.acquire(workspace_id, agent_id)
            sub = self._sessions[session_id] = _Subscriber(session, watch)
            self._sessions_of.setdefault(agent_id, set()).add(session_id)
        sub.uris.add(uri)

    def unsubscribe(self, session_id: str, uri: str) -> None:
        sub = self._sessions.get(session_id)
        if sub is not None:
            sub.uris.discard(uri)
            if not sub.uris:
                self.drop_session(session_id)

    def drop_session(self, session_id: str) -> None:
        sub = self._sessions.pop(session_id, None)
        if sub is not None:
            ids = self._sessions_of.get(sub.watch.agent, set())
            ids.discard(session_id)
            if not ids:
                self._sessions_of.pop(sub.watch.agent, None)
            self.watches.release(sub.watch)

    # -- 2026: subscriptions/listen --------------------------------------------------------

    async def listen(self, workspace_id: int, agent_id: int, ctx: Any, params: Any) -> Any:
        """Serve one listen stream of the agent (until the client closes it)."""
        listeners = self._listeners.get(agent_id)
        if listeners is None:
            bus = InMemorySubscriptionBus()
            listeners = self._listeners[agent_id] = _Listeners(
                bus, ListenHandler(bus), self.watches.acquire(workspace_id, agent_id))
        listeners.streams += 1
        try:
            return await listeners.handler(ctx, params)
        finally:
            listeners.streams -= 1
            if listeners.streams == 0 and self._listeners.get(agent_id) is listeners:
                del self._listeners[agent_id]
                self.watches.release(listeners.watch)

    # -- what the hub's watch calls --------------------------------------------------------

    @property
    def subscribed_sessions(self) -> int:
        return len(self._sessions)

    @property
    def listening_agents(self) -> int:
        return len(self._listeners)

    def changed(self, watch: AgentWatch, uri: str) -> None:
        """A resource of the watched agent changed (synchronous, coalesced)."""
        if watch.agent not in self._sessions_of and watch.agent not in self._listeners:
            return
        self._changed.setdefault(watch.agent, set()).add(uri)
        self._wake.set()

    # -- the notifier --------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            changed, self._changed = self._changed, {}
            for agent_id, uris in changed.items():
                await self._notify(agent_id, uris)

    async def _notify(self, agent_id: int, uris: set[str]) -> None:
        listeners = self._listeners.get(agent_id)
        if listeners is not None:
            for uri in sorted(uris):
                await listeners.bus.publish(ResourceUpdated(uri=uri))
                self.sent += 1
        for session_id in sorted(self._sessions_of.get(agent_id, ())):
            sub = self._sessions.get(session_id)
            if sub is None:
                continue
            for uri in sorted(uris & sub.uris):
                with trio.move_on_after(self.notify_timeout) as scope:
                    try:
                        await sub.session.send_resource_updated(uri)
                        self.sent += 1
                    except Exception as exc:
                        # The session is gone (the SDK tells no one): forget it.
                        log.info("mcp session %s: dropped from subscriptions (%r)",
                                 session_id[:8], exc)
                        self.drop_session(session_id)
                        break
                if scope.cancelled_caught:
                    self.dropped += 1
