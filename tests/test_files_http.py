"""Files over HTTP through the real server on 127.0.0.1: upload, complete, attach, download."""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import msgspec
import pytest
import trio

from broker.config import HttpSettings, ServerSettings, Settings
from broker.engine import files
from broker.engine.config import EngineConfig
from broker.engine.history import load_messages
from broker.engine.workspaces import DeleteWorkspace
from broker.filestore import FileStore, sweep_files
from broker.server import BrokerServer
from tests.helpers.daemon import run_server
from tests.helpers.engine import TEST_DEADLINE_S, wait_purged
from tests.helpers.rest import RestWorld, announce, call, make_rest_world, put, uploaded


def store_of(server: BrokerServer) -> FileStore:
    return FileStore(Path(server.settings.data_dir))


def on_disk(store: FileStore) -> tuple[list[str], list[str]]:
    """(stored objects, temporary files)."""
    return sorted(store.object_keys()), sorted(os.listdir(store.tmp))


async def file_rows(server: BrokerServer) -> list[Any]:
    return await server.engine.read(lambda c: c.execute(
        "SELECT id, state, storage_key FROM files ORDER BY id").fetchall())


@pytest.fixture
async def world(client: httpx.AsyncClient) -> RestWorld:
    w = await make_rest_world(client)
    assert (await call(client, "POST", "/v1/channels", w.tokens["alice"],
                       json={"name": "ops"})).status == 201
    assert (await call(client, "POST", "/v1/channels/ops/join",
                       w.tokens["bob"])).status == 200
    return w


# -- the round trip ----------------------------------------------------------------------


async def test_upload_round_trip_same_bytes(
    server: BrokerServer, client: httpx.AsyncClient, world: RestWorld
) -> None:
    """An upload round trip returns the same bytes."""
    # larger than one write piece, not a multiple of anything
    data = secrets.token_bytes(2 * 1024 * 1024 + 12345)
    ticket = await announce(client, world.tokens["alice"], data, filename="trace dump é.bin",
                            content_type="application/octet-stream")
    assert ticket["upload_url"].startswith(f"{server.url}/v1/files/{ticket['id']}/content?token=")
    assert ticket["expires_at"].endswith("Z")
    assert (await call(client, "GET", f"/v1/files/{ticket['id']}", world.key)).data["status"] \
        == "pending"

    async def streamed() -> AsyncIterator[bytes]:  # chunked: no Content-Length
        for start in range(0, len(data), 100_000):
            yield data[start:start + 100_000]

    response = await put(client, ticket["upload_url"], streamed())
    assert response.status_code == 200, response.text
    assert response.json()["data"] == {"id": ticket["id"], "size_bytes": len(data),
                                       "status": "pending"}
    done = await call(client, "POST", f"/v1/files/{ticket['id']}/complete",
                      world.tokens["alice"])
    assert done.status == 200
    assert {k: done.data[k] for k in ("id", "filename", "content_type", "size_bytes")} == {
        "id": ticket["id"], "filename": "trace dump é.bin",
        "content_type": "application/octet-stream", "size_bytes": len(data)}

    download = await client.get(done.data["download_url"])  # no Authorization header
    assert download.status_code == 200
    assert download.content == data
    assert download.headers["content-type"] == "application/octet-stream"
    assert download.headers["content-length"] == str(len(data))
    assert download.headers["x-content-type-options"] == "nosniff"
    assert "filename*=UTF-8''trace%20dump%20%C3%A9.bin" in download.headers["content-disposition"]
    # a member of the workspace may also download with its bearer token
    by_bob = await client.get(f"/v1/files/{ticket['id']}/content",
                              headers={"Authorization": f"Bearer {world.tokens['bob']}"})
    assert by_bob.content == data

    info = await call(client, "GET", f"/v1/files/{ticket['id']}", world.tokens["bob"])
    assert info.data["status"] == "complete" and info.data["uploaded_by"] == "alice"
    assert (await client.get(info.data["download_url"])).content == data
    listed = await call(client, "GET", "/v1/files", world.key)
    assert [f["id"] for f in listed.data] == [ticket["id"]]
    # completing again answers the same
    again = await call(client, "POST", f"/v1/files/{ticket['id']}/complete",
                       world.tokens["alice"])
    assert again.status == 200 and again.data["id"] == ticket["id"]


