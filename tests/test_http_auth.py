"""The auth matrix: every authenticated REST route against every kind of bad or foreign token.

For each route: no token (401 unauthorized), a malformed token (401
invalid_token), a rotated-out agent token after its grace, a deactivated
agent's token and a deleted workspace's key (401 invalid_token), the wrong
kind of token (403 forbidden, for routes that take only one kind), and a
valid token of another workspace aimed at this workspace's channels,
messages, conversations, agents and deliveries (404, never the data; routes
that name nothing of the first workspace act on the caller's own workspace);
on the reads both kinds take, another workspace's agent token and its key.
"""

from __future__ import annotations

from typing import Any

import httpx
import msgspec
import pytest

from broker.config import Settings
from broker.engine.config import EngineConfig, Limits
from broker.http.routes import ROUTES
from broker.operations import OPERATIONS
from broker.webhooks.settings import WebhookSettings
from tests.helpers.rest import RestWorld, call, make_rest_world


@pytest.fixture
def engine_config() -> EngineConfig:
    # No grace: a rotated-out token dies at once.
    return EngineConfig(synchronous="NORMAL", limits=Limits(token_grace_seconds=0))


@pytest.fixture
def settings(settings: Settings) -> Settings:
    # Workspace A subscribes a local URL (never called: no dispatcher runs).
    return msgspec.structs.replace(
        settings, webhooks=WebhookSettings(enabled=False, allow_hosts=("127.0.0.1",)))


class Target(msgspec.Struct):
    """Ids of workspace A that the routes are aimed at, and the tokens of both workspaces."""

    a: RestWorld
    b: RestWorld
    ids: dict[str, str]
    rotated_out: str
    deactivated: str
    deleted_key: str


async def make_target(client: httpx.AsyncClient) -> Target:
    a = await make_rest_world(client, "ws-a", ("alice", "bob", "carol", "rot", "gone"))
    b = await make_rest_world(client, "ws-b", ("xavier", "yolanda"))
    alice = a.tokens["alice"]
    await call(client, "POST", "/v1/channels", alice, json={"name": "ops-a"})
    sent = await call(client, "POST", "/v1/channels/ops-a/messages", alice,
                      json={"text": "hello secret"})
    await call(client, "POST", "/v1/channels/general/messages", alice, json={"text": "hello all"})
    group = await call(client, "POST", "/v1/dm/group", alice,
                       json={"participants": ["bob", "carol"]})
    deliveries = await call(client, "GET", "/v1/deliveries", a.tokens["bob"])
    upload = await call(client, "POST", "/v1/files/upload", alice,
                        json={"filename": "a.txt", "content_type": "text/plain", "size_bytes": 1})
    assert upload.status == 201, upload.body
    subscription = await call(
        client, "POST", "/v1/subscriptions", a.key,
        json={"url": "http://127.0.0.1:9/hook", "events": ["message.created"]})
    assert subscription.status == 201, subscription.body
    hook = await call(client, "POST", "/v1/webhooks", a.key, json={"channel": "ops-a"})
    assert hook.status == 201, hook.body
    rotated = await call(client, "POST", "/v1/agents/rot/rotate-token", a.key)
    assert rotated.status == 200
    gone = await call(client, "DELETE", "/v1/agents/gone", a.key)
    assert gone.status == 200
    c = await make_rest_world(client, "ws-c", ())
    assert (await call(client, "DELETE", "/v1/workspace", c.key)).status == 200
    ids = {
        "name": "alice",
        "channel": "ops-a",
        "message_id": sent.data["id"],
        "conversation_id": group.data["id"],
        "delivery_id": deliveries.data[0]["id"],
        "emoji": "x",
        "agent_name": "bob",
        "file_id": upload.data["id"],
        "subscription_id": subscription.data["id"],
        "webhook_id": hook.data["webhook_id"],
    }
    return Target(a, b, ids, a.tokens["rot"], a.tokens["gone"], c.key)


