"""`/mcp` as an ASGI endpoint: check the token, then let the SDK's session manager serve.

The token is checked before any MCP message is read: no token or a bad one
is a 401 with `WWW-Authenticate: Bearer` and a JSON-RPC error body (the
SDK's client reports a bare 401 only as a generic error), an address
blocked for guessing is a 429. A good token puts the caller in the scope:
`scope["user"]`, which the SDK ties each session to (the same token must
come back with the session id, or the answer is 404), and the broker's
`Caller` for the handlers (broker.mcp.server).

A body is bounded by `http.max_body_bytes`, as REST's are: one declared
larger is refused before it is read, a chunked one as soon as it passes the
limit (413, `payload_too_large`; the connection then closes, as for REST's
early answers, broker.http.keepalive). A POST's body is read here for that
count (the SDK reads it whole anyway) and handed on; being read, it is also
looked at once: a body that is not JSON, or not a JSON-RPC message at all,
gets a short JSON-RPC error here (-32700, -32600) rather than the SDK's
pages of validation text.

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

import mcp_types as types
import msgspec
import trio
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
from broker.http import keepalive
from broker.http.errors import status_for
from broker.http.keepalive import disconnect_after_last_send
from broker.mcp.server import CALLER_KEY
from broker.mcp.sessions import SESSION_HEADER, Caller, McpSessions
from broker.ratelimit import RateLimited, RateLimiter, client_address

log = logging.getLogger(__name__)

# JSON-RPC error code of a refused credential (the implementation-defined range).
UNAUTHORIZED = -32001
# ... and of a caller over its share of sessions or requests.
RATE_LIMITED = -32029
# The JSON-RPC code of a body refused before the SDK reads it, by its broker code.
BODY_ERRORS = {"payload_too_large": types.INVALID_REQUEST, "invalid_json": types.PARSE_ERROR,
               "invalid_request": types.INVALID_REQUEST, "request_timeout": types.INVALID_REQUEST}

# A body's top level, its values left undecoded: enough to tell a JSON-RPC message.
_envelope = msgspec.json.Decoder(dict[str, msgspec.Raw])

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


async def read_body(receive: Receive, limit: int) -> bytes | None:
    """The request body; None when the client went away before sending it all.

    Raises BrokerError `payload_too_large` as soon as the body passes `limit` bytes, and
    `request_timeout` when it stops arriving (keepalive.BODY_STALL_SECONDS).
    """
    chunks: list[bytes] = []
    size = 0
    while True:
        with trio.move_on_after(keepalive.BODY_STALL_SECONDS) as waited:
            message = await receive()
        if waited.cancelled_caught:
            raise keepalive.body_stalled()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BrokerError("payload_too_large", f"the body is over the limit of {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def check_envelope(body: bytes) -> None:
    """Check that `body` is one JSON-RPC message: a JSON object with `"jsonrpc": "2.0"` and
    a `method` (a request, a notification) or an `id` with a `result` or an `error` (a
    response). Its fields' values are the SDK's to validate.

    Raises BrokerError `invalid_json` (not JSON) or `invalid_request` (not such a message).
    """
    try:
        fields = _envelope.decode(body)
    except RecursionError:
        return  # nested too deep to look at cheaply: the SDK's own parser decides
    except msgspec.ValidationError:
        raise BrokerError("invalid_request",
                          "the body must be one JSON-RPC message (a JSON object)") from None
    except msgspec.DecodeError as exc:
        raise BrokerError("invalid_json", f"the body is not valid JSON: {exc}") from None
    version = fields.get("jsonrpc")
    if version is None or msgspec.json.decode(version) != "2.0":
        raise BrokerError("invalid_request",
                          'the body is not a JSON-RPC message: "jsonrpc" must be "2.0"')
    if "method" not in fields and not ("id" in fields and ("result" in fields
                                                           or "error" in fields)):
        raise BrokerError("invalid_request", 'the body is not a JSON-RPC message: it needs a '
                          '"method" (or an "id" with a "result" or an "error")')


def replaying(body: bytes, receive: Receive) -> Receive:
    """A `receive` that hands out `body` (already read) once, then defers to `receive`."""
    pending: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay


class McpService:
    """Serves /mcp in this process: the token check, the body's bound, the registry, the
    SDK's manager."""

    def __init__(self, check: TokenCheck, manager: StreamableHTTPSessionManager,
                 sessions: McpSessions, max_sessions_per_agent: int,
                 max_body_bytes: int) -> None:
        self.check = check
        self.manager = manager
        self.sessions = sessions
        self.max_sessions_per_agent = max_sessions_per_agent
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        caller = await self.check(scope, receive, send)
        if caller is None:
            return
        headers = Headers(scope=scope)
        try:
            declared = headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
                raise BrokerError("payload_too_large",
                                  f"the body is over the limit of {self.max_body_bytes} bytes")
            # Only a POST carries a message; the SDK reads no other method's body.
            if scope["method"] == "POST":
                body = await read_body(receive, self.max_body_bytes)
                if body is None:
                    return  # the client went away: no one to answer
                check_envelope(body)
                receive = replaying(body, receive)
        except BrokerError as exc:
            await jsonrpc_error(status_for(exc.code), exc.code,
                                exc.message, BODY_ERRORS[exc.code])(scope, receive, send)
            return
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

        receive, send_answer = disconnect_after_last_send(receive, watch_session)
        with self.sessions.request(caller, session_id):
            await self.manager.handle_request(scope, receive, send_answer)
        # Only the owner's DELETE ends the session: the SDK refuses anyone else's (404),
        # and the registry must keep the entry that caps, closes and notifies it.
        if session_id is not None and scope["method"] == "DELETE" and 0 < status < 400:
            self.sessions.forget(session_id, caller)

