"""`broker loadtest` as a program, for the tests that run it whole."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio

# What every traffic report holds (BENCHMARKS.md reads them).
REQUIRED_KEYS = {
    "sends_per_s", "deliveries_per_s", "echo_per_s", "ratio", "send_reply_p99_ms",
    "send_deliver_p99_ms", "lost", "errors",
}
# Spawning the daemon, the echo server and two shard processes on a busy machine.
SUBPROCESS_DEADLINE_S = 120


async def run_loadtest(out: Path, *options: str) -> tuple[str, dict[str, Any]]:
    """`broker loadtest OPTIONS --json OUT` in a process of its own, which must exit 0:
    its output (stdout and stderr) and the report it wrote."""
    with trio.fail_after(SUBPROCESS_DEADLINE_S):
        done = await trio.run_process(
            [sys.executable, "-m", "broker", "loadtest", *options, "--json", str(out)],
            capture_stdout=True, stderr=subprocess.STDOUT, check=False)
    output = done.stdout.decode()
    assert done.returncode == 0, output
    report: dict[str, Any] = json.loads(await trio.Path(out).read_text())
    return output, report
