"""The OpenAPI document at /openapi.json: complete, in step with the README, and true.

"True" is checked by fuzzing: schemathesis generates requests from the
document (valid ones, and ones that break it) and runs them against a live
server, once as an agent and once as the workspace key, with the checks
that the answers are no server error, have a documented status and content
type, and match the documented schema.
"""

from __future__ import annotations

import re
import typing
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import hypothesis
import pytest
import requests
import schemathesis
import trio
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from broker.config import HttpSettings, ServerSettings, Settings
from broker.engine.config import EngineConfig
from broker.http.openapi import OPENAPI_PATH, SERVICE_ROUTES, build_openapi, served
from broker.http.routes import ROUTES
from broker.operations import OPERATIONS
from broker.ratelimit import UNLIMITED
from broker.server import BrokerServer
from tests.helpers.rest import call, make_rest_world

README = Path(__file__).resolve().parent.parent / "README.md"
ROW = re.compile(r"^\| (GET|POST|PUT|PATCH|DELETE) \| `([^`]+)` \| ", re.M)
METHODS = ("get", "post", "put", "patch", "delete")

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]
# Per operation and mode (generated, and with the world's real path values):
# enough to reach each route's error and success answers, small enough that
# both runs stay within about a minute on two cores.
EXAMPLES_PER_OPERATION = 6
# Operations that must answer 2xx at least once in a run (about 30 do, as
# either caller; most of the rest need names the fuzzer cannot guess).
MIN_OPERATIONS_SUCCEEDING = 20


@pytest.fixture
def settings(tmp_path: Path, engine_config: EngineConfig) -> Settings:
    """The server without rate limits: the fuzzer's hundreds of requests would
    otherwise end as 429s (documented, so passing, but testing nothing more);
    the limits have their own tests."""
    return Settings(
        data_dir=str(tmp_path / "data"), engine=engine_config, rate_limits=UNLIMITED,
        server=ServerSettings(workers=1),
        http=HttpSettings(host="127.0.0.1", port=0, shutdown_grace_seconds=1.0),
    )


def documented(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(m.upper(), path) for path, item in doc["paths"].items() for m in item
            if m in METHODS}


def test_operations_declare_what_they_return() -> None:
    """Every operation declares what it returns.

    Each route's operation names its output type, and 204 routes exactly return nothing.
    """
    for route in ROUTES:
        op = OPERATIONS[route.operation]
        assert op.output is not typing.Any, op.name
        returns_nothing = op.output is None
        assert returns_nothing == (route.status == 204), (route, op.output)


def test_openapi_refuses_undescribable_route() -> None:
    """The document refuses a route it cannot describe.

    A route with no description fails the build instead of going undocumented.
    """
    from starlette.responses import Response
    from starlette.routing import Route

    async def endpoint(request: Any) -> Response:
        return Response()

    with pytest.raises(ValueError, match="GET /v1/undescribed"):
        build_openapi([Route("/v1/undescribed", endpoint, methods=["GET"])])


async def test_openapi_describes_every_route_the_server_serves(
    server: BrokerServer, client: httpx.AsyncClient
) -> None:
    """GET /openapi.json lists every HTTP route of the running app, and nothing else."""
    response = await client.get(OPENAPI_PATH)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    doc = response.json()
    assert doc["openapi"].startswith("3.1")
    app_routes = server_app_routes(server)
    assert documented(doc) == set(app_routes)
    assert {(r.method, r.path) for r in ROUTES} <= documented(doc)
    assert {(r.method, r.path) for r in SERVICE_ROUTES} <= documented(doc)
    # Token kinds: an agent route takes the agent token, a none route no token.
    assert doc["paths"]["/v1/dm"]["post"]["security"] == [{"agentToken": []}]
    assert doc["paths"]["/v1/workspaces"]["post"]["security"] == []
    assert doc["paths"]["/v1/agents"]["get"]["security"] == [
        {"workspaceKey": []}, {"agentToken": []}]
    # A create that found its workspace answers 200 with another shape.
    create = doc["paths"]["/v1/workspaces"]["post"]["responses"]
    assert create["201"]["content"]["application/json"]["schema"]["properties"]["data"] == {
        "$ref": "#/components/schemas/WorkspaceCreated"}
    assert create["200"]["content"]["application/json"]["schema"]["properties"]["data"] == {
        "$ref": "#/components/schemas/WorkspaceFound"}
    assert "500" not in create


def server_app_routes(server: BrokerServer) -> list[tuple[str, str]]:
    """(method, path) of the HTTP routes the running server's app holds."""
    app = server.app
    assert app is not None
    return served(app.routes)


async def test_readme_route_table_matches_the_document(client: httpx.AsyncClient) -> None:
    """Every route in the README's table is in the document, and every /v1 route of the
    document is in the table (the byte routes and the hook are listed in prose)."""
    listed = set(ROW.findall(README.read_text(encoding="utf-8")))
    in_doc = documented((await client.get(OPENAPI_PATH)).json())
    assert listed <= in_doc, listed - in_doc
    in_prose = {("PUT", "/v1/files/{file_id}/content"), ("GET", "/v1/files/{file_id}/content"),
                ("POST", "/v1/hooks/{webhook_id}")}
    v1 = {(m, p) for m, p in in_doc if p.startswith("/v1/")}
    assert v1 - in_prose == listed, (v1 - in_prose) ^ listed
    assert OPENAPI_PATH in README.read_text(encoding="utf-8")


# -- fuzzing ---------------------------------------------------------------------------------


