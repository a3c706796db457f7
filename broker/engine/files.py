"""Files: upload tickets, recorded bytes, completion, soft deletion, the sweep, and reads.

A file moves through three states, and the row is the truth about its bytes:

    pending   -- CreateUpload: the row and a signed, expiring upload URL.
                 RecordUpload (called by the PUT route only after the bytes
                 are written, fsynced and linked into place, and the
                 directory fsynced) sets `storage_key`; until then the row
                 has no bytes, and completing it is `file_not_uploaded`.
    complete  -- CompleteUpload: only a row with a storage_key, so a row
                 never says complete for bytes that are not durably in place.
                 Only complete files can be attached, listed and downloaded.
    deleted   -- DeleteFile (uploader only): a soft delete. The row stays as a
                 tombstone, so messages that attached the file keep their
                 attachment metadata `{file_id, filename, content_type,
                 size_bytes}`; reading or downloading it answers 410
                 `file_deleted`, attaching it again `file_not_found`. The
                 bytes are removed by the sweep once the retention period has
                 passed (so a backup copied database-first stays consistent).

The sweep (`SweepFiles`) deletes the rows of pending uploads whose URL
expired (plus a grace, so an upload that started in time can finish) and
clears the storage_key of deleted files; it returns the keys whose bytes may
go, and the file store removes them only after the command committed. A
crash in between leaves bytes that no row names, which the store removes at
the next start.

Upload and download URLs are signed with HMAC-SHA256 over
(purpose, file id, expiry) with a 256-bit server secret generated on first
use and kept in the database (`server_secrets`), so it is backed up with the
rows it signs for, and every binding that can reach the engine can sign.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import time
from typing import Any, Literal, cast

import apsw
import msgspec

from broker.engine import validation
from broker.engine.errors import BrokerError
from broker.engine.events import emit_ephemeral
from broker.engine.history import page_limit
from broker.engine.lookups import require_agent
from broker.engine.writer import Tx
from protocol.files import (
    FileInfo,
    FileStatus,
    FileUploaded,
    UploadCompleted,
    UploadTicket,
    content_url,
)
from protocol.objects import iso

URL_SECRET_NAME = "file_urls"
URL_SECRET_BYTES = 32
# A pending upload is swept this long after its URL expired: a PUT that
# started before the expiry has this long to finish and be completed.
UPLOAD_SWEEP_GRACE_MS = 15 * 60 * 1000
# Rows changed by one sweep command at most (bounds how long it holds the writer).
SWEEP_BATCH = 500
MAX_FILENAME_BYTES = 255
MAX_CONTENT_TYPE_CHARS = 255

Purpose = Literal["upload", "download"]

# RFC 6838 type/subtype (restricted-name characters), with optional
# `; name=value` parameters (value a token or a quoted string).
_TOKEN = r"[A-Za-z0-9!#$&^_.+-]+"
_MIME = re.compile(
    rf"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{{0,126}}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{{0,126}}"
    rf"(?:[ \t]*;[ \t]*{_TOKEN}=(?:{_TOKEN}|\"[^\"\\\x00-\x1f\x7f]*\"))*"
)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# storage keys are made by the file store: "<workspace id>/<file id>.<random hex>"
_STORAGE_KEY = re.compile(r"([0-9]{1,19})/([0-9]{1,19})\.[0-9a-f]{16}")


# -- validation --------------------------------------------------------------------------


def filename(value: str) -> str:
    """A file name that cannot name a path: raises `invalid_filename`."""
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate from JSON `\ud800`
        size = 0
    if size == 0 or size > MAX_FILENAME_BYTES:
        raise BrokerError(
            "invalid_filename", f"a file name is 1-{MAX_FILENAME_BYTES} bytes of UTF-8"
        )
    if "/" in value or "\\" in value or value in (".", ".."):
        raise BrokerError(
            "invalid_filename",
            "a file name must not be a path: no '/' or '\\', and not '.' or '..'",
        )
    if _CONTROL.search(value):
        raise BrokerError(
            "invalid_filename", "a file name must not contain NUL or other control characters"
        )
    return value


def content_type(value: str) -> str:
    """A MIME type `type/subtype` (parameters allowed), type and subtype lowercased."""
    if len(value) > MAX_CONTENT_TYPE_CHARS or not _MIME.fullmatch(value):
        raise BrokerError(
            "invalid_content_type",
            "content_type must be a MIME type such as 'text/plain' or 'image/png'",
        )
    essence, sep, params = value.partition(";")
    return essence.lower() + sep + params


def size_bytes(value: int, limit: int) -> int:
    if value < 0:
        raise BrokerError("invalid_size", "size_bytes must be 0 or more")
    if value > limit:
        raise BrokerError(
            "file_too_large", f"the file is {value} bytes; the limit is {limit} bytes"
        )
    return value


def storage_key_of(key: str, workspace_id: int, file_id: int) -> str:
    """`key` if it is a storage key of this file, else ValueError (a bug, not bad input)."""
    match = _STORAGE_KEY.fullmatch(key)
    if match is None or int(match[1]) != workspace_id or int(match[2]) != file_id:
        raise ValueError(f"{key!r} is not a storage key of file {file_id}")
    return key


def is_storage_key(key: str) -> bool:
    return _STORAGE_KEY.fullmatch(key) is not None


# -- signed URLs -------------------------------------------------------------------------


def sign(secret: bytes, purpose: Purpose, file_id: int, expires_ms: int) -> str:
    """The token `<expires_ms>.<base64url HMAC-SHA256(purpose:file_id:expires_ms)>`."""
    mac = hmac.new(secret, f"{purpose}:{file_id}:{expires_ms}".encode(), hashlib.sha256)
    return f"{expires_ms}." + base64.urlsafe_b64encode(mac.digest()).rstrip(b"=").decode()


def verify(
    secret: bytes | None, purpose: Purpose, file_id: int, token: str, now_ms: int
) -> int:
    """Check an upload or download token for this file; returns its expiry (ms).

    Raises `url_token_invalid` (not signed by us, for another file or purpose)
    or `url_token_expired`; the signature is checked first, so a forged token
    is never reported as merely expired.
    """
    expires, _, _ = token.partition(".")
    if secret is None or not (expires.isascii() and expires.isdigit()) or len(expires) > 16:
        raise BrokerError("url_token_invalid", f"the {purpose} token is not valid for this file")
    expected = sign(secret, purpose, file_id, int(expires))
    if not hmac.compare_digest(expected.encode(), token.encode("utf-8", "surrogatepass")):
        raise BrokerError("url_token_invalid", f"the {purpose} token is not valid for this file")
    if now_ms > int(expires):
        raise BrokerError("url_token_expired", f"the {purpose} URL has expired")
    return int(expires)


def url_secret(conn: apsw.Connection) -> bytes | None:
    """The URL-signing secret (None until the first upload created it)."""
    row = conn.execute(
        "SELECT value FROM server_secrets WHERE name = ?", (URL_SECRET_NAME,)
    ).fetchone()
    return None if row is None else cast(bytes, row[0])


def _ensure_url_secret(tx: Tx) -> bytes:
    secret = url_secret(tx.conn)
    if secret is None:
        secret = os.urandom(URL_SECRET_BYTES)
        tx.conn.execute(
            "INSERT INTO server_secrets(name, value, created_at) VALUES (?,?,?)",
            (URL_SECRET_NAME, secret, tx.now_ms),
        )
    return secret


def download_url(
    secret: bytes | None, base_url: str | None, file_id: int, now_ms: int, ttl_ms: int
) -> str | None:
    if secret is None:
        return None
    return content_url(base_url, file_id, sign(secret, "download", file_id, now_ms + ttl_ms))


# -- rows --------------------------------------------------------------------------------


class FileRow(msgspec.Struct, frozen=True):
    id: int
    workspace_id: int
    uploader_id: int | None
    uploader_name: str | None
    filename: str
    content_type: str
    size_bytes: int
    state: FileStatus
    storage_key: str | None
    expires_at: int | None
    created_at: int


_ROW = (
    "SELECT f.id, f.workspace_id, f.uploader_id, a.name, f.filename, f.content_type,"
    " f.size_bytes, f.state, f.storage_key, f.expires_at, f.created_at"
    " FROM files f LEFT JOIN agents a ON a.id = f.uploader_id"
)


def file_row(conn: apsw.Connection, file_id: int) -> FileRow | None:
    """The file `file_id` of any live workspace (for callers holding a signed token), or None.

    A signed URL carries no workspace credential, so the workspace's deletion
    mark is checked here: from the delete's commit on, its files are not
    found (and a late upload is refused), not only once the purge reaches them.
    """
    row = conn.execute(
        _ROW + " JOIN workspaces w ON w.id = f.workspace_id AND w.deleted_at IS NULL"
        " WHERE f.id = ?", (file_id,)
    ).fetchone()
    return None if row is None else FileRow(*row)


def require_file(conn: apsw.Connection, workspace_id: int, raw_id: str | int) -> FileRow:
    """The file of this workspace; `file_not_found` for any other (nothing leaks)."""
    file_id = validation.parse_id(raw_id, "file_not_found", "file")
    row = conn.execute(
        _ROW + " WHERE f.id = ? AND f.workspace_id = ?", (file_id, workspace_id)
    ).fetchone()
    if row is None:
        raise BrokerError("file_not_found", f"file {raw_id!r} not found")
    return FileRow(*row)


def _require_live(conn: apsw.Connection, workspace_id: int, raw_id: str | int) -> FileRow:
    row = require_file(conn, workspace_id, raw_id)
    if row.state == "deleted":
        raise BrokerError("file_deleted", f"file {row.id} was deleted by its uploader")
    return row


def _info(
    row: FileRow, secret: bytes | None, base_url: str | None, now_ms: int, ttl_ms: int
) -> FileInfo:
    url = None
    if row.state == "complete":
        url = download_url(secret, base_url, row.id, now_ms, ttl_ms)
    return FileInfo(
        id=str(row.id), filename=row.filename, content_type=row.content_type,
        size_bytes=row.size_bytes, status=row.state, download_url=url,
        uploaded_by=row.uploader_name, created_at=iso(row.created_at) or "",
    )


# -- commands ----------------------------------------------------------------------------


class CreateUpload(msgspec.Struct, frozen=True, kw_only=True):
    """Announce a file: a pending row and a signed upload URL valid for `file_url_ttl_seconds`.

    base_url: where clients reach this daemon (the URL is root-relative without it).
    Raises invalid_filename, invalid_content_type, invalid_size, file_too_large,
    agent_not_found.
    """

    workspace_id: int
    agent_id: int
    filename: str
    content_type: str
    size_bytes: int
    base_url: str | None = None

    def apply(self, tx: Tx) -> UploadTicket:
        limits, conn = tx.limits, tx.conn
        name = filename(self.filename)
        mime = content_type(self.content_type)
        size = size_bytes(self.size_bytes, limits.max_file_bytes)
        require_agent(conn, self.workspace_id, self.agent_id)
        secret = _ensure_url_secret(tx)
        file_id = tx.new_id()
        expires = tx.now_ms + limits.file_url_ttl_seconds * 1000
        conn.execute(
            "INSERT INTO files(id, workspace_id, uploader_id, filename, content_type, size_bytes,"
            " state, expires_at, created_at) VALUES (?,?,?,?,?,?,'pending',?,?)",
            (file_id, self.workspace_id, self.agent_id, name, mime, size, expires, tx.now_ms),
        )
        token = sign(secret, "upload", file_id, expires)
        return UploadTicket(
            id=str(file_id), upload_url=content_url(self.base_url, file_id, token),
            expires_at=iso(expires) or "",
        )


class RecordUpload(msgspec.Struct, frozen=True, kw_only=True):
    """Note that the bytes of a pending file are durably stored under `storage_key`.

    Called only after the file store has written, fsynced and linked the
    bytes into place. The first upload wins: raises file_already_uploaded if
    bytes were recorded before, file_deleted, or file_not_found (the row was
    swept); the caller then removes the bytes it stored.
    """

    file_id: int
    storage_key: str

    def apply(self, tx: Tx) -> FileRow:
        row = file_row(tx.conn, self.file_id)
        if row is None:
            raise BrokerError("file_not_found", f"file {self.file_id} not found")
        if row.state == "deleted":
            raise BrokerError("file_deleted", f"file {row.id} was deleted by its uploader")
        if row.state != "pending" or row.storage_key is not None:
            raise BrokerError(
                "file_already_uploaded", f"the bytes of file {row.id} were already uploaded"
            )
        key = storage_key_of(self.storage_key, row.workspace_id, row.id)
        tx.conn.execute("UPDATE files SET storage_key = ? WHERE id = ?", (key, row.id))
        return row


class CompleteUpload(msgspec.Struct, frozen=True, kw_only=True):
    """Mark an uploaded file complete (uploader only); completing it again returns the same.

    Emits the ephemeral `file.uploaded` event to the workspace. Raises
    file_not_found, file_deleted, forbidden (not the uploader), file_not_uploaded
    (no bytes were PUT yet).
    """

    workspace_id: int
    agent_id: int
    file_id: str
    base_url: str | None = None

    def apply(self, tx: Tx) -> UploadCompleted:
        conn = tx.conn
        row = _require_live(conn, self.workspace_id, self.file_id)
        if row.uploader_id != self.agent_id:
            raise BrokerError("forbidden", "only the uploader can complete this upload")
        if row.state == "pending":
            if row.storage_key is None:
                raise BrokerError(
                    "file_not_uploaded",
                    f"the bytes of file {row.id} have not been uploaded to its upload_url",
                )
            conn.execute(
                "UPDATE files SET state = 'complete', completed_at = ?, expires_at = NULL"
                " WHERE id = ?",
                (tx.now_ms, row.id),
            )
            emit_ephemeral(
                tx, workspace_id=self.workspace_id, event_type="file.uploaded",
                data=FileUploaded(
                    file_id=str(row.id), filename=row.filename, content_type=row.content_type,
                    size_bytes=row.size_bytes, uploaded_by=row.uploader_name or "",
                ),
            )
        url = download_url(url_secret(conn), self.base_url, row.id, tx.now_ms,
                           tx.limits.file_url_ttl_seconds * 1000)
        assert url is not None  # the upload that made this row made the secret
        return UploadCompleted(
            id=str(row.id), filename=row.filename, content_type=row.content_type,
            size_bytes=row.size_bytes, download_url=url,
        )


class DeleteFile(msgspec.Struct, frozen=True, kw_only=True):
    """Soft-delete a file (uploader only); deleting a deleted file again is a no-op.

    The attachment metadata of messages stays; the bytes go with the sweep.
    Raises file_not_found, forbidden (not the uploader).
    """

    workspace_id: int
    agent_id: int
    file_id: str

    def apply(self, tx: Tx) -> None:
        row = require_file(tx.conn, self.workspace_id, self.file_id)
        if row.uploader_id != self.agent_id:
            raise BrokerError("forbidden", "only the uploader can delete this file")
        if row.state != "deleted":
            tx.conn.execute(
                "UPDATE files SET state = 'deleted', deleted_at = ?, expires_at = NULL"
                " WHERE id = ?",
                (tx.now_ms, row.id),
            )


class SweptFiles(msgspec.Struct, frozen=True):
    """What one sweep step did; `storage_keys` are the bytes that may now be removed."""

    expired_uploads: int
    purged_deletions: int
    storage_keys: list[str]


class SweepFiles(msgspec.Struct, frozen=True, kw_only=True):
    """Drop expired pending uploads and release the bytes of deleted files, `limit` rows each.

    A pending row is dropped `upload_grace_ms` after its URL expired (nothing
    can reference it: only complete files can be attached). A deleted file's
    storage_key is cleared `retention_ms` after the deletion; its row stays.
    """

    upload_grace_ms: int = UPLOAD_SWEEP_GRACE_MS
    retention_ms: int
    limit: int = SWEEP_BATCH
    now_ms: int | None = None  # default: the batch's time

    def apply(self, tx: Tx) -> SweptFiles:
        conn = tx.conn
        now = tx.now_ms if self.now_ms is None else self.now_ms
        expired = cast(list[tuple[int, str | None]], conn.execute(
            "SELECT id, storage_key FROM files WHERE state = 'pending' AND expires_at <= ?"
            " ORDER BY expires_at LIMIT ?",
            (now - self.upload_grace_ms, self.limit),
        ).fetchall())
        if expired:
            conn.executemany("DELETE FROM files WHERE id = ?", [(i,) for i, _ in expired])
        released = cast(list[tuple[int, str]], conn.execute(
            "SELECT id, storage_key FROM files WHERE state = 'deleted'"
            " AND storage_key IS NOT NULL AND deleted_at <= ? ORDER BY deleted_at LIMIT ?",
            (now - self.retention_ms, self.limit),
        ).fetchall())
        if released:
            conn.executemany(
                "UPDATE files SET storage_key = NULL WHERE id = ?", [(i,) for i, _ in released]
            )
        keys = [k for _, k in expired if k is not None] + [k for _, k in released]
        return SweptFiles(len(expired), len(released), keys)


# -- queries (run on the reader pool) ----------------------------------------------------


def get_file(
    conn: apsw.Connection, workspace_id: int, raw_id: str, base_url: str | None,
    ttl_ms: int, now_ms: int | None = None,
) -> FileInfo:
    """A file of this workspace, with a download URL signed for `ttl_ms` once it is complete.

    Raises file_not_found, file_deleted.
    """
    now = _now_ms() if now_ms is None else now_ms
    row = _require_live(conn, workspace_id, raw_id)
    return _info(row, url_secret(conn), base_url, now, ttl_ms)


def list_files(
    conn: apsw.Connection, workspace_id: int, uploaded_by: str | None, limit: int | None,
    before: str | None, base_url: str | None, ttl_ms: int, now_ms: int | None = None,
) -> list[FileInfo]:
    """The workspace's complete files, newest first, optionally by one uploader (name or id).

    Raises invalid_limit, invalid_cursor.
    """
    now = _now_ms() if now_ms is None else now_ms
    page = page_limit(limit)
    cursor: int | None = None
    if before is not None:
        if not (before.isascii() and before.isdigit() and len(before) <= 19
                and int(before) <= validation.MAX_ID):
            raise BrokerError("invalid_cursor", "before must be a file id")
        cursor = int(before)
    sql = _ROW + " WHERE f.workspace_id = ? AND f.state = 'complete'"
    args: list[object] = [workspace_id]
    if cursor is not None:
        sql += " AND f.id < ?"
        args.append(cursor)
    if uploaded_by is not None:
        sql += " AND (a.name = ? OR a.id = ?)"
        # A name, or an id; a number too large to be an id matches nothing.
        uploader_id = (int(uploaded_by) if uploaded_by.isascii() and uploaded_by.isdigit()
                       and len(uploaded_by) <= 19 and int(uploaded_by) <= validation.MAX_ID
                       else -1)
        args += [uploaded_by, uploader_id]
    sql += " ORDER BY f.id DESC LIMIT ?"
    args.append(page)
    secret = url_secret(conn)
    rows = cast(list[tuple[Any, ...]], conn.execute(sql, args).fetchall())
    return [_info(FileRow(*r), secret, base_url, now, ttl_ms) for r in rows]


def _now_ms() -> int:
    return int(time.time() * 1000)


def kept_storage_keys(conn: apsw.Connection, keys: list[str]) -> set[str]:
    """Which of `keys` a row still names (their bytes must stay)."""
    if not keys:
        return set()
    rows = conn.execute(
        "SELECT storage_key FROM files WHERE storage_key IN (SELECT value FROM json_each(?))",
        (msgspec.json.encode(keys).decode(),),
    ).fetchall()
    return {cast(str, r[0]) for r in rows}


def existing_workspaces(conn: apsw.Connection, workspace_ids: list[int]) -> set[int]:
    """Which of these workspaces still exist."""
    if not workspace_ids:
        return set()
    rows = conn.execute(
        "SELECT id FROM workspaces WHERE id IN (SELECT value FROM json_each(?))",
        (msgspec.json.encode(workspace_ids).decode(),),
    ).fetchall()
    return {cast(int, r[0]) for r in rows}
