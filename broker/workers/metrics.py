"""One /metrics for the whole daemon, from the expositions of its processes.

Each process renders its own registry (the writer process: the writer
actor, pending deliveries, the webhook outbox and dispatcher, its garbage
collector, the keys of the rate limits' shared tables; each gateway
process: its HTTP and socket requests, open sessions, its own rate-limit
refusals, its garbage collector). The writer process
merges them: samples of the same name and labels are summed (counters,
gauges and histogram buckets all add up across processes: open sessions
of the daemon are the sum of each gateway's), except `_created`
timestamps, of which the earliest is kept.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

_Key = tuple[str, tuple[tuple[str, str], ...]]


class _Merged:
    def __init__(self, metrics: list[Metric]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        yield from self.metrics


def merge_expositions(texts: Sequence[bytes]) -> bytes:
    """The Prometheus text of `texts` merged: one family per name, like samples summed."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[_Key, float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text.decode()):
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation,
                                               family.type, family.unit)
                values[family.name] = {}
            seen = values[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in seen:
                    seen[key] = sample.value
                elif sample.name.endswith("_created"):
                    seen[key] = min(seen[key], sample.value)
                else:
                    seen[key] += sample.value
    merged: list[Metric] = []
    for name, family in families.items():
        for (sample_name, labels), value in values[name].items():
            family.add_sample(sample_name, dict(labels), value)
        merged.append(family)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged(merged))
    data: bytes = generate_latest(registry)
    return data
