"""Tables that every process of the daemon shares, in one shared-memory file.

With `--workers N` each gateway process serves the connections the kernel
hands it, but a rate limit or a socket cap is the daemon's: an agent whose
requests and sockets are spread over N gateways must meet the configured
limit once, not N times. The writer process makes one anonymous
shared-memory file (`memfd_create`, `SharedRegion.create`) before it starts
the gateways; each gateway is handed its descriptor and maps it
(`SharedRegion.attach`). What lives in it is laid out by its user
(`broker.ratelimit.SharedLimits`): counters and tables of slots.

A `SlotTable` is an open-addressed hash table of fixed size: each slot two
signed 64-bit integers, a key and its value. A key is 8 bytes of a BLAKE2b
digest of the caller's key, keyed with the region's random salt (`slot_key`;
never 0, which marks a slot never used). A key lives in one of the `WINDOW`
slots from `key mod slots`, so a lookup is one unpack of 256 bytes; a new
key takes the first slot of its window that is vacant: never used, or
holding a value its table calls idle (a bucket that has refilled, a count
of 0). An idle key is the same as no key, which is what lets a slot be
reused without tombstones.

Every check-and-update runs under `SharedRegion.locked()`, a POSIX record
lock on the file (`fcntl.lockf`): held for microseconds, always on the
event loop's thread and never across an await, so it cannot deadlock, and
the kernel releases it if its holder dies (a gateway that dies takes the
daemon down, so the region never outlives a torn update: docs/operations.md,
"Processes"). A holder that is stopped (SIGSTOP, a debugger) while it holds
the lock stops every other process's checks with it. A POSIX lock does not
exclude threads of one process: nothing here may be called from a worker
thread.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import struct
from collections.abc import Callable

# Slots a key may live in, from its home slot on: one unpack reads them all.
WINDOW = 16
_SLOT = struct.Struct("<qq")
_WINDOW = struct.Struct(f"<{2 * WINDOW}q")
_COUNTER = struct.Struct("<q")


def slot_key(key: object, salt: bytes) -> int:
    """The table key of `key` (an id or an address): the same in every process of one daemon
    (`salt` is the region's), never 0. The salt keeps a client from choosing addresses that
    crowd one window."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8, key=salt).digest()
    return int.from_bytes(digest, "little", signed=True) or 1


class SharedRegion:
    """One shared-memory file mapped into this process, with the lock its users take.

    Owned by the process that created it or was handed its descriptor;
    `close()` unmaps it (the memory is freed when the last process closes it).
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.size = os.fstat(fd).st_size
        self._map = mmap.mmap(fd, self.size)
        self.view = memoryview(self._map)
        self._lock = _Lock(fd)

    @classmethod
    def create(cls, size: int) -> SharedRegion:
        """A new zeroed region of `size` bytes (pages are allocated as they are first touched)."""
        fd = os.memfd_create("broker-shared", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            return cls(fd)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def attach(cls, fd: int, size: int) -> SharedRegion:
        """The region behind an inherited descriptor, which it then owns (`close` closes
        it, as does a failure here); its size must be `size` bytes. Raises ValueError
        for another size or an empty file, OSError when it cannot be mapped."""
        try:
            region = cls(fd)
        except BaseException:
            os.close(fd)
            raise
        if region.size != size:
            region.close()
            raise ValueError(f"the shared region has {region.size} bytes, not {size}: the"
                             " processes of one daemon disagree on its layout")
        return region

    def locked(self) -> _Lock:
        """The region's lock, to hold with `with` (blocking: every holder keeps it for
        microseconds)."""
        return self._lock

    def close(self) -> None:
        """Unmap the region and close its descriptor (once: later calls do nothing)."""
        if self._map.closed:
            return
        self.view.release()
        self._map.close()
        os.close(self.fd)


class _Lock:
    """A POSIX record lock on a whole file, as a context manager (a class: a generator-based
    one costs more than the lock itself)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def __enter__(self) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_UN)


class SharedCounter:
    """One signed 64-bit integer at `offset` of a region. Change it under the region's lock."""

    SIZE = _COUNTER.size

    def __init__(self, view: memoryview, offset: int) -> None:
        self._view, self._offset = view, offset

    @property
    def value(self) -> int:
        value: int = _COUNTER.unpack_from(self._view, self._offset)[0]
        return value

    def add(self, delta: int) -> None:
        _COUNTER.pack_into(self._view, self._offset, self.value + delta)


class SlotTable:
    """A fixed-size table of (key, value) slots at `offset` of a region (see the module)."""

    def __init__(self, view: memoryview, offset: int, slots: int, salt: bytes) -> None:
        """salt: the region's, for `key_of`."""
        if slots < 1:
            raise ValueError("a table needs at least one slot")
        self.slots = slots
        self.salt = salt
        self._view = view
        self._offset = offset
        # Slots holding a key, idle or not (a slot is never emptied, only reused).
        self.used = SharedCounter(view, offset)

    @staticmethod
    def size(slots: int) -> int:
        """Bytes a table of `slots` slots takes: its counter, and a window past the last slot."""
        return SharedCounter.SIZE + (slots + WINDOW - 1) * _SLOT.size

    def key_of(self, key: object) -> int:
        """The table key of `key` (slot_key with the region's salt)."""
        return slot_key(key, self.salt)

    def find(self, key: int, idle: Callable[[int], bool],
             evict: Callable[[int], int] | None = None) -> tuple[int, int | None]:
        """Where `key` is and its value, or where it may go and None.

        idle(value): the slot is vacant. When the window has no vacant
        slot: with `evict`, the slot whose `evict(value)` is lowest is
        offered (its key is dropped when the caller writes there); without,
        the slot is -1 (no room).
        """
        home = key % self.slots  # Python's modulo: never negative
        values = _WINDOW.unpack_from(self._view, self._slot_offset(home))
        keys = values[0::2]
        if key in keys:
            i = keys.index(key)
            return home + i, values[2 * i + 1]
        for i in range(WINDOW):
            if keys[i] == 0 or idle(values[2 * i + 1]):
                return home + i, None
        if evict is None:
            return -1, None
        return home + min(range(WINDOW), key=lambda i: evict(values[2 * i + 1])), None

    def write(self, slot: int, key: int, value: int) -> None:
        """Store `key` and `value` in `slot` (from `find`)."""
        offset = self._slot_offset(slot)
        if _SLOT.unpack_from(self._view, offset)[0] == 0:
            self.used.add(1)
        _SLOT.pack_into(self._view, offset, key, value)

    def _slot_offset(self, slot: int) -> int:
        return self._offset + SharedCounter.SIZE + slot * _SLOT.size
