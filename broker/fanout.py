"""The fanout hub: committed facts routed to live sessions, without ever awaiting a socket.

The writer publishes each committed batch of facts on `engine.facts`; the
hub's one task takes them in commit order and, for each fact, hands it to
every session that must see it: the sessions of each agent that got a
durable delivery (with that delivery's seq), and, for an ephemeral event,
the sessions of its audience or of the whole workspace. Workspace
observers see every fact of their workspace. Presence events
(`agent.status.*` for the whole workspace) go to the owner's `presence`
route instead, when it gives one: one frame per connect to every session
of a workspace is O(N^2) frames when N agents connect, so the gateway
coalesces them (`broker.gateway.presence.PresenceFeed`).

Handing over is a synchronous, bounded operation (a session's
`offer_*` puts it in its frame queue, `broker.gateway.frame_queue`), so a
slow socket can only ever fill its own queue; the hub, the writer behind
it and every other session keep going (DESIGN invariant 7).

Each fact is wrapped once (`wrap`, given by the owner: the gateway's
`FactView.of`, `broker.gateway.views`) and the one view is shared by all
its recipients. The hub knows nothing of what a view holds, so it
depends on the engine's facts only and the gateway depends on it, not
the other way round.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any, Generic, Protocol, TypeVar, overload

import msgspec
import trio

from broker.engine.facts import Fact

log = logging.getLogger(__name__)

# The ephemeral events of presence, which the `presence` route takes when given.
PRESENCE_PREFIX = "agent.status."

View = TypeVar("View")
ViewIn = TypeVar("ViewIn", contravariant=True)


class Subscriber(Protocol[ViewIn]):
    """A live session as the hub sees it; `view` is what the hub's `wrap` made of a fact.

    agent_id is None for a workspace observer, which sees every fact of the
    workspace through `offer_fact`.
    """

    workspace_id: int
    agent_id: int | None

    def offer_delivery(self, seq: int, view: ViewIn) -> None: ...

    def offer_event(self, view: ViewIn) -> None: ...

    def offer_fact(self, view: ViewIn) -> None: ...


class HubStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of the hub (`FanoutHub.statistics()`).

    sessions: agent sessions attached (native and node; observers apart).
    agents_online: agents with at least one session attached.
    observers: workspace observers attached.
    batches, facts: committed batches and facts routed since start.
    deliveries_routed: durable deliveries offered to sessions (one per session).
    events_routed: ephemeral events offered to sessions (one per session).
    presence_routed: presence events handed to the presence route (one per event).
    """

    sessions: int
    agents_online: int
    observers: int
    batches: int
    facts: int
    deliveries_routed: int
    events_routed: int
    presence_routed: int


