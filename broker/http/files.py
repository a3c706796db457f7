"""The byte-streaming file routes: `PUT` and `GET` on `/v1/files/{file_id}/content`.

These two cannot be JSON operations: the body of the PUT is the file, and
the answer to the GET is the file. The JSON routes (upload, complete, get,
list, delete) go through the operation table like every other route.

Both routes take the signed, expiring `token` of the URL that the upload
and get operations hand out, so a client can use the URL as it is, without
an Authorization header (like a presigned object-store URL). A download
also accepts a bearer token of the file's workspace instead. Tokens are
checked before a byte is read, behind the same limits as the REST
operations: an address with too many refused tokens is refused (429) even
with a good one, and a bad signature or a refused bearer token counts
towards that block, so neither kind of token can be guessed here faster
than elsewhere; a request is counted in its workspace's bucket (and its
agent's, with an agent token). The upload is written to disk while it
streams in (never held in memory) and is recorded on the row only once it
is durably in place (see broker.filestore).

Downloads serve `HEAD`, byte ranges and conditional requests, as proxies,
resuming clients and large files need. The bytes under a storage key never
change (a new upload gets a new key), so the key makes a strong `ETag`.
This module parses `Range` itself (RFC 9110 section 14) and hands
starlette's FileResponse only a range it already normalized: starlette
answers a range it cannot parse with a plain-text 400, refuses a whole set
when one range in it is unsatisfiable, and does not read `If-None-Match`.
Here an unparsable `Range` is ignored (the whole file, as the RFC allows),
unsatisfiable ranges are dropped from a set (416 `range_not_satisfiable`
only when none is left), overlapping or adjacent ranges are merged, and a
set of more than MAX_RANGES is ignored (so a request cannot ask for the
same bytes thousands of times).
"""

from __future__ import annotations

import logging
import os
import re
import time
from contextlib import aclosing
from urllib.parse import quote

import trio
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from broker.auth import bearer_token, resolve_token
from broker.engine import files
from broker.engine.engine import Engine
from broker.engine.errors import BrokerError
from broker.filestore import FileStore
from broker.http.app import error_response, success_response
from broker.ratelimit import UNLIMITED, RateLimited, RateLimiter, Verdict, client_address
from protocol.files import CONTENT_PATH, UploadReceived

log = logging.getLogger(__name__)

# Ranges one request may ask for; a longer set is ignored (the whole file is sent).
MAX_RANGES = 16
# A position has at most 19 digits (below 2^63); a longer one makes the header
# ignored, and never reaches int(), which refuses more than 4,300 digits.
_RANGE_SPEC = re.compile(r"([0-9]{0,19})-([0-9]{0,19})", re.ASCII)


def file_routes(
    engine: Engine, store: FileStore, limiter: RateLimiter | None = None
) -> list[BaseRoute]:
    """The upload (PUT) and download (GET) routes of file bytes.

    limiter: the rate limits shared with the REST operations (None: none).
    """
    limiter = limiter or RateLimiter(UNLIMITED)

    async def put_content(request: Request) -> Response:
        try:
            return await _upload(engine, store, limiter, request)
        except RateLimited as exc:
            return error_response(exc.code, exc.message, headers=exc.verdict.headers())
        except BrokerError as exc:
            return error_response(exc.code, exc.message)
        except ClientDisconnect:
            return error_response("invalid_request", "the client went away during the upload")
        except Exception:
            log.exception("upload to %s failed", request.url.path)
            return error_response("internal_error", "the broker failed to store this upload")

    async def get_content(request: Request) -> Response:
        try:
            return await _download(engine, store, limiter, request)
        except RateLimited as exc:
            return error_response(exc.code, exc.message, headers=exc.verdict.headers())
        except BrokerError as exc:
            return error_response(exc.code, exc.message)
        except Exception:
            log.exception("download of %s failed", request.url.path)
            return error_response("internal_error", "the broker failed to read this file")

    return [
        Route(CONTENT_PATH, put_content, methods=["PUT"], name="PUT file content"),
        Route(CONTENT_PATH, get_content, methods=["GET"], name="GET file content"),
    ]


