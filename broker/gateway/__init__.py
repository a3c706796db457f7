"""The WebSocket gateway: `/v1/ws` (native agent sessions and Relaycast observers),
`/v1/node/ws` (Relaycast node sockets) and `POST /v1/agent/node-token`.

`Gateway` owns what every session shares: the fanout hub fed by the
engine's committed facts, the recorder that turns acks and pushes into few
writer commands, the presence reporter, and the codecs (built once from
the operation table). The HTTP server mounts `gateway.routes()` and runs
`gateway.run` as a service beside it.

The token decides the role of a socket at the handshake: an agent token on
`/v1/ws` opens a native session (`broker.gateway.native`), a workspace key
opens an observer (`broker.gateway.observer`), a node token on
`/v1/node/ws` opens a node socket (`broker.gateway.node`). A missing or
refused token gets HTTP 401 with the REST error body, before any upgrade.
An agent's socket answers the requests of the operations an agent token may
call, an observer's those of the workspace key (docs/protocol.md).

Caps and limits (`broker.ratelimit`, docs/operations.md): a socket past
`max_sessions_per_agent` (native and node sockets of one agent) is accepted
and closed with 4429, past `max_sessions` (every kind) with 1013; an address
blocked for refused tokens gets 4429 whatever its token; each request frame
of a native session counts against its workspace's and agent's limits.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import trio
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.types import Receive, Scope, Send

from broker.auth import authorize, bearer_token, resolve_token
from broker.engine import secrets
from broker.engine.engine import Engine
from broker.engine.errors import BrokerError
from broker.engine.node_tokens import IssueNodeToken, NodeIdentity, agent_by_node_token
from broker.engine.workspaces import Principal
from broker.fanout import FanoutHub, HubStatistics
from broker.gateway.native import AgentSession
from broker.gateway.node import NodeSession
from broker.gateway.observer import ObserverSession
from broker.gateway.presence import (
    ACTIVE,
    OFFLINE,
    PresenceFeed,
    PresenceFeedStatistics,
    PresenceReporter,
)
from broker.gateway.recorder import DeliveryRecorder, RecorderStatistics
from broker.gateway.session import MAX_REASON_BYTES, Session, SessionStatistics
from broker.gateway.settings import GatewaySettings
from broker.gateway.views import FactView
from broker.gateway.websocket import AsgiWebSocket, ConnectionClosed
from broker.http.errors import encode_error, encode_success, status_for
from broker.operations import OPERATIONS
from broker.operations.registry import Operation
from broker.ratelimit import UNLIMITED, RateLimited, RateLimiter, client_address
from protocol import frames as fr
from protocol.codec import MSGPACK_SUBPROTOCOL, CloseCode, Codec, negotiate

__all__ = ["Gateway", "GatewaySettings"]

log = logging.getLogger(__name__)

# Request types answered by the session itself, never by an operation of that name.
SESSION_FRAME_TYPES = frozenset({"delivery.ack", "ping", "pong"})
# Operations a socket may call: those an agent token may call.
SOCKET_AUTH = frozenset({"agent", "any"})
# An observer's requests: every operation that takes a token, so that one an
# agent token needs is answered `forbidden` (Session.answer), not ignored as
# an unknown type; the workspace key's run.
OBSERVER_AUTH = frozenset({"agent", "workspace", "any"})
# Values of `/v1/ws?batch=`: absent or "0", one `deliver` frame per delivery;
# "1", `deliver.batch` frames (docs/protocol.md). Anything else is refused.
BATCH_VALUES = frozenset({None, "0", "1"})
# Values of `/v1/ws?presence=`: absent or "0", no presence events; "1", the
# coalesced `presence` events (docs/protocol.md). Anything else is refused.
PRESENCE_VALUES = frozenset({None, "0", "1"})


class GatewayStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of the gateway (`Gateway.statistics()`).

    hub: the fanout hub's (see `HubStatistics`).
    recorder: the delivery recorder's (see `RecorderStatistics`).
    sessions: sessions open now (every kind).
    slow_closes: sessions closed with 4008 (slow client) since start.
    presence_commands: presence commands submitted since start.
    presence: the presence feed's (see `PresenceFeedStatistics`).
    """

    hub: HubStatistics
    recorder: RecorderStatistics
    sessions: int
    slow_closes: int
    presence_commands: int
    presence: PresenceFeedStatistics


