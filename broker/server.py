"""BrokerServer: the engine and the ASGI app served by hypercorn's trio worker on one port.

Lifetimes nest like this, outermost first:

    services nursery   -- background services (facts consumer, ...); they end
      Engine.open      -- writer + readers; on exit the writer drains its queue
        HTTP nursery   -- hypercorn: accepts until stop(), then lets requests
                          in flight finish within the grace period

so a stop first stops accepting, then lets queued commands commit, then
closes the database, and only then ends the services that consume the
writer's committed facts (the writer never blocks on a missing consumer).

The gateway seam: `compose()` returns the extra routes to mount (`/v1/ws`,
`/v1/node/ws`, `/v1/agent/node-token`) and the services to run beside the
server: the WebSocket gateway (`broker.gateway`), whose fanout hub consumes
`engine.facts` and which closes its sessions with 1001 when a stop begins.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, cast

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
from broker.http.metrics import BrokerMetrics
from broker.http.tls import check_tls, configure_tls
from broker.mcp import McpSurface
from broker.ratelimit import RateLimiter
from broker.sweeps import Sweeper
from broker.webhooks.dispatcher import WebhookDispatcher, attach
from broker.webhooks.inbound import inbound_routes

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
        self.limiter = limiter or RateLimiter(settings.rate_limits)
        self.port: int | None = None
        self.url: str | None = None
        # The ASGI app while the server runs (its routes: what /openapi.json describes).
        self.app: Starlette | None = None
        self._engine: Engine | None = None
        self._metrics: BrokerMetrics | None = None
        self._stop = trio.Event()
        self.gateway: Gateway | None = None
        self.webhooks: WebhookDispatcher | None = None
        self.mcp: McpSurface | None = None

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

        gateway = self.gateway = Gateway(engine, self.settings.gateway,
                                         on_sessions=metrics.open_sessions.set,
                                         on_request=metrics.observe_socket_request,
                                         limiter=self.limiter,
                                         public_url=self.settings.http.base_url)
        # Read at scrape time, so the gauge can never drift from the sessions.
        metrics.open_sessions.set_function(lambda: len(gateway.sessions))

        async def realtime(
            *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
        ) -> None:
            await gateway.run(stopping=self._stop, task_status=task_status)

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

        services: tuple[Service, ...] = (realtime, file_sweep, sweeps)
        if self.settings.webhooks.enabled:
            services = (*services, webhooks)
        routes: tuple[BaseRoute, ...] = (
            *gateway.routes(), *file_routes(engine, store, self.limiter),
            *inbound_routes(engine, self.settings, self.limiter))
        if self.settings.mcp.enabled:
            # MCP (/mcp): its waits and resource notifications follow the gateway's hub.
            surface = self.mcp = McpSurface(engine, gateway.hub, self.settings.mcp, self.limiter,
                                            self.settings.http.base_url)

            async def mcp(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
                # Ends when a stop begins: its sessions and long requests end with it.
                async with trio.open_nursery() as nursery:
                    await nursery.start(surface.run)
                    task_status.started()
                    await self._stop.wait()
                    nursery.cancel_scope.cancel()

            routes, services = (*routes, *surface.routes()), (*services, mcp)
        return routes, services

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def stop(self) -> None:
        """Stop accepting connections; in-flight requests get the grace period."""
        self._stop.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open the engine, serve until `stop()`, then shut down in order.

        Raises ConfigError (before the database is opened) for an unusable TLS file.
        """
        settings = self.settings
        check_tls(settings.http.tls)
        async with trio.open_nursery() as services:
            async with Engine.open(
                Path(settings.data_dir), settings.engine, with_facts=True
            ) as engine:
                self._engine = engine
                stale = await engine.submit(ResetPresence())
                if stale:
                    log.info("presence: %d agents left online by the last run set offline", stale)
                self._metrics = metrics = BrokerMetrics(engine)
                extra_routes, background = self.compose(engine, metrics)
                for service in background:
                    await services.start(service)
                metrics.count_refusals(self.limiter)
                app = self.app = create_app(engine, settings, metrics, extra_routes,
                                            self.limiter)
                config = self._hypercorn_config()
                metrics.gc_pauses.install()
                try:
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
                finally:
                    metrics.gc_pauses.remove()
                log.info("broker %s: stopped accepting; closing the engine", self.url)
            self._engine = None
        log.info("broker %s: stopped", self.url)

    def _hypercorn_config(self) -> HypercornConfig:
        http = self.settings.http
        config = HypercornConfig()
        host = f"[{http.host}]" if ":" in http.host else http.host
        config.bind = [f"{host}:{http.port}"]
        # Every process that serves the port speaks TLS when it is set.
        configure_tls(config, http.tls)
        config.graceful_timeout = http.shutdown_grace_seconds
        config.accesslog = None
        # Larger WebSocket frames are refused (1009) before they are buffered whole,
        # by a buffer that survives the refusal (broker.gateway.frame_buffer).
        config.websocket_max_message_size = self.settings.gateway.max_frame_bytes
        frame_buffer.install()
        # Each plain-TCP WebSocket gets its transport in the scope (direct writes, abort).
        transport.install()
        # hypercorn logs through this logger only (not its own stderr handler);
        # the entry point configures handlers.
        config.errorlog = logging.getLogger("hypercorn.error")
        return config
