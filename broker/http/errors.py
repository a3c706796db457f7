"""Error codes to HTTP statuses, and the response envelope.

The code is the contract (the WebSocket gateway sends the same codes); the
status is how REST clients branch on it. Exact codes first, then families
by suffix or prefix, so a new `*_not_found` code needs no edit here.
Success: `{"ok": true, "data": ...}`; failure:
`{"ok": false, "error": {"code": ..., "message": ...}}`.
"""

from __future__ import annotations

from typing import Any

import msgspec

# One encoder for every response body.
_encoder = msgspec.json.Encoder()

EXACT_STATUS: dict[str, int] = {
    "unauthorized": 401,
    "invalid_token": 401,
    "forbidden": 403,
    "not_a_member": 403,
    "not_a_participant": 403,
    "not_allowed": 403,
    "url_token_invalid": 403,
    "url_token_expired": 403,
    "not_found": 404,
    "method_not_allowed": 405,
    "request_timeout": 408,
    "idempotency_key_reused": 409,
    "channel_archived": 409,
    "file_already_uploaded": 409,
    "file_not_uploaded": 409,
    "file_not_complete": 409,
    "file_deleted": 410,
    "payload_too_large": 413,
    "unsupported_media_type": 415,
    "range_not_satisfiable": 416,
    "upgrade_required": 426,
    "rate_limit_exceeded": 429,
    # nginx's status for a client that went away first; nobody reads the answer
    "client_closed_request": 499,
    "internal_error": 500,
    "file_missing": 500,
    "commit_failed": 503,
    "shutting_down": 503,
    "writer_failed": 503,
    "not_ready": 503,
}

# (suffix, status) checked in order when the code has no exact entry.
SUFFIX_STATUS: tuple[tuple[str, int], ...] = (
    ("_not_found", 404),
    ("_already_exists", 409),
    ("_conflict", 409),
    ("_forbidden", 403),
    ("_too_long", 400),
    ("_too_large", 400),
    ("_too_many", 400),
)
PREFIX_STATUS: tuple[tuple[str, int], ...] = (
    ("invalid_", 400),
    ("cannot_", 400),
)
DEFAULT_ERROR_STATUS = 400


def status_for(code: str) -> int:
    """The HTTP status of a domain error code (400 when nothing more specific applies)."""
    exact = EXACT_STATUS.get(code)
    if exact is not None:
        return exact
    for suffix, status in SUFFIX_STATUS:
        if code.endswith(suffix):
            return status
    for prefix, status in PREFIX_STATUS:
        if code.startswith(prefix):
            return status
    return DEFAULT_ERROR_STATUS


class ErrorBody(msgspec.Struct, frozen=True):
    code: str
    message: str


class ErrorEnvelope(msgspec.Struct, frozen=True, kw_only=True):
    ok: bool = False
    error: ErrorBody


def encode_error(code: str, message: str) -> bytes:
    return _encoder.encode(ErrorEnvelope(error=ErrorBody(code, message)))


def encode_success(data: Any) -> bytes:
    # The data is encoded on its own so a msgspec.Raw or a Struct passes through as is.
    return b'{"ok":true,"data":' + _encoder.encode(data) + b"}"
