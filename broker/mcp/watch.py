"""Following an agent's deliveries on the fanout hub, for the MCP surface: no polling.

An `AgentWatch` is a hub watcher (`FanoutHub.watch`: it sees what the
agent's sessions see and counts as no session, so presence is untouched).
It is shared by everything of the MCP surface that follows that agent: the
`message.inbox.wait` calls in progress (they block on `wait_delivery_after`),
its resource subscriptions (each delivery marks `broker://inbox` and the
message's channel as changed for the notifier) and its sessions (a
deactivation or a token rotation closes them). `Watches` attaches one per
agent while anything holds it and detaches it when the last one lets go.

Everything the hub calls here is synchronous and bounded: it sets events
and adds to a set of changed URIs that the notifier drains.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import trio

from broker.engine.agents import TOKEN_ROTATED
from broker.fanout import FanoutHub
from broker.gateway.views import FactView
from protocol.objects import MESSAGE_EVENTS

INBOX_URI = "broker://inbox"
CHANNEL_URI_PREFIX = "broker://channels/"


def channel_uri(name: str) -> str:
    return f"{CHANNEL_URI_PREFIX}{name}"


class AgentWatch:
    """One agent followed on the hub (see the module docstring).

    last_seq: the highest delivery seq seen since the watch began (0: none).
    agent: the agent's id (`agent_id` as well, typed as the hub's subscribers are).
    """

    agent_id: int | None

    def __init__(self, workspace_id: int, agent_id: int,
                 on_changed: Callable[[AgentWatch, str], None],
                 on_revoked: Callable[[AgentWatch, str], None],
                 on_rotated: Callable[[AgentWatch], None]) -> None:
        self.workspace_id = workspace_id
        self.agent_id = self.agent = agent_id
        self.last_seq = 0
        self.holders = 0
        self._arrived = trio.Event()
        self._on_changed = on_changed
        self._on_revoked = on_revoked
        self._on_rotated = on_rotated

    def __repr__(self) -> str:
        return f"<AgentWatch agent={self.agent}>"

    # -- what the hub calls --------------------------------------------------------------

    def offer_delivery(self, seq: int, view: FactView) -> None:
        self.last_seq = max(self.last_seq, seq)
        self._arrived.set()
        self._arrived = trio.Event()
        self._on_changed(self, INBOX_URI)
        if view.type in MESSAGE_EVENTS:
            name = view.message_object().get("channel_name")
            if isinstance(name, str) and name:
                self._on_changed(self, channel_uri(name))

    def offer_event(self, view: FactView) -> None:
        if view.type == TOKEN_ROTATED:
            self._on_rotated(self)
        elif view.type == "workspace.deleted":
            self._on_revoked(self, "the workspace was deleted")
        elif view.type == "agent.deactivated" and isinstance(view.data, dict) \
                and view.data.get("agent_id") == str(self.agent):
            self._on_revoked(self, "the agent was deactivated")

    def offer_fact(self, view: Any) -> None:
        """Only observers get facts."""

    # -- waiting ---------------------------------------------------------------------------

    async def wait_delivery_after(self, seq: int) -> None:
        """Return once a delivery with a seq above `seq` has been seen (the caller bounds it)."""
        while self.last_seq <= seq:
            await self._arrived.wait()


class Watches:
    """The agents followed now: one `AgentWatch` each, attached to `hub` while held.

    on_changed(watch, uri): a resource of the agent changed.
    on_revoked(watch, reason): the agent's credentials are gone (deactivated,
    workspace deleted). on_rotated(watch): the agent's token was rotated.
    """

    def __init__(self, hub: FanoutHub[Any],
                 on_changed: Callable[[AgentWatch, str], None],
                 on_revoked: Callable[[AgentWatch, str], None],
                 on_rotated: Callable[[AgentWatch], None]) -> None:
        self.hub = hub
        self._watches: dict[int, AgentWatch] = {}
        self._on_changed = on_changed
        self._on_revoked = on_revoked
        self._on_rotated = on_rotated

    def __len__(self) -> int:
        return len(self._watches)

    def get(self, agent_id: int) -> AgentWatch | None:
        return self._watches.get(agent_id)

    def acquire(self, workspace_id: int, agent_id: int) -> AgentWatch:
        """Hold the agent's watch (made and attached on first hold); `release` lets go."""
        watch = self._watches.get(agent_id)
        if watch is None:
            watch = self._watches[agent_id] = AgentWatch(
                workspace_id, agent_id, self._on_changed, self._on_revoked, self._on_rotated)
            self.hub.watch(watch)
        watch.holders += 1
        return watch

    def release(self, watch: AgentWatch) -> None:
        watch.holders -= 1
        if watch.holders <= 0 and self._watches.get(watch.agent) is watch:
            del self._watches[watch.agent]
            self.hub.unwatch(watch)

    @contextmanager
    def holding(self, workspace_id: int, agent_id: int) -> Iterator[AgentWatch]:
        watch = self.acquire(workspace_id, agent_id)
        try:
            yield watch
        finally:
            self.release(watch)