async def _signed(engine: Engine, limiter: RateLimiter, address: str, purpose: files.Purpose,
                  file_id: int, token: str, now_ms: int) -> int:
    """`files.verify` behind the refused-token limit, which a bad signature feeds.

    Returns the token's expiry. Raises RateLimited while `address` is
    blocked, url_token_invalid, url_token_expired (not counted: the
    signature was ours).
    """
    with limiter.guarding_tokens(address, refusal="url_token_invalid"):
        return files.verify(await engine.read(files.url_secret), purpose, file_id, token, now_ms)


async def _upload(engine: Engine, store: FileStore, limiter: RateLimiter,
                  request: Request) -> Response:
    file_id = _file_id(request)
    token = request.query_params.get("token")
    if not token:
        raise BrokerError("url_token_invalid", "the upload URL carries no token")
    now = _now_ms()
    address = client_address(request.scope)
    expires = await _signed(engine, limiter, address, "upload", file_id, token, now)
    row = await engine.read(files.file_row, file_id)
    if row is None:
        raise BrokerError("file_not_found", f"file {file_id} not found")
    # Before a byte is read: a refused upload stores nothing.
    limits = limiter.take_request("file.upload_content", row.workspace_id, None, address)
    if row.state == "deleted":
        raise BrokerError("file_deleted", f"file {file_id} was deleted by its uploader")
    if row.state != "pending" or row.storage_key is not None:
        raise BrokerError("file_already_uploaded", f"the bytes of file {file_id} were uploaded")
    declared = request.headers.get("content-length")
    if declared is not None and declared.strip() != str(row.size_bytes):
        raise BrokerError(
            "file_size_mismatch",
            f"Content-Length is {declared.strip()}; size_bytes declared {row.size_bytes}",
        )
    key: str | None = None
    recorded = False
    try:
        # An upload that started in time may finish until the sweep could
        # drop its row; a trickle cannot hold a temporary file any longer.
        with trio.move_on_after((expires + files.UPLOAD_SWEEP_GRACE_MS - now) / 1000) as window:
            async with aclosing(request.stream()) as body:
                key = await store.receive(row.workspace_id, row.id, body, row.size_bytes)
        if window.cancelled_caught:
            raise BrokerError("url_token_expired", "the upload did not finish in time")
        assert key is not None
        # Shielded: once the command is submitted its outcome must be known,
        # or bytes could be removed under a row that recorded them.
        with trio.CancelScope(shield=True):
            await engine.submit(files.RecordUpload(file_id=row.id, storage_key=key))
        recorded = True
    finally:
        if key is not None and not recorded:
            store.discard(key)
    response = success_response(UploadReceived(id=str(row.id), size_bytes=row.size_bytes,
                                               status="pending"))
    _limit_headers(response, limits)
    return response


async def _download(engine: Engine, store: FileStore, limiter: RateLimiter,
                    request: Request) -> Response:
    file_id = _file_id(request)
    token = request.query_params.get("token")
    address = client_address(request.scope)
    if token:
        await _signed(engine, limiter, address, "download", file_id, token, _now_ms())
        row = await engine.read(files.file_row, file_id)
        if row is None:
            raise BrokerError("file_not_found", f"file {file_id} not found")
        limits = limiter.take_request("file.download_content", row.workspace_id, None, address)
    else:
        # As the REST operations do (`_checked_principal`): a blocked address
        # is refused before the token is looked at, so the answer cannot tell
        # a good token from a bad one, and a refused token counts.
        header = request.headers.get("authorization")
        with limiter.guarding_tokens(address, presented=bool(header)):
            principal = await resolve_token(engine, bearer_token(header))
        limits = limiter.take_request("file.download_content", principal.workspace_id,
                                      principal.agent_id, address)
        row = await engine.read(files.require_file, principal.workspace_id, file_id)
    if row.state == "deleted":
        raise BrokerError("file_deleted", f"file {file_id} was deleted by its uploader")
    if row.state != "complete" or row.storage_key is None:
        raise BrokerError("file_not_complete", f"file {file_id} has not finished uploading")
    path = store.path_of(row.storage_key)
    try:
        stat = await trio.to_thread.run_sync(os.stat, path)
    except FileNotFoundError:
        log.error("file %d is complete but its bytes %s are missing", row.id, row.storage_key)
        raise BrokerError("file_missing", f"the bytes of file {file_id} are missing") from None
    etag = _etag(row.storage_key)
    headers = {
        "etag": etag,
        "accept-ranges": "bytes",
        # a deleted file must stop being served at once, from caches too
        "cache-control": "private, no-store",
    }
    if limits is not None:
        headers.update(limits.headers())
    if _etag_matches(request.headers.get("if-none-match"), etag):
        return Response(status_code=304, headers=headers)
    ranges: list[tuple[int, int]] | None = None
    asked = request.headers.get("range")
    if asked is not None and request.headers.get("if-range", etag) == etag:
        ranges = byte_ranges(asked, stat.st_size)
        if ranges == []:
            headers["content-range"] = f"bytes */{stat.st_size}"
            return error_response("range_not_satisfiable",
                                  f"no range of {asked[:100]!r} is within the file's"
                                  f" {stat.st_size} bytes", headers=headers)
    # FileResponse opens the file only while it sends it and always closes
    # it, also when the client goes away before the body starts.
    return _FileRange(
        path, ranges, stat_result=stat, media_type=row.content_type,
        headers={
            **headers,
            "content-disposition": _attachment(row.filename),
            # never let a browser render an uploaded file as something else
            "x-content-type-options": "nosniff",
        },
    )