# Bodies that pass input validation, so a foreign token reaches the engine's lookups.
BODIES: dict[str, dict[str, Any]] = {
    "workspace.update": {},
    "agent.register": {"name": "newbie"},
    "agent.update": {"persona": "p"},
    "channel.create": {"name": "fresh"},
    "channel.update": {"topic": "t"},
    "channel.set_topic": {"topic": "t"},
    "channel.invite": {"agent_name": "yolanda"},
    "message.send": {"text": "x"},
    "thread.reply": {"text": "x"},
    "reaction.add": {"emoji": "x"},
    "dm.send": {"to": "alice", "text": "x"},
    "group_dm.create": {"participants": ["alice", "bob"]},
    "group_dm.send": {"text": "x"},
    "group_dm.add_participant": {"agent_name": "yolanda"},
    "delivery.ack_up_to": {"up_to_seq": 1},
    "delivery.fail": {"error": "e"},
    "delivery.defer": {"available_at": "2030-01-01T00:00:00Z"},
    "file.upload": {"filename": "b.txt", "content_type": "text/plain", "size_bytes": 1},
    "subscription.create": {"url": "http://127.0.0.1:9/b", "events": ["message.created"]},
    "subscription.replay": {},
    "webhook.create": {"channel": "ops-a"},
}
QUERIES: dict[str, dict[str, str]] = {"search": {"q": "hello"}}

# With another workspace's valid token: what each route answers. Routes that
# name something of workspace A must not find it; the others act on B.
FOREIGN: dict[str, tuple[int, str | None]] = {
    "workspace.get": (200, None),
    "workspace.update": (200, None),
    "workspace.delete": (200, None),
    "agent.register": (201, None),
    "agent.list": (200, None),
    "agent.presence": (200, None),
    "agent.heartbeat": (200, None),
    "agent.disconnect": (200, None),
    "agent.me": (200, None),
    "agent.get": (404, "agent_not_found"),
    "agent.update": (404, "agent_not_found"),
    "agent.deactivate": (404, "agent_not_found"),
    "agent.rotate_token": (404, "agent_not_found"),
    "agent.mailbox": (404, "agent_not_found"),
    "agent.deliveries": (404, "agent_not_found"),
    "mailbox.list": (200, None),
    "channel.create": (201, None),
    "channel.list": (200, None),
    "channel.get": (404, "channel_not_found"),
    "channel.update": (404, "channel_not_found"),
    "channel.archive": (404, "channel_not_found"),
    "channel.set_topic": (404, "channel_not_found"),
    "channel.join": (404, "channel_not_found"),
    "channel.leave": (404, "channel_not_found"),
    "channel.invite": (404, "channel_not_found"),
    "channel.members": (404, "channel_not_found"),
    "channel.mute": (404, "channel_not_found"),
    "channel.unmute": (404, "channel_not_found"),
    "channel.read_status": (404, "channel_not_found"),
    "message.send": (404, "channel_not_found"),
    "message.list": (404, "channel_not_found"),
    "message.get": (404, "message_not_found"),
    "thread.reply": (404, "message_not_found"),
    "thread.get": (404, "message_not_found"),
    "reaction.add": (404, "message_not_found"),
    "reaction.list": (404, "message_not_found"),
    "reaction.remove": (404, "message_not_found"),
    "message.read": (404, "message_not_found"),
    "message.readers": (404, "message_not_found"),
    "dm.send": (404, "agent_not_found"),
    "dm.conversations": (200, None),
    "dm.messages": (404, "conversation_not_found"),
    "group_dm.create": (404, "agent_not_found"),
    "group_dm.send": (404, "conversation_not_found"),
    "group_dm.add_participant": (404, "conversation_not_found"),
    "group_dm.remove_participant": (404, "conversation_not_found"),
    "inbox.get": (200, None),
    "search": (200, None),
    "delivery.list": (200, None),
    "delivery.ack_one": (404, "delivery_not_found"),
    "delivery.ack_up_to": (200, None),
    "delivery.fail": (404, "delivery_not_found"),
    "delivery.defer": (404, "delivery_not_found"),
    "file.upload": (201, None),
    "file.list": (200, None),
    "file.get": (404, "file_not_found"),
    "file.complete": (404, "file_not_found"),
    "file.delete": (404, "file_not_found"),
    "subscription.create": (201, None),
    "subscription.list": (200, None),
    "subscription.get": (404, "subscription_not_found"),
    "subscription.delete": (404, "subscription_not_found"),
    "subscription.dead_letters": (404, "subscription_not_found"),
    "subscription.replay": (404, "subscription_not_found"),
    "webhook.create": (404, "channel_not_found"),
    "webhook.list": (200, None),
    "webhook.delete": (404, "webhook_not_found"),
}

