"""The MCP surface: the operation table as MCP tools on `/mcp`, a third binding beside REST and
WebSocket (docs/mcp.md is its contract).

One job per module:

- `tools`: the tool table made from the operation table (names, schemas, aliases);
- `render`: a result as structured content and as short text, the unread notice;
- `server`: the SDK's low-level `Server` and its handlers (tools, resources, the prompt);
- `watch`: an agent followed on the fanout hub (waits, resource changes, revocations);
- `notify`: resource subscriptions of both protocol revisions and their notifications;
- `sessions`: who holds which session and request, and closing them;
- `endpoint`: the ASGI endpoint (the token check, then the SDK's session manager);
- `forward`: a gateway that does not serve MCP hands its `/mcp` requests to the one that does;
- `bridge`, `editors`: `broker mcp` (stdio to /mcp) and editor configuration snippets.

`McpSurface` puts them together: the server mounts `surface.routes()` and
runs `surface.run` as a service beside the gateway (it needs the gateway's
fanout hub).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import msgspec
import trio
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from starlette.routing import BaseRoute, Route

from broker.engine.engine import Engine
from broker.engine.errors import BrokerError
from broker.fanout import FanoutHub
from broker.gateway.native import token_expiry
from broker.mcp.endpoint import McpService, TokenCheck
from broker.mcp.notify import ResourceNotifier
from broker.mcp.server import McpHandlers, ToolCallObserver
from broker.mcp.sessions import McpSessions, SessionEntry
from broker.mcp.settings import McpSettings
from broker.mcp.watch import AgentWatch, Watches
from broker.ratelimit import RateLimiter

__all__ = ["McpSettings", "McpStatistics", "McpSurface"]

log = logging.getLogger(__name__)

MCP_PATH = "/mcp"


class McpStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of the MCP surface (`McpSurface.statistics()`).

    sessions: stateful (2025) sessions open in this process.
    watched_agents: agents followed on the hub (by waits, subscriptions, sessions).
    subscribed_sessions: sessions with resource subscriptions; listening_agents:
    agents with a 2026 listen stream open.
    notifications_sent / notifications_dropped: resource notifications since start
    (dropped: a session did not take one within the notify timeout).
    """

    sessions: int
    watched_agents: int
    subscribed_sessions: int
    listening_agents: int
    notifications_sent: int
    notifications_dropped: int


class McpSurface:
    """Start with `await nursery.start(surface.run)`; mount `surface.routes()`."""

    def __init__(self, engine: Engine, hub: FanoutHub[Any], settings: McpSettings,
                 limiter: RateLimiter, public_url: str | None = None,
                 on_tool_call: ToolCallObserver | None = None, *,
                 max_body_bytes: int) -> None:
        """public_url: the base of the absolute URLs tools hand out (`http.public_url`;
        None: the request's own). on_tool_call(tool, outcome, seconds): told of every
        tool call (`ok` or its error code). max_body_bytes: the largest request body
        taken (`http.max_body_bytes`, as for REST)."""
        self.engine = engine
        self.settings = settings
        self.check = TokenCheck(engine, limiter)
        self.watches = Watches(hub, on_changed=self._changed, on_revoked=self._revoked,
                               on_rotated=self._rotated)
        self.notifier = ResourceNotifier(self.watches, settings.notify_timeout_seconds)
        self.server = McpHandlers(engine, self.watches, self.notifier, limiter,
                                  public_url, on_tool_call).build()
        # The SDK's own bound on a body, kept equal to ours (broker.mcp.endpoint applies it
        # first): a limit set above the SDK's default must not meet a second, smaller one.
        self.manager = StreamableHTTPSessionManager(
            app=self.server, stateless=False,
            session_idle_timeout=settings.session_idle_timeout_seconds,
            max_sessions=settings.max_sessions, max_request_body_size=max_body_bytes)
        self.sessions = McpSessions(self.manager.handle_request,
                                    settings.session_idle_timeout_seconds,
                                    on_opened=self._opened, on_closed=self._closed)
        self.service = McpService(self.check, self.manager, self.sessions,
                                  settings.max_sessions_per_agent, max_body_bytes)
        self._session_watches: dict[str, AgentWatch] = {}
        self._nursery: trio.Nursery | None = None

    def routes(self) -> list[BaseRoute]:
        # A Route, not a Mount: a Mount answers /mcp with a redirect to /mcp/. No methods:
        # the SDK answers those it does not serve (405), and the OpenAPI document, which
        # describes the REST API, leaves this endpoint to docs/mcp.md.
        return [Route(MCP_PATH, self.service, name="mcp")]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the session manager, the registry and the notifier until cancelled."""
        async with self.manager.run(), trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.sessions.run)
            await nursery.start(self.notifier.run)
            task_status.started()

    def statistics(self) -> McpStatistics:
        return McpStatistics(
            sessions=len(self.sessions.sessions), watched_agents=len(self.watches),
            subscribed_sessions=self.notifier.subscribed_sessions,
            listening_agents=self.notifier.listening_agents,
            notifications_sent=self.notifier.sent, notifications_dropped=self.notifier.dropped)

    # -- sessions hold their agent's watch, to hear of revocations ---------------------------

    def _opened(self, entry: SessionEntry) -> None:
        agent_id = entry.caller.principal.agent_id
        if agent_id is not None:
            self._session_watches[entry.session_id] = self.watches.acquire(
                entry.caller.principal.workspace_id, agent_id)

    def _closed(self, entry: SessionEntry) -> None:
        self.notifier.drop_session(entry.session_id)
        watch = self._session_watches.pop(entry.session_id, None)
        if watch is not None:
            self.watches.release(watch)

    # -- what the hub's watches report ---------------------------------------------------------

    def _changed(self, watch: AgentWatch, uri: str) -> None:
        self.notifier.changed(watch, uri)

    def _revoked(self, watch: AgentWatch, reason: str) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(self.sessions.close_agent, watch.agent, None, reason)

    def _rotated(self, watch: AgentWatch) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(self._expire_rotated, watch.workspace_id, watch.agent)

    async def _expire_rotated(self, workspace_id: int, agent_id: int) -> None:
        """Close what the agent's old token opened when its grace ends (the new token's stay)."""
        for credential in self.sessions.credentials_of(agent_id):
            try:
                expires = await self.engine.read(token_expiry, workspace_id, agent_id, credential)
            except BrokerError:
                expires = 0
            if expires is None:
                continue
            assert self._nursery is not None
            self._nursery.start_soon(self._close_at, agent_id, credential, expires)

    async def _close_at(self, agent_id: int, credential: bytes, expires_ms: int) -> None:
        await trio.sleep(max(0.0, expires_ms / 1000 - time.time()))
        await self.sessions.close_agent(agent_id, credential, "its token was rotated out")
