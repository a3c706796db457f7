"""The writer process's side of the gateway processes: their links, and the processes.

`WriterHost` serves every gateway's link: it applies the commands a
gateway submits (`engine.submit`, so they enter the one writer actor's
channel like any other caller's) and answers each with its result or its
error; it numbers every committed batch of facts (the commit number) and
pushes it, encoded once, to every gateway in commit order; it answers a
gateway's /metrics with the whole daemon's (`broker.workers.metrics`).

The writer never waits for a gateway: a link whose queued bytes pass
`MAX_LINK_BACKLOG` misses the batch, and the gateway, seeing the gap in
commit numbers, sends its sessions back to the database (the rows are
durable; the live stream is a shortcut).

Presence across processes: each gateway reports an agent online when its
first session there opens and offline when its last one there closes, so
an agent with sockets in two gateways would go offline while still
connected. The host keeps which gateways hold each agent and drops the
"offline" of a gateway while another still holds it; likewise the
heartbeat timeout (`ExpirePresence`) of one gateway never expires an agent
connected to another.

`GatewayPool` starts the gateway processes on the daemon's port (each
listens with a socket of its own and SO_REUSEPORT; `broker.http.listener`),
waits until every one listens, and watches them: one that exits while the
daemon is not stopping raises `WorkerDied`, so the daemon exits non-zero.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import trio

from broker.config import Settings
from broker.engine.agents import ExpirePresence, SetPresence
from broker.engine.engine import Engine
from broker.engine.errors import BrokerError
from broker.http.listener import address
from broker.http.metrics import BrokerMetrics
from broker.ratelimit import SharedLimits
from broker.workers.channel import (
    Link,
    LinkClosed,
    encode,
    pack_facts,
    pack_result,
    unpack_command,
)
from broker.workers.metrics import merge_expositions

log = logging.getLogger(__name__)

# Encoded bytes a gateway's link may hold unsent before it misses fact
# batches (the gateway then falls back to the database): the writer never
# waits for a gateway that does not read.
MAX_LINK_BACKLOG = 64 * 1024 * 1024
# How long a /metrics waits for the other gateways' figures.
COLLECT_TIMEOUT_S = 2.0
# What a caller gets for a bug in a command: the code and message the HTTP app
# answers an unexpected exception with in one process (a 500, no internals).
INTERNAL_ERROR = ("internal_error", "the broker failed to handle this request")
# How long a started gateway may take to listen (it imports the app first).
START_TIMEOUT_S = 60.0
# After the stop grace, how long a gateway may still take before it is killed.
STOP_MARGIN_S = 5.0
# The offline status SetPresence takes (broker.gateway.presence.OFFLINE).
_OFFLINE = "offline"
# Exit status of a gateway that lost the writer (broker.workers.gateway_process).
EXIT_WRITER_LOST = 3


class WriterMetrics(BrokerMetrics):
    """The writer process's registry; `render()` is the whole daemon's /metrics (every
    gateway's merged in), `render_process()` this process's alone."""

    host: WriterHost | None = None

    async def render_process(self) -> bytes:
        return await super().render()

    async def render(self) -> bytes:
        if self.host is None:
            return await self.render_process()
        return await self.host.daemon_metrics()


class WorkerDied(Exception):
    """A gateway process exited while the daemon was not stopping."""


class WriterHost:
    """The writer process's end of every gateway link."""

    def __init__(self, engine: Engine, render_own: Callable[[], Awaitable[bytes]]) -> None:
        """render_own: this process's metrics as Prometheus text."""
        self.engine = engine
        self.render_own = render_own
        self.links: dict[int, Link] = {}
        # Committed batches numbered since start; a gateway expects each next one.
        self.commit = 0
        self.missed_batches = 0
        self.holders: dict[int, set[int]] = {}
        self._next_id = 0
        self._reports: dict[int, tuple[trio.Event, dict[int, bytes]]] = {}

    # -- facts -------------------------------------------------------------------------

    async def distribute(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Push every committed batch to every link, until the engine closes its facts."""
        facts = self.engine.facts
        if facts is None:
            raise RuntimeError("the writer host needs an engine opened with_facts=True")
        async with facts:
            task_status.started()
            async for batch in facts:
                self.commit += 1
                frame = encode(("facts", self.commit, pack_facts(batch)))
                for index, link in tuple(self.links.items()):
                    if link.pending_bytes > MAX_LINK_BACKLOG:
                        self.missed_batches += 1
                        log.warning("gateway %d: link backlog full, batch %d missed",
                                    index, self.commit)
                        continue
                    try:
                        link.send_frame_nowait(frame)
                    except LinkClosed:
                        pass

    # -- one link ----------------------------------------------------------------------

    async def serve(self, index: int, link: Link, on_message: Callable[[Any], None]) -> None:
        """Answer `link` until it closes; messages this host does not handle go to
        `on_message` (the pool's: "listening")."""
        self.links[index] = link
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    try:
                        message = await link.receive()
                    except LinkClosed:
                        break
                    kind = message[0]
                    if kind == "submit":
                        nursery.start_soon(self._submit, index, link, message[1],
                                           message[2], message[3])
                    elif kind == "metrics":
                        nursery.start_soon(self._metrics, link, message[1])
                    elif kind == "report":
                        self._report(index, message[1], message[2])
                    else:
                        on_message(message)
        finally:
            del self.links[index]
            for agent_id in [a for a, held in self.holders.items() if index in held]:
                self._release(agent_id, index)

    async def _submit(self, index: int, link: Link, call: int, name: str,
                      data: bytes) -> None:
        answer: tuple[Any, ...]
        try:
            command = self._presence_across_gateways(index, unpack_command(name, data))
            result = [] if command is None else await self.engine.submit(command)
            answer = ("result", call, True, pack_result(result))
        except BrokerError as exc:
            answer = ("result", call, False, pack_result(BrokerError(exc.code, exc.message)))
        except Exception:  # a bug in a command: the caller's 500, as in one process
            # The traceback stays in this process's log; the caller gets the
            # generic answer the HTTP app gives an unexpected exception.
            log.exception("gateway %d: command %s failed", index, name)
            answer = ("result", call, False, pack_result(BrokerError(*INTERNAL_ERROR)))
        try:
            link.send_nowait(answer)
        except LinkClosed:
            pass

    def _presence_across_gateways(self, index: int, command: Any) -> Any:
        """`command` as this gateway may apply it, or None when nothing is left of it."""
        if isinstance(command, SetPresence):
            changes = []
            for agent_id, status in command.changes:
                if status == _OFFLINE:
                    if self._release(agent_id, index):
                        continue  # another gateway still holds a socket of it
                else:
                    self.holders.setdefault(agent_id, set()).add(index)
                changes.append((agent_id, status))
            if not changes:
                return None
            return msgspec.structs.replace(command, changes=tuple(changes))
        if isinstance(command, ExpirePresence):
            agents = tuple(a for a in command.agents if not self.holders.get(a[1]))
            if not agents:
                return None
            return msgspec.structs.replace(command, agents=agents)
        return command

    def _release(self, agent_id: int, index: int) -> bool:
        """Gateway `index` holds no socket of `agent_id` now; True if another still does."""
        held = self.holders.get(agent_id)
        if held is None:
            return False
        held.discard(index)
        if held:
            return True
        del self.holders[agent_id]
        return False

    # -- metrics -----------------------------------------------------------------------

    async def _metrics(self, link: Link, call: int) -> None:
        text = await self.daemon_metrics()
        try:
            link.send_nowait(("metrics", call, text))
        except LinkClosed:
            pass

    async def daemon_metrics(self) -> bytes:
        """The whole daemon's metrics: this process's and every gateway's, merged."""
        self._next_id += 1
        call = self._next_id
        done = trio.Event()
        reports: dict[int, bytes] = {}
        self._reports[call] = (done, reports)
        asked = 0
        for link in tuple(self.links.values()):
            try:
                link.send_nowait(("collect", call))
                asked += 1
            except LinkClosed:
                pass
        try:
            own = await self.render_own()
            with trio.move_on_after(COLLECT_TIMEOUT_S):
                while len(reports) < asked:
                    await done.wait()
                    done = trio.Event()
                    self._reports[call] = (done, reports)
        finally:
            del self._reports[call]
        return merge_expositions([own, *reports.values()])

    def _report(self, index: int, call: int, text: bytes) -> None:
        waiting = self._reports.get(call)
        if waiting is not None:
            waiting[1][index] = text
            waiting[0].set()


class GatewayPool:
    """The gateway processes: start with `url = await nursery.start(pool.run, stopping)`."""

    def __init__(self, settings: Settings, host: WriterHost, count: int,
                 holder: socket.socket, shared: SharedLimits) -> None:
        """holder: a socket bound to the port, not listening (`broker.http.listener.
        hold_port`), which keeps it until every gateway listens; `run` closes it.
        shared: the rate limits' tables, handed to every gateway."""
        self.settings = settings
        self.host = host
        self.count = count
        self.holder = holder
        self.shared = shared
        self.processes: list[trio.Process] = []
        self.run_dir: Path | None = None
        self._listening: dict[int, str] = {}
        self._all_listening = trio.Event()

    @property
    def gateway0_socket(self) -> Path:
        """Gateway 0's private Unix socket (see `broker.workers`)."""
        assert self.run_dir is not None
        return self.run_dir / "gateway-0.sock"

    async def run(self, stopping: trio.Event, *,
                  task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Start every gateway on the port; `started(url)` once all listen.

        After `stopping` is set, tell each gateway to stop and wait until
        they have exited. Raises WorkerDied if one exits before that.
        """
        http = self.settings.http
        # The holder keeps the port (port 0: the one the kernel picked) without
        # listening: each gateway binds its own listening socket to it with
        # SO_REUSEPORT, and the kernel spreads new connections over them evenly
        # (one shared listening socket hands most of them to whichever process
        # waits in accept first). The daemon's claim keeps other brokers off it.
        holder = self.holder
        # A private directory (0700) for gateway 0's Unix socket.
        self.run_dir = Path(tempfile.mkdtemp(prefix="broker-run-"))
        links: list[Link] = []
        ends: list[socket.socket] = []
        try:
            host, port = holder.getsockname()[:2]
            url = f"{'https' if http.tls.enabled else 'http'}://{address(host, port)}"
            listen = msgspec.structs.replace(http, port=port)
            settings = msgspec.structs.replace(self.settings, http=listen)
            hello = msgspec.json.encode(settings)
            environ = {k: v for k, v in os.environ.items()
                       if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
            shared_fd = self.shared.region.fd
            async with trio.open_nursery() as nursery:
                for index in range(self.count):
                    ours, theirs = socket.socketpair()
                    try:
                        process = await trio.lowlevel.open_process(
                            [sys.executable, "-m", "broker.workers.gateway_process",
                             str(index), str(self.count), str(theirs.fileno()), str(shared_fd)],
                            pass_fds=(theirs.fileno(), shared_fd), env=environ,
                            stdin=subprocess.DEVNULL)
                    finally:
                        theirs.close()
                    self.processes.append(process)
                    ends.append(ours)
                    link = Link(trio.SocketStream(trio.socket.from_stdlib_socket(ours)))
                    links.append(link)
                    nursery.start_soon(link.run_sender)
                    link.send_nowait(("hello", hello, str(self.gateway0_socket)))
                    nursery.start_soon(self._serve, index, link)
                    nursery.start_soon(self._watch, index, process, stopping)
                with trio.fail_after(START_TIMEOUT_S):
                    await self._all_listening.wait()
                holder.close()  # every gateway listens on the port now
                log.info("broker listening on %s (%d gateway processes, pids %s; data in %s)",
                         url, self.count, " ".join(str(p.pid) for p in self.processes),
                         self.settings.data_dir)
                task_status.started(url)
                await stopping.wait()
                log.info("stopping %d gateway processes", self.count)
                for link in links:
                    try:
                        link.send_nowait(("stop",))
                    except LinkClosed:
                        pass
                deadline = (http.shutdown_grace_seconds + self.settings.gateway.close_grace_seconds
                            + STOP_MARGIN_S)
                with trio.move_on_after(deadline):
                    for process in self.processes:
                        await process.wait()
                for link in links:
                    link.close()
                nursery.cancel_scope.cancel()
        finally:
            holder.close()
            for end in ends:
                end.close()
            for process in self.processes:
                if process.returncode is None:
                    process.kill()
            with trio.CancelScope(shield=True):
                for process in self.processes:
                    await process.wait()
            shutil.rmtree(self.run_dir, ignore_errors=True)
        log.info("gateway processes stopped: exit statuses %s",
                 " ".join(str(p.returncode) for p in self.processes))

    async def _serve(self, index: int, link: Link) -> None:
        def on_message(message: Any) -> None:
            if message[0] == "listening":
                log.info("gateway %d listening on %s", index, message[1])
                self._listening[index] = message[1]
                if len(self._listening) == self.count:
                    self._all_listening.set()
            else:
                log.warning("gateway %d: unknown message %r", index, message[0])

        await self.host.serve(index, link, on_message)

    async def _watch(self, index: int, process: trio.Process, stopping: trio.Event) -> None:
        status = await process.wait()
        if stopping.is_set() and status == 0:
            return
        name = (f"signal {signal.Signals(-status).name}" if status < 0
                else f"status {status}")
        log.error("gateway %d (pid %d) exited with %s: the daemon stops", index, process.pid,
                  name)
        raise WorkerDied(f"gateway {index} (pid {process.pid}) exited with {name}")
