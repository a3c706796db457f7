"""The collector settings the daemon runs with, and its pauses as /metrics reports them."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path

import httpx
import trio
from prometheus_client import CollectorRegistry, generate_latest

from broker.gc_tuning import YOUNG_GENERATION_THRESHOLD, CollectorPauses
from broker.loadtest.command import daemon_figures
from tests.helpers.daemon import serve
from tests.helpers.engine import TEST_DEADLINE_S

PROCESS_DEADLINE_S = 60


def test_settle_heap_freezes_startup_objects_and_raises_the_young_threshold() -> None:
    # In a process of its own: gc.freeze() and the thresholds belong to the whole process.
    script = (
        "import gc, json, broker.server\n"
        "from broker.gc_tuning import settle_heap\n"
        "before = gc.get_threshold()\n"
        "settle_heap()\n"
        "print(json.dumps([gc.get_freeze_count(), gc.get_threshold(), before]))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=PROCESS_DEADLINE_S, check=True)
    frozen, after, before = json.loads(done.stdout)
    # broker.server imports the whole stack: tens of thousands of objects.
    assert frozen > 10_000
    assert after == [YOUNG_GENERATION_THRESHOLD, before[1], before[2]]


def _samples(registry: CollectorRegistry) -> dict[str, float]:
    return _samples_of(generate_latest(registry).decode())


def _samples_of(text: str) -> dict[str, float]:
    samples = [line.rsplit(" ", 1) for line in text.splitlines()
               if line and not line.startswith("#")]
    return {name: float(value) for name, value in samples}


def test_gc_pauses_counted_by_generation() -> None:
    """Pauses are counted by generation while installed."""
    registry = CollectorRegistry()
    pauses = CollectorPauses()
    registry.register(pauses)
    pauses.install()
    pauses.install()  # twice: still one hook
    try:
        gc.collect()
        gc.collect(0)
    finally:
        pauses.remove()
    gc.collect()  # not timed any more
    samples = _samples(registry)
    assert samples['broker_gc_pause_seconds_count{generation="2"}'] == 1
    assert samples['broker_gc_pause_seconds_count{generation="0"}'] >= 1
    assert samples['broker_gc_pause_seconds_sum{generation="2"}'] > 0
    assert samples['broker_gc_pause_seconds_bucket{generation="2",le="+Inf"}'] == 1
    assert "broker_gc_frozen_objects" in samples
    assert pauses._hook not in gc.callbacks


def test_load_report_takes_the_pauses_of_its_own_phase() -> None:
    def scrape(count: float, total: float, buckets: dict[str, float]) -> dict[str, float]:
        figures = {"broker_writer_commit_seconds_count": count,
                   "broker_gc_pause_seconds_count": count,
                   "broker_gc_pause_seconds_sum": total}
        figures.update({f"broker_gc_pause_seconds:{le}": value for le, value in buckets.items()})
        return figures

    before = scrape(5, 0.010, {"0.001": 4, "0.01": 5, "0.05": 5, "+Inf": 5})
    # Three more pauses during the phase: 0.5 ms, 2 ms, 30 ms.
    after = scrape(8, 0.0425, {"0.001": 5, "0.01": 7, "0.05": 8, "+Inf": 8})
    figures = daemon_figures(before, after)
    assert figures["gc_pauses"] == 3
    assert figures["gc_pause_total_ms"] == 32.5
    assert figures["gc_pause_longest_ms_at_most"] == 50.0
    quiet = daemon_figures(after, after | {"broker_writer_commit_seconds_count": 9})
    assert quiet["gc_pauses"] == 0 and quiet["gc_pause_longest_ms_at_most"] == 0.0


def _pause_hooks() -> list[CollectorPauses]:
    return [hook.__self__ for hook in gc.callbacks
            if isinstance(getattr(hook, "__self__", None), CollectorPauses)]


async def test_server_times_collections_while_running(
    tmp_path: Path,
) -> None:
    """A server times collections while it runs, and lets go when it stops."""
    with trio.fail_after(TEST_DEADLINE_S):
        async with serve(tmp_path) as server:
            assert len(_pause_hooks()) == 1
            gc.collect()
            async with httpx.AsyncClient(base_url=server.url) as client:
                text = (await client.get("/metrics")).text
            full = _samples_of(text)['broker_gc_pause_seconds_count{generation="2"}']
            assert full >= 1  # the gc.collect() above, at least
        assert _pause_hooks() == []
