"""The OpenAPI 3.1 document of the REST API, generated from the code that serves it.

Nothing here is written by hand twice: the operation routes come from
`broker.http.routes.ROUTES`, their token kind, input and output from the
operation table (`broker.operations.OPERATIONS`), and every schema from the
protocol Structs through `msgspec.json.schema_components`. The few routes
that are not operations (file bytes, the inbound hook, the node token,
health, readiness, metrics, this document) are described in `SERVICE_ROUTES`
below, next to nothing else. `build_openapi` takes the routes the app really
serves and refuses one it cannot describe, so the document cannot drift from
the server: a new route without a description fails at app creation.

How inputs map, as the REST binding merges them (broker.http.app): a path
parameter fills the input field of its name; a GET takes the other fields
as query parameters; other methods take them as a JSON body. Errors share
one envelope and the statuses of `broker.http.errors`; 500 is not listed as
an expected answer (it is a bug, and the fuzz test treats it as one).
WebSocket endpoints (`/v1/ws`, `/v1/node/ws`) are not HTTP operations, so
OpenAPI has no place for them; docs/protocol.md describes them.
"""

from __future__ import annotations

import copy
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import msgspec
from starlette.routing import BaseRoute, Route

from broker.http.errors import ErrorBody
from broker.http.routes import ROUTES, RestRoute
from broker.operations import OPERATIONS
from broker.operations.registry import Existing, Operation
from protocol.files import CONTENT_PATH, UploadReceived
from protocol.frames import NodeToken
from protocol.requests import InboundWebhookTrigger
from protocol.responses import ServiceStatus

OPENAPI_PATH = "/openapi.json"
OPENAPI_VERSION = "3.1.0"
REF = "#/components/schemas/{name}"
JSON = "application/json"

# Security schemes by the token kind of an operation (`Operation.auth`).
WORKSPACE_KEY = "workspaceKey"
AGENT_TOKEN = "agentToken"
HOOK_TOKEN = "hookToken"
SECURITY_SCHEMES: dict[str, dict[str, Any]] = {
    WORKSPACE_KEY: {"type": "http", "scheme": "bearer", "bearerFormat": "rk_live_...",
                    "description": "The workspace key, shown once when the workspace is made."},
    AGENT_TOKEN: {"type": "http", "scheme": "bearer", "bearerFormat": "at_live_...",
                  "description": "An agent token, shown once when the agent is registered."},
    HOOK_TOKEN: {"type": "http", "scheme": "bearer", "bearerFormat": "wh_live_...",
                 "description": "An inbound hook's token (or `?token=`)."},
}
SECURITY: dict[str, list[dict[str, list[str]]]] = {
    "agent": [{AGENT_TOKEN: []}],
    "workspace": [{WORKSPACE_KEY: []}],
    "any": [{WORKSPACE_KEY: []}, {AGENT_TOKEN: []}],
    "none": [],
}

# Error statuses (broker.http.errors, the README's status-code table) and
# what each means on a route. 500 is deliberately absent (see above).
ERROR_STATUSES: dict[int, str] = {
    400: "Bad input: `invalid_json`, `invalid_request`, `invalid_*`, `*_too_long`, ...",
    401: "No token (`unauthorized`) or an unknown, revoked or rotated one (`invalid_token`).",
    403: "A token of the wrong kind (`forbidden`), `not_a_member`, `not_a_participant`, ...",
    404: "`*_not_found`; an id of another workspace is always not found.",
    408: "`request_timeout`: the request body stopped arriving (30 s without a byte).",
    409: "`*_already_exists`, `idempotency_key_reused`, `channel_archived`, file states.",
    410: "`file_deleted`.",
    413: "`payload_too_large`: the body is over `http.max_body_bytes`.",
    416: "`range_not_satisfiable`: no range asked for is within the file.",
    429: "`rate_limit_exceeded`; `Retry-After` says when to try again.",
    503: "`shutting_down`, `commit_failed`, `writer_failed`, `not_ready`.",
}

