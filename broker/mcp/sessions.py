"""Who holds what on `/mcp`: callers, their sessions, their requests in flight.

The SDK's session manager owns the sessions' transports; this registry
keeps what the broker must know about them and the SDK does not: which
agent and which token opened each one (to cap sessions per agent and to
close them when that token stops working), and the cancel scope of every
request in flight (a `message.inbox.wait`, a GET stream, a 2026
`subscriptions/listen` stream), so a deactivation or the end of a rotated
token's grace ends those at once instead of at their own timeout.

A session is closed through the SDK's public door, the ASGI app: a
DELETE with the session's id and its owner, as the client itself would
send (`close`). The SDK's idle timeout ends a session without telling
anyone, so each entry here carries the same idle deadline and is dropped
(and closed, a no-op by then) when it passes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import trio
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from starlette.types import Message, Receive, Scope, Send

from broker.engine.workspaces import Principal

log = logging.getLogger(__name__)

SESSION_HEADER = "mcp-session-id"


@dataclass(eq=False)
class Caller:
    """Who calls /mcp: the principal, the digest of the token presented, the SDK's user."""

    principal: Principal
    credential: bytes
    user: AuthenticatedUser

    @property
    def is_agent(self) -> bool:
        return self.principal.agent_id is not None

    @property
    def owner(self) -> tuple[int, int | None]:
        return self.principal.workspace_id, self.principal.agent_id


@dataclass(eq=False)
class SessionEntry:
    session_id: str
    caller: Caller
    in_flight: int = 0
    # Moved to +inf while a request is in flight, to now + idle when the last ends.
    idle: trio.CancelScope = field(default_factory=trio.CancelScope)


class McpSessions:
    """The registry (see the module docstring). `run` ends idle entries; start it first.

    app: the SDK's ASGI app, for the DELETE that closes a session.
    on_opened / on_closed: told when a session is registered and dropped.
    """

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]],
                 idle_timeout: float,
                 on_opened: Callable[[SessionEntry], None] = lambda entry: None,
                 on_closed: Callable[[SessionEntry], None] = lambda entry: None) -> None:
        self._app = app
        self.idle_timeout = idle_timeout
        self.sessions: dict[str, SessionEntry] = {}
        self._requests: dict[tuple[int, int | None], set[tuple[Caller, trio.CancelScope]]] = {}
        self._on_opened = on_opened
        self._on_closed = on_closed
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def count_of(self, owner: tuple[int, int | None]) -> int:
        return sum(1 for entry in self.sessions.values() if entry.caller.owner == owner)

    def of_agent(self, agent_id: int) -> list[SessionEntry]:
        return [e for e in self.sessions.values() if e.caller.principal.agent_id == agent_id]

    def credentials_of(self, agent_id: int) -> set[bytes]:
        """The token digests that the agent's sessions and requests in flight were opened with."""
        found = {e.caller.credential for e in self.of_agent(agent_id)}
        for (_, agent), requests in self._requests.items():
            if agent == agent_id:
                found.update(caller.credential for caller, _ in requests)
        return found

    def opened(self, session_id: str, caller: Caller) -> None:
        """A session was opened by `caller` (its id came back on the response)."""
        if session_id in self.sessions or self._nursery is None:
            return
        entry = self.sessions[session_id] = SessionEntry(session_id, caller)
        self._nursery.start_soon(self._expire, entry)
        self._on_opened(entry)

    @contextmanager
    def request(self, caller: Caller, session_id: str | None) -> Iterator[trio.CancelScope]:
        """Run a request of `caller` (of session `session_id`, if any) under a scope that
        `close_agent` can cancel; it holds the session's idle deadline off meanwhile."""
        entry = self.sessions.get(session_id) if session_id else None
        if entry is not None:
            entry.in_flight += 1
            entry.idle.deadline = math.inf
        item = (caller, trio.CancelScope())
        requests = self._requests.setdefault(caller.owner, set())
        requests.add(item)
        try:
            with item[1]:
                yield item[1]
        finally:
            requests.discard(item)
            if not requests:
                self._requests.pop(caller.owner, None)
            if entry is not None:
                entry.in_flight -= 1
                if entry.in_flight == 0:
                    entry.idle.deadline = trio.current_time() + self.idle_timeout

    async def _expire(self, entry: SessionEntry) -> None:
        entry.idle.deadline = trio.current_time() + self.idle_timeout
        with entry.idle:
            await trio.sleep_forever()
        await self.close(entry.session_id)

    def forget(self, session_id: str, caller: Caller) -> None:
        """`caller` ended the session itself (a DELETE the SDK accepted); a no-op unless
        `caller` opened it with the same token (the SDK ties a session to both)."""
        entry = self.sessions.get(session_id)
        if entry is None or entry.caller.owner != caller.owner \
                or entry.caller.credential != caller.credential:
            return
        del self.sessions[session_id]
        entry.idle.cancel()
        self._on_closed(entry)

    async def close(self, session_id: str) -> None:
        """Close the session (its streams end; its id answers 404 from now on)."""
        entry = self.sessions.pop(session_id, None)
        if entry is None:
            return
        entry.idle.cancel()
        self._on_closed(entry)
        await self._app(_delete_scope(session_id, entry.caller), _empty_body, _discard)
        log.info("mcp session %s of agent %s closed", session_id[:8],
                 entry.caller.principal.agent_id)

    async def close_agent(self, agent_id: int, credential: bytes | None = None,
                          reason: str = "") -> int:
        """Close the agent's sessions and end its requests in flight (only those opened
        with `credential`, if given). Returns how many sessions were closed."""
        closed = 0
        for entry in self.of_agent(agent_id):
            if credential is None or entry.caller.credential == credential:
                await self.close(entry.session_id)
                closed += 1
        for (_, agent), requests in list(self._requests.items()):
            if agent != agent_id:
                continue
            for caller, scope in list(requests):
                if credential is None or caller.credential == credential:
                    scope.cancel()
        if closed:
            log.info("mcp: closed %d sessions of agent %s: %s", closed, agent_id, reason)
        return closed


def _delete_scope(session_id: str, caller: Caller) -> Scope:
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
        "method": "DELETE", "scheme": "http", "path": "/mcp", "raw_path": b"/mcp",
        "query_string": b"", "root_path": "",
        "headers": [(SESSION_HEADER.encode(), session_id.encode())],
        "client": None, "server": None, "user": caller.user,
    }


async def _empty_body() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _discard(message: Message) -> None:
    pass