def byte_ranges(header: str, size: int) -> list[tuple[int, int]] | None:
    """The byte ranges a `Range` header asks of `size` bytes, as sorted, disjoint
    (first, last) pairs, inclusive.

    None: the header is to be ignored (not bytes, unparsable, a last byte
    before its first, more than MAX_RANGES). []: every range is unsatisfiable
    (answer 416). Ranges past the end are dropped, ends past it are cut,
    overlapping or adjacent ranges are merged.
    """
    unit, sep, specs = header.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return None
    parts = [part.strip() for part in specs.split(",") if part.strip()]
    if not parts or len(parts) > MAX_RANGES:
        return None
    wanted: list[tuple[int, int]] = []
    for part in parts:
        spec = _RANGE_SPEC.fullmatch(part)
        if spec is None or spec.group(1) == spec.group(2) == "":
            return None
        first, last = spec.group(1), spec.group(2)
        if first == "":  # the last N bytes
            length = int(last)
            if length > 0 and size > 0:
                wanted.append((max(0, size - length), size - 1))
            continue
        start = int(first)
        end = size - 1 if last == "" else int(last)
        if last != "" and end < start:
            return None
        if start < size:
            wanted.append((start, min(end, size - 1)))
    merged: list[tuple[int, int]] = []
    for start, end in sorted(wanted):
        if merged and start <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


class _FileRange(FileResponse):
    """A FileResponse that sends `ranges` (None: the whole file), already decided here.

    It hands starlette the normalized ranges as the request's only range
    header, so starlette's own parsing (which this module does not share)
    never sees what the client sent.
    """

    def __init__(self, path: os.PathLike[str], ranges: list[tuple[int, int]] | None, *,
                 stat_result: os.stat_result, media_type: str,
                 headers: dict[str, str]) -> None:
        super().__init__(path, stat_result=stat_result, media_type=media_type, headers=headers)
        self.range = None if ranges is None else "bytes=" + ",".join(
            f"{start}-{end}" for start, end in ranges)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(name, value) for name, value in scope["headers"]
                   if name not in (b"range", b"if-range")]
        if self.range is not None:
            headers.append((b"range", self.range.encode("latin-1")))
        await super().__call__({**scope, "headers": headers}, receive, send)


def _etag(storage_key: str) -> str:
    """A strong validator: the bytes under a storage key never change."""
    return '"' + storage_key.replace("/", "-") + '"'


def _etag_matches(header: str | None, etag: str) -> bool:
    """`If-None-Match` by weak comparison (RFC 9110 section 13.1.2)."""
    if header is None:
        return False
    if header.strip() == "*":
        return True
    return any(tag.strip().removeprefix("W/") == etag for tag in header.split(","))


def _limit_headers(response: Response, limits: Verdict | None) -> None:
    if limits is not None:
        response.headers.update(limits.headers())


def _file_id(request: Request) -> int:
    raw = str(request.path_params["file_id"])
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 19):
        raise BrokerError("file_not_found", f"file {raw!r} not found")
    return int(raw)


def _attachment(filename: str) -> str:
    """`Content-Disposition` with an ASCII fallback and the exact UTF-8 name (RFC 6266)."""
    fallback = "".join(c if 0x20 <= ord(c) < 0x7F and c not in '"\\' else "_" for c in filename)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


def _now_ms() -> int:
    return int(time.time() * 1000)