async def test_download_serves_stored_content_type(
    client: httpx.AsyncClient, world: RestWorld
) -> None:
    """The stored content type is served back exactly."""
    done = await uploaded(client, world.tokens["alice"], b"<h1>hi</h1>", filename="a.html",
                          content_type="text/html; charset=iso-8859-1")
    download = await client.get(done["download_url"])
    assert download.headers["content-type"] == "text/html; charset=iso-8859-1"
    assert download.headers["content-disposition"].startswith("attachment;")


async def test_upload_empty_file(client: httpx.AsyncClient, world: RestWorld) -> None:
    """An empty file is a file."""
    done = await uploaded(client, world.tokens["alice"], b"")
    download = await client.get(done["download_url"])
    assert download.status_code == 200 and download.content == b""


async def test_upload_writes_bytes_once(
    server: BrokerServer, client: httpx.AsyncClient, world: RestWorld
) -> None:
    """The bytes are written once."""
    ticket = await announce(client, world.tokens["alice"], b"first")
    assert (await put(client, ticket["upload_url"], b"first")).status_code == 200
    second = await put(client, ticket["upload_url"], b"other")
    assert second.status_code == 409
    assert second.json()["error"]["code"] == "file_already_uploaded"
    done = await call(client, "POST", f"/v1/files/{ticket['id']}/complete",
                      world.tokens["alice"])
    assert (await client.get(done.data["download_url"])).content == b"first"
    assert len(on_disk(store_of(server))[0]) == 1


# -- size mismatch and tokens ----------------------------------------------------------------


async def test_upload_size_mismatch_never_completes(
    server: BrokerServer, client: httpx.AsyncClient, world: RestWorld
) -> None:
    """A size mismatch fails and the file never completes."""
    ticket = await announce(client, world.tokens["alice"], b"0123456789")

    async def chunked(data: bytes) -> AsyncIterator[bytes]:
        yield data[:3]
        yield data[3:]

    attempts: list[Any] = [b"012345678", b"0123456789A", chunked(b"012"), chunked(b"0" * 5000)]
    for body in attempts:
        response = await put(client, ticket["upload_url"], body)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == "file_size_mismatch"
    done = await call(client, "POST", f"/v1/files/{ticket['id']}/complete",
                      world.tokens["alice"])
    assert (done.status, done.code) == (409, "file_not_uploaded")
    assert on_disk(store_of(server)) == ([], [])
    assert await file_rows(server) == [(int(ticket["id"]), "pending", None)]
    download = await client.get(f"/v1/files/{ticket['id']}/content",
                                headers={"Authorization": f"Bearer {world.tokens['alice']}"})
    assert download.status_code == 409
    assert download.json()["error"]["code"] == "file_not_complete"
    # the upload URL still works for a correct body
    assert (await put(client, ticket["upload_url"], b"0123456789")).status_code == 200


async def test_upload_expired_or_forged_token_403(
    server: BrokerServer, client: httpx.AsyncClient, world: RestWorld
) -> None:
    """An expired or forged upload token is 403."""
    ticket = await announce(client, world.tokens["alice"], b"hello")
    other = await announce(client, world.tokens["alice"], b"hello")
    file_id = int(ticket["id"])
    url = urlsplit(ticket["upload_url"])
    token = parse_qs(url.query)["token"][0]
    path = url.path
    secret = await server.engine.read(files.url_secret)
    assert secret is not None
    past = int(time.time() * 1000) - 1
    expired = files.sign(secret, "upload", file_id, past)
    forged = files.sign(b"not the server secret".ljust(32), "upload", file_id, past + 3_600_000)
    cases = {
        "url_token_expired": [f"{path}?token={expired}"],
        "url_token_invalid": [
            f"{path}?token={forged}",
            f"{path}?token={token[:-2]}xx",
            f"{path}",
            f"{path}?token=",
            f"{path}?token={files.sign(secret, 'download', file_id, past + 3_600_000)}",
            # another file's upload URL for this file
            f"{path}?token={parse_qs(urlsplit(other['upload_url']).query)['token'][0]}",
        ],
    }
    for code, urls in cases.items():
        for candidate in urls:
            response = await put(client, candidate, b"hello")
            assert response.status_code == 403, (candidate, response.text)
            assert response.json()["error"]["code"] == code
    assert on_disk(store_of(server)) == ([], [])
    assert all(row[2] is None for row in await file_rows(server))