AUTHENTICATED = [r for r in ROUTES if OPERATIONS[r.operation].auth != "none"]


def test_auth_matrix_covers_every_route() -> None:
    """Every authenticated route is in the matrix."""
    assert {r.operation for r in AUTHENTICATED} == set(FOREIGN)


@pytest.mark.parametrize(
    "route", AUTHENTICATED, ids=[f"{r.method} {r.path}" for r in AUTHENTICATED]
)
async def test_auth_matrix(client: httpx.AsyncClient, route: Any) -> None:
    target = await make_target(client)
    path = route.path.format(**target.ids)
    body = BODIES.get(route.operation)
    params = QUERIES.get(route.operation)
    auth = OPERATIONS[route.operation].auth

    async def attempt(headers: dict[str, str]) -> tuple[int, str | None]:
        response = await client.request(route.method, path, json=body, params=params,
                                        headers=headers)
        if response.status_code == 204:
            return 204, None
        payload = response.json()
        return response.status_code, None if payload["ok"] else payload["error"]["code"]

    def bearer(token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    results: dict[str, tuple[int, str | None]] = {
        "no token": await attempt({}),
        "not a bearer header": await attempt({"Authorization": "Basic dXNlcjpwYXNz"}),
        "bearer without a token": await attempt({"Authorization": "Bearer"}),
        "unknown prefix": await attempt(bearer("xx_live_abc")),
        "unknown agent token": await attempt(bearer("at_live_" + "A" * 43)),
        "unknown workspace key": await attempt(bearer("rk_live_" + "A" * 43)),
        "oversized token": await attempt(bearer("at_live_" + "A" * 2000)),
        "rotated-out token": await attempt(bearer(target.rotated_out)),
        "deactivated agent": await attempt(bearer(target.deactivated)),
        "deleted workspace key": await attempt(bearer(target.deleted_key)),
    }
    expected: dict[str, tuple[int, str | None]] = {
        "no token": (401, "unauthorized"),
        **{case: (401, "invalid_token") for case in results if case != "no token"},
    }
    if auth == "agent":
        results["workspace key (wrong kind)"] = await attempt(bearer(target.a.key))
        expected["workspace key (wrong kind)"] = (403, "forbidden")
    elif auth == "workspace":
        results["agent token (wrong kind)"] = await attempt(bearer(target.a.tokens["alice"]))
        expected["agent token (wrong kind)"] = (403, "forbidden")
    foreign = target.b.key if auth == "workspace" else target.b.tokens["xavier"]
    results["another workspace's token"] = await attempt(bearer(foreign))
    expected["another workspace's token"] = FOREIGN[route.operation]
    if auth == "any" and route.method == "GET":
        # The workspace key reads all of its own workspace, and no more of another.
        results["another workspace's key"] = await attempt(bearer(target.b.key))
        expected["another workspace's key"] = FOREIGN[route.operation]
    assert results == expected


async def test_auth_foreign_workspace_search_and_lists_empty(
    client: httpx.AsyncClient,
) -> None:
    """Another workspace's search and lists show nothing of it."""
    target = await make_target(client)
    xavier = target.b.tokens["xavier"]
    found = await call(client, "GET", "/v1/search", xavier, params={"q": "hello"})
    assert found.data == []
    agents = await call(client, "GET", "/v1/agents", xavier)
    assert sorted(a["name"] for a in agents.data) == ["xavier", "yolanda"]
    channels = await call(client, "GET", "/v1/channels", xavier)
    assert [c["name"] for c in channels.data] == ["general"]
    history = await call(client, "GET", "/v1/channels/general/messages", xavier)
    assert history.data == []
    assert (await call(client, "GET", "/v1/deliveries", xavier)).data == []
    assert (await call(client, "GET", "/v1/dm/conversations", xavier)).data == []

