"""Run `broker serve` as a subprocess on 127.0.0.1 port 0, for tests that kill or signal it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import trio

LISTENING = re.compile(rb"broker listening on (http://127\.0\.0\.1:(\d+))")


class Daemon:
    def __init__(self, process: trio.Process, url: str) -> None:
        self.process = process
        self.url = url
        self.ws_url = url.replace("http://", "ws://", 1) + "/v1/ws"
        self.output = b""

    def kill(self) -> None:
        self.process.kill()


@asynccontextmanager
async def run_daemon(
    data_dir: Path, *extra: str, env: dict[str, str] | None = None
) -> AsyncIterator[Daemon]:
    """Start the daemon, yield once it listens; on exit kill it if it still runs."""
    environ = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(partial(
            trio.run_process,
            [sys.executable, "-m", "broker", "serve", "--host", "127.0.0.1", "--port", "0",
             "--data-dir", str(data_dir), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False, env=environ))
        assert process.stdout is not None
        output = b""
        found = None
        while found is None:
            chunk = await process.stdout.receive_some(4096)
            if not chunk:
                raise RuntimeError(f"daemon exited before listening:\n{output.decode()}")
            output += chunk
            found = LISTENING.search(output)
        daemon = Daemon(process, found.group(1).decode())
        daemon.output = output

        async def drain() -> None:
            assert process.stdout is not None
            while chunk := await process.stdout.receive_some(4096):
                daemon.output += chunk

        nursery.start_soon(drain)
        try:
            yield daemon
        finally:
            if process.returncode is None:
                process.kill()
