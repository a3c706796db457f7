"""The ASGI application: REST routes bound to the operation table, plus health and metrics.

Each REST route is a thin adapter: authenticate the bearer token, read the
body under the size limit while it streams in, merge query parameters, the
JSON body and path parameters (path last, so a body cannot redirect a call
to another resource) into one dict, and hand it to the operation. Errors
leave as the envelope `{"ok": false, "error": {"code", "message"}}` with the
status from `broker.http.errors`. The request handler is the per-request
failure boundary: an unexpected exception becomes a 500 and is logged; the
daemon keeps serving.

`create_app(..., extra_routes=...)` is the seam where the WebSocket gateway
mounts `/v1/ws` and `/v1/node/ws` on the same port.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import aclosing
from typing import Any

import msgspec
import trio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Match, Route, WebSocketRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker.auth import authorize, bearer_token, resolve_token
from broker.config import Settings
from broker.console import console_routes
from broker.engine.engine import Engine
from broker.engine.errors import BrokerError
from broker.engine.health import Probe
from broker.engine.workspaces import Principal
from broker.http import keepalive
from broker.http.errors import encode_error, encode_success, status_for
from broker.http.keepalive import CloseWhenBodyUnread
from broker.http.metrics import CONTENT_TYPE, BrokerMetrics
from broker.http.openapi import OPENAPI_PATH, build_openapi
from broker.http.proxies import TrustedProxies
from broker.http.routes import ROUTES, RestRoute
from broker.operations import OPERATIONS
from broker.operations.registry import Call, Existing, Operation, invoke
from broker.ratelimit import UNLIMITED, RateLimited, RateLimiter, Verdict, client_address
from protocol.nesting import NestingTooDeep, Unstorable, decode_json
from protocol.responses import ServiceStatus

log = logging.getLogger(__name__)

JSON = "application/json"
IDEMPOTENCY_HEADERS = ("idempotency-key", "x-idempotency-key")
# Methods whose body is never read (the SDK sends none).
BODYLESS = frozenset({"GET", "HEAD"})
# The order of the methods a 405's Allow header lists (others after these, by name).
METHOD_ORDER = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")

_json_decoder = msgspec.json.Decoder()


def error_response(code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(
        encode_error(code, message), status_code=status_for(code), media_type=JSON,
        headers=headers,
    )


def success_response(data: Any, status: int = 200) -> Response:
    """The success envelope; an operation that returned nothing is 204 No Content."""
    if data is None:
        return Response(status_code=204)
    return Response(encode_success(data), status_code=status, media_type=JSON)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with `payload_too_large` as soon as it passes `limit` bytes.

    A body that stops arriving for `keepalive.BODY_STALL_SECONDS` is refused
    with `request_timeout` (408). A client that
    closes mid-body raises `client_closed_request` (499, answered to no one).
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BrokerError("payload_too_large", f"the body is over the limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async with aclosing(request.stream()) as stream:
            while True:
                with trio.move_on_after(keepalive.BODY_STALL_SECONDS) as waited:
                    chunk = await anext(stream, None)
                if waited.cancelled_caught:
                    raise keepalive.body_stalled()
                if chunk is None:
                    break
                size += len(chunk)
                if size > limit:
                    raise BrokerError(
                        "payload_too_large", f"the body is over the limit of {limit} bytes"
                    )
                chunks.append(chunk)
    except ClientDisconnect:
        raise BrokerError("client_closed_request",
                          "the client closed the connection before its body was read") from None
    return b"".join(chunks)


def parse_body(body: bytes) -> dict[str, Any]:
    """A JSON object body as a dict (an empty body is `{}`)."""
    if not body.strip():
        return {}
    try:
        value = decode_json(_json_decoder, body)
    except NestingTooDeep as exc:
        raise BrokerError("invalid_json", f"the body is {exc}") from None
    except Unstorable as exc:
        raise BrokerError("invalid_request", f"the body holds {exc}") from None
    except msgspec.DecodeError as exc:
        raise BrokerError("invalid_json", f"the body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise BrokerError("invalid_request", "the body must be a JSON object")
    return value


def idempotency_key(request: Request) -> str | None:
    for header in IDEMPOTENCY_HEADERS:
        value = request.headers.get(header)
        if value is not None:
            return value.strip()
    return None


async def _principal(engine: Engine, op: Operation[Any], request: Request) -> Principal | None:
    """Who calls: required and checked for `op.auth`; for open operations, only if valid."""
    header = request.headers.get("authorization")
    if op.auth != "none":
        principal = await resolve_token(engine, bearer_token(header))
        authorize(op.auth, principal)
        return principal
    try:
        return await resolve_token(engine, bearer_token(header))
    except BrokerError:
        # An open operation ignores a missing or unknown token.
        return None


async def _checked_principal(
    engine: Engine, op: Operation[Any], request: Request, limiter: RateLimiter
) -> Principal | None:
    """`_principal`, behind the per-address limit on refused tokens (which it feeds).

    Raises RateLimited while the caller's address is blocked, even for a
    good token: that is what makes guessing slow.
    """
    with limiter.guarding_tokens(client_address(request.scope),
                                 presented=bool(request.headers.get("authorization"))):
        return await _principal(engine, op, request)


def operation_endpoint(
    engine: Engine, route: RestRoute, op: Operation[Any], max_body_bytes: int,
    limiter: RateLimiter | None = None, base_url: str | None = None,
) -> Callable[[Request], Awaitable[Response]]:
    """The request handler that binds `route` to `op`; `limiter`: the rate limits (None:
    none); `base_url`: the daemon's public URL (None: the request's own)."""
    limiter = limiter or RateLimiter(UNLIMITED)

    async def endpoint(request: Request) -> Response:
        limits: Verdict | None = None
        try:
            principal = await _checked_principal(engine, op, request, limiter)
            # Before the body is read and the operation runs: a refused request writes nothing.
            limits = limiter.take_request(
                op.name, None if principal is None else principal.workspace_id,
                None if principal is None else principal.agent_id,
                client_address(request.scope))
            fields: dict[str, Any] = dict(request.query_params)
            if request.method not in BODYLESS:
                fields.update(parse_body(await read_body(request, max_body_bytes)))
            fields.update(request.path_params)
            call = Call(principal, idempotency_key(request),
                        base_url=base_url or str(request.base_url).rstrip("/"))
            result = await invoke(engine, op.name, call, fields)
            status = route.status
            if isinstance(result, Existing):
                status, result = 200, result.value
            response = success_response(result, status)
            if limits is not None:
                response.headers.update(limits.headers())
            return response
        except RateLimited as exc:
            return error_response(exc.code, exc.message, headers=exc.verdict.headers())
        except BrokerError as exc:
            return error_response(exc.code, exc.message)
        except Exception:
            log.exception("request %s %s (%s) failed", request.method, route.path, op.name)
            return error_response("internal_error", "the broker failed to handle this request")

    endpoint.__name__ = f"rest_{op.name.replace('.', '_')}"
    return endpoint


def rest_routes(
    engine: Engine, settings: Settings, limiter: RateLimiter | None = None
) -> list[BaseRoute]:
    """The REST routes; `limiter`: the rate limits (one from `settings` when None)."""
    limiter = limiter or RateLimiter(settings.rate_limits)
    routes: list[BaseRoute] = []
    for route in ROUTES:
        op = OPERATIONS[route.operation]
        routes.append(Route(
            route.path,
            operation_endpoint(engine, route, op, settings.http.max_body_bytes, limiter,
                               settings.http.base_url),
            methods=[route.method],
            name=f"{route.method} {route.path}",
        ))
    return routes


def service_routes(engine: Engine, settings: Settings, metrics: BrokerMetrics) -> list[BaseRoute]:
    """/healthz, /readyz and /metrics."""

    async def healthz(request: Request) -> Response:
        return success_response(ServiceStatus(status="ok"))

    async def readyz(request: Request) -> Response:
        if not engine.writer.running:
            return error_response("not_ready", "the writer is not running")
        with trio.move_on_after(settings.http.ready_timeout_seconds) as scope:
            try:
                await engine.submit(Probe())
            except BrokerError as exc:
                return error_response("not_ready", f"the database is not writable: {exc.message}")
        if scope.cancelled_caught:
            return error_response("not_ready", "the writer did not commit in time")
        return success_response(ServiceStatus(status="ready"))

    async def metrics_endpoint(request: Request) -> Response:
        try:
            body = await metrics.render()
        except BrokerError as exc:  # a gateway whose writer is gone: writer_failed, a 503
            return error_response(exc.code, exc.message)
        return Response(body, media_type=CONTENT_TYPE)

    return [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
    ]


def allowed_methods(routes: Sequence[BaseRoute], scope: Scope) -> list[str]:
    """Every method that one of `routes` serves on the path of `scope` (HEAD with GET)."""
    methods: set[str] = set()
    for route in routes:
        if isinstance(route, Route) and route.methods \
                and route.matches(scope)[0] is not Match.NONE:
            methods |= route.methods
    return sorted(methods, key=lambda method: (
        METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method))


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        if any(isinstance(route, WebSocketRoute) and route.path == request.url.path
               for route in request.app.router.routes):
            return error_response(
                "upgrade_required",
                f"{request.url.path} takes WebSocket connections (Upgrade: websocket)",
                headers={"Upgrade": "websocket", "Connection": "Upgrade"})
        return error_response("not_found", f"no route for {request.method} {request.url.path}")
    if exc.status_code == 405:
        # starlette's Allow names the methods of the one route that refused, and each
        # route serves one method: list every method some route serves on this path.
        allowed = allowed_methods(request.app.router.routes, request.scope)
        return error_response(
            "method_not_allowed", f"{request.method} is not allowed on {request.url.path}",
            headers={**(exc.headers or {}), "Allow": ", ".join(allowed)},
        )
    return Response(
        encode_error("http_error", str(exc.detail)), status_code=exc.status_code, media_type=JSON
    )


class RequestMetrics:
    """ASGI middleware: count every HTTP response by method, route template and status."""

    def __init__(self, app: ASGIApp, metrics: BrokerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.observe_request(
                scope["method"], template, status, time.perf_counter() - started
            )


def create_app(
    engine: Engine,
    settings: Settings,
    metrics: BrokerMetrics | None = None,
    extra_routes: Sequence[BaseRoute] = (),
    limiter: RateLimiter | None = None,
) -> Starlette:
    """The broker's ASGI app: REST under /v1, health, readiness, metrics, `/openapi.json`,
    the web console at `/`, and `extra_routes`.

    metrics: the registry to report into (one is made when None); it is kept
    on `app.state.metrics`. limiter: the rate limits (one from `settings`
    when None), kept on `app.state.limiter`.
    """
    metrics = metrics or BrokerMetrics(engine)
    limiter = limiter or RateLimiter(settings.rate_limits)
    routes = [*service_routes(engine, settings, metrics),
              *rest_routes(engine, settings, limiter), *extra_routes, *console_routes()]
    # Built once, from the routes just made: a route it cannot describe is an error here.
    document = msgspec.json.encode(build_openapi(routes, public_url=settings.http.base_url))

    async def openapi(request: Request) -> Response:
        return Response(document, media_type=JSON)

    app = Starlette(
        routes=[*routes, Route(OPENAPI_PATH, openapi, methods=["GET"])],
        exception_handlers={HTTPException: _http_exception},
    )
    # An unknown path is a 404, never a redirect to a near miss.
    app.router.redirect_slashes = False
    app.add_middleware(RequestMetrics, metrics=metrics)
    app.add_middleware(CloseWhenBodyUnread)
    # Outermost, so every part of the app keys by the real client.
    app.add_middleware(TrustedProxies, trusted=settings.http.trusted_proxies)
    app.state.metrics = metrics
    app.state.limiter = limiter
    return app
