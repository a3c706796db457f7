"""Helpers for HTTP tests: calls with a bearer token and a workspace built over REST."""

from __future__ import annotations

from typing import Any

import httpx
import msgspec


class Reply(msgspec.Struct):
    """A decoded response: status, the envelope's data or error, the raw JSON."""

    status: int
    body: Any

    @property
    def data(self) -> Any:
        assert self.body["ok"] is True, self.body
        return self.body["data"]

    @property
    def code(self) -> str:
        assert self.body["ok"] is False, self.body
        return str(self.body["error"]["code"])


async def call(
    client: httpx.AsyncClient, method: str, path: str, token: str | None = None,
    json: Any = None, params: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None, content: bytes | None = None,
) -> Reply:
    all_headers = dict(headers or {})
    if token is not None:
        all_headers["Authorization"] = f"Bearer {token}"
    response = await client.request(
        method, path, json=json, params=params, headers=all_headers, content=content
    )
    if response.status_code == 204:
        return Reply(204, None)
    return Reply(response.status_code, response.json())


class RestWorld(msgspec.Struct):
    """A workspace made over REST: its key, and its agents' ids and tokens by name."""

    workspace_id: str
    key: str
    agents: dict[str, str]
    tokens: dict[str, str]


async def make_rest_world(
    client: httpx.AsyncClient, name: str = "acme",
    agents: tuple[str, ...] = ("alice", "bob", "carol"),
) -> RestWorld:
    created = await call(client, "POST", "/v1/workspaces", json={"name": name})
    assert created.status == 201, created.body
    key = created.data["api_key"]
    ids: dict[str, str] = {}
    tokens: dict[str, str] = {}
    for agent in agents:
        reply = await call(client, "POST", "/v1/agents", key, json={"name": agent})
        assert reply.status == 201, reply.body
        ids[agent] = reply.data["id"]
        tokens[agent] = reply.data["token"]
    return RestWorld(created.data["workspace_id"], key, ids, tokens)


async def announce(
    client: httpx.AsyncClient, token: str, data: bytes, filename: str = "notes.txt",
    content_type: str = "text/plain",
) -> dict[str, Any]:
    reply = await call(client, "POST", "/v1/files/upload", token, json={
        "filename": filename, "content_type": content_type, "size_bytes": len(data)})
    assert reply.status == 201, reply.body
    return dict(reply.data)


async def put(client: httpx.AsyncClient, url: str, content: Any) -> httpx.Response:
    return await client.put(url, content=content)


async def uploaded(
    client: httpx.AsyncClient, token: str, data: bytes, **kwargs: Any
) -> dict[str, Any]:
    """Announce, PUT and complete a file; returns the complete response."""
    ticket = await announce(client, token, data, **kwargs)
    response = await put(client, ticket["upload_url"], data)
    assert response.status_code == 200, response.text
    done = await call(client, "POST", f"/v1/files/{ticket['id']}/complete", token)
    assert done.status == 200, done.body
    return dict(done.data)


class Scene(msgspec.Struct):
    """acme: #ops (alice, bob; carol is not in it), a thread, a reaction, a read,
    a DM alice-bob and a group DM alice-bob-carol; globex: another workspace."""

    acme: RestWorld
    globex: RestWorld
    root: str
    reply: str
    dm: str
    dm_message: str
    group: str


async def make_scene(client: httpx.AsyncClient) -> Scene:
    acme = await make_rest_world(client)
    alice, bob = acme.tokens["alice"], acme.tokens["bob"]
    assert (await call(client, "POST", "/v1/channels", alice, json={"name": "ops"})).status == 201
    assert (await call(client, "POST", "/v1/channels/ops/join", bob)).status == 200
    root = (await call(client, "POST", "/v1/channels/ops/messages", alice,
                       json={"text": "deploying now"})).data["id"]
    reply = (await call(client, "POST", f"/v1/messages/{root}/replies", bob,
                        json={"text": "ack from bob"})).data["id"]
    reacted = await call(client, "POST", f"/v1/messages/{root}/reactions", bob,
                         json={"emoji": "+1"})
    assert reacted.status == 201
    assert (await call(client, "POST", f"/v1/messages/{root}/read", bob)).status == 200
    dm = (await call(client, "POST", "/v1/dm", alice, json={"to": "bob", "text": "psst"})).data
    group = (await call(client, "POST", "/v1/dm/group", alice,
                        json={"participants": ["bob", "carol"], "name": "standup"})).data
    sent = await call(client, "POST", f"/v1/dm/{group['id']}/messages", acme.tokens["carol"],
                      json={"text": "standup at ten"})
    assert sent.status == 201
    globex = await make_rest_world(client, "globex", agents=("zed",))
    return Scene(acme, globex, root, reply, dm["conversation_id"], dm["message"]["id"],
                 group["id"])
