"""Files on the wire: the inputs of the file operations and the objects they return.

Names and shapes follow `@relaycast/types@6.0.2` (dist/file.d.ts): an upload
request `{filename, content_type, size_bytes}` is answered with
`{id, upload_url, expires_at}`; the client PUTs the bytes to `upload_url`,
then completes the upload by id. The upload and download URLs point at this
daemon (`CONTENT_PATH`) and carry a signed, expiring token, so they work
without an Authorization header, like the presigned URLs of Relaycast.
"""

from __future__ import annotations

from typing import Literal
from urllib.parse import quote

import msgspec

from protocol.requests import Request

# Where the bytes of a file are uploaded (PUT) and downloaded (GET).
CONTENT_PATH = "/v1/files/{file_id}/content"

FileStatus = Literal["pending", "complete", "deleted"]


def content_url(base_url: str | None, file_id: int | str, token: str) -> str:
    """The absolute (or, without a base URL, root-relative) URL of a file's bytes."""
    path = CONTENT_PATH.format(file_id=file_id) + "?token=" + quote(token, safe="")
    return (base_url or "").rstrip("/") + path


# -- inputs ---------------------------------------------------------------------------


class UploadFile(Request):
    """`POST /v1/files/upload`: announce a file; the bytes follow with a PUT."""

    filename: str
    content_type: str
    size_bytes: int


class FileRef(Request):
    """A file named by id (`/v1/files/{file_id}`, `/complete`, `DELETE`)."""

    file_id: str


class ListFiles(Request):
    """`GET /v1/files`: complete files, newest first.

    uploaded_by: an agent name (or id); before: a file id, for the next page.
    """

    uploaded_by: str | None = None
    limit: int | None = None
    before: str | None = None


# -- results --------------------------------------------------------------------------


class UploadTicket(msgspec.Struct, kw_only=True):
    """Relaycast `UploadResponse`: where to PUT the bytes, and until when."""

    id: str
    upload_url: str
    expires_at: str


class UploadReceived(msgspec.Struct, kw_only=True):
    """The answer to the PUT: the bytes are durably stored; the file is still pending."""

    id: str
    size_bytes: int
    status: FileStatus


class UploadCompleted(msgspec.Struct, kw_only=True):
    """Relaycast `CompleteUploadResponse`."""

    id: str
    filename: str
    content_type: str
    size_bytes: int
    download_url: str


class FileInfo(msgspec.Struct, kw_only=True):
    """Relaycast `FileInfo`; download_url is null until the upload is complete."""

    id: str
    filename: str
    content_type: str
    size_bytes: int
    status: FileStatus
    download_url: str | None
    uploaded_by: str | None
    created_at: str


class FileUploaded(msgspec.Struct, kw_only=True):
    """The data of the ephemeral `file.uploaded` event (Relaycast nests it as `file`)."""

    file_id: str
    filename: str
    content_type: str
    size_bytes: int
    uploaded_by: str
