"""A daemon for tests, on 127.0.0.1 port 0: in process (`run_server`, `serve`) or as a
`broker serve` subprocess (`run_daemon`, for tests that kill or signal it;
`refused_start`, for one that must not start).

The subprocess reports that it listens the way it does under systemd: a READY=1
datagram to $NOTIFY_SOCKET, whose STATUS names its URL.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import trio

from broker.config import HttpSettings, ServerSettings, Settings, TlsSettings
from broker.engine.config import EngineConfig
from broker.gateway.settings import GatewaySettings
from broker.server import BrokerServer

FAST_ENGINE = EngineConfig(synchronous="NORMAL")
SERVING = re.compile(rb"^STATUS=serving on (http://127\.0\.0\.1:\d+)$", re.MULTILINE)
GATEWAY_PIDS = re.compile(rb"gateway processes, pids ([\d ]+);")


# -- in process ------------------------------------------------------------------------


@asynccontextmanager
async def run_server(settings: Settings, **kwargs: Any) -> AsyncIterator[BrokerServer]:
    """A BrokerServer(settings, **kwargs) that listens until the block ends (graceful stop)."""
    server = BrokerServer(settings, **kwargs)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        try:
            yield server
        finally:
            server.stop()


@asynccontextmanager
async def serve(
    data_dir: Path, gateway: GatewaySettings | None = None, engine: EngineConfig = FAST_ENGINE,
    port: int = 0, workers: int = 1, tls: TlsSettings | None = None,
) -> AsyncIterator[BrokerServer]:
    """A BrokerServer on 127.0.0.1 (port 0 unless given) until the block ends (graceful stop).

    workers: gateway processes (1: everything in this process, as `server.gateway`);
    tls: serve TLS with these files."""
    settings = Settings(
        data_dir=str(data_dir), engine=engine, server=ServerSettings(workers=workers),
        http=HttpSettings(host="127.0.0.1", port=port, shutdown_grace_seconds=2.0,
                          tls=tls or TlsSettings()),
        gateway=gateway or GatewaySettings(),
    )
    async with run_server(settings) as server:
        yield server


# -- as a subprocess ---------------------------------------------------------------------


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def wait_gone(pids: list[int]) -> None:
    """Wait until none of `pids` is alive."""
    while True:  # /proc says when: polled
        if not any(alive(pid) for pid in pids):
            return
        await trio.sleep(0.02)


class Daemon:
    """A running `broker serve`: its process, URL, output so far and notify socket.

    ready: the READY=1 datagram; notifications: the socket later datagrams
    (WATCHDOG=1, STOPPING=1) arrive on.
    """

    def __init__(self, process: trio.Process, notifications: trio.socket.SocketType) -> None:
        self.process = process
        self.notifications = notifications
        self.ready = b""
        self.url = ""
        self.ws_url = ""
        self.output = b""
        self._output_ended = trio.Event()

    def kill(self) -> None:
        self.process.kill()

    async def gateway_pids(self) -> list[int]:
        """The gateway processes (`--workers` > 1) the daemon logged before READY=1."""
        while True:  # logged before READY=1; the output is read by another task
            found = GATEWAY_PIDS.search(self.output)
            if found is not None:
                return [int(pid) for pid in found.group(1).split()]
            await trio.sleep(0.01)

    async def finished(self) -> bytes:
        """Wait until the process has exited and its output ended; all of its output."""
        await self._output_ended.wait()
        await self.process.wait()
        return self.output

    async def _drain(self) -> None:
        assert self.process.stdout is not None
        while chunk := await self.process.stdout.receive_some(4096):
            self.output += chunk
        self._output_ended.set()

    async def _wait_ready(self) -> None:
        while not self.ready.startswith(b"READY=1"):  # watchdog pings may come first
            self.ready = await self.notifications.recv(4096)
        found = SERVING.search(self.ready)
        assert found is not None, self.ready
        self.url = found.group(1).decode()
        self.ws_url = self.url.replace("http://", "ws://", 1) + "/v1/ws"


@asynccontextmanager
async def _notify_socket(env: dict[str, str] | None) -> AsyncIterator[
        tuple[trio.socket.SocketType, dict[str, str]]]:
    """A datagram socket for the daemon's notifications, and its environment naming it."""
    # An abstract socket name: no file to clean up, no limit from a long tmp_path.
    address = f"broker-test-{secrets.token_hex(8)}"
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notifications:
        await notifications.bind("\0" + address)
        environ = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        environ["NOTIFY_SOCKET"] = "@" + address
        yield notifications, environ


def _serve_command(data_dir: Path, workers: int, port: int, extra: tuple[str, ...]) -> list[str]:
    return [sys.executable, "-m", "broker", "serve", "--host", "127.0.0.1", "--port", str(port),
            "--data-dir", str(data_dir), "--workers", str(workers), *extra]


@asynccontextmanager
async def run_daemon(
    data_dir: Path, *extra: str, env: dict[str, str] | None = None, workers: int = 1,
    port: int = 0, new_session: bool = False,
) -> AsyncIterator[Daemon]:
    """Start the daemon, yield once it has sent READY=1; on exit kill it if it still runs.

    workers: `--workers` (1: one process; more: a writer process and that many gateways).
    new_session: in a session and process group of its own, whose id is its pid
    (`os.killpg` then reaches every process of the daemon, as systemd's
    KillMode=control-group does).
    """
    async with _notify_socket(env) as (notifications, environ):
        async with trio.open_nursery() as nursery:
            process: trio.Process = await nursery.start(partial(
                trio.run_process, _serve_command(data_dir, workers, port, extra),
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False, env=environ,
                start_new_session=new_session))
            daemon = Daemon(process, notifications)
            nursery.start_soon(daemon._drain)
            try:
                with trio.CancelScope() as waiting:
                    async def exited() -> None:
                        await process.wait()
                        waiting.cancel()

                    nursery.start_soon(exited)
                    await daemon._wait_ready()
                if not daemon.ready.startswith(b"READY=1"):
                    output = await daemon.finished()
                    raise RuntimeError(f"daemon exited before READY=1:\n{output.decode()}")
                yield daemon
            finally:
                if process.returncode is None:
                    process.kill()


async def refused_start(
    data_dir: Path, *extra: str, port: int, workers: int = 1,
) -> subprocess.CompletedProcess[bytes]:
    """Run a `broker serve` that must fail at start: its exit status, stdout and stderr.

    Raises AssertionError (after killing it) if it sends READY=1 instead.
    """
    async with _notify_socket(None) as (notifications, environ):
        async with trio.open_nursery() as nursery:
            done: list[subprocess.CompletedProcess[bytes]] = []

            async def run() -> None:
                done.append(await trio.run_process(
                    _serve_command(data_dir, workers, port, extra), capture_stdout=True,
                    capture_stderr=True, check=False, env=environ))
                nursery.cancel_scope.cancel()

            nursery.start_soon(run)
            while not (await notifications.recv(4096)).startswith(b"READY=1"):
                pass  # watchdog pings may come first
            nursery.cancel_scope.cancel()  # run_process stops the daemon when cancelled
    if not done:
        raise AssertionError(f"broker serve --port {port} started (READY=1)")
    return done[0]
