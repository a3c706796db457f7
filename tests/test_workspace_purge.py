"""Deleting a workspace: one small command that refuses its tokens at once, then a purge
in bounded steps by the sweeper, woken by the commit and resumed after a restart."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import msgspec
import pytest
import trio

from broker.engine import node_tokens
from broker.engine.engine import Engine
from broker.engine.maintenance import PurgeWorkspace
from broker.engine.messages import SendChannelMessage
from broker.engine.workspaces import DeleteWorkspace, agent_by_token, workspace_by_key
from broker.filestore import FileStore
from broker.server import BrokerServer
from broker.sweeps import Sweeper
from tests.helpers.engine import TEST_DEADLINE_S, World, make_world, wait_purged
from tests.helpers.rest import announce, call, make_rest_world, put, uploaded
from tests.helpers.webhooks import Receiver, dispatching, serving, subscribe, wait_state


def rows_of(engine: Engine, workspace_id: int) -> int:
    """Rows that name the workspace directly (the purge removes their children first)."""
    conn = engine.writer.connection
    return sum(int(conn.execute(f"SELECT count(*) FROM {t} WHERE workspace_id = ?",
                                (workspace_id,)).fetchone()[0])
               for t in ("agents", "channels", "messages", "message_log", "files", "outbox",
                         "webhook_subscriptions", "node_tokens"))


def workspace_row(engine: Engine, workspace_id: int) -> bool:
    return engine.writer.connection.execute(
        "SELECT 1 FROM workspaces WHERE id = ?", (workspace_id,)).fetchone() is not None


async def send_many(engine: Engine, world: World, n: int) -> None:
    for i in range(n):
        await engine.submit(SendChannelMessage(
            workspace_id=world.workspace_id, agent_id=world.agents["alice"], channel="general",
            text=f"message {i}"))


async def test_workspace_delete_refuses_tokens_and_frees_the_name(
    client: httpx.AsyncClient,
) -> None:
    """Right after the delete commits, every token of the workspace gets the same 401 as an
    unknown token, and a new workspace may take its name while the old rows remain."""
    world = await make_rest_world(client, agents=("alice",))
    unknown = await call(client, "GET", "/v1/workspace", "rk_live_" + "0" * 40)
    assert (await call(client, "DELETE", "/v1/workspace", world.key)).status == 200
    for path, token in (("/v1/workspace", world.key), ("/v1/agent", world.tokens["alice"]),
                        ("/v1/channels", world.tokens["alice"])):
        gone = await call(client, "GET", path, token)
        assert (gone.status, gone.body) == (401, unknown.body), path
    again = await call(client, "POST", "/v1/workspaces", json={"name": "acme"})
    assert again.status == 201
    new_key = again.data["api_key"]
    assert (await call(client, "GET", "/v1/workspace", new_key)).data["name"] == "acme"
    by_name = await call(client, "GET", "/v1/workspaces/by-name/acme")
    assert by_name.data["id"] == again.data["workspace_id"] != world.workspace_id
    assert (await call(client, "GET", "/v1/workspace", world.key)).status == 401


async def test_workspace_delete_refuses_node_tokens_before_the_purge(
    engine: Engine, world: World
) -> None:
    issued = await engine.submit(node_tokens.IssueNodeToken(
        workspace_id=world.workspace_id, agent_id=world.agents["alice"]))
    now = int(time.time() * 1000)
    assert await engine.read(node_tokens.agent_by_node_token, issued.token, now) is not None
    await send_many(engine, world, 3)
    await engine.submit(DeleteWorkspace(workspace_id=world.workspace_id))
    assert rows_of(engine, world.workspace_id) > 10  # nothing purged yet
    assert await engine.read(node_tokens.agent_by_node_token, issued.token, now) is None
    assert await engine.read(agent_by_token, world.tokens["bob"], now) is None
    assert await engine.read(workspace_by_key, world.key) is None


async def test_workspace_delete_refuses_its_signed_file_urls_before_the_purge(
    server: BrokerServer, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A signed download or upload URL carries no workspace token: from the delete's commit
    on it answers 404 file_not_found, while the purge (held here) has not removed a row."""
    held = trio.Event()

    async def hold_purge() -> int:
        held.set()
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    monkeypatch.setattr(server.sweeper, "purge_deleted_workspaces", hold_purge)
    world = await make_rest_world(client, agents=("alice",))
    alice = world.tokens["alice"]
    done = await uploaded(client, alice, b"secret bytes")
    assert (await client.get(done["download_url"])).content == b"secret bytes"
    pending = await announce(client, alice, b"later")
    assert (await call(client, "DELETE", "/v1/workspace", world.key)).status == 200
    with trio.fail_after(TEST_DEADLINE_S):
        await held.wait()
    download = await client.get(done["download_url"])
    assert download.status_code == 404, download.text
    assert download.json()["error"]["code"] == "file_not_found"
    upload = await put(client, pending["upload_url"], b"later")
    assert upload.status_code == 404, upload.text
    assert upload.json()["error"]["code"] == "file_not_found"
    assert rows_of(server.engine, int(world.workspace_id)) > 0  # nothing purged yet


