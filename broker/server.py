"""BrokerServer: the engine and the ASGI app served by hypercorn's trio worker on one port.

Lifetimes nest like this, outermost first:

    services nursery   -- background services (facts consumer, ...); they end
      Engine.open      -- writer + readers; on exit the writer drains its queue
        HTTP nursery   -- hypercorn: accepts until stop(), then lets requests
                          in flight finish within the grace period

so a stop first stops accepting, then lets queued commands commit, then
closes the database, and only then ends the services that consume the
writer's committed facts (the writer never blocks on a missing consumer).
Before all of them the daemon claims the port and binds it
(`broker.http.listener`): a port in use, by another broker or not, stops
the start before the database is opened.

With `server.workers` >= 2 this process keeps the engine and the writer's
services (`writer_services`) and the gateway processes serve the port
(`broker.workers`): the same nesting, with "HTTP nursery" read as "the
gateway processes, which drain before the engine closes".

The gateway seam: `compose()` returns the extra routes to mount (`/v1/ws`,
`/v1/node/ws`, `/v1/agent/node-token`) and the services to run beside the
server: the WebSocket gateway (`broker.gateway`), whose fanout hub consumes
`engine.facts` and which closes its sessions with 1001 when a stop begins.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, NamedTuple, TypeVar, cast

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from starlette.applications import Starlette
from starlette.routing import BaseRoute

from broker.config import Settings
from broker.engine.agents import ResetPresence
from broker.engine.engine import Engine
from broker.filestore import FILE_SWEEP_INTERVAL_S, FileStore, run_file_sweep
from broker.gateway import Gateway, frame_buffer, transport
from broker.http.app import create_app
from broker.http.files import file_routes
from broker.http.listener import LISTEN_BACKLOG, claim_and_bind
from broker.http.metrics import BrokerMetrics
from broker.http.tls import check_tls, configure_tls
from broker.mcp import McpSurface
from broker.ratelimit import RateLimiter, SharedLimits
from broker.sweeps import Sweeper
from broker.webhooks.dispatcher import WebhookDispatcher, attach
from broker.webhooks.inbound import inbound_routes
from broker.workers.writer_side import GatewayPool, WriterHost, WriterMetrics

MetricsT = TypeVar("MetricsT", bound=BrokerMetrics)

log = logging.getLogger(__name__)

# A service runs for the server's lifetime: `await nursery.start(service)`;
# it calls task_status.started() once ready and returns when its input ends
# (for a facts consumer: when the engine closes `engine.facts`).
Service = Callable[..., Awaitable[None]]


class BrokerServer:
    """The daemon's network face. Start with `await nursery.start(server.run)`.

    After start, `server.port` and `server.url` name the real listening
    address (useful with port 0), `server.engine` and `server.metrics` are set.
    `stop()` asks for a graceful stop; `run` returns when it is complete.
    """

    def __init__(self, settings: Settings, limiter: RateLimiter | None = None) -> None:
        """limiter: the rate limits of the REST app and the gateway (one from
        `settings.rate_limits` when None; tests pass one with a fake clock)."""
        self.settings = settings
        if limiter is not None and settings.server.gateway_processes():
            raise ValueError("a RateLimiter object serves one process: pass none with workers")
        self.limiter = limiter or RateLimiter(settings.rate_limits)
        self.port: int | None = None
        self.url: str | None = None
        # The ASGI app while the server runs (its routes: what /openapi.json describes).
        self.app: Starlette | None = None
        self._engine: Engine | None = None
        self._metrics: BrokerMetrics | None = None
        self._stop = trio.Event()
        # In one process only (none with gateway processes: `broker.workers`).
        self.gateway: Gateway | None = None
        self.mcp: McpSurface | None = None
        self.webhooks: WebhookDispatcher | None = None
        # With gateway processes: their pool (pids, gateway 0's private socket).
        self.pool: GatewayPool | None = None

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise RuntimeError("the server is not running")
        return self._engine

    @property
    def metrics(self) -> BrokerMetrics:
        if self._metrics is None:
            raise RuntimeError("the server is not running")
        return self._metrics

    def compose(
        self, engine: Engine, metrics: BrokerMetrics
    ) -> tuple[Sequence[BaseRoute], Sequence[Service]]:
        """Extra routes and services (the WebSocket gateway plugs in here).

        Each service is started as `nursery.start(service)` before the port opens.
        """
        front = gateway_front(engine, self.settings, metrics, self.limiter, self._stop)
        self.gateway, self.mcp = front.gateway, front.mcp
        return front.routes, (*front.services, *self.writer_services(engine, metrics))

    def writer_services(self, engine: Engine, metrics: BrokerMetrics) -> tuple[Service, ...]:
        """The services of the process that holds the writer: the file sweep, the
        sweeps and the webhook dispatcher (everything that writes on its own or
        watches the writer's commit signals)."""
        store = FileStore(Path(self.settings.data_dir))

        async def file_sweep(
            *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
        ) -> None:
            # Starts before the port opens (it cleans up unfinished uploads);
            # ends when a stop begins, while the engine still takes commands.
            async with trio.open_nursery() as nursery:
                await nursery.start(run_file_sweep, engine, store, FILE_SWEEP_INTERVAL_S)
                task_status.started()
                await self._stop.wait()
                nursery.cancel_scope.cancel()

        # Webhooks: the dispatcher delivers the outbox (when enabled) and holds
        # the SSRF allow list the subscription operations consult.
        dispatcher = self.webhooks = WebhookDispatcher(
            engine, self.settings.webhooks,
            stop_grace_seconds=self.settings.http.shutdown_grace_seconds,
        )
        attach(engine, dispatcher)
        metrics.watch_webhooks(dispatcher)

        async def webhooks(
            *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
        ) -> None:
            # Ends when a stop begins; deliveries in flight get the grace.
            await dispatcher.run(self._stop.wait, task_status=task_status)

        sweeper = self.sweeper = Sweeper(engine, store)

        async def sweeps(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            # Expiry and retention write through the writer: they end when a
            # stop begins, while the engine still takes commands.
            async with trio.open_nursery() as nursery:
                await nursery.start(sweeper.run)
                task_status.started()
                await self._stop.wait()
                nursery.cancel_scope.cancel()

        services: tuple[Service, ...] = (file_sweep, sweeps)
        if self.settings.webhooks.enabled:
            services = (*services, webhooks)
        return services

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def stop(self) -> None:
        """Stop accepting connections; in-flight requests get the grace period."""
        self._stop.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open the engine, serve until `stop()`, then shut down in order.

        Raises, before the database is opened, ConfigError for an unusable TLS
        file and StartupError when the port cannot be listened on (in use).
        """
        check_tls(self.settings.http.tls)
        # The port first: a second daemon on it stops here, its database untouched.
        # The claim is held until the daemon ends (broker.http.listener).
        workers = self.settings.server.gateway_processes()
        claim, sock = claim_and_bind(self.settings.http, listen=not workers)
        with claim, sock:
            if workers:
                await self._run_with_workers(sock, task_status=task_status)
            else:
                await self._run_in_one_process(sock, task_status=task_status)

    async def _run_in_one_process(
        self, listener: socket.socket, *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Everything in this process: hypercorn serves `listener`."""
        settings = self.settings
        async with trio.open_nursery() as services:
            async with self._open_engine(BrokerMetrics) as (engine, metrics):
                extra_routes, background = self.compose(engine, metrics)
                for service in background:
                    await services.start(service)
                metrics.count_refusals(self.limiter)
                app = self.app = create_app(engine, settings, metrics, extra_routes,
                                            self.limiter)
                # hypercorn owns the socket from here: once it stops accepting,
                # the port is closed, not left queueing connections nobody accepts.
                config = hypercorn_config(settings, [f"fd://{listener.detach()}"])
                async with trio.open_nursery() as http:
                    binds: list[str] = await http.start(
                        lambda task_status: serve(
                            cast(Any, app), config, shutdown_trigger=self._stop.wait,
                            task_status=task_status,
                        )
                    )
                    self.url = binds[0]
                    self.port = int(self.url.rsplit(":", 1)[1])
                    log.info("broker listening on %s (data in %s)",
                             self.url, settings.data_dir)
                    task_status.started()
                log.info("broker %s: stopped accepting; closing the engine", self.url)
        log.info("broker %s: stopped", self.url)

    async def _run_with_workers(
        self, holder: socket.socket, *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """This process holds the writer and its services; gateway processes serve the
        port that `holder` holds, each with a socket of its own (`broker.workers`).
        Ends after the gateways have drained and exited."""
        settings = self.settings
        count = settings.server.gateway_processes()
        # The rate limits' and caps' tables, which every gateway maps: this
        # process reports the keys they hold, each gateway its own refusals.
        shared = SharedLimits.create(settings.gateway.max_sessions)
        self.limiter = RateLimiter(settings.rate_limits, shared=shared)
        try:
            async with trio.open_nursery() as services:
                async with self._open_engine(WriterMetrics) as (engine, metrics):
                    metrics.count_refusals(self.limiter)
                    host = metrics.host = WriterHost(engine, metrics.render_process)
                    await services.start(host.distribute)
                    for service in self.writer_services(engine, metrics):
                        await services.start(service)
                    self.pool = pool = GatewayPool(settings, host, count, holder, shared)
                    async with trio.open_nursery() as gateways:
                        self.url = await gateways.start(pool.run, self._stop)
                        self.port = int(self.url.rsplit(":", 1)[1])
                        task_status.started()
                    log.info("broker %s: gateways stopped; closing the engine", self.url)
        finally:
            shared.close()
        log.info("broker %s: stopped", self.url)

    @asynccontextmanager
    async def _open_engine(
        self, metrics_for: Callable[[Engine], MetricsT]
    ) -> AsyncIterator[tuple[Engine, MetricsT]]:
        """The engine, with presence reset, and its metrics (`metrics_for(engine)`),
        timing collector pauses until the engine closes; both are this server's
        while open. One process and the writer process start the same way."""
        settings = self.settings
        async with Engine.open(
            Path(settings.data_dir), settings.engine, with_facts=True
        ) as engine:
            self._engine = engine
            await reset_presence(engine)
            self._metrics = metrics = metrics_for(engine)
            metrics.gc_pauses.install()
            try:
                yield engine, metrics
            finally:
                metrics.gc_pauses.remove()
        self._engine = None


async def reset_presence(engine: Engine) -> None:
    """Everyone offline: no socket survives a restart."""
    stale = await engine.submit(ResetPresence())
    if stale:
        log.info("presence: %d agents left online by the last run set offline", stale)


class Front(NamedTuple):
    """What serves clients besides the REST routes (see `gateway_front`)."""

    gateway: Gateway
    mcp: McpSurface | None
    routes: tuple[BaseRoute, ...]
    services: tuple[Service, ...]


def gateway_front(
    engine: Engine, settings: Settings, metrics: BrokerMetrics, limiter: RateLimiter,
    stopping: trio.Event, *, mcp: bool = True,
) -> Front:
    """The WebSocket gateway, MCP (when enabled and `mcp`), the file and inbound-hook
    routes, and their services (run them before the port opens). The same in one
    process and in each gateway process (MCP only in gateway 0: `broker.workers`)."""
    gateway = Gateway(engine, settings.gateway,
                      on_sessions=metrics.open_sessions.set,
                      on_request=metrics.observe_socket_request,
                      limiter=limiter,
                      public_url=settings.http.base_url)
    # Read at scrape time, so the gauge can never drift from the sessions.
    metrics.open_sessions.set_function(lambda: len(gateway.sessions))

    async def realtime(
        *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        await gateway.run(stopping=stopping, task_status=task_status)

    store = FileStore(Path(settings.data_dir))
    routes: tuple[BaseRoute, ...] = (
        *gateway.routes(), *file_routes(engine, store, limiter),
        *inbound_routes(engine, settings, limiter))
    services: tuple[Service, ...] = (realtime,)
    surface = None
    if mcp and settings.mcp.enabled:
        # MCP (/mcp): its waits and resource notifications follow the gateway's hub.
        surface = McpSurface(engine, gateway.hub, settings.mcp, limiter,
                             settings.http.base_url, on_tool_call=metrics.observe_tool_call,
                             max_body_bytes=settings.http.max_body_bytes)
        metrics.watch_mcp(surface.statistics)

        async def run_mcp(
            *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
        ) -> None:
            # Ends when a stop begins: its sessions and long requests end with it.
            assert surface is not None
            async with trio.open_nursery() as nursery:
                await nursery.start(surface.run)
                task_status.started()
                await stopping.wait()
                nursery.cancel_scope.cancel()

        routes, services = (*routes, *surface.routes()), (*services, run_mcp)
    return Front(gateway, surface, routes, services)


def hypercorn_config(
    settings: Settings, binds: Sequence[str], private: Sequence[str] = (),
) -> HypercornConfig:
    """hypercorn's configuration; binds: the port's listening socket (`fd://N`, from
    `broker.http.listener.open_listener`); private: binds served without TLS even when
    the port has it (gateway 0's Unix socket, reached from the other gateways only)."""
    http = settings.http
    config = HypercornConfig()
    config.bind = list(binds)
    # Every process that serves the port speaks TLS when it is set.
    configure_tls(config, http.tls)
    if config.ssl_enabled:
        config.insecure_bind = list(private)
    else:
        config.bind += private
    config.graceful_timeout = http.shutdown_grace_seconds
    # hypercorn calls listen() again on every socket it serves, with a backlog of
    # 100 unless told: keep the kernel's cap, in one process and in each gateway.
    config.backlog = LISTEN_BACKLOG
    config.accesslog = None
    # Larger WebSocket frames are refused (1009) before they are buffered whole,
    # by a buffer that survives the refusal (broker.gateway.frame_buffer).
    config.websocket_max_message_size = settings.gateway.max_frame_bytes
    frame_buffer.install()
    # Each HTTP/1.1 WebSocket, over TCP or TLS, gets its transport in the scope (one
    # write per flush, straight to the socket over TCP; abort).
    transport.install()
    # hypercorn logs through this logger only (not its own stderr handler);
    # the entry point configures handlers.
    config.errorlog = logging.getLogger("hypercorn.error")
    return config
