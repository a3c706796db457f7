"""A gateway process: hypercorn + starlette on the shared socket, writes through the link.

Started by the writer process (`broker.workers.writer_side.GatewayPool`) as

    python -m broker.workers.gateway_process INDEX COUNT LINK_FD SHARED_FD

The first message on the link is the daemon's settings (with the port the
writer process holds and has claimed: every gateway listens on it with a
socket of its own and SO_REUSEPORT; `broker.http.listener`). SHARED_FD is
the shared memory that holds the daemon's rate limits and socket counts
(`broker.ratelimit.SharedLimits`). The process then
opens its own reader pool, builds the same app as one process does (REST,
the WebSocket gateway, files, inbound hooks, health and metrics) on a
`GatewayEngine`, listens, says so on the link, and serves until the
writer process says stop. It exits with EXIT_WRITER_LOST as soon as the
link ends otherwise: a gateway never outlives its writer.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any, cast

import msgspec
import trio
from hypercorn.trio import serve
from starlette.routing import Route

from broker.config import Settings
from broker.engine.config import EngineConfig
from broker.engine.engine import DATABASE_FILE, FACTS_BUFFER, Engine
from broker.engine.errors import BrokerError
from broker.engine.facts import Fact
from broker.engine.readers import ReaderPool
from broker.engine.writer import Command
from broker.gateway import Gateway
from broker.gateway.delivery import DeliverySession
from broker.gc_tuning import settle_heap
from broker.http.app import create_app
from broker.http.listener import open_listener
from broker.http.metrics import BrokerMetrics
from broker.mcp import MCP_PATH
from broker.mcp.endpoint import TokenCheck
from broker.mcp.forward import McpForwarder
from broker.ratelimit import RateLimiter, SharedLimits
from broker.server import gateway_front, hypercorn_config
from broker.webhooks.dispatcher import WebhookDispatcher, attach
from broker.workers.channel import (
    Link,
    LinkClosed,
    pack_command,
    unpack_facts,
    unpack_result,
)
from broker.workers.writer_side import EXIT_WRITER_LOST

log = logging.getLogger("broker.workers.gateway_process")  # also when run as __main__

T = Any


class _Call:
    __slots__ = ("done", "ok", "value")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.ok = False
        self.value: Any = None


class RemoteWriter:
    """The writer as a gateway process sees it: `submit` over the link.

    Offers the part of `WriterActor` a gateway uses (`submit`, `running`,
    `config`); `on_commit` exists only in the writer process, where the
    services that watch commit signals run.
    """

    def __init__(self, link: Link, config: EngineConfig) -> None:
        self.link = link
        self.config = config
        self.running = True
        self._calls: dict[int, _Call] = {}
        self._ids = itertools.count(1)

    async def submit(self, command: Command[T]) -> T:
        """As `WriterActor.submit`: the result once the command is durable, or its error.

        Raises BrokerError("writer_failed") when the link to the writer is gone.
        """
        result: T = await self._call("submit", *pack_command(command))
        return result

    async def daemon_metrics(self) -> bytes:
        """The whole daemon's metrics, merged by the writer process.

        Raises BrokerError("writer_failed") when the link to the writer is gone.
        """
        data: bytes = await self._call("metrics")
        return data

    async def _call(self, kind: str, *body: Any) -> Any:
        """Send `(kind, call id, *body)` to the writer; its answer, or raise its error."""
        if not self.running:
            raise BrokerError("writer_failed", "the writer has stopped")
        call_id = next(self._ids)
        call = self._calls[call_id] = _Call()
        try:
            self.link.send_nowait((kind, call_id, *body))
            await call.done.wait()
        except LinkClosed:
            raise BrokerError("writer_failed", "the writer has stopped") from None
        finally:
            self._calls.pop(call_id, None)
        if not call.ok:
            raise call.value
        return call.value

    def answer(self, call_id: int, ok: bool, value: Any) -> None:
        call = self._calls.get(call_id)
        if call is not None:  # None: its caller was cancelled; the result is dropped
            call.ok, call.value = ok, value
            call.done.set()

    def lost(self) -> None:
        """The link ended: every caller waiting gets writer_failed."""
        self.running = False
        for call in self._calls.values():
            call.ok, call.value = False, BrokerError("writer_failed", "the writer has stopped")
            call.done.set()

    def on_commit(self, name: str, callback: Any) -> Any:
        raise RuntimeError("commit signals are only seen in the writer process")


class GatewayEngine(Engine):
    """An `Engine` whose writer is in the writer process: `submit` goes over the link,
    `read` runs on this process's own reader pool, `facts` are the batches
    the writer pushed."""

    def __init__(self, writer: RemoteWriter, readers: ReaderPool,
                 facts: trio.MemoryReceiveChannel[list[Fact]]) -> None:
        # Engine's writer is a WriterActor; the remote one offers what the
        # HTTP app and the gateway use of it (see RemoteWriter).
        super().__init__(cast(Any, writer), readers, facts)
        self.remote = writer


class GatewayMetrics(BrokerMetrics):
    """This process's registry; /metrics answers with the whole daemon's (from the writer)."""

    def __init__(self, engine: GatewayEngine) -> None:
        super().__init__(engine, daemon_wide=False)
        self.remote = engine.remote

    async def render(self) -> bytes:
        return await self.remote.daemon_metrics()


class GatewayProcess:
    """One gateway process's lifetime; `run` until the writer says stop."""

    def __init__(self, index: int, count: int, link: Link, shared_fd: int) -> None:
        """shared_fd: the rate limits' tables the writer process made (SharedLimits)."""
        self.index = index
        self.count = count
        self.link = link
        self.shared_fd = shared_fd
        self.stop = trio.Event()
        self.commit = 0
        self.gaps = 0
        self.gateway: Gateway | None = None
        self.metrics: GatewayMetrics | None = None

    async def run(self) -> None:
        link = self.link
        async with trio.open_nursery() as nursery:
            await nursery.start(link.run_sender)
            hello = await link.receive()
            assert hello[0] == "hello", hello[0]
            settings = msgspec.json.decode(hello[1], type=Settings)
            configure_logging(settings.log_level)
            gateway0_socket = hello[2]
            facts_send, facts_receive = trio.open_memory_channel[list[Fact]](FACTS_BUFFER)
            writer = RemoteWriter(link, settings.engine)
            readers = ReaderPool(Path(settings.data_dir) / DATABASE_FILE, settings.engine)
            readers.open()
            try:
                engine = GatewayEngine(writer, readers, facts_receive)
                receiving = trio.CancelScope()

                async def receive() -> None:
                    with receiving:
                        await self._receive(writer, facts_send)

                nursery.start_soon(receive)
                await self._serve(engine, settings, gateway0_socket)
                receiving.cancel()
            finally:
                readers.close()
            link.close()  # the sender writes what is queued, then returns

    async def _serve(self, engine: GatewayEngine, settings: Settings,
                     gateway0_socket: str) -> None:
        metrics = self.metrics = GatewayMetrics(engine)
        shared = SharedLimits.attach(self.shared_fd, settings.gateway.max_sessions)
        limiter = RateLimiter(settings.rate_limits, shared=shared)
        # The subscription operations consult the allow list through a
        # dispatcher; this one never runs (the writer process's delivers).
        attach(engine, WebhookDispatcher(engine, settings.webhooks))
        private: list[str] = []
        if self.index == 0:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(gateway0_socket)
            sock.listen(socket.SOMAXCONN)
            private.append(f"fd://{sock.detach()}")  # hypercorn owns and closes it
        async with trio.open_nursery() as services:
            # MCP lives in gateway 0; the others forward /mcp to it (broker.mcp.forward),
            # checking the token first, where the client's address is known.
            front = gateway_front(engine, settings, metrics, limiter, self.stop,
                                  mcp=self.index == 0)
            gateway = self.gateway = front.gateway
            routes = front.routes
            if self.index != 0 and settings.mcp.enabled:
                forward = McpForwarder(gateway0_socket, TokenCheck(engine, limiter).passes)
                routes = (*routes, Route(MCP_PATH, forward, name="mcp"))
            for service in front.services:
                await services.start(service)
            metrics.count_refusals(limiter)
            app = create_app(engine, settings, metrics, routes, limiter)
            # Beside the other gateways' sockets (SO_REUSEPORT); hypercorn owns it.
            port = open_listener(settings.http, reuse_port=True).detach()
            config = hypercorn_config(settings, [f"fd://{port}"], private)
            metrics.gc_pauses.install()
            async with trio.open_nursery() as http:
                bound: list[str] = await http.start(
                    lambda task_status: serve(
                        cast(Any, app), config, shutdown_trigger=self.stop.wait,
                        task_status=task_status))
                self.link.send_nowait(("listening", bound[0]))
                settle_heap()  # start-up is over, as in the writer process (broker.gc_tuning)
            # hypercorn stopped accepting and let requests in flight
            # finish; the gateway closes its sessions (1001) on `stop`:
            # wait for that, and commit what they acked.
            await gateway.close_all()
            with trio.move_on_after(settings.gateway.close_grace_seconds):
                await gateway.recorder.flush()
                await gateway.presence.flush()
            metrics.gc_pauses.remove()
            services.cancel_scope.cancel()
        log.info("gateway %d: stopped", self.index)

    async def _receive(self, writer: RemoteWriter,
                       facts: trio.MemorySendChannel[list[Fact]]) -> None:
        link = self.link
        try:
            while True:
                message = await link.receive()
                kind = message[0]
                if kind == "result":
                    writer.answer(message[1], message[2], unpack_result(message[3]))
                elif kind == "facts":
                    self._facts(message[1], unpack_facts(message[2]), facts)
                elif kind == "collect":
                    assert self.metrics is not None
                    link.send_nowait(("report", message[1], self.metrics.render_local()))
                elif kind == "metrics":
                    writer.answer(message[1], True, message[2])
                elif kind == "stop":
                    log.info("gateway %d: stopping", self.index)
                    self.stop.set()
        except LinkClosed as exc:
            writer.lost()
            if self.stop.is_set():
                return
            log.error("gateway %d: lost the writer (%s); exiting", self.index, exc)
            logging.shutdown()
            os._exit(EXIT_WRITER_LOST)

    def _facts(self, commit: int, batch: list[Fact],
               facts: trio.MemorySendChannel[list[Fact]]) -> None:
        """Hand one committed batch to the hub; after a gap, sessions go to the database."""
        expected = self.commit + 1
        self.commit = commit
        if commit != expected and expected != 1:
            self.fall_behind(f"batch {commit} after {expected - 1}")
        try:
            facts.send_nowait(batch)
        except trio.WouldBlock:
            self.fall_behind(f"the hub's queue is full at batch {commit}")
        except trio.BrokenResourceError:
            pass  # the hub has ended: this gateway is stopping, its sessions are closed

    def fall_behind(self, why: str) -> None:
        """Live facts were lost: every delivery session resumes from the database."""
        self.gaps += 1
        log.warning("gateway %d: %s; sessions catch up from the database", self.index, why)
        if self.gateway is None:
            return
        for session in tuple(self.gateway.sessions):
            if isinstance(session, DeliverySession):
                session.queue.fall_behind()


def configure_logging(level: str) -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(stream=sys.stdout, level=level,
                            format="%(levelname)s %(name)s: %(message)s")


def main(argv: list[str]) -> int:
    index, count, link_fd, shared_fd = (int(a) for a in argv[:4])
    # A terminal's Ctrl-C, `timeout` or systemd's KillMode=control-group
    # signal the whole group: the writer process alone decides when the
    # gateways stop (over the link), so that they drain before it does.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    link_sock = socket.socket(fileno=link_fd)

    async def run() -> None:
        link = Link(trio.SocketStream(trio.socket.from_stdlib_socket(link_sock)))
        await GatewayProcess(index, count, link, shared_fd).run()

    trio.run(run)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
