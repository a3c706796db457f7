"""The servers a load run starts for itself, each in its own process, and what /proc says of them.

`ServerProcess.start` runs a command (`broker serve` on a temporary data
directory, or the echo server), waits for the line that names its port,
and keeps reading its output in a thread so that a chatty server never
blocks on a full pipe. `rss_bytes` and `cpu_seconds` read /proc; a
server's figures sum its whole process tree (a daemon with `--workers N` is
a writer process and N gateway children). `start_profiler` samples one with
py-spy, children included.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from broker.loadtest.tls import RunCertificate

# How long a server may take to print its listening line.
START_TIMEOUT_S = 30.0
# How long a server may take to exit after SIGTERM before it is killed.
STOP_TIMEOUT_S = 15.0
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")

# One process: "... on http://host:port (data in ...)"; several: "... on http://host:port (N
# gateway processes ..."; https:// when the daemon serves TLS.
DAEMON_LISTENING = re.compile(r"broker listening on (https?://[^\s]+?):?(?:\s|$)")
ECHO_LISTENING = re.compile(r"echo listening on (\d+)")

_N = TypeVar("_N", int, float)


class ServerProcess:
    """A server subprocess; `address` is what its listening line named."""

    def __init__(self, process: subprocess.Popen[str], address: str) -> None:
        self.process = process
        self.address = address
        self.tail: deque[str] = deque(maxlen=50)
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    @classmethod
    def start(cls, argv: Sequence[str], listening: re.Pattern[str],
              env: dict[str, str] | None = None) -> ServerProcess:
        """Start `argv`, return once a line matches `listening` (group 1 is the address).

        Raises RuntimeError (with the output so far) when it exits or stays silent first.
        """
        process = subprocess.Popen(
            list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})))
        assert process.stdout is not None
        seen: list[str] = []
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            seen.append(line)
            found = listening.search(line)
            if found:
                return cls(process, found.group(1))
        process.kill()
        process.wait()
        process.stdout.close()
        raise RuntimeError(f"{argv[:4]} did not start:\n{''.join(seen[-30:])}")

    def _drain(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.tail.append(line)

    def stop(self) -> int:
        """SIGTERM, wait (then SIGKILL); the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(timeout=1)
        if self.process.stdout is not None and not self._reader.is_alive():
            self.process.stdout.close()
        return self.process.returncode

    def rss_bytes(self) -> int:
        """Resident memory of the server and every process under it."""
        return sum(_alive(rss_bytes, pid) for pid in process_tree(self.pid))

    def cpu_seconds(self) -> float:
        """CPU time of the server and every process under it that is still running."""
        return sum(_alive(cpu_seconds, pid) for pid in process_tree(self.pid))


# A load run drives one workspace from one address far past what the request
# limits allow a production client (they exist to bound one agent's cost to
# the others); the daemon a run starts for itself measures the broker, not
# its refusals. A daemon reached with --url keeps its own settings.
UNLIMITED_ENV = {
    "BROKER_RATE_LIMITS_WORKSPACE_PER_MINUTE": "0",
    "BROKER_RATE_LIMITS_AGENT_PER_MINUTE": "0",
    "BROKER_RATE_LIMITS_ANONYMOUS_PER_MINUTE": "0",
}


def start_daemon(data_dir: Path, *extra: str, tls: RunCertificate | None = None) -> ServerProcess:
    """`broker serve` on 127.0.0.1, port 0, with its database in `data_dir`, without rate
    limits; serving TLS with `tls` if given."""
    return ServerProcess.start(
        [sys.executable, "-m", "broker", "serve", "--host", "127.0.0.1", "--port", "0",
         "--data-dir", str(data_dir), *extra],
        DAEMON_LISTENING, env={**UNLIMITED_ENV, **(tls.daemon_environ() if tls else {})})


def start_echo(tls: RunCertificate | None = None) -> ServerProcess:
    """The echo server (`broker.loadtest.echo`), serving TLS with `tls` if given."""
    return ServerProcess.start(
        [sys.executable, "-m", "broker.loadtest.echo", *(tls.echo_arguments() if tls else [])],
        ECHO_LISTENING)


def rss_bytes(pid: int) -> int:
    """Resident memory of process `pid` (from /proc/PID/statm)."""
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * _PAGE


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process `pid` so far (from /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as stat:
        # The command name may hold spaces; the fields after its ')' are fixed.
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants, from the parent ids in /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        children.setdefault(parent, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, ()))
    return tree


def _alive(read: Callable[[int], _N], pid: int) -> _N | int:
    """read(pid), or 0 for a process that ended since the tree was listed."""
    try:
        return read(pid)
    except (OSError, IndexError, ValueError):
        return 0


def raise_fd_limit() -> int:
    """Raise the soft open-files limit to the hard one (children inherit it); the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def start_profiler(pid: int, output: Path) -> subprocess.Popen[bytes]:
    """py-spy sampling `pid` (without pausing it) until `stop_profiler`."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        raise RuntimeError("--profile needs py-spy: pip install '.[bench]'")
    kind = {".txt": "raw", ".json": "speedscope"}.get(output.suffix, "flamegraph")
    return subprocess.Popen([py_spy, "record", "--nonblocking", "--subprocesses",
                             "--pid", str(pid), "--format",
                             kind, "--output", str(output)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_profiler(sampler: subprocess.Popen[bytes]) -> None:
    sampler.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
    try:
        sampler.wait(30)
    except subprocess.TimeoutExpired:
        sampler.kill()
        sampler.wait()
