"""Signing a webhook delivery, and verifying one (for receivers and tests).

Two schemes, both HMAC-SHA256:

- Relaycast: `X-Relay-Signature: sha256=<hex HMAC of the body>`, keyed with
  the secret's UTF-8 bytes; `X-Relay-Event` and `X-Relay-Timestamp` (the
  event's time, as in the body) beside it.
- Standard Webhooks (https://www.standardwebhooks.com), when the secret has
  the form `whsec_<base64 key>`: `webhook-id` (the outbox row, stable across
  retries), `webhook-timestamp` (Unix seconds of this attempt) and
  `webhook-signature: v1,<base64 HMAC of "id.timestamp.body">` keyed with the
  decoded key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping

from broker.engine.webhooks import STANDARD_SECRET_PREFIX, standard_key

CONTENT_TYPE = "application/json"
USER_AGENT = "agent-broker-webhooks/1"


def relay_signature(secret: str, body: bytes) -> str:
    """`sha256=<hex>`: the X-Relay-Signature of `body`."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def standard_signature(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """`v1,<base64>`: the Standard Webhooks signature of `body` (secret `whsec_...`)."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(standard_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def delivery_headers(
    *, event_type: str, event_time: str, delivery_id: int, attempt: int, body: bytes,
    secret: str | None, now_s: int, extra: Mapping[str, str],
) -> dict[str, str]:
    """Every header of one attempt: the subscription's extras first, ours over them.

    The extras were checked at subscription time not to name any of ours;
    writing ours last makes that hold even for rows written another way.
    """
    headers = dict(extra)
    message_id = f"msg_{delivery_id}"
    headers.update({
        "Content-Type": CONTENT_TYPE,
        "User-Agent": USER_AGENT,
        "X-Relay-Event": event_type,
        "X-Relay-Timestamp": event_time,
        "X-Relay-Delivery": str(delivery_id),
        "X-Relay-Attempt": str(attempt),
    })
    if secret is not None:
        headers["X-Relay-Signature"] = relay_signature(secret, body)
        if secret.startswith(STANDARD_SECRET_PREFIX):
            headers["webhook-id"] = message_id
            headers["webhook-timestamp"] = str(now_s)
            headers["webhook-signature"] = standard_signature(secret, message_id, now_s, body)
    return headers


def verify_relay(secret: str, body: bytes, header: str) -> bool:
    """Whether `header` (X-Relay-Signature) is the signature of `body` with `secret`."""
    return hmac.compare_digest(relay_signature(secret, body), header)


def verify_standard(secret: str, headers: Mapping[str, str], body: bytes) -> bool:
    """Whether the Standard Webhooks headers sign `body` with `secret` (any listed v1 signature).

    The timestamp's freshness is the receiver's policy and is not checked here.
    """
    message_id = headers.get("webhook-id")
    timestamp = headers.get("webhook-timestamp")
    signatures = headers.get("webhook-signature")
    if message_id is None or timestamp is None or signatures is None or not timestamp.isdigit():
        return False
    expected = standard_signature(secret, message_id, int(timestamp), body)
    return any(hmac.compare_digest(expected, candidate) for candidate in signatures.split(" "))
