"""What a load run counts: latency histograms and per-message bitmaps, both cheap to merge.

A run may see millions of latency samples across several processes, so
samples go into a log-bucketed histogram (2% relative precision, the exact
maximum kept aside) whose counts simply add up when processes report.

Loss is counted exactly, per message: each message a sender sends carries
(sender index, n) with n dense from 0, so "which n were acknowledged" and
"which n reached recipient r" are bitmaps (`Bits`), one bit per message,
and the lost messages are a few big-integer operations in the parent.
"""

from __future__ import annotations

import math

import msgspec

# Bucket i holds samples in [GROWTH**i, GROWTH**(i+1)) microseconds.
GROWTH = 1.02
_LOG_GROWTH = math.log(GROWTH)
# 2% buckets up to ~10 minutes; longer samples land in the last one (max stays exact).
BUCKETS = 1400


class Histogram(msgspec.Struct, kw_only=True):
    """Latency samples in microseconds, log-bucketed; `merge` adds another one."""

    counts: list[int] = msgspec.field(default_factory=lambda: [0] * BUCKETS)
    count: int = 0
    total_us: float = 0.0
    max_us: float = 0.0

    def add(self, seconds: float) -> None:
        us = seconds * 1e6
        index = int(math.log(us) / _LOG_GROWTH) + 1 if us >= 1.0 else 0
        self.counts[min(index, BUCKETS - 1)] += 1
        self.count += 1
        self.total_us += us
        if us > self.max_us:
            self.max_us = us

    def merge(self, other: Histogram) -> None:
        counts = self.counts
        for i, n in enumerate(other.counts):
            if n:
                counts[i] += n
        self.count += other.count
        self.total_us += other.total_us
        self.max_us = max(self.max_us, other.max_us)

    def percentile_ms(self, p: float) -> float:
        """The p-th percentile (0..100) in ms: its bucket's upper edge, capped at max."""
        if self.count == 0:
            return 0.0
        rank = max(1, math.ceil(self.count * p / 100))
        seen = 0
        for i, n in enumerate(self.counts):
            seen += n
            if seen >= rank:
                upper = GROWTH ** i if i else 1.0
                return min(upper, self.max_us) / 1000
        return self.max_us / 1000

    @property
    def max_ms(self) -> float:
        return self.max_us / 1000

    @property
    def mean_ms(self) -> float:
        return self.total_us / self.count / 1000 if self.count else 0.0

    def summary(self) -> dict[str, float]:
        return {"p50": self.percentile_ms(50), "p90": self.percentile_ms(90),
                "p99": self.percentile_ms(99), "max": self.max_ms}


class Bits:
    """A growable bitmap of message numbers; `set` says whether the bit was new."""

    __slots__ = ("data",)

    def __init__(self, data: bytes = b"") -> None:
        self.data = bytearray(data)

    def set(self, n: int) -> bool:
        byte, bit = divmod(n, 8)
        data = self.data
        if byte >= len(data):
            data.extend(bytes(max(byte + 1 - len(data), len(data))))
        mask = 1 << bit
        if data[byte] & mask:
            return False
        data[byte] |= mask
        return True

    def __contains__(self, n: int) -> bool:
        byte, bit = divmod(n, 8)
        return byte < len(self.data) and bool(self.data[byte] >> bit & 1)

    def as_int(self) -> int:
        return int.from_bytes(self.data, "little")

    def __len__(self) -> int:
        return self.as_int().bit_count()


def bits_of(values: int) -> Bits:
    """The bitmap whose integer form is `values`."""
    return Bits(values.to_bytes((values.bit_length() + 7) // 8, "little"))