class FanoutHub(Generic[View]):
    """Routes committed facts to subscribers; `run` consumes `engine.facts`.

    wrap: makes the one view of a fact that all its subscribers get
    (none: they get the `Fact` itself).
    presence: takes the view of every workspace-wide presence event
    (`agent.status.*`) in place of the workspace's sessions (observers
    still get it); none: the sessions get it like any other event.

    `attach` / `detach` return True when they change whether the agent has
    any session at all (first connect, last disconnect), for presence.
    """

    @overload
    def __init__(self: FanoutHub[Fact], *,
                 presence: Callable[[Fact], object] | None = None) -> None: ...

    @overload
    def __init__(self, wrap: Callable[[Fact], View], *,
                 presence: Callable[[View], object] | None = None) -> None: ...

    def __init__(self, wrap: Callable[[Fact], Any] | None = None, *,
                 presence: Callable[[Any], object] | None = None) -> None:
        self._wrap: Callable[[Fact], Any] = wrap if wrap is not None else _as_is
        self._presence = presence
        self._by_agent: dict[int, set[Subscriber[View]]] = {}
        self._by_workspace: dict[int, set[Subscriber[View]]] = {}
        self._observers: dict[int, set[Subscriber[View]]] = {}
        # Watchers (`watch`): see what their agent's sessions see, count as none.
        self._watchers_by_agent: dict[int, set[Subscriber[View]]] = {}
        self._watchers_by_workspace: dict[int, set[Subscriber[View]]] = {}
        self.batches = 0
        self.facts = 0
        self.deliveries_routed = 0
        self.events_routed = 0
        self.presence_routed = 0

    def attach(self, sub: Subscriber[View]) -> bool:
        """Start routing to `sub`; True if it is its agent's first session."""
        if sub.agent_id is None:
            self._observers.setdefault(sub.workspace_id, set()).add(sub)
            return False
        self._by_workspace.setdefault(sub.workspace_id, set()).add(sub)
        sessions = self._by_agent.setdefault(sub.agent_id, set())
        sessions.add(sub)
        return len(sessions) == 1

    def detach(self, sub: Subscriber[View]) -> bool:
        """Stop routing to `sub` (idempotent); True if it was its agent's last session."""
        if sub.agent_id is None:
            _discard(self._observers, sub.workspace_id, sub)
            return False
        _discard(self._by_workspace, sub.workspace_id, sub)
        sessions = self._by_agent.get(sub.agent_id)
        if sessions is None or sub not in sessions:
            return False
        sessions.discard(sub)
        if sessions:
            return False
        del self._by_agent[sub.agent_id]
        return True

    def watch(self, sub: Subscriber[View]) -> None:
        """Route an agent's deliveries and events to `sub` without counting it as a session.

        For listeners that are not connections (the MCP surface's waits and
        resource subscriptions): they never make their agent online or keep
        it so, and `sessions_of` does not list them. `sub.agent_id` is required.
        """
        if sub.agent_id is None:
            raise ValueError("a watcher follows one agent")
        self._watchers_by_workspace.setdefault(sub.workspace_id, set()).add(sub)
        self._watchers_by_agent.setdefault(sub.agent_id, set()).add(sub)

    def unwatch(self, sub: Subscriber[View]) -> None:
        """Stop routing to the watcher `sub` (idempotent)."""
        _discard(self._watchers_by_workspace, sub.workspace_id, sub)
        if sub.agent_id is not None:
            _discard(self._watchers_by_agent, sub.agent_id, sub)

    def sessions_of(self, agent_id: int) -> frozenset[Subscriber[View]]:
        """The subscribers of `agent_id` attached now."""
        return frozenset(self._by_agent.get(agent_id, ()))

    async def run(
        self, facts: trio.MemoryReceiveChannel[list[Fact]],
        *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Route every batch until the engine closes the channel."""
        async with facts:
            task_status.started()
            async for batch in facts:
                self.publish(batch)

    def publish(self, batch: Iterable[Fact]) -> None:
        """Route one committed batch, in order (synchronous: nothing here awaits)."""
        self.batches += 1
        # A subscriber may detach while it is offered something (a session
        # closes when its credential is revoked), so each set is copied first.
        for fact in batch:
            self.facts += 1
            view = self._wrap(fact)
            if not fact.internal:
                for sub in tuple(self._observers.get(fact.workspace_id, ())):
                    sub.offer_fact(view)
            if fact.deliveries:
                for delivery in fact.deliveries:
                    for sub in tuple(self._by_agent.get(delivery.agent_id, ())):
                        self.deliveries_routed += 1
                        sub.offer_delivery(delivery.seq, view)
                    if self._watchers_by_agent:
                        for sub in tuple(self._watchers_by_agent.get(delivery.agent_id, ())):
                            sub.offer_delivery(delivery.seq, view)
            elif fact.audience is not None:
                for agent_id in fact.audience:
                    for sub in tuple(self._by_agent.get(agent_id, ())):
                        if sub.workspace_id == fact.workspace_id:
                            self.events_routed += 1
                            sub.offer_event(view)
                    for sub in tuple(self._watchers_by_agent.get(agent_id, ())):
                        if sub.workspace_id == fact.workspace_id:
                            sub.offer_event(view)
            elif not fact.log_id:
                # Watchers follow workspace events (a deactivation), not presence.
                if not fact.type.startswith(PRESENCE_PREFIX):
                    for sub in tuple(self._watchers_by_workspace.get(fact.workspace_id, ())):
                        sub.offer_event(view)
                if self._presence is not None and fact.type.startswith(PRESENCE_PREFIX):
                    self.presence_routed += 1
                    self._presence(view)
                    continue
                for sub in tuple(self._by_workspace.get(fact.workspace_id, ())):
                    self.events_routed += 1
                    sub.offer_event(view)

    def statistics(self) -> HubStatistics:
        """A snapshot of the counts (see `HubStatistics`)."""
        return HubStatistics(
            sessions=sum(len(s) for s in self._by_workspace.values()),
            agents_online=len(self._by_agent),
            observers=sum(len(s) for s in self._observers.values()),
            batches=self.batches, facts=self.facts,
            deliveries_routed=self.deliveries_routed, events_routed=self.events_routed,
            presence_routed=self.presence_routed,
        )


def _as_is(fact: Fact) -> Fact:
    return fact


def _discard(index: dict[int, set[Any]], key: int, sub: Any) -> None:
    members = index.get(key)
    if members is not None:
        members.discard(sub)
        if not members:
            del index[key]
