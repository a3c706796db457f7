"""`/mcp` as an ASGI endpoint: check the token, then let the SDK's session manager serve.

The token is checked before any MCP message is read: no token or a bad one
is a 401 with `WWW-Authenticate: Bearer` and a JSON-RPC error body (the
SDK's client reports a bare 401 only as a generic error), an address
blocked for guessing is a 429. A good token puts the caller in the scope:
`scope["user"]`, which the SDK ties each session to (the same token must
come back with the session id, or the answer is 404), and the broker's
`Caller` for the handlers (broker.mcp.server).

Each request runs under the session registry's scope (broker.mcp.sessions),
so closing an agent's sessions also ends its long requests. The session id
that an `initialize` answer carries is how the registry learns of a
session; a DELETE from the session's owner that the SDK accepts is how it
learns of its end (the SDK answers anyone else's DELETE 404, and the
session stays theirs).

With several gateway processes, `McpService` runs in the one that serves
MCP; the others hand it every `/mcp` request (broker.mcp.forward), so every
request of a session meets the same session objects.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import msgspec
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS
from starlette.datastructures import Headers
from starlette.types import Message, Receive, Scope, Send

from broker.auth import bearer_token, resolve_token
from broker.engine import secrets
from broker.engine.engine import Engine
from broker.engine.errors import BrokerError
from broker.mcp.server import CALLER_KEY
from broker.mcp.sessions import SESSION_HEADER, Caller, McpSessions
from broker.ratelimit import RateLimited, RateLimiter, client_address

log = logging.getLogger(__name__)

# JSON-RPC error code of a refused credential (the implementation-defined range).
UNAUTHORIZED = -32001
# ... and of a caller over its share of sessions or requests.
RATE_LIMITED = -32029

ASGI = Callable[[Scope, Receive, Send], Awaitable[None]]


def jsonrpc_error(status: int, code: str, message: str, rpc_code: int,
                  headers: dict[str, str] | None = None) -> ASGI:
    """An HTTP answer whose body is a JSON-RPC error naming the broker's `code`."""
    body = msgspec.json.encode({"jsonrpc": "2.0", "id": None, "error": {
        "code": rpc_code, "message": f"{code}: {message}", "data": {"code": code}}})

    async def respond(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            *((k.encode(), v.encode()) for k, v in (headers or {}).items())]})
        await send({"type": "http.response.body", "body": body})

    return respond


class TokenCheck:
    """The token check of `/mcp`, before any MCP message is read (see the module docstring)."""

    def __init__(self, engine: Engine, limiter: RateLimiter) -> None:
        self.engine = engine
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> Caller | None:
        """The caller; None when the request was refused (the answer is sent)."""
        headers = Headers(scope=scope)
        token = bearer_token(headers.get("authorization"))
        try:
            with self.limiter.guarding_tokens(client_address(scope),
                                              presented=bool(headers.get("authorization"))):
                principal = await resolve_token(self.engine, token)
        except RateLimited as exc:
            await jsonrpc_error(429, exc.code, exc.message, RATE_LIMITED,
                                exc.verdict.headers())(scope, receive, send)
            return None
        except BrokerError as exc:
            await jsonrpc_error(401, exc.code, exc.message, UNAUTHORIZED,
                                {"www-authenticate": 'Bearer realm="broker"'})(
                scope, receive, send)
            return None
        assert token is not None
        credential = secrets.digest(token)
        owner = f"{principal.workspace_id}:{principal.agent_id or '-'}"
        user = AuthenticatedUser(AccessToken(token=credential.hex(), client_id=owner,
                                             scopes=[], subject=credential.hex()))
        return Caller(principal, credential, user)

    async def passes(self, scope: Scope, receive: Receive, send: Send) -> bool:
        return await self(scope, receive, send) is not None


class McpService:
    """Serves /mcp in this process: the token check, the registry, the SDK's manager."""

    def __init__(self, check: TokenCheck, manager: StreamableHTTPSessionManager,
                 sessions: McpSessions, max_sessions_per_agent: int) -> None:
        self.check = check
        self.manager = manager
        self.sessions = sessions
        self.max_sessions_per_agent = max_sessions_per_agent

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        caller = await self.check(scope, receive, send)
        if caller is None:
            return
        headers = Headers(scope=scope)
        session_id = headers.get(SESSION_HEADER)
        opening = session_id is None and scope["method"] == "POST" \
            and headers.get("mcp-protocol-version") in (None, *HANDSHAKE_PROTOCOL_VERSIONS)
        if opening and self.sessions.count_of(caller.owner) >= self.max_sessions_per_agent:
            await jsonrpc_error(
                429, "too_many_sessions",
                f"this caller holds its limit of {self.max_sessions_per_agent} MCP sessions",
                RATE_LIMITED)(scope, receive, send)
            return
        scope = {**scope, "user": caller.user, CALLER_KEY: caller}

        status = 0

        async def watch_session(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                if opening and status < 400:
                    for name, value in message.get("headers", ()):
                        if name.lower() == SESSION_HEADER.encode():
                            self.sessions.opened(value.decode(), caller)
            await send(message)

        with self.sessions.request(caller, session_id):
            await self.manager.handle_request(scope, receive, watch_session)
        # Only the owner's DELETE ends the session: the SDK refuses anyone else's (404),
        # and the registry must keep the entry that caps, closes and notifies it.
        if session_id is not None and scope["method"] == "DELETE" and 0 < status < 400:
            self.sessions.forget(session_id, caller)

