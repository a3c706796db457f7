"""How the long-running processes use CPython's cyclic garbage collector, and its pauses timed.

The collector holds the GIL while it runs, so no Python runs meanwhile in
any thread: not the event loop, not the writer thread between its SQLite
calls, not the load generator's clients. Under load a full collection
walks every object that exists once the server has started (functions,
classes, modules: they live as long as the process), tens of thousands of
them, and holds up every send in flight while it does; young collections,
one per 700 container objects allocated (the default), run many times a
second and add up to a few per cent of the daemon's CPU (the figures are
in BENCHMARKS.md, "Figures behind the code").

So `settle_heap()`, called once a process has started: collect, then
`gc.freeze()` (what exists now moves to a permanent generation that every
later collection ignores), and collect the young generation every 10,000
allocations instead of 700. Cycles of garbage made later still get
collected; up to 10,000 young objects wait a little longer for it. The
price: a start-up object that later dies in a reference cycle is never
reclaimed (start-up objects are modules, classes, functions and the
server's own long-lived parts, which do not die before the process).

`CollectorPauses` times every collection into a histogram by generation,
for `/metrics`: the pauses are visible to whoever operates the daemon.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric

from broker.engine.histogram import Histogram

# Collect the young generation once this many more container objects were
# allocated than freed (CPython's default: 700).
YOUNG_GENERATION_THRESHOLD = 10_000
# Upper bounds, in seconds, of the pause histogram.
PAUSE_BUCKETS: tuple[float, ...] = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
GENERATIONS = 3


def settle_heap() -> None:
    """Freeze the objects that exist now and make young collections rarer (see the module doc).

    Call once per process, after start-up (imports done, the server built).
    """
    gc.collect()
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_GENERATION_THRESHOLD, middle, oldest)


class CollectorPauses:
    """A Prometheus collector timing every garbage collection while installed.

    `install()` adds a `gc.callbacks` hook, `remove()` takes it away (the hook
    list is the process's, and a test process runs many servers). The hook
    runs inside the collector, in whichever thread triggered it, with the GIL
    held: it only adds to a histogram's counts and takes no lock (a lock held
    by the interrupted code of the same thread would deadlock it).
    """

    def __init__(self, buckets: Sequence[float] = PAUSE_BUCKETS) -> None:
        self.pauses = [Histogram(buckets) for _ in range(GENERATIONS)]
        self._started: float | None = None

    def install(self) -> None:
        """Start timing collections (idempotent)."""
        if self._hook not in gc.callbacks:
            gc.callbacks.append(self._hook)

    def remove(self) -> None:
        """Stop timing collections (idempotent); the figures so far stay."""
        if self._hook in gc.callbacks:
            gc.callbacks.remove(self._hook)
        self._started = None

    def _hook(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        if self._started is None:  # installed during a collection: its start was not seen
            return
        seconds = time.perf_counter() - self._started
        self._started = None
        generation = min(int(info.get("generation", 0)), GENERATIONS - 1)
        self.pauses[generation].observe(seconds)

    def describe(self) -> Sequence[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        pauses = HistogramMetricFamily(
            "broker_gc_pause_seconds",
            "Garbage-collector pauses (no Python runs in any thread), by generation",
            labels=["generation"],
        )
        for generation, histogram in enumerate(self.pauses):
            snapshot = histogram.snapshot()
            pauses.add_metric([str(generation)], snapshot.cumulative(), snapshot.sum)
        yield pauses
        yield GaugeMetricFamily(
            "broker_gc_frozen_objects",
            "Objects moved out of the collector's reach by gc.freeze() at start-up",
            value=gc.get_freeze_count(),
        )
