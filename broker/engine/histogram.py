"""Bucketed counts of observations, for the writer's timings and the collector's pauses.

A `Histogram` is the live counter its owner observes into; a
`HistogramSnapshot` is the frozen copy that `statistics()` methods hand out
(trio's `MemoryChannelStatistics` is the model: a reader gets values as of
the call, never an object that keeps changing under it). It lives in the
engine because the writer actor is its first user; the layers above (the
metrics endpoint, the garbage-collector timing) import it from here.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class HistogramSnapshot:
    """A histogram's figures as of one moment.

    bounds: the buckets' upper bounds, ascending (the last bucket, above
    them all, is open). counts: observations per bucket, one more than
    `bounds`. sum: the observed values added up. count: the observations.
    """

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    sum: float
    count: int

    @property
    def mean(self) -> float:
        return self.sum / self.count if self.count else 0.0

    def cumulative(self) -> list[tuple[str, float]]:
        """Prometheus buckets: (upper bound, observations at or below it), "+Inf" last."""
        buckets: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip(self.bounds, self.counts, strict=False):
            running += count
            buckets.append((repr(float(bound)), float(running)))
        buckets.append(("+Inf", float(sum(self.counts))))
        return buckets


class Histogram:
    """Cumulative-friendly bucket counts, with the sum and count of observations."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    @property
    def mean(self) -> float:
        return self.sum / self.count if self.count else 0.0

    def snapshot(self) -> HistogramSnapshot:
        """A frozen copy of the figures.

        From one copy of the counts, so the buckets agree with each other even
        if an observation lands meanwhile (a garbage-collector hook can run in
        the middle of a scrape).
        """
        return HistogramSnapshot(self.bounds, tuple(self.counts), self.sum, self.count)
