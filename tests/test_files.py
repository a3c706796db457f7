"""Files without HTTP: input rules, signed URL tokens, the commands and the sweep."""

from __future__ import annotations

import os
import time
from contextlib import aclosing
from pathlib import Path
from typing import Any

import pytest
import trio

from broker.engine import files
from broker.engine.engine import Engine
from broker.engine.errors import BrokerError
from broker.filestore import FileStore, remove_orphans, sweep_files
from tests.helpers.engine import World

SECRET = b"k" * 32


class byte_chunks:  # noqa: N801 - reads like the generator it stands for
    """An async iterator of `data` in small pieces (not a generator: nothing to finalize)."""

    def __init__(self, data: bytes, size: int = 7) -> None:
        self.pieces = [data[i:i + size] for i in range(0, len(data), size)]

    def __aiter__(self) -> byte_chunks:
        return self

    async def __anext__(self) -> bytes:
        await trio.lowlevel.checkpoint()
        if not self.pieces:
            raise StopAsyncIteration
        return self.pieces.pop(0)


async def rows(engine: Engine, sql: str, *args: object) -> list[Any]:
    return await engine.read(lambda c: c.execute(sql, args).fetchall())


def stored_objects(store: FileStore) -> list[str]:
    return sorted(store.object_keys())


async def announce(engine: Engine, world: World, agent: str = "alice", size: int = 5) -> int:
    ticket = await engine.submit(files.CreateUpload(
        workspace_id=world.workspace_id, agent_id=world.agents[agent], filename="a.txt",
        content_type="text/plain", size_bytes=size))
    return int(ticket.id)


async def upload(engine: Engine, store: FileStore, file_id: int, data: bytes) -> str:
    """What the PUT route does: store the bytes durably, then record them."""
    row = await engine.read(files.file_row, file_id)
    assert row is not None
    key = await store.receive(row.workspace_id, file_id, byte_chunks(data), row.size_bytes)
    await engine.submit(files.RecordUpload(file_id=file_id, storage_key=key))
    return key


@pytest.fixture
def store(tmp_path: Path, engine: Engine) -> FileStore:
    store = FileStore(tmp_path)
    store.open()
    return store


# -- input rules -----------------------------------------------------------------------


@pytest.mark.parametrize("name", [
    "../x", "/", "a/b", "a\\b", "..", ".", "", "a\x00b", "tab\there", "new\nline", "x" * 256,
    "é" * 128, "\ud800",
])
def test_file_name_refuses_path_like_or_odd(name: str) -> None:
    """Path like or odd file names are refused."""
    with pytest.raises(BrokerError) as refused:
        files.filename(name)
    assert refused.value.code == "invalid_filename"


@pytest.mark.parametrize("name", ["a.txt", "..hidden", "x" * 255, "é" * 127, "report 2024 (v2).pdf",
                                  "名前.png"])
def test_file_name_ordinary_passes(name: str) -> None:
    """Ordinary file names pass."""
    assert files.filename(name) == name


@pytest.mark.parametrize("value", [
    "text", "text/", "/plain", "text/plain/x", "text plain", "../x", "text/plain\r\nX-A: b",
    "text/plain;", "text/plain; charset", "", "a" * 300 + "/b",
])
def test_content_type_refuses_non_mime(value: str) -> None:
    """Content types that are not MIME types are refused."""
    with pytest.raises(BrokerError) as refused:
        files.content_type(value)
    assert refused.value.code == "invalid_content_type"


@pytest.mark.parametrize(("value", "kept"), [
    ("text/plain", "text/plain"),
    ("Image/PNG", "image/png"),
    ("text/plain; charset=utf-8", "text/plain; charset=utf-8"),
    ('multipart/mixed; boundary="a b"', 'multipart/mixed; boundary="a b"'),
    ("application/vnd.api+json", "application/vnd.api+json"),
])
def test_content_type_mime_lowercased(value: str, kept: str) -> None:
    """MIME types pass, with type and subtype lowercased."""
    assert files.content_type(value) == kept


def test_file_size_checked_against_limit() -> None:
    """Sizes are checked against the limit."""
    assert files.size_bytes(0, 10) == 0
    assert files.size_bytes(10, 10) == 10
    for value, code in ((11, "file_too_large"), (-1, "invalid_size")):
        with pytest.raises(BrokerError) as refused:
            files.size_bytes(value, 10)
        assert refused.value.code == code


# -- tokens ----------------------------------------------------------------------------


