"""Idempotency keys, checked and stored inside the send's own transaction.

The same key with the same request replays the first result and writes
nothing; the same key with another request fails with
`idempotency_key_reused`. Because the record commits with the send, two
concurrent sends with one key produce one message: the writer applies them
one after the other, and the second finds the first's record.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import TypeVar, cast

import msgspec

from broker.engine.errors import BrokerError
from broker.engine.writer import Tx

R = TypeVar("R")

_encoder = msgspec.json.Encoder()


def request_digest(operation: str, request: msgspec.Struct) -> bytes:
    """A digest of the request without its key: what "the same payload" means."""
    fields = msgspec.structs.asdict(request)
    fields.pop("idempotency_key", None)
    return hashlib.sha256(operation.encode() + b"\0" + _encoder.encode(fields)).digest()


def once(
    tx: Tx,
    *,
    agent_id: int,
    key: str | None,
    operation: str,
    request: msgspec.Struct,
    result_type: type[R],
    run: Callable[[], R],
) -> R:
    """`run()` the first time `key` is seen for this agent; the stored result after that.

    Call it right after the input is validated, with every domain check
    (membership, archived channel, active recipient) inside `run`: a retry
    must get the first result even when the state changed since it.
    Raises invalid_idempotency_key, idempotency_key_reused (the key was used
    with another request), and whatever `run` raises.
    """
    if key is None:
        return run()
    if not key.strip() or len(key) > 255:
        raise BrokerError("invalid_idempotency_key",
                          "an idempotency key is 1-255 characters and not blank")
    digest = request_digest(operation, request)
    horizon = tx.now_ms - tx.limits.idempotency_ttl_seconds * 1000
    row = tx.conn.execute(
        "SELECT operation, request_hash, response FROM idempotency_keys"
        " WHERE agent_id = ? AND key = ? AND created_at > ?",
        (agent_id, key, horizon),
    ).fetchone()
    if row is not None:
        if row[0] != operation or bytes(row[1]) != digest:
            raise BrokerError(
                "idempotency_key_reused",
                "this idempotency key was already used with a different request",
            )
        return msgspec.json.decode(cast(bytes, row[2]), type=result_type)
    result = run()
    tx.conn.execute(
        "INSERT OR REPLACE INTO idempotency_keys(agent_id, key, operation, request_hash,"
        " response, created_at) VALUES (?,?,?,?,?,?)",
        (agent_id, key, operation, digest, _encoder.encode(result), tx.now_ms),
    )
    return result