class _Endpoint:
    """A raw ASGI endpoint (starlette wraps plain functions and methods otherwise)."""

    def __init__(self, serve: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.serve = serve

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.serve(scope, receive, send)


class Gateway:
    """Start its services with `await nursery.start(gateway.run)`; mount `gateway.routes()`."""

    def __init__(
        self, engine: Engine, settings: GatewaySettings | None = None,
        on_sessions: Callable[[int], object] | None = None,
        on_request: Callable[[str, float], object] | None = None,
        limiter: RateLimiter | None = None, public_url: str | None = None,
    ) -> None:
        """on_sessions: told the number of open sessions whenever it changes (a gauge);
        on_request: told each socket request's operation and seconds (a histogram);
        limiter: the rate limits, shared with the REST app (None: no limits);
        public_url: the base of the absolute URLs that replies hand out (`http.public_url`;
        None: root-relative URLs)."""
        self.engine = engine
        self.public_url = public_url
        self.settings = settings or GatewaySettings()
        # The limiter also counts this gateway's sockets against the caps
        # (`_admit`), which are the daemon's: over every gateway process.
        self.limiter = limiter or RateLimiter(UNLIMITED)
        self._on_sessions = on_sessions
        self.on_request = on_request
        self.presence_feed = PresenceFeed(self.settings.presence_interval_seconds)
        self.hub = FanoutHub(FactView.of, presence=self.presence_feed.offer)
        self.recorder = DeliveryRecorder(engine)
        self.presence = PresenceReporter(
            engine, self.hub, heartbeat_timeout_seconds=self.settings.heartbeat_timeout_seconds)
        self.sessions: set[Session] = set()
        self.slow_closes = 0
        # Request frame type -> its operation, for both kinds of socket (each
        # kind's frames are classes of their own).
        self.request_operations: dict[type, Operation[Any]] = {}
        native = (*fr.NATIVE_CONTROL_FRAMES, *self._request_frames(SOCKET_AUTH))
        observer = (*fr.OBSERVER_INBOUND_FRAMES, *self._request_frames(OBSERVER_AUTH))
        limit = self.settings.max_frame_bytes
        self.native_json = Codec(native, max_frame_bytes=limit)
        self.native_msgpack = Codec(native, msgpack=True, max_frame_bytes=limit)
        self.node_codec = Codec(fr.NODE_INBOUND_FRAMES, max_frame_bytes=limit)
        self.observer_codec = Codec(observer, max_frame_bytes=limit, version=None)

    def _request_frames(self, auth: frozenset[str]) -> list[type[msgspec.Struct]]:
        """A request frame for each operation of `auth`, each kept in `request_operations`."""
        frames: list[type[msgspec.Struct]] = []
        for name, op in sorted(OPERATIONS.items()):
            if op.auth not in auth or name in SESSION_FRAME_TYPES:
                continue
            try:
                frame = fr.request_frame(name, op.input)
            except ValueError as exc:
                # An agent's operation missing on its socket is a bug; one only the
                # key calls may stay REST-only (agent.register: its `type` field is
                # the frame's tag).
                if op.auth in SOCKET_AUTH:
                    log.error("gateway: operation %s is not available on sockets: %s", name, exc)
                continue
            frames.append(frame)
            self.request_operations[frame] = op
        return frames

    @property
    def request_types(self) -> frozenset[str]:
        """The request types a native session answers besides its own frames."""
        return frozenset(op.name for op in self.request_operations.values()
                         if op.auth in SOCKET_AUTH)

    # -- sessions ------------------------------------------------------------------------

    def attach(self, session: Session) -> None:
        self.sessions.add(session)
        if session.wants_presence:
            self.presence_feed.subscribe(session)
        if self.hub.attach(session) and session.agent_id is not None:
            self.presence.report(session.workspace_id, session.agent_id, ACTIVE)
        self._sessions_changed()

    def detach(self, session: Session) -> None:
        if session in self.sessions:
            self.sessions.discard(session)
            self._sessions_changed()
        self.presence_feed.unsubscribe(session)
        if self.hub.detach(session) and session.agent_id is not None:
            self.presence.report(session.workspace_id, session.agent_id, OFFLINE)

    def _sessions_changed(self) -> None:
        if self._on_sessions is not None:
            self._on_sessions(len(self.sessions))

    async def close_all(self, code: int = CloseCode.GOING_AWAY, reason: str = "") -> None:
        """Close every session with `code` and wait (at most the close grace) until they end."""
        sessions = list(self.sessions)
        for session in sessions:
            session.close(code, reason or "the broker is stopping")
        with trio.move_on_after(self.settings.close_grace_seconds + 1):
            for session in sessions:
                await session.finished.wait()

    # -- services ------------------------------------------------------------------------

    async def run(
        self, *, stopping: trio.Event | None = None,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Route committed facts until the engine closes them; close sessions on `stopping`."""
        if self.engine.facts is None:
            raise RuntimeError("the gateway needs an engine opened with_facts=True")
        async with trio.open_nursery() as nursery:
            await nursery.start(self.recorder.run)
            await nursery.start(self.presence.run)
            await nursery.start(self.presence_feed.run)
            if stopping is not None:
                nursery.start_soon(self._stop_on, stopping)
            await nursery.start(self._route, nursery.cancel_scope)
            task_status.started()

    async def _route(
        self, done: trio.CancelScope, *, task_status: trio.TaskStatus[None]
    ) -> None:
        assert self.engine.facts is not None
        await self.hub.run(self.engine.facts, task_status=task_status)
        done.cancel()

    async def _stop_on(self, stopping: trio.Event) -> None:
        await stopping.wait()
        await self.close_all(CloseCode.GOING_AWAY)
        # Commit what the closed sessions acked while the writer still runs.
        with trio.move_on_after(self.settings.close_grace_seconds):
            await self.recorder.flush()
            await self.presence.flush()

    # -- routes ----------------------------------------------------------------------------

    def routes(self) -> list[BaseRoute]:
        return [
            WebSocketRoute("/v1/ws", _Endpoint(self._serve_ws), name="ws"),
            WebSocketRoute("/v1/node/ws", _Endpoint(self._serve_node), name="node_ws"),
            Route("/v1/agent/node-token", self._node_token, methods=["POST"],
                  name="POST /v1/agent/node-token"),
        ]

    # -- admission ------------------------------------------------------------------------

    def _admit(self, agent_id: int | None) -> tuple[int, str] | None:
        """Take a place for one socket (of `agent_id`, if an agent's): None, or the close to send.

        Taken before the handshake is accepted, so two racing sockets cannot
        both take the last place. The caller gives the place back with
        `_release` when the socket ends.
        """
        s = self.settings
        refused = self.limiter.admit_socket(agent_id, s.max_sessions, s.max_sessions_per_agent)
        if refused == "sessions":
            return (CloseCode.TRY_AGAIN_LATER,
                    f"the broker holds its limit of {s.max_sessions} sockets; try again later")
        if refused is not None:
            return (CloseCode.RATE_LIMITED,
                    f"this agent has its limit of {s.max_sessions_per_agent} sockets open")
        return None

    def _release(self, agent_id: int | None) -> None:
        self.limiter.release_socket(agent_id)

    async def _refuse(self, ws: AsgiWebSocket, code: int, reason: str) -> None:
        """Accept the handshake only to close it with `code`: browsers see no HTTP status."""
        reason = reason.encode()[:MAX_REASON_BYTES].decode(errors="ignore")
        try:
            with trio.move_on_after(self.settings.close_grace_seconds):
                await ws.accept(None)
                await ws.close(code, reason)
        except ConnectionClosed:
            pass

    async def _authenticate(self, ws: AsgiWebSocket, token: str | None, resolve: Callable[
            [str | None], Awaitable[Any]]) -> Any:
        """`resolve(token)` behind the per-address limit on refused tokens (which it feeds).

        Raises RateLimited while the address is blocked, BrokerError from `resolve`.
        """
        with self.limiter.guarding_tokens(client_address(ws.scope), presented=token is not None):
            return await resolve(token)

    async def _serve_ws(self, scope: Scope, receive: Receive, send: Send) -> None:
        ws = AsgiWebSocket(scope, receive, send,
                           direct_writes=self.settings.direct_writes)
        try:
            await ws.wait_connect()
        except ConnectionClosed:
            return
        try:
            token = ws.query("token") or bearer_token(ws.header("authorization"))
            principal = await self._authenticate(
                ws, token, lambda token: resolve_token(self.engine, token))
        except RateLimited as exc:
            await self._refuse(ws, CloseCode.RATE_LIMITED, exc.message)
            return
        except BrokerError as exc:
            await ws.deny(status_for(exc.code), encode_error(exc.code, exc.message))
            return
        batch = ws.query("batch")
        if batch not in BATCH_VALUES:
            # Before the upgrade, as a refused token is: the client asked for
            # something this server does not have, and nothing was opened.
            await ws.deny(status_for("invalid_request"), encode_error(
                "invalid_request", f"batch must be 0 or 1, not {batch!r}"),
                close_code=CloseCode.BAD_FRAME)
            return
        presence = ws.query("presence")
        if presence not in PRESENCE_VALUES:
            await ws.deny(status_for("invalid_request"), encode_error(
                "invalid_request", f"presence must be 0 or 1, not {presence!r}"),
                close_code=CloseCode.BAD_FRAME)
            return
        refusal = self._admit(principal.agent_id)
        if refusal is not None:
            await self._refuse(ws, *refusal)
            return
        try:
            await self._open_ws(ws, token, principal, batch=batch == "1",
                                presence=presence == "1")
        finally:
            self._release(principal.agent_id)

    async def _open_ws(self, ws: AsgiWebSocket, token: str | None, principal: Principal, *,
                       batch: bool = False, presence: bool = False) -> None:
        """batch: the agent's deliveries go out as `deliver.batch` frames (an observer's
        frames are Relaycast's flat events: it takes the option and has no deliveries)."""
        session: Session
        if principal.agent_id is None:
            await ws.accept(negotiate(ws.subprotocols))
            session = ObserverSession(self, ws, self.observer_codec,
                                      workspace_id=principal.workspace_id)
        else:
            subprotocol = negotiate(ws.subprotocols)
            codec = self.native_msgpack if subprotocol == MSGPACK_SUBPROTOCOL else self.native_json
            await ws.accept(subprotocol)
            assert token is not None
            session = AgentSession(self, ws, codec, workspace_id=principal.workspace_id,
                                   agent_id=principal.agent_id, agent_name=principal.agent_name,
                                   credential=secrets.digest(token), batch=batch,
                                   presence=presence)
        await self._run(session)

    async def _serve_node(self, scope: Scope, receive: Receive, send: Send) -> None:
        ws = AsgiWebSocket(scope, receive, send,
                           direct_writes=self.settings.direct_writes)
        try:
            await ws.wait_connect()
        except ConnectionClosed:
            return
        token = ws.query("token")
        try:
            identity = await self._authenticate(ws, token, self._node_identity)
        except RateLimited as exc:
            await self._refuse(ws, CloseCode.RATE_LIMITED, exc.message)
            return
        except BrokerError as exc:
            await ws.deny(401, encode_error(exc.code, exc.message))
            return
        refusal = self._admit(identity.agent_id)
        if refusal is not None:
            await self._refuse(ws, *refusal)
            return
        try:
            await self._open_node(ws, identity, secrets.digest(token or ""))
        finally:
            self._release(identity.agent_id)

    async def _node_identity(self, token: str | None) -> NodeIdentity:
        """The node socket that `token` opens. Raises unauthorized or invalid_token."""
        identity = None
        if token and token.startswith(secrets.NODE_TOKEN_PREFIX) and len(token) < 512:
            identity = await self.engine.read(agent_by_node_token, token, int(time.time() * 1000))
        if identity is None:
            raise BrokerError("unauthorized" if not token else "invalid_token",
                              "/v1/node/ws needs ?token=<node token>")
        return identity

    async def _open_node(self, ws: AsgiWebSocket, identity: NodeIdentity,
                         credential: bytes) -> None:
        await ws.accept(negotiate(ws.subprotocols))
        session = NodeSession(
            self, ws, self.node_codec, workspace_id=identity.workspace_id,
            agent_id=identity.agent_id, agent_name=identity.agent_name,
            node_id=identity.node_id, node_name=identity.node_name,
            credential=credential,
        )
        await self._run(session)

    async def _run(self, session: Session) -> None:
        """The per-connection failure boundary: a session's bug never takes the daemon down."""
        try:
            await session.serve()
        except Exception:
            log.exception("session %d (%s, agent %s) failed", session.id, session.kind,
                          session.agent_id)
            self.detach(session)
            try:
                with trio.move_on_after(self.settings.close_grace_seconds):
                    await session.ws.close(CloseCode.INTERNAL_ERROR, "internal error")
            except ConnectionClosed:
                pass

    async def _node_token(self, request: Request) -> Response:
        """POST /v1/agent/node-token: `{node_id, node_name, token}` for the calling agent."""
        limits = None
        try:
            address = client_address(request.scope)
            header = request.headers.get("authorization")
            with self.limiter.guarding_tokens(address, presented=bool(header)):
                token = bearer_token(header)
                principal = await resolve_token(self.engine, token)
            authorize("agent", principal)
            assert principal.agent_id is not None and token is not None
            limits = self.limiter.take_request("agent.node_token", principal.workspace_id,
                                               principal.agent_id, address)
            # The agent token's digest caps the node token's life at its own.
            issued = await self.engine.submit(IssueNodeToken(
                workspace_id=principal.workspace_id, agent_id=principal.agent_id,
                ttl_seconds=self.settings.node_token_ttl_seconds,
                minted_with=secrets.digest(token)))
        except BrokerError as exc:
            return Response(encode_error(exc.code, exc.message), status_code=status_for(exc.code),
                            media_type="application/json",
                            headers=exc.verdict.headers() if isinstance(exc, RateLimited) else None)
        data = fr.NodeToken(node_id=issued.node_id, node_name=issued.node_name,
                            token=issued.token)
        return Response(encode_success(data), status_code=201, media_type="application/json",
                        headers=None if limits is None else limits.headers())

    # -- reporting ----------------------------------------------------------------------------

    def session_statistics(self) -> tuple[SessionStatistics, ...]:
        """A snapshot of every open session (see `SessionStatistics`)."""
        return tuple(s.statistics() for s in self.sessions)

    def statistics(self) -> GatewayStatistics:
        """A snapshot of the gateway's counts (see `GatewayStatistics`)."""
        return GatewayStatistics(
            hub=self.hub.statistics(), recorder=self.recorder.statistics(),
            sessions=len(self.sessions), slow_closes=self.slow_closes,
            presence_commands=self.presence.commands,
            presence=self.presence_feed.statistics(),
        )