def test_url_token_verifies_only_its_file_purpose_secret_time() -> None:
    """A token verifies only for its file, purpose, secret and time."""
    token = files.sign(SECRET, "upload", 42, expires_ms=2_000)
    files.verify(SECRET, "upload", 42, token, now_ms=2_000)
    refusals = [
        (SECRET, "upload", 43, token, 1_000),       # another file
        (SECRET, "download", 42, token, 1_000),     # another purpose
        (b"x" * 32, "upload", 42, token, 1_000),    # another secret
        (None, "upload", 42, token, 1_000),         # no secret yet
        (SECRET, "upload", 42, "3000." + token.split(".")[1], 1_000),  # expiry moved
        (SECRET, "upload", 42, token[:-1] + ("A" if token[-1] != "A" else "B"), 1_000),
        (SECRET, "upload", 42, "garbage", 1_000),
        (SECRET, "upload", 42, "", 1_000),
    ]
    for secret, purpose, file_id, candidate, now in refusals:
        with pytest.raises(BrokerError) as refused:
            files.verify(secret, purpose, file_id, candidate, now)  # type: ignore[arg-type]
        assert refused.value.code == "url_token_invalid"
    with pytest.raises(BrokerError) as expired:
        files.verify(SECRET, "upload", 42, token, now_ms=2_001)
    assert expired.value.code == "url_token_expired"


# -- commands ----------------------------------------------------------------------------


async def test_url_secret_made_once_on_first_upload(engine: Engine, world: World) -> None:
    """The secret is made once on the first upload."""
    assert await engine.read(files.url_secret) is None
    await announce(engine, world)
    first = await engine.read(files.url_secret)
    await announce(engine, world)
    assert first is not None and len(first) == files.URL_SECRET_BYTES
    assert await engine.read(files.url_secret) == first


async def test_complete_only_after_bytes_recorded(
    engine: Engine, world: World, store: FileStore
) -> None:
    """A file completes only after its bytes are recorded."""
    file_id = await announce(engine, world)
    complete = files.CompleteUpload(workspace_id=world.workspace_id,
                                    agent_id=world.agents["alice"], file_id=str(file_id))
    with pytest.raises(BrokerError) as early:
        await engine.submit(complete)
    assert early.value.code == "file_not_uploaded"
    key = await upload(engine, store, file_id, b"hello")
    assert (store.objects / key).read_bytes() == b"hello"
    done = await engine.submit(complete)
    assert done.size_bytes == 5 and done.download_url.startswith(f"/v1/files/{file_id}/content?")
    assert await rows(engine, "SELECT state, storage_key FROM files") == [("complete", key)]
    # a second PUT cannot replace the bytes of a file
    again = await store.receive(world.workspace_id, file_id, byte_chunks(b"HELLO"), 5)
    with pytest.raises(BrokerError) as twice:
        await engine.submit(files.RecordUpload(file_id=file_id, storage_key=again))
    assert twice.value.code == "file_already_uploaded"


async def test_upload_size_mismatch_stores_nothing(
    engine: Engine, world: World, store: FileStore
) -> None:
    """A size mismatch stores nothing."""
    file_id = await announce(engine, world, size=5)
    for body in (b"hell", b"hello!", b"hello" * 100):
        with pytest.raises(BrokerError) as refused:
            await store.receive(world.workspace_id, file_id, byte_chunks(body), 5)
        assert refused.value.code == "file_size_mismatch"
    assert os.listdir(store.tmp) == [] and stored_objects(store) == []
    assert await rows(engine, "SELECT state, storage_key FROM files") == [("pending", None)]


async def test_record_for_swept_row_refused(
    engine: Engine, world: World, store: FileStore
) -> None:
    """A record for a swept row is refused."""
    file_id = await announce(engine, world)
    key = await store.receive(world.workspace_id, file_id, byte_chunks(b"hello"), 5)
    far = int(time.time() * 1000) + 10 * 3600 * 1000
    await sweep_files(engine, store, now_ms=far)
    assert await rows(engine, "SELECT count(*) FROM files") == [(0,)]
    with pytest.raises(BrokerError) as refused:
        await engine.submit(files.RecordUpload(file_id=file_id, storage_key=key))
    assert refused.value.code == "file_not_found"


