"""Webhook settings: `[webhooks]` in the TOML file (or BROKER_WEBHOOKS_* variables).

Every number is a named default. The retry schedule: after failed attempt n
(1-based) the next one waits `min(cap, base * multiplier ** (n - 1))`,
times a random factor in [1 - jitter, 1 + jitter] (then capped again); a
429 or 503 answer's `Retry-After` lengthens the wait, never shortens it.
After `max_attempts` attempts the event is a dead letter.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from broker.webhooks.destinations import parse_allow_entry

DEFAULT_MAX_ATTEMPTS = 10
DEFAULT_BACKOFF_BASE_S = 2.0
DEFAULT_BACKOFF_MULTIPLIER = 4.0
DEFAULT_BACKOFF_CAP_S = 3600.0
DEFAULT_JITTER = 0.2
# One request, from connecting to the status line.
DEFAULT_REQUEST_TIMEOUT_S = 10.0
# Requests in flight at once, over all subscriptions and per subscription:
# the per-subscription bound is what keeps one slow endpoint from taking
# every slot.
DEFAULT_CONCURRENCY = 64
DEFAULT_PER_SUBSCRIPTION_CONCURRENCY = 4
# Accepted for old configuration files and ignored: the dispatcher is woken
# by the commits that write outbox rows, it no longer polls.
DEFAULT_POLL_INTERVAL_S = 0.25
# Due rows read per look.
DEFAULT_FETCH_BATCH = 256
# Delivered rows are kept this long (for counts and support), then pruned.
DEFAULT_DELIVERED_RETENTION_S = 24 * 3600.0
DEFAULT_PRUNE_INTERVAL_S = 600.0


class WebhookSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How outbound webhooks are dispatched, and which private destinations are allowed.

    allow_hosts: host names, IP addresses or CIDR networks that may be called
    although they are loopback, private, link-local or metadata addresses
    (e.g. "127.0.0.1", "10.0.0.0/8", "hooks.internal").
    enabled: run the dispatcher (subscriptions and the outbox work either way).
    """

    enabled: bool = True
    allow_hosts: tuple[str, ...] = ()
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=100)] = DEFAULT_MAX_ATTEMPTS
    backoff_base_seconds: Annotated[float, msgspec.Meta(gt=0)] = DEFAULT_BACKOFF_BASE_S
    backoff_multiplier: Annotated[float, msgspec.Meta(ge=1)] = DEFAULT_BACKOFF_MULTIPLIER
    backoff_cap_seconds: Annotated[float, msgspec.Meta(gt=0)] = DEFAULT_BACKOFF_CAP_S
    jitter: Annotated[float, msgspec.Meta(ge=0, lt=1)] = DEFAULT_JITTER
    request_timeout_seconds: Annotated[float, msgspec.Meta(gt=0)] = DEFAULT_REQUEST_TIMEOUT_S
    concurrency: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = DEFAULT_CONCURRENCY
    per_subscription_concurrency: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = (
        DEFAULT_PER_SUBSCRIPTION_CONCURRENCY
    )
    poll_interval_seconds: Annotated[float, msgspec.Meta(gt=0)] = DEFAULT_POLL_INTERVAL_S
    fetch_batch: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = DEFAULT_FETCH_BATCH
    delivered_retention_seconds: Annotated[float, msgspec.Meta(ge=0)] = (
        DEFAULT_DELIVERED_RETENTION_S
    )
    prune_interval_seconds: Annotated[float, msgspec.Meta(gt=0)] = DEFAULT_PRUNE_INTERVAL_S

    def __post_init__(self) -> None:
        if self.per_subscription_concurrency > self.concurrency:
            raise ValueError("per_subscription_concurrency must not exceed concurrency")
        for entry in self.allow_hosts:
            parse_allow_entry(entry)