def fuzz(
    doc: dict[str, Any], base_url: str, token: str, known: dict[str, str],
    statuses: dict[str, Counter[int]],
) -> list[str]:
    """Run every operation of `doc` against `base_url`; the failures, one line each.

    statuses: filled with the statuses each operation answered.

    Blocking (schemathesis calls with requests): run it in a worker thread
    while the server runs on the test's event loop.
    """
    schema = schemathesis.openapi.from_dict(doc)
    failures: list[str] = []
    headers = {"Authorization": f"Bearer {token}"}
    with requests.Session() as session:
        for operation in sorted((r.ok() for r in schema.get_all_operations()),
                                key=destructive_last):
            in_path = {p.name for p in operation.path_parameters}
            fixed = {k: v for k, v in known.items() if k in in_path}
            strategies = [
                operation.as_strategy(generation_mode=schemathesis.GenerationMode.POSITIVE),
                operation.as_strategy(generation_mode=schemathesis.GenerationMode.NEGATIVE),
            ]
            if fixed:
                strategies.append(operation.as_strategy(path_parameters=fixed))

            @hypothesis.settings(
                max_examples=EXAMPLES_PER_OPERATION * len(strategies), derandomize=True,
                database=None, deadline=None, print_blob=False,
                suppress_health_check=list(hypothesis.HealthCheck),
                phases=[hypothesis.Phase.generate],
            )
            @hypothesis.given(case=st.one_of(strategies))
            def run(case: Any) -> None:
                response = case.call_and_validate(base_url=base_url, session=session,
                                                  headers=headers, checks=CHECKS, timeout=10)
                statuses.setdefault(case.operation.label, Counter())[response.status_code] += 1

            try:
                run()
            except (Exception, FailureGroup) as exc:  # collect all, report them together
                failures.append(describe_failure(operation.label, exc))
    return failures


def destructive_last(operation: Any) -> tuple[bool, bool]:
    """Deletes after the rest, deleting the workspace last: what they remove (the known
    channel, the workspace itself) would turn the later operations' answers into 404s
    and 401s, and the fuzzer would reach fewer success answers."""
    return operation.method.upper() == "DELETE", operation.path == "/v1/workspace"


def describe_failure(label: str, exc: BaseException) -> str:
    """The failed checks with their messages, and the request that reproduces them."""
    found = exc.exceptions if isinstance(exc, BaseExceptionGroup) else (exc,)
    lines = [f"{label}:"]
    lines += [f"  {type(f).__name__}: {f}".replace("\n", " | ") for f in found]
    lines += [f"  {note}".replace("\n", " ") for note in getattr(exc, "__notes__", ())
              if "curl" in note]
    return "\n".join(lines)


async def build_known_world(client: httpx.AsyncClient) -> tuple[Any, dict[str, str]]:
    """A workspace with real objects, so fuzzed requests also reach success answers."""
    world = await make_rest_world(client, "fuzz", agents=("alice", "bob", "carol"))
    alice, key = world.tokens["alice"], world.key
    assert (await call(client, "POST", "/v1/channels", alice, json={"name": "lobby"})
            ).status == 201
    await call(client, "POST", "/v1/channels/lobby/join", world.tokens["bob"])
    sent = await call(client, "POST", "/v1/channels/lobby/messages", alice,
                      json={"text": "hello"})
    dm = await call(client, "POST", "/v1/dm", world.tokens["bob"],
                    json={"to": "alice", "text": "hi"})
    group = await call(client, "POST", "/v1/dm/group", alice,
                       json={"participants": ["bob", "carol"], "name": "trio"})
    upload = await call(client, "POST", "/v1/files/upload", alice,
                        json={"filename": "a.txt", "content_type": "text/plain",
                              "size_bytes": 2})
    put = await client.put(upload.data["upload_url"], content=b"hi")
    assert put.status_code == 200, put.text
    await call(client, "POST", f"/v1/files/{upload.data['id']}/complete", alice)
    hook = await call(client, "POST", "/v1/webhooks", key, json={"channel": "lobby"})
    deliveries = await call(client, "GET", "/v1/deliveries", alice)
    known = {
        "channel": "lobby", "name": "bob", "agent_name": "carol", "emoji": "thumbsup",
        "message_id": sent.data["id"], "conversation_id": group.data["id"],
        "file_id": upload.data["id"], "webhook_id": hook.data["webhook_id"],
        "delivery_id": deliveries.data[0]["id"] if deliveries.data else "0:1",
    }
    assert dm.status == 201 and sent.status == 201, (dm.body, sent.body)
    return world, known


@pytest.mark.parametrize("as_who", ["agent", "workspace key"])
async def test_openapi_fuzz_finds_no_server_error_and_no_schema_violation(
    server: BrokerServer, client: httpx.AsyncClient, as_who: str
) -> None:
    """schemathesis over the whole document: every answer documented and as described."""
    world, known = await build_known_world(client)
    doc = (await client.get(OPENAPI_PATH)).json()
    token = world.tokens["alice"] if as_who == "agent" else world.key
    assert server.url is not None
    statuses: dict[str, Counter[int]] = {}
    failures = await trio.to_thread.run_sync(
        partial(fuzz, doc, server.url, token, known, statuses))
    assert failures == [], "\n".join(failures)
    # Every operation was called, and many reached a success answer whose
    # schema was checked (not only errors): the known world did its job.
    assert set(statuses) == {f"{m} {p}" for m, p in documented(doc)}
    succeeded = [label for label, seen in statuses.items() if any(s < 300 for s in seen)]
    assert len(succeeded) >= MIN_OPERATIONS_SUCCEEDING, sorted(succeeded)