async def test_complete_and_delete_only_by_uploader(engine: Engine, world: World) -> None:
    """Only the uploader completes or deletes."""
    file_id = await announce(engine, world)
    for command in (
        files.CompleteUpload(workspace_id=world.workspace_id, agent_id=world.agents["bob"],
                             file_id=str(file_id)),
        files.DeleteFile(workspace_id=world.workspace_id, agent_id=world.agents["bob"],
                         file_id=str(file_id)),
    ):
        with pytest.raises(BrokerError) as refused:
            await engine.submit(command)
        assert refused.value.code == "forbidden"
    assert await rows(engine, "SELECT state FROM files") == [("pending",)]


# -- the sweep ---------------------------------------------------------------------------


async def test_sweep_drops_expired_uploads_with_bytes(
    engine: Engine, world: World, store: FileStore
) -> None:
    """The sweep drops expired uploads with their bytes."""
    stale = await announce(engine, world)
    await upload(engine, store, stale, b"hello")
    (expires,) = (await rows(engine, "SELECT expires_at FROM files WHERE id = ?", stale))[0]
    # within the grace after the URL expired, nothing happens
    quiet = await sweep_files(engine, store, now_ms=expires + files.UPLOAD_SWEEP_GRACE_MS - 1)
    assert quiet.expired_uploads == 0 and len(stored_objects(store)) == 1
    report = await sweep_files(engine, store, now_ms=expires + files.UPLOAD_SWEEP_GRACE_MS)
    assert (report.expired_uploads, report.removed_objects) == (1, 1)
    assert await rows(engine, "SELECT count(*) FROM files") == [(0,)]
    assert stored_objects(store) == []


async def test_sweep_releases_deleted_bytes_after_retention(
    engine: Engine, world: World, store: FileStore
) -> None:
    """The sweep releases deleted bytes after the retention."""
    file_id = await announce(engine, world)
    key = await upload(engine, store, file_id, b"hello")
    await engine.submit(files.CompleteUpload(
        workspace_id=world.workspace_id, agent_id=world.agents["alice"], file_id=str(file_id)))
    await engine.submit(files.DeleteFile(
        workspace_id=world.workspace_id, agent_id=world.agents["alice"], file_id=str(file_id)))
    (deleted_at,) = (await rows(engine, "SELECT deleted_at FROM files"))[0]
    retention = engine.limits.deleted_file_retention_seconds * 1000
    await sweep_files(engine, store, now_ms=deleted_at + retention - 1)
    assert stored_objects(store) == [key]
    report = await sweep_files(engine, store, now_ms=deleted_at + retention)
    assert (report.purged_deletions, report.removed_objects) == (1, 1)
    assert stored_objects(store) == []
    # the tombstone stays: attachments that name the file keep their metadata
    assert await rows(engine, "SELECT state, storage_key FROM files") == [("deleted", None)]


async def test_remove_orphans_and_dead_workspaces_at_start(
    engine: Engine, world: World, store: FileStore
) -> None:
    """Orphans and dead workspaces are removed at start."""
    kept = await announce(engine, world)
    kept_key = await upload(engine, store, kept, b"hello")
    # bytes written and renamed, then the daemon died before the row recorded them
    lost = await announce(engine, world)
    lost_key = await store.receive(world.workspace_id, lost, byte_chunks(b"hello"), 5)
    # a workspace whose rows are gone, and a stray temporary file
    (store.objects / "999").mkdir()
    (store.objects / "999" / "1.0123456789abcdef").write_bytes(b"x")
    (store.tmp / "5.0123456789abcdef.part").write_bytes(b"half")
    assert store.open() == 1
    assert await remove_orphans(engine, store) == 2
    assert stored_objects(store) == [kept_key]
    assert lost_key not in stored_objects(store)
    assert store.workspace_dirs() == [world.workspace_id]
    assert os.listdir(store.tmp) == []


async def test_upload_interrupted_leaves_no_temporary_file(
    engine: Engine, world: World, store: FileStore
) -> None:
    """An interrupted upload leaves no temporary file."""
    file_id = await announce(engine, world, size=10)

    async def breaks() -> Any:
        yield b"hello"
        raise ConnectionResetError("the client went away")

    with pytest.raises(ConnectionResetError):
        async with aclosing(breaks()) as body:
            await store.receive(world.workspace_id, file_id, body, 10)

    with trio.CancelScope() as scope:

        async def cancelled() -> Any:
            yield b"hello"
            scope.cancel()
            await trio.lowlevel.checkpoint()
            yield b"world"

        async with aclosing(cancelled()) as body:
            await store.receive(world.workspace_id, file_id, body, 10)
    assert scope.cancelled_caught
    assert os.listdir(store.tmp) == [] and stored_objects(store) == []