async def test_workspace_purge_starts_on_the_delete_commit(engine: Engine) -> None:
    """The sweeper's interval is an hour: only the commit signal can start the purge."""
    a = await make_world(engine, "a")
    b = await make_world(engine, "b")
    await send_many(engine, a, 20)
    await send_many(engine, b, 2)
    b_rows = rows_of(engine, b.workspace_id)
    sweeper = Sweeper(engine, purge_step_rows=10)
    sweeper.retention = msgspec.structs.replace(sweeper.retention, sweep_interval_seconds=3600)
    async with trio.open_nursery() as nursery:
        await nursery.start(sweeper.run)
        await engine.submit(DeleteWorkspace(workspace_id=a.workspace_id))
        await wait_purged(sweeper, 1)
        nursery.cancel_scope.cancel()
    stats = sweeper.statistics()
    assert stats.purge_steps >= 10 and stats.purged_rows <= 10 * stats.purge_steps
    assert rows_of(engine, a.workspace_id) == 0 and not workspace_row(engine, a.workspace_id)
    assert rows_of(engine, b.workspace_id) == b_rows
    assert await engine.read(workspace_by_key, b.key) is not None


async def test_workspace_purge_resumes_after_a_restart(tmp_path: Path) -> None:
    """A purge cut short (two steps done) finishes on the next start, bytes on disk included."""
    store = FileStore(tmp_path)
    with trio.fail_after(TEST_DEADLINE_S):
        async with Engine.open(tmp_path) as engine:
            store.open()
            world = await make_world(engine)
            await send_many(engine, world, 10)
            file_id = 10**12
            key = f"{world.workspace_id}/{file_id}.{'a' * 16}"
            (store.objects / str(world.workspace_id)).mkdir()
            store.path_of(key).write_bytes(b"bytes")
            conn = engine.writer.connection
            await engine.submit(_Sql(
                "INSERT INTO files(id, workspace_id, filename, content_type, size_bytes, state,"
                " storage_key, created_at) VALUES (?,?,'f','text/plain',5,'complete',?,0)",
                (file_id, world.workspace_id, key)))
            await engine.submit(DeleteWorkspace(workspace_id=world.workspace_id))
            for _ in range(2):
                step = await engine.submit(PurgeWorkspace(world.workspace_id, 5))
                assert (step.rows, step.done) == (5, False)
            left = rows_of(engine, world.workspace_id)
            assert left > 0
        async with Engine.open(tmp_path) as engine:
            conn = engine.writer.connection
            assert rows_of(engine, world.workspace_id) == left
            sweeper = Sweeper(engine, store, purge_step_rows=5)
            async with trio.open_nursery() as nursery:
                await nursery.start(sweeper.run)
                await wait_purged(sweeper, 1)
                nursery.cancel_scope.cancel()
            assert rows_of(engine, world.workspace_id) == 0
            assert not workspace_row(engine, world.workspace_id)
            assert conn.execute("SELECT count(*) FROM deliveries").fetchone()[0] == 0
    assert not store.path_of(key).exists()
    assert not (store.objects / str(world.workspace_id)).exists()


async def test_workspace_delete_stops_its_webhooks(engine: Engine) -> None:
    """Outbox rows of a deleted workspace are never sent, while another workspace's are."""
    a = await make_world(engine, "a")
    b = await make_world(engine, "b")
    async with serving(Receiver()) as receiver:
        await subscribe(engine, a, ["message.created"], url=receiver.url)
        await subscribe(engine, b, ["message.created"], url=receiver.url)
        await send_many(engine, a, 1)
        await engine.submit(DeleteWorkspace(workspace_id=a.workspace_id))
        await send_many(engine, b, 1)
        async with dispatching(engine) as dispatcher:
            (got,) = await receiver.wait_for(1)
            # A's row was due at every look since the first: had it been taken,
            # it would have been sent before or with B's.
            await wait_state(engine, int(got.headers["x-relay-delivery"]), "delivered")
        a_rows = engine.writer.connection.execute(
            "SELECT state, attempts FROM outbox WHERE workspace_id = ?",
            (a.workspace_id,)).fetchall()
    assert got.json()["workspace_id"] == str(b.workspace_id)
    assert len(receiver.requests) == 1
    assert a_rows == [("pending", 0)]  # never attempted
    assert dispatcher.statistics().attempts == 1


class _Sql:
    """A test command: one statement in the writer's transaction."""

    def __init__(self, sql: str, args: tuple[object, ...]) -> None:
        self.sql, self.args = sql, args

    def apply(self, tx: object) -> None:
        tx.conn.execute(self.sql, self.args)  # type: ignore[attr-defined]