# Operations that honour an `Idempotency-Key` header (the sends); the header
# is read on every route but only these store it with the write.
IDEMPOTENT = frozenset(
    {"message.send", "thread.reply", "dm.send", "group_dm.send", "webhook.trigger"})
IDEMPOTENCY_HEADER: dict[str, Any] = {
    "name": "Idempotency-Key", "in": "header", "required": False,
    "description": "Same key and payload replay the first answer; another payload is 409.",
    "schema": {"type": "string"},
}


def _error_statuses(method: str, auth: str, name: str = "") -> set[int]:
    """The error statuses a route can answer: bad input, not found, rate limit, stopping,
    token errors when it needs a token, conflicts and 413 when it takes a body, and
    `file_deleted` on the file operations (a deleted file keeps its row)."""
    statuses = {400, 404, 429, 503}
    if name.startswith("file."):
        statuses.add(410)
    if auth != "none":
        statuses |= {401, 403}
    if method not in ("GET", "HEAD"):
        statuses |= {409, 413}
    return statuses


@dataclass
class _Schemas:
    """Collects the types the document needs; one `schema_components` call names them all."""

    types: list[Any] = field(default_factory=list)

    def ref(self, tp: Any) -> int:
        """Register `tp`; the index resolves to its schema after `resolve`."""
        self.types.append(tp)
        return len(self.types) - 1

    def resolve(self) -> tuple[Sequence[dict[str, Any]], dict[str, Any]]:
        return msgspec.json.schema_components(self.types, ref_template=REF)


# Describing a route takes two steps: register the types it needs (one
# `schema_components` call must see them all, so names are given once), then
# finish the operation object from the resolved schemas and components.
Finish = Callable[[Sequence[dict[str, Any]], dict[str, Any]], dict[str, Any]]
Describe = Callable[[_Schemas], Finish]


@dataclass(frozen=True)
class ServiceRoute:
    """A route that is not an operation, and how to describe it."""

    method: str
    path: str
    describe: Describe


def _envelope(data: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": ["ok", "data"],
            "properties": {"ok": {"const": True}, "data": data}}


