"""Error codes to HTTP statuses, and failures that must not stop the daemon."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from broker.http.errors import status_for
from broker.operations import registry as operations
from broker.server import BrokerServer
from tests.helpers.rest import call, make_rest_world


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


@pytest.mark.one_process  # patches a handler in the serving process
async def test_server_unexpected_exception_500_keeps_serving(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected exception is 500 and the daemon keeps serving."""
    world = await make_rest_world(client, agents=("alice",))

    async def broken(engine: Any, call: Any, req: Any) -> Any:
        raise RuntimeError("bug")

    op = operations.OPERATIONS["agent.me"]
    monkeypatch.setitem(
        operations.OPERATIONS, "agent.me",
        operations.Operation(op.name, op.input, op.auth, broken, op.output),
    )
    reply = await call(client, "GET", "/v1/agent", world.tokens["alice"])
    assert (reply.status, reply.code) == (500, "internal_error")
    assert "bug" not in reply.body["error"]["message"]
    assert (await call(client, "GET", "/v1/agents", world.key)).status == 200


async def test_server_write_after_writer_closed_503(
    server: BrokerServer, client: httpx.AsyncClient
) -> None:
    """A write after the writer closed is 503 shutting_down."""
    world = await make_rest_world(client, agents=("alice",))
    await server.engine.writer.aclose()
    reply = await call(client, "POST", "/v1/channels/general/messages", world.tokens["alice"],
                       json={"text": "late"})
    assert (reply.status, reply.code) == (503, "shutting_down")
    # Reads still answer while the writer drains.
    assert (await call(client, "GET", "/v1/agent", world.tokens["alice"])).status == 200


async def test_envelopes_success_and_error(client: httpx.AsyncClient) -> None:
    """Success and error envelopes."""
    ok = await client.post("/v1/workspaces", json={"name": "acme"})
    assert ok.headers["content-type"] == "application/json"
    assert ok.json()["ok"] is True
    assert set(ok.json()) == {"ok", "data"}
    bad = await client.post("/v1/workspaces", json={"name": "acme"})
    assert bad.json() == {
        "ok": False,
        "error": {"code": "workspace_already_exists", "message": bad.json()["error"]["message"]},
    }


@pytest.mark.parametrize("path", ["/v1/ws", "/v1/node/ws"])
async def test_plain_http_to_a_websocket_path_is_426(client: httpx.AsyncClient, path: str) -> None:
    """It was 404 "no route", which sends a client looking for a wrong URL."""
    for method in ("GET", "POST"):
        response = await client.request(method, path)
        assert response.status_code == 426, response.text
        assert response.headers["upgrade"] == "websocket"
        assert response.json()["error"] == {
            "code": "upgrade_required",
            "message": f"{path} takes WebSocket connections (Upgrade: websocket)"}
    assert (await client.get("/v1/wss")).json()["error"]["code"] == "not_found"


# One past the largest SQLite integer: a 19-digit id that used to overflow the query binding.
PAST_MAX_ID = str(2**63)


@pytest.mark.parametrize(("method", "path", "params", "status", "code"), [
    ("GET", "/v1/channels/general/messages", {"before": PAST_MAX_ID}, 400, "invalid_cursor"),
    ("GET", "/v1/channels/general/messages", {"after": "9" * 19}, 400, "invalid_cursor"),
    ("GET", "/v1/messages/{message}/replies", {"before": PAST_MAX_ID}, 400, "invalid_cursor"),
    ("GET", "/v1/files", {"before": PAST_MAX_ID}, 400, "invalid_cursor"),
    ("GET", "/v1/files", {"uploaded_by": PAST_MAX_ID}, 200, None),
    ("GET", f"/v1/messages/{PAST_MAX_ID}", {}, 404, "message_not_found"),
    ("POST", f"/v1/messages/{PAST_MAX_ID}/reactions", {}, 404, "message_not_found"),
])
async def test_server_refuses_ids_past_largest_integer(
    client: httpx.AsyncClient, method: str, path: str, params: dict[str, str], status: int,
    code: str | None,
) -> None:
    """Ids and cursors past the largest integer are refused, not 500."""
    world = await make_rest_world(client, agents=("alice",))
    alice = world.tokens["alice"]
    sent = await call(client, "POST", "/v1/channels/general/messages", alice, json={"text": "x"})
    reply = await call(client, method, path.format(message=sent.data["id"]), alice,
                       params=params, json={"emoji": "ok"} if method == "POST" else None)
    assert reply.status == status, reply.body
    if code is not None:
        assert reply.code == code
