"""Engine settings: storage, writer batching and the domain limits.

Every number here is a named default that the daemon configuration can
override; nothing below this package reads the environment.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

Synchronous = Literal["OFF", "NORMAL", "FULL", "EXTRA"]


class Limits(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Domain limits enforced by the commands."""

    max_text_bytes: Annotated[int, msgspec.Meta(ge=1)] = 32 * 1024
    max_data_bytes: Annotated[int, msgspec.Meta(ge=2)] = 64 * 1024
    max_emoji_chars: Annotated[int, msgspec.Meta(ge=1)] = 64
    max_agent_name_chars: Annotated[int, msgspec.Meta(ge=1)] = 64
    mailbox_depth: Annotated[int, msgspec.Meta(ge=1)] = 10_000
    delivery_ttl_seconds: Annotated[int, msgspec.Meta(ge=1)] = 24 * 3600
    token_grace_seconds: Annotated[int, msgspec.Meta(ge=0)] = 5 * 60
    idempotency_ttl_seconds: Annotated[int, msgspec.Meta(ge=1)] = 24 * 3600
    max_page: Annotated[int, msgspec.Meta(ge=1)] = 100
    default_page: Annotated[int, msgspec.Meta(ge=1)] = 50
    # Files: the largest upload, how long a signed upload or download URL
    # works, and how long a deleted file's bytes stay on disk (a backup that
    # copies the database first, then the files, within this time is whole).
    max_file_bytes: Annotated[int, msgspec.Meta(ge=0)] = 25 * 1024 * 1024
    file_url_ttl_seconds: Annotated[int, msgspec.Meta(ge=1)] = 3600
    deleted_file_retention_seconds: Annotated[int, msgspec.Meta(ge=0)] = 3600


class Retention(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How long settled rows are kept, and how the sweeps pace themselves."""

    # Acked and dead-lettered deliveries older than this are pruned.
    settled_delivery_days: Annotated[float, msgspec.Meta(gt=0)] = 7
    # Message-log rows older than this are pruned once no delivery can point at
    # them any more; must exceed settled_delivery_days plus the delivery TTL.
    message_log_days: Annotated[float, msgspec.Meta(gt=0)] = 30
    # Rows changed per sweep command: bounds how long one transaction holds the writer.
    sweep_batch: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 500
    sweep_interval_seconds: Annotated[float, msgspec.Meta(gt=0)] = 60
    checkpoint_interval_seconds: Annotated[float, msgspec.Meta(gt=0)] = 300
    optimize_interval_seconds: Annotated[float, msgspec.Meta(gt=0)] = 3600


class EngineConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Where the database lives and how the writer and readers run."""

    # `synchronous=FULL` in WAL mode: an acknowledged commit survives power loss.
    synchronous: Synchronous = "FULL"
    # Commands taken into one transaction at most (group commit bound).
    max_batch: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 256
    # Commands waiting for the writer before submitters are held back.
    queue_size: Annotated[int, msgspec.Meta(ge=1)] = 4096
    readers: Annotated[int, msgspec.Meta(ge=1, le=64)] = 4
    busy_timeout_ms: Annotated[int, msgspec.Meta(ge=0)] = 5_000
    limits: Limits = msgspec.field(default_factory=Limits)
    retention: Retention = msgspec.field(default_factory=Retention)

    def __post_init__(self) -> None:
        ttl_days = self.limits.delivery_ttl_seconds / 86400
        if self.retention.message_log_days <= self.retention.settled_delivery_days + ttl_days:
            raise ValueError(
                "retention.message_log_days must exceed retention.settled_delivery_days plus "
                "limits.delivery_ttl_seconds, so that no delivery outlives its log row"
            )