def _json_response(description: str, data: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": _envelope(data)}}}


def _errors(statuses: Iterable[int]) -> dict[str, Any]:
    return {str(s): {"$ref": f"#/components/responses/Error{s}"} for s in sorted(statuses)}


def _branches(output: Any) -> tuple[Any, Any]:
    """(the route's own answer, the answer of an `Existing[T]` branch or None)."""
    if typing.get_origin(output) in (typing.Union, types.UnionType):
        own = [a for a in typing.get_args(output) if typing.get_origin(a) is not Existing]
        found = [typing.get_args(a)[0] for a in typing.get_args(output)
                 if typing.get_origin(a) is Existing]
        if len(own) != 1 or len(found) > 1:
            raise ValueError(f"cannot describe the output {output!r}")
        return own[0], found[0] if found else None
    return output, None


def _query_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A field's schema as a query parameter: absent is the null, so null is dropped."""
    schema = {k: v for k, v in schema.items() if k != "default" or v is not None}
    options = schema.get("anyOf")
    if options is not None:
        kept = [o for o in options if o != {"type": "null"}]
        del schema["anyOf"]
        schema.update(kept[0] if len(kept) == 1 else {"anyOf": kept})
    return schema


def _component(schema: dict[str, Any], components: dict[str, Any]) -> dict[str, Any]:
    """The component a Struct's `$ref` schema names."""
    return dict(components[schema["$ref"].rsplit("/", 1)[1]])


def _path_params(path: str) -> list[str]:
    return [part[1:-1] for part in path.split("/") if part.startswith("{")]


def _describe_operation(
    route: RestRoute, op: Operation[Any], schemas: _Schemas
) -> Finish:
    """Register what `route` needs and return how to finish its operation object."""
    own, found = _branches(op.output)
    if (own is None) != (route.status == 204):
        raise ValueError(f"{route.method} {route.path}: status {route.status} but "
                         f"{op.name} returns {own!r} (nothing to say is 204, only then)")
    input_at = schemas.ref(op.input)
    own_at = None if own is None else schemas.ref(own)
    found_at = None if found is None else schemas.ref(found)

    def finish(resolved: Sequence[dict[str, Any]], components: dict[str, Any]) -> dict[str, Any]:
        # The input's own component (not a $ref) so path fields can be split off.
        component = _component(resolved[input_at], components)
        properties: dict[str, Any] = component.get("properties", {})
        required = set(component.get("required", ()))
        in_path = _path_params(route.path)
        parameters: list[dict[str, Any]] = [
            {"name": p, "in": "path", "required": True,
             "schema": _query_schema(properties.get(p, {"type": "string"}))}
            for p in in_path
        ]
        rest = {k: v for k, v in properties.items() if k not in in_path}
        body: dict[str, Any] | None = None
        if route.method == "GET":
            parameters += [
                {"name": k, "in": "query", "required": k in required, "schema": _query_schema(v)}
                for k, v in rest.items()
            ]
        elif rest:
            body_schema = copy.deepcopy(component)
            body_schema["properties"] = rest
            body_schema["required"] = [k for k in component.get("required", ()) if k in rest]
            if not body_schema["required"]:
                del body_schema["required"]
            body = {"required": bool(body_schema.get("required")),
                    "content": {JSON: {"schema": body_schema}}}
        if op.name in IDEMPOTENT:
            parameters.append(IDEMPOTENCY_HEADER)
        responses: dict[str, Any] = {}
        if own_at is None:
            responses["204"] = {"description": "Done; nothing to say."}
        else:
            responses[str(route.status)] = _json_response(
                "Created." if route.status == 201 else "OK.", resolved[own_at])
        if found_at is not None:
            responses["200"] = _json_response(
                "It existed already; nothing was written.", resolved[found_at])
        responses |= _errors(_error_statuses(route.method, op.auth, op.name))
        described: dict[str, Any] = {
            "operationId": op.name, "summary": op.name,
            "tags": [op.name.split(".", 1)[0]],
            "security": SECURITY[op.auth], "parameters": parameters, "responses": responses,
        }
        doc = (op.handler.__doc__ or "").strip()
        if doc:
            described["description"] = doc
        if body is not None:
            described["requestBody"] = body
        return described

    return finish


# -- the routes that are not operations -----------------------------------------------------


def _status_route(summary: str, extra: dict[str, Any] | None = None) -> Describe:
    def describe(schemas: _Schemas) -> Finish:
        at = schemas.ref(ServiceStatus)
        return lambda resolved, components: {
            "operationId": summary.split(":", 1)[0], "summary": summary, "tags": ["service"],
            "security": [], "responses": {"200": _json_response("OK.", resolved[at]),
                                          **(extra or {})},
        }
    return describe


def _metrics(schemas: _Schemas) -> Finish:
    return lambda resolved, components: {
        "operationId": "metrics", "summary": "metrics: Prometheus text exposition",
        "tags": ["service"], "security": [],
        "responses": {"200": {"description": "The metrics.", "content": {
            "text/plain": {"schema": {"type": "string"}}}}},
    }


def _openapi(schemas: _Schemas) -> Finish:
    return lambda resolved, components: {
        "operationId": "openapi", "summary": "openapi: this document", "tags": ["service"],
        "security": [],
        "responses": {"200": {"description": "The OpenAPI document.", "content": {
            JSON: {"schema": {"type": "object"}}}}},
    }


FILE_ID = {"name": "file_id", "in": "path", "required": True, "schema": {"type": "string"}}


def _console_page(schemas: _Schemas) -> Finish:
    return lambda resolved, components: {
        "operationId": "console", "summary": "console: the web console's page (README)",
        "tags": ["console"], "security": [],
        "responses": {"200": {"description": "The page.", "content": {
            "text/html": {"schema": {"type": "string"}}}}},
    }


def _console_file(schemas: _Schemas) -> Finish:
    return lambda resolved, components: {
        "operationId": "console.file", "summary": "console.file: a script or style of the console",
        "tags": ["console"], "security": [],
        "parameters": [{"name": "name", "in": "path", "required": True,
                        "schema": {"type": "string"}}],
        "responses": {"200": {"description": "The file, with its own content type.", "content": {
            "*/*": {"schema": {"type": "string"}}}}, **_errors({404})},
    }


def _put_content(schemas: _Schemas) -> Finish:
    at = schemas.ref(UploadReceived)
    return lambda resolved, components: {
        "operationId": "file.put_content", "summary": "file.put_content: upload the bytes",
        "description": "The `upload_url` of `file.upload`: exactly `size_bytes` bytes, any "
                       "content type; the URL's signed token is the credential.",
        "tags": ["file"], "security": [],
        "parameters": [FILE_ID, {"name": "token", "in": "query", "required": True,
                                 "schema": {"type": "string"}}],
        "requestBody": {"required": True, "content": {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
        "responses": {"200": _json_response("Stored; complete the upload next.", resolved[at]),
                      **_errors({400, 403, 404, 409, 410, 413, 429, 503})},
    }


def _get_content(schemas: _Schemas) -> Finish:
    return lambda resolved, components: {
        "operationId": "file.get_content", "summary": "file.get_content: download the bytes",
        "description": "With the `download_url`'s signed token, or a token of the workspace. "
                       "`HEAD` answers the headers alone. A `Range` of bytes answers 206 "
                       "(several ranges: `multipart/byteranges`); an unparsable one is "
                       "ignored. `ETag` is strong: `If-None-Match` answers 304, `If-Range` "
                       "sends the whole file when it does not match.",
        "tags": ["file"],
        # Either token kind, or none when the URL carries its signed token.
        "security": [*SECURITY["any"], {}],
        "parameters": [FILE_ID, {"name": "token", "in": "query", "required": False,
                                 "schema": {"type": "string"}},
                       *({"name": name, "in": "header", "required": False,
                          "schema": {"type": "string"}}
                         for name in ("Range", "If-Range", "If-None-Match"))],
        "responses": {"200": {"description": "The file, with its own content type.",
                              "content": {"*/*": {"schema": {"type": "string",
                                                             "format": "binary"}}}},
                      "206": {"description": "The ranges asked for, with `Content-Range`.",
                              "content": {"*/*": {"schema": {"type": "string",
                                                             "format": "binary"}}}},
                      "304": {"description": "`If-None-Match` matched the `ETag`."},
                      **_errors({400, 401, 403, 404, 409, 410, 416, 429, 503})},
    }


def _trigger(schemas: _Schemas) -> Finish:
    op = OPERATIONS["webhook.trigger"]
    out = schemas.ref(op.output)
    body_at = schemas.ref(InboundWebhookTrigger)

    def finish(resolved: Sequence[dict[str, Any]], components: dict[str, Any]) -> dict[str, Any]:
        body = copy.deepcopy(_component(resolved[body_at], components))
        for taken in ("webhook_id", "token"):
            body["properties"].pop(taken)
        body.pop("required", None)
        return {
            "operationId": op.name, "summary": f"{op.name}: post into the hook's channel",
            "description": "A body with none of text, message, payload, blocks is taken "
                           "whole as the payload.",
            "tags": ["webhook"], "security": [{HOOK_TOKEN: []}],
            "parameters": [
                {"name": "webhook_id", "in": "path", "required": True,
                 "schema": {"type": "string"}},
                {"name": "token", "in": "query", "required": False,
                 "schema": {"type": "string"}},
                IDEMPOTENCY_HEADER,
            ],
            "requestBody": {"required": False, "content": {JSON: {"schema": body}}},
            "responses": {"201": _json_response("Posted.", resolved[out]),
                          **_errors(_error_statuses("POST", "agent"))},
        }

    return finish


def _node_token(schemas: _Schemas) -> Finish:
    at = schemas.ref(NodeToken)
    return lambda resolved, components: {
        "operationId": "agent.node_token",
        "summary": "agent.node_token: a node token for /v1/node/ws (Relaycast SDK)",
        "tags": ["agent"], "security": SECURITY["agent"],
        "responses": {"201": _json_response("Issued.", resolved[at]),
                      **_errors(_error_statuses("POST", "agent"))},
    }


SERVICE_ROUTES: tuple[ServiceRoute, ...] = (
    ServiceRoute("GET", "/healthz", _status_route("healthz: the process answers")),
    ServiceRoute("GET", "/readyz", _status_route(
        "readyz: the writer runs and the database takes a write",
        {"503": {"$ref": "#/components/responses/Error503"}})),
    ServiceRoute("GET", "/metrics", _metrics),
    ServiceRoute("GET", OPENAPI_PATH, _openapi),
    ServiceRoute("PUT", CONTENT_PATH, _put_content),
    ServiceRoute("GET", CONTENT_PATH, _get_content),
    ServiceRoute("POST", "/v1/hooks/{webhook_id}", _trigger),
    ServiceRoute("POST", "/v1/agent/node-token", _node_token),
    ServiceRoute("GET", "/", _console_page),
    ServiceRoute("GET", "/console/{name}", _console_file),
)


def served(routes: Sequence[BaseRoute]) -> list[tuple[str, str]]:
    """(method, path) of every HTTP route in `routes` (WebSocket routes have no method)."""
    pairs: list[tuple[str, str]] = []
    for route in routes:
        if isinstance(route, Route) and route.methods:
            pairs += [(m, route.path) for m in sorted(route.methods) if m != "HEAD"]
    return pairs


def build_openapi(routes: Sequence[BaseRoute], *, title: str = "agent-broker",
                  version: str = "1", public_url: str | None = None) -> dict[str, Any]:
    """The OpenAPI 3.1 document of `routes` (and of `/openapi.json` itself); `public_url`
    (`http.public_url`) is its `servers` entry (none: relative to the document).

    Raises ValueError for an HTTP route that neither `ROUTES` nor
    `SERVICE_ROUTES` describes, or whose declared status and output disagree.
    """
    by_key: dict[tuple[str, str], Describe] = {}
    for rest in ROUTES:
        by_key[(rest.method, rest.path)] = partial(
            _describe_operation, rest, OPERATIONS[rest.operation])
    for service in SERVICE_ROUTES:
        by_key[(service.method, service.path)] = service.describe
    wanted = dict.fromkeys([*served(routes), ("GET", OPENAPI_PATH)])
    missing = [f"{m} {p}" for m, p in wanted if (m, p) not in by_key]
    if missing:
        raise ValueError(f"routes with no OpenAPI description: {', '.join(missing)}")
    schemas = _Schemas()
    error_at = schemas.ref(ErrorBody)
    finishers = [(m, p, by_key[(m, p)](schemas)) for m, p in wanted]
    resolved, components = schemas.resolve()
    paths: dict[str, dict[str, Any]] = {}
    for method, path, finish in finishers:
        paths.setdefault(path, {})[method.lower()] = finish(resolved, components)
    error = {"type": "object", "required": ["ok", "error"],
             "properties": {"ok": {"const": False}, "error": resolved[error_at]}}
    components["Error"] = error
    responses = {
        f"Error{status}": {"description": text, "content": {
            JSON: {"schema": {"$ref": REF.format(name="Error")}}}}
        for status, text in ERROR_STATUSES.items()
    }
    responses["Error429"]["headers"] = {
        "Retry-After": {"description": "Seconds until a request may succeed.",
                        "schema": {"type": "integer"}}}
    document: dict[str, Any] = {
        "openapi": OPENAPI_VERSION,
        "info": {"title": title, "version": version, "description": (
            "The REST API of the broker. Every answer is `{\"ok\": true, \"data\": ...}` or "
            "`{\"ok\": false, \"error\": {\"code\", \"message\"}}`. The WebSocket endpoints "
            "`/v1/ws` and `/v1/node/ws` are described in docs/protocol.md.")},
        "paths": paths,
        "components": {"schemas": components, "responses": responses,
                       "securitySchemes": SECURITY_SCHEMES},
    }
    if public_url is not None:
        document["servers"] = [{"url": public_url}]
    return document
