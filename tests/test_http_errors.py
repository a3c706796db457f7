"""Error codes to HTTP statuses, and failures that must not stop the daemon."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from broker import operations
from broker.http.errors import status_for
from broker.server import BrokerServer
from tests.rest import call, make_rest_world


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("unauthorized", 401),
        ("invalid_token", 401),
        ("forbidden", 403),
        ("not_a_member", 403),
        ("not_a_participant", 403),
        ("channel_not_found", 404),
        ("message_not_found", 404),
        ("delivery_not_found", 404),
        ("not_found", 404),
        ("method_not_allowed", 405),
        ("agent_already_exists", 409),
        ("channel_already_exists", 409),
        ("idempotency_key_reused", 409),
        ("channel_archived", 409),
        ("payload_too_large", 413),
        ("internal_error", 500),
        ("commit_failed", 503),
        ("shutting_down", 503),
        ("writer_failed", 503),
        ("not_ready", 503),
        ("invalid_json", 400),
        ("invalid_request", 400),
        ("invalid_text", 400),
        ("text_too_long", 400),
        ("data_too_large", 400),
        ("too_few_participants", 400),
        ("cannot_dm_self", 400),
        ("cannot_archive_general", 400),
        ("not_a_group_dm", 400),
        ("something_new", 400),
    ],
)
def test_status_for_code(code: str, status: int) -> None:
    assert status_for(code) == status


async def test_an_unexpected_exception_is_500_and_the_daemon_keeps_serving(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = await make_rest_world(client, agents=("alice",))

    async def broken(engine: Any, call: Any, req: Any) -> Any:
        raise RuntimeError("bug")

    op = operations.OPERATIONS["agent.me"]
    monkeypatch.setitem(
        operations.OPERATIONS, "agent.me",
        operations.Operation(op.name, op.input, op.auth, broken),
    )
    reply = await call(client, "GET", "/v1/agent", world.tokens["alice"])
    assert (reply.status, reply.code) == (500, "internal_error")
    assert "bug" not in reply.body["error"]["message"]
    assert (await call(client, "GET", "/v1/agents", world.key)).status == 200


async def test_a_write_after_the_writer_closed_is_503_shutting_down(
    server: BrokerServer, client: httpx.AsyncClient
) -> None:
    world = await make_rest_world(client, agents=("alice",))
    await server.engine.writer.aclose()
    reply = await call(client, "POST", "/v1/channels/general/messages", world.tokens["alice"],
                       json={"text": "late"})
    assert (reply.status, reply.code) == (503, "shutting_down")
    # Reads still answer while the writer drains.
    assert (await call(client, "GET", "/v1/agent", world.tokens["alice"])).status == 200


async def test_success_and_error_envelopes(client: httpx.AsyncClient) -> None:
    ok = await client.post("/v1/workspaces", json={"name": "acme"})
    assert ok.headers["content-type"] == "application/json"
    assert ok.json()["ok"] is True
    assert set(ok.json()) == {"ok", "data"}
    bad = await client.post("/v1/workspaces", json={"name": "acme"})
    assert bad.json() == {
        "ok": False,
        "error": {"code": "workspace_already_exists", "message": bad.json()["error"]["message"]},
    }