async def test_download_needs_token_or_bearer(
    client: httpx.AsyncClient, world: RestWorld
) -> None:
    """A download URL needs a valid token or a bearer."""
    done = await uploaded(client, world.tokens["alice"], b"hello")
    path = f"/v1/files/{done['id']}/content"
    assert (await client.get(path)).status_code == 401
    upload_like = await client.get(path + "?token=1." + "A" * 43)
    assert upload_like.status_code == 403
    assert upload_like.json()["error"]["code"] == "url_token_invalid"


@pytest.mark.one_process  # patches the upload grace in the serving process
async def test_upload_outliving_its_url_cut_off(
    server: BrokerServer, client: httpx.AsyncClient, world: RestWorld,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An upload that outlives its URL is cut off."""
    ticket = await announce(client, world.tokens["alice"], b"0123456789")
    # leave the PUT 0.2 s instead of the URL's hour plus the sweep's grace
    ttl_ms = server.engine.limits.file_url_ttl_seconds * 1000
    monkeypatch.setattr(files, "UPLOAD_SWEEP_GRACE_MS", 200 - ttl_ms)

    async def trickle() -> AsyncIterator[bytes]:
        yield b"01234"
        await trio.sleep(0.5)
        yield b"56789"

    response = await put(client, ticket["upload_url"], trickle())
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "url_token_expired"
    assert on_disk(store_of(server)) == ([], [])
    assert await file_rows(server) == [(int(ticket["id"]), "pending", None)]


# -- workspaces are separate ----------------------------------------------------------------


async def test_files_of_other_workspace_not_attached_or_read(
    server: BrokerServer, client: httpx.AsyncClient, world: RestWorld
) -> None:
    """A file of another workspace cannot be attached or read."""
    done = await uploaded(client, world.tokens["alice"], b"secret plans")
    file_id = done["id"]
    other = await make_rest_world(client, name="other", agents=("mallory",))
    mallory = other.tokens["mallory"]
    assert (await call(client, "POST", "/v1/channels", mallory, json={"name": "loot"})).status \
        == 201
    sent = await call(client, "POST", "/v1/channels/loot/messages", mallory,
                      json={"text": "look", "attachments": [file_id]})
    assert (sent.status, sent.code) == (404, "file_not_found")
    for method, path in (("GET", f"/v1/files/{file_id}"),
                         ("POST", f"/v1/files/{file_id}/complete"),
                         ("DELETE", f"/v1/files/{file_id}")):
        reply = await call(client, method, path, mallory)
        assert (reply.status, reply.code) == (404, "file_not_found"), path
    assert (await call(client, "GET", "/v1/files", other.key)).data == []
    download = await client.get(f"/v1/files/{file_id}/content",
                                headers={"Authorization": f"Bearer {mallory}"})
    assert download.status_code == 404
    assert download.json()["error"]["code"] == "file_not_found"
    assert await file_rows(server) == [(int(file_id), "complete", await _key(server))]


async def _key(server: BrokerServer) -> str:
    (key,) = on_disk(store_of(server))[0]
    return key


# -- attachments and the deletion rule ----------------------------------------------------------


async def attachments_of(server: BrokerServer, message_id: str) -> list[dict[str, Any]]:
    """A message's attachments as every read path returns them."""
    (message,) = await server.engine.read(load_messages, [int(message_id)])
    return [msgspec.to_builtins(a) for a in message.attachments]


async def test_messages_carry_attachment_metadata(
    server: BrokerServer, client: httpx.AsyncClient, world: RestWorld
) -> None:
    done = await uploaded(client, world.tokens["alice"], b"patch", filename="fix.diff",
                          content_type="text/x-diff")
    sent = await call(client, "POST", "/v1/channels/ops/messages", world.tokens["alice"],
                      json={"text": "here", "attachments": [done["id"]]})
    assert sent.status == 201, sent.body
    expected = [{"file_id": done["id"], "filename": "fix.diff", "content_type": "text/x-diff",
                 "size_bytes": 5}]
    assert sent.data["attachments"] == expected
    assert await attachments_of(server, sent.data["id"]) == expected
    pending = await announce(client, world.tokens["alice"], b"later")
    refused = await call(client, "POST", "/v1/channels/ops/messages", world.tokens["alice"],
                         json={"text": "too soon", "attachments": [pending["id"]]})
    assert (refused.status, refused.code) == (409, "file_not_complete")


async def test_delete_referenced_file_keeps_metadata_410(
    server: BrokerServer, client: httpx.AsyncClient, world: RestWorld
) -> None:
    """Deleting a referenced file keeps the metadata and answers 410."""
    done = await uploaded(client, world.tokens["alice"], b"log lines")
    file_id = done["id"]
    sent = await call(client, "POST", "/v1/channels/ops/messages", world.tokens["alice"],
                      json={"text": "the log", "attachments": [file_id]})
    forbidden = await call(client, "DELETE", f"/v1/files/{file_id}", world.tokens["bob"])
    assert (forbidden.status, forbidden.code) == (403, "forbidden")
    workspace_key = await call(client, "DELETE", f"/v1/files/{file_id}", world.key)
    assert workspace_key.status == 403
    assert (await call(client, "DELETE", f"/v1/files/{file_id}", world.tokens["alice"])).status \
        == 204
    assert (await call(client, "DELETE", f"/v1/files/{file_id}", world.tokens["alice"])).status \
        == 204

    gone = await call(client, "GET", f"/v1/files/{file_id}", world.tokens["bob"])
    assert (gone.status, gone.code) == (410, "file_deleted")
    download = await client.get(done["download_url"])
    assert download.status_code == 410
    assert download.json()["error"]["code"] == "file_deleted"
    assert (await call(client, "GET", "/v1/files", world.key)).data == []
    assert await attachments_of(server, sent.data["id"]) == sent.data["attachments"]
    again = await call(client, "POST", "/v1/channels/ops/messages", world.tokens["alice"],
                       json={"text": "again", "attachments": [file_id]})
    assert (again.status, again.code) == (404, "file_not_found")

    # the bytes stay for the retention period, then the sweep removes them
    store = store_of(server)
    assert len(on_disk(store)[0]) == 1
    later = int(time.time() * 1000) + server.engine.limits.deleted_file_retention_seconds * 1000
    report = await sweep_files(server.engine, store, now_ms=later + 1000)
    assert report.removed_objects == 1 and on_disk(store) == ([], [])
    assert await file_rows(server) == [(int(file_id), "deleted", None)]
    assert await attachments_of(server, sent.data["id"]) == sent.data["attachments"]
    assert (await client.get(done["download_url"])).status_code == 410


async def test_workspace_delete_removes_files(
    server: BrokerServer, client: httpx.AsyncClient, world: RestWorld
) -> None:
    """Deleting a workspace removes its files."""
    done = await uploaded(client, world.tokens["alice"], b"bytes")
    await call(client, "POST", "/v1/channels/ops/messages", world.tokens["alice"],
               json={"text": "attached", "attachments": [done["id"]]})
    await server.engine.submit(DeleteWorkspace(workspace_id=int(world.workspace_id)))
    # The delete marks the workspace; the server's sweeper purges its rows and bytes.
    await wait_purged(server.sweeper, 1)
    assert await file_rows(server) == []
    store = store_of(server)
    await sweep_files(server.engine, store)
    assert on_disk(store) == ([], []) and store.workspace_dirs() == []


async def test_upload_of_swept_row_leaves_no_bytes(
    server: BrokerServer, client: httpx.AsyncClient, world: RestWorld
) -> None:
    """An upload whose row was swept meanwhile leaves no bytes."""
    ticket = await announce(client, world.tokens["alice"], b"0123456789")
    store = store_of(server)
    far = int(time.time() * 1000) + 24 * 3600 * 1000

    async def slow_body() -> AsyncIterator[bytes]:
        yield b"01234"
        # the URL expired long ago, as far as the sweep can tell
        await sweep_files(server.engine, store, now_ms=far)
        yield b"56789"

    response = await put(client, ticket["upload_url"], slow_body())
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "file_not_found"
    assert on_disk(store) == ([], [])
    assert await file_rows(server) == []


# -- bad input: a clear code and nothing stored ------------------------------------------------


BAD_UPLOADS: list[tuple[dict[str, Any], str]] = [
    ({"content_type": "text/plain", "size_bytes": 1}, "invalid_request"),
    ({"filename": "a.txt", "size_bytes": 1}, "invalid_request"),
    ({"filename": "a.txt", "content_type": "text/plain"}, "invalid_request"),
    ({"filename": 7, "content_type": "text/plain", "size_bytes": 1}, "invalid_request"),
    ({"filename": "a.txt", "content_type": "text/plain", "size_bytes": "big"}, "invalid_request"),
    ({"filename": "a.txt", "content_type": "text/plain", "size_bytes": True}, "invalid_request"),
    ({"filename": "a.txt", "content_type": "text/plain", "size_bytes": 1.5}, "invalid_request"),
    ({"filename": "a.txt", "content_type": "text/plain", "size_bytes": -1}, "invalid_size"),
    ({"filename": "a.txt", "content_type": "text/plain", "size_bytes": 25 * 1024 * 1024 + 1},
     "file_too_large"),
    ({"filename": "a.txt", "content_type": "text", "size_bytes": 1}, "invalid_content_type"),
    ({"filename": "a.txt", "content_type": "../x", "size_bytes": 1}, "invalid_content_type"),
    ({"filename": "a.txt", "content_type": "text/plain\r\nX: y", "size_bytes": 1},
     "invalid_content_type"),
    ({"filename": "../x", "content_type": "text/plain", "size_bytes": 1}, "invalid_filename"),
    ({"filename": "/", "content_type": "text/plain", "size_bytes": 1}, "invalid_filename"),
    ({"filename": "a\\b", "content_type": "text/plain", "size_bytes": 1}, "invalid_filename"),
    ({"filename": "a\x00b", "content_type": "text/plain", "size_bytes": 1}, "invalid_filename"),
    ({"filename": "", "content_type": "text/plain", "size_bytes": 1}, "invalid_filename"),
    ({"filename": "x" * 256, "content_type": "text/plain", "size_bytes": 1}, "invalid_filename"),
]


async def test_upload_bad_input_clear_code_stores_nothing(
    server: BrokerServer, client: httpx.AsyncClient, world: RestWorld
) -> None:
    """Bad uploads get a clear code and store nothing."""
    for body, code in BAD_UPLOADS:
        reply = await call(client, "POST", "/v1/files/upload", world.tokens["alice"], json=body)
        assert (reply.status, reply.code) == (400, code), body
    by_key = await call(client, "POST", "/v1/files/upload", world.key,
                        json={"filename": "a.txt", "content_type": "text/plain", "size_bytes": 1})
    assert (by_key.status, by_key.code) == (403, "forbidden")
    anonymous = await call(client, "POST", "/v1/files/upload",
                           json={"filename": "a.txt", "content_type": "text/plain",
                                 "size_bytes": 1})
    assert anonymous.status == 401
    assert await file_rows(server) == []
    assert on_disk(store_of(server)) == ([], [])


async def test_files_bad_ids_and_pages_clear_codes(
    client: httpx.AsyncClient, world: RestWorld
) -> None:
    """Bad file ids and pages get clear codes."""
    for raw in ("nope", "12345", "-1", "9" * 30):
        reply = await call(client, "GET", f"/v1/files/{raw}", world.key)
        assert (reply.status, reply.code) == (404, "file_not_found"), raw
        response = await client.put(f"/v1/files/{raw}/content?token=1.x", content=b"x")
        assert response.status_code in (403, 404), raw
    assert (await call(client, "GET", "/v1/files", world.key, params={"limit": "0"})).code \
        == "invalid_limit"
    assert (await call(client, "GET", "/v1/files", world.key, params={"before": "x"})).code \
        == "invalid_cursor"


async def test_files_list_filters_by_uploader_and_pages(
    client: httpx.AsyncClient, world: RestWorld
) -> None:
    """Listing filters by uploader and pages."""
    a1 = await uploaded(client, world.tokens["alice"], b"1")
    b1 = await uploaded(client, world.tokens["bob"], b"2")
    a2 = await uploaded(client, world.tokens["alice"], b"3")
    await announce(client, world.tokens["alice"], b"pending")  # never listed
    every = await call(client, "GET", "/v1/files", world.tokens["carol"])
    assert [f["id"] for f in every.data] == [a2["id"], b1["id"], a1["id"]]
    by_alice = await call(client, "GET", "/v1/files", world.key,
                          params={"uploaded_by": "alice"})
    assert [f["id"] for f in by_alice.data] == [a2["id"], a1["id"]]
    by_id = await call(client, "GET", "/v1/files", world.key,
                       params={"uploaded_by": world.agents["bob"]})
    assert [f["id"] for f in by_id.data] == [b1["id"]]
    page = await call(client, "GET", "/v1/files", world.key,
                      params={"limit": "1", "before": a2["id"]})
    assert [f["id"] for f in page.data] == [b1["id"]]


# -- a daemon killed mid-upload ------------------------------------------------------------------


@asynccontextmanager
async def running(data_dir: Path, config: EngineConfig) -> AsyncIterator[BrokerServer]:
    async with run_server(Settings(
        data_dir=str(data_dir), engine=config, server=ServerSettings(workers=1),
        http=HttpSettings(host="127.0.0.1", port=0, shutdown_grace_seconds=1.0))) as srv:
        yield srv


async def test_upload_killed_daemon_leaves_no_half_file(
    tmp_path: Path, engine_config: EngineConfig
) -> None:
    """A daemon killed mid upload leaves no visible half file."""
    data_dir = tmp_path / "data"
    with trio.fail_after(TEST_DEADLINE_S):
        async with running(data_dir, engine_config) as first:
            async with httpx.AsyncClient(base_url=first.url or "", timeout=10) as client:
                world = await make_rest_world(client)
                alice = world.tokens["alice"]
                ticket = await announce(client, alice, b"0123456789")
                recorded = await announce(client, alice, b"abcde")
                assert (await put(client, recorded["upload_url"], b"abcde")).status_code == 200
        # What a kill leaves behind: half of an upload in tmp/, and bytes that
        # were renamed into place but never recorded on their row.
        store = FileStore(data_dir)
        half = store.tmp / f"{ticket['id']}.0123456789abcdef.part"
        half.write_bytes(b"01234")
        workspace_dir = store.objects / world.workspace_id
        unrecorded = workspace_dir / f"{ticket['id']}.fedcba9876543210"
        unrecorded.write_bytes(b"0123456789")
        (kept,) = [p for p in workspace_dir.iterdir() if p.name.startswith(recorded["id"])]

        async with running(data_dir, engine_config) as second:
            async with httpx.AsyncClient(base_url=second.url or "", timeout=10) as client:
                assert not half.exists() and not unrecorded.exists() and kept.exists()
                assert (await call(client, "GET", "/v1/files", world.key)).data == []
                info = await call(client, "GET", f"/v1/files/{ticket['id']}", world.key)
                assert info.data["status"] == "pending" and info.data["download_url"] is None
                download = await client.get(f"/v1/files/{ticket['id']}/content",
                                            headers={"Authorization": f"Bearer {alice}"})
                assert download.status_code == 409
                done = await call(client, "POST", f"/v1/files/{ticket['id']}/complete", alice)
                assert (done.status, done.code) == (409, "file_not_uploaded")
                # the upload that was recorded before the kill completes as usual
                finished = await call(client, "POST", f"/v1/files/{recorded['id']}/complete",
                                      alice)
                assert (await client.get(finished.data["download_url"])).content == b"abcde"
                # and the interrupted one can be uploaded again (this server has another port)
                url = urlsplit(ticket["upload_url"])
                retry = await put(client, f"{url.path}?{url.query}", b"0123456789")
                assert retry.status_code == 200
