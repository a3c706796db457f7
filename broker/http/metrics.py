"""Prometheus metrics in text format, from a registry owned by the server (no global state).

Request counts and latencies come from the HTTP middleware; the writer's
queue depth, batch sizes, commit latency (and where it went) and its
thread's CPU time are read from `writer.statistics()` at scrape time by a
custom collector; pending deliveries are summed by a reader query just
before each scrape; open sessions is a gauge the WebSocket gateway moves;
garbage-collector pauses are timed by a `gc.callbacks` hook
(`broker.gc_tuning`); the webhook dispatcher's counts come from its
`statistics()` snapshot, its queue depth and oldest pending age from a
reader query per scrape; MCP's tool calls are counted as they end, its
sessions and subscriptions read from the surface's `statistics()`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from broker.engine.engine import Engine
from broker.engine.health import pending_deliveries_total
from broker.engine.histogram import HistogramSnapshot
from broker.engine.webhook_deliveries import outbox_backlog
from broker.engine.writer import WriterActor
from broker.gc_tuning import CollectorPauses
from broker.ratelimit import REASONS, RateLimiter
from broker.webhooks.dispatcher import WebhookDispatcher

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Upper bounds, in seconds, of the HTTP request latency histogram.
REQUEST_SECONDS_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
)




class WriterCollector:
    """Reports the writer actor's statistics at scrape time."""

    def __init__(self, writer: WriterActor) -> None:
        self.writer = writer

    def describe(self) -> Sequence[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        # WriterStatistics carries its fields as attributes set at run time.
        stats: Any = self.writer.statistics()
        yield GaugeMetricFamily(
            "broker_writer_running", "1 while the writer actor is running", value=int(stats.running)
        )
        yield GaugeMetricFamily(
            "broker_writer_queue_depth", "Commands waiting for the writer",
            value=stats.queue_depth,
        )
        yield CounterMetricFamily(
            "broker_writer_batches", "Transactions committed (or attempted) by the writer",
            value=stats.batches,
        )
        yield CounterMetricFamily(
            "broker_writer_commands", "Commands applied by the writer", value=stats.commands
        )
        yield CounterMetricFamily(
            "broker_writer_messages", "Messages committed (channel, thread, DM, group DM)",
            value=stats.messages,
        )
        yield CounterMetricFamily(
            "broker_writer_deliveries", "Durable deliveries committed, over every recipient",
            value=stats.deliveries,
        )
        yield CounterMetricFamily(
            "broker_writer_failed_commands", "Commands that raised and were rolled back",
            value=stats.failed_commands,
        )
        yield CounterMetricFamily(
            "broker_writer_failed_commits", "Batches whose COMMIT failed",
            value=stats.failed_commits,
        )
        yield CounterMetricFamily(
            "broker_writer_apply_cpu_seconds",
            "CPU time of the writer thread running batches' commands (beside"
            " broker_writer_apply_seconds, its wall-clock time: the difference is"
            " time the thread did not run, waiting for the GIL, a core or the disk)",
            value=stats.apply_cpu_seconds,
        )
        yield CounterMetricFamily(
            "broker_writer_sync_cpu_seconds",
            "CPU time of the writer thread in batches' COMMITs (beside"
            " broker_writer_sync_seconds, their wall-clock time: the difference is"
            " the wait for the disk, the GIL or a core)",
            value=stats.sync_cpu_seconds,
        )
        batch: HistogramSnapshot = stats.batch_sizes
        sizes = HistogramMetricFamily(
            "broker_writer_batch_size", "Commands per committed transaction"
        )
        sizes.add_metric([], batch.cumulative(), batch.sum)
        yield sizes
        for name, help_text, histogram in (
            ("broker_writer_commit_seconds",
             "Time to apply and commit one batch, from the event loop", stats.commit_latency),
            ("broker_writer_queue_seconds",
             "Time a command waits in the queue until its batch starts", stats.queue_wait),
            ("broker_writer_apply_seconds",
             "Time the writer thread spends running one batch's commands", stats.apply_time),
            ("broker_writer_sync_seconds",
             "Time one batch's COMMIT takes (the WAL write and fsync)", stats.sync_time),
        ):
            family = HistogramMetricFamily(name, help_text, unit="")
            family.add_metric([], histogram.cumulative(), histogram.sum)
            yield family


class RefusalCollector:
    """Reports the rate limiter's refusals by reason, and the keys its tables hold, at scrape."""

    def __init__(self, limiter: RateLimiter) -> None:
        self.limiter = limiter

    def describe(self) -> Sequence[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        stats = self.limiter.statistics()
        refusals = CounterMetricFamily(
            "broker_refusals", "Requests and sockets refused by a rate limit or a cap, by"
            " reason (workspace, agent, anonymous: requests per minute; auth_failures:"
            " an address with too many refused tokens; sessions_per_agent, sessions: caps)",
            labels=["reason"],
        )
        for reason in REASONS:
            refusals.add_metric([reason], getattr(stats, reason))
        yield refusals
        if stats.tracked_keys is not None:  # else the process that made the tables reports them
            yield GaugeMetricFamily(
                "broker_rate_limit_keys",
                "Workspaces, agents and addresses the rate limiter tracks (with gateway"
                " processes: the slots of the shared tables that hold a key, idle or not)",
                value=stats.tracked_keys,
            )


class WebhookCollector:
    """Reports the webhook dispatcher's statistics at scrape time."""

    def __init__(self, dispatcher: WebhookDispatcher) -> None:
        self.dispatcher = dispatcher

    def describe(self) -> Sequence[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        stats = self.dispatcher.statistics()
        yield GaugeMetricFamily(
            "broker_webhook_in_flight", "Webhook requests under way now", value=stats.in_flight
        )
        for name, help_text, value in (
            ("broker_webhook_attempts", "Webhook requests started", stats.attempts),
            ("broker_webhook_delivered", "Webhook events delivered (a 2xx answer)",
             stats.delivered),
            ("broker_webhook_retried", "Failed webhook attempts scheduled for a retry",
             stats.retried),
            ("broker_webhook_dead_lettered", "Webhook events given up on (dead letters)",
             stats.dead_lettered),
        ):
            yield CounterMetricFamily(name, help_text, value=value)
        failures = CounterMetricFamily(
            "broker_webhook_failures", "Failed webhook attempts by reason", labels=["reason"]
        )
        for reason, value in (
            ("status", stats.failed_status), ("timeout", stats.failed_timeout),
            ("connection", stats.failed_connection), ("refused", stats.failed_refused),
            ("internal", stats.failed_internal),
        ):
            failures.add_metric([reason], value)
        yield failures


class McpFigures(Protocol):
    """What the MCP collector reads (broker.mcp.McpStatistics has these fields)."""

    @property
    def sessions(self) -> int: ...
    @property
    def watched_agents(self) -> int: ...
    @property
    def subscribed_sessions(self) -> int: ...
    @property
    def listening_agents(self) -> int: ...
    @property
    def notifications_sent(self) -> int: ...
    @property
    def notifications_dropped(self) -> int: ...


class McpCollector:
    """Reports the MCP surface's statistics at scrape time."""

    def __init__(self, statistics: Callable[[], McpFigures]) -> None:
        self.statistics = statistics

    def describe(self) -> Sequence[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        stats = self.statistics()
        for name, documentation, value in (
            ("broker_mcp_sessions", "MCP sessions open now (stateful, 2025 revision)",
             stats.sessions),
            ("broker_mcp_watched_agents",
             "Agents followed for MCP waits, resource subscriptions and sessions",
             stats.watched_agents),
            ("broker_mcp_subscribed_sessions", "MCP sessions with resource subscriptions",
             stats.subscribed_sessions),
            ("broker_mcp_listening_agents", "Agents with a subscriptions/listen stream open",
             stats.listening_agents),
        ):
            yield GaugeMetricFamily(name, documentation, value=value)
        yield CounterMetricFamily(
            "broker_mcp_notifications", "MCP resource notifications sent",
            value=stats.notifications_sent)
        yield CounterMetricFamily(
            "broker_mcp_notifications_dropped",
            "MCP resource notifications dropped: a session did not take one in time",
            value=stats.notifications_dropped)


class BrokerMetrics:
    """The server's metrics registry and the instruments other layers update."""

    def __init__(self, engine: Engine, *, daemon_wide: bool = True) -> None:
        """daemon_wide: this registry reports the writer, pending deliveries and the
        webhook outbox (False in a gateway process, which asks the writer
        process for those: `broker.workers`)."""
        self.engine = engine
        self.daemon_wide = daemon_wide
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Counter(
            "broker_http_requests", "HTTP requests answered, by route template and status",
            ["method", "route", "status"], registry=self.registry,
        )
        self.request_seconds = Histogram(
            "broker_http_request_seconds", "HTTP request latency by route template",
            ["route"], buckets=REQUEST_SECONDS_BUCKETS, registry=self.registry,
        )
        self.socket_request_seconds = Histogram(
            "broker_ws_request_seconds",
            "WebSocket request latency by operation: the frame read to its reply queued",
            ["operation"], buckets=REQUEST_SECONDS_BUCKETS, registry=self.registry,
        )
        self.mcp_tool_calls = Counter(
            "broker_mcp_tool_calls", "MCP tool calls, by tool and outcome (ok or the error code)",
            ["tool", "outcome"], registry=self.registry,
        )
        self.mcp_tool_seconds = Histogram(
            "broker_mcp_tool_seconds",
            "MCP tool call latency by tool (message.inbox.wait's includes its wait)",
            ["tool"], buckets=REQUEST_SECONDS_BUCKETS, registry=self.registry,
        )
        # Moved by the WebSocket gateway as sessions open and close.
        self.open_sessions = Gauge(
            "broker_open_sessions", "WebSocket sessions open now", registry=self.registry
        )
        self.pending_deliveries = Gauge(
            "broker_pending_deliveries", "Deliveries not yet acknowledged, over every agent",
            registry=self.registry,
        )
        if daemon_wide:
            self.registry.register(WriterCollector(engine.writer))
        # Set by `watch_webhooks`; the queue gauges are refreshed by a query per scrape.
        self.webhooks: WebhookDispatcher | None = None
        self.webhook_queue_depth = Gauge(
            "broker_webhook_queue_depth", "Webhook events pending (due now or waiting to retry)",
            registry=self.registry,
        )
        self.webhook_oldest_pending_seconds = Gauge(
            "broker_webhook_oldest_pending_seconds",
            "Age of the oldest pending webhook event (0 when none is pending)",
            registry=self.registry,
        )
        # Timing starts with `gc_pauses.install()`; the server removes it when it stops.
        self.gc_pauses = CollectorPauses()
        self.registry.register(self.gc_pauses)

    def count_refusals(self, limiter: RateLimiter) -> None:
        """Report `limiter`'s refusals (call once; the server owns the limiter)."""
        self.registry.register(RefusalCollector(limiter))

    def watch_webhooks(self, dispatcher: WebhookDispatcher) -> None:
        """Report `dispatcher`'s statistics and the outbox's backlog from now on."""
        self.webhooks = dispatcher
        self.registry.register(WebhookCollector(dispatcher))

    def watch_mcp(self, statistics: Callable[[], McpFigures]) -> None:
        """Report the MCP surface's `statistics()` from now on (the process that serves it)."""
        self.registry.register(McpCollector(statistics))

    def observe_tool_call(self, tool: str, outcome: str, seconds: float) -> None:
        self.mcp_tool_calls.labels(tool, outcome).inc()
        self.mcp_tool_seconds.labels(tool).observe(seconds)

    def observe_socket_request(self, operation: str, seconds: float) -> None:
        self.socket_request_seconds.labels(operation).observe(seconds)

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.request_seconds.labels(route).observe(seconds)

    def render_local(self) -> bytes:
        """This process's registry as Prometheus text, as it stands (no query)."""
        data: bytes = generate_latest(self.registry)
        return data

    async def render(self) -> bytes:
        """Refresh the values that need a query, then the whole registry as Prometheus text."""
        if not self.daemon_wide:
            return self.render_local()
        self.pending_deliveries.set(await self.engine.read(pending_deliveries_total))
        backlog = await self.engine.read(outbox_backlog)
        self.webhook_queue_depth.set(backlog.pending)
        oldest = backlog.oldest_created_at
        self.webhook_oldest_pending_seconds.set(
            0.0 if oldest is None else max(0.0, time.time() - oldest / 1000))
        data: bytes = generate_latest(self.registry)
        return data
