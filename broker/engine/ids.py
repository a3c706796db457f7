"""Time-ordered 64-bit ids, allocated only by the writer.

An id is `milliseconds since the Unix epoch << 22 | counter`: sortable by
creation time, unique within the one writer, and it fits a signed 64-bit
SQLite INTEGER until the year 2255. The allocator never goes backwards: it
is seeded with the largest id already stored, so a clock that steps back
after a restart cannot reuse an id.
"""

from __future__ import annotations

import time
from collections.abc import Callable

COUNTER_BITS = 22


class IdAllocator:
    """Strictly increasing ids; not thread-safe (the writer thread owns it)."""

    def __init__(self, floor: int = 0, clock: Callable[[], float] = time.time) -> None:
        self._last = floor
        self._clock = clock

    def next(self) -> int:
        candidate = int(self._clock() * 1000) << COUNTER_BITS
        self._last = max(self._last + 1, candidate)
        return self._last

    @property
    def last(self) -> int:
        return self._last


def id_time_ms(id_: int) -> int:
    """The creation time, in milliseconds since the epoch, encoded in an id."""
    return id_ >> COUNTER_BITS
