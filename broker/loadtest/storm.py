"""The connect storm: N agents of one workspace connect at once (a daemon restart is this case).

For each count a fresh daemon of its own and one workspace of that many
agents (registered before the clock starts). Then every agent connects
with `broker.client`, `STORM_CONCURRENCY` handshakes in flight at a time,
each asking for presence (`?presence=1`), the case that costs the most
frames; with `presence=False` none asks, which leaves the connect path
alone. Measured:

- connect: from the first connect to the last handshake answered;
- until quiet: to the last presence frame, once none has come for
  `QUIET_S` (the coalesced feed sends one per session per interval);
- frames per agent: every event frame the clients received, divided by N;
- CPU: the daemon's over the storm (to quiet), from /proc, and the
  generator's own (this process: the clients run in it).

With `profile`, py-spy samples the daemon during the storm of the largest
count (see `--profile` of the traffic run for the formats).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from broker.client import BrokerClient
from broker.loadtest.processes import raise_fd_limit, start_daemon, start_profiler, stop_profiler
from broker.loadtest.tls import certificate_for
from broker.loadtest.topology import LoadSpec, build_topology

STORM_CONCURRENCY = 64
STORM_CONNECT_TIMEOUT_S = 120.0
# No frame for this long (more than the presence interval): the storm is over.
QUIET_S = 2.5


async def connect_storm(counts: list[int], profile: Path | None = None,
                        presence: bool = True, *, tls: bool = False) -> dict[str, Any]:
    """For each count, a fresh daemon and that many agents of one workspace connecting at once
    (over TLS with `tls`: broker.loadtest.tls)."""
    limit = raise_fd_limit()
    if max(counts) * 2 + 100 > limit:
        raise ValueError(f"{max(counts)} connections need more than the open-files limit {limit}")
    steps = []
    for count in counts:
        sampled = profile if profile is not None and count == max(counts) else None
        steps.append(await _storm(count, sampled, presence, tls))
    return {"scenario": "connect", "presence": presence, "tls": all(s["tls"] for s in steps),
            "steps": steps}


async def _storm(count: int, profile: Path | None, presence: bool, tls: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="broker-storm-") as tmp:
        certificate = certificate_for(Path(tmp), tls)
        daemon = start_daemon(Path(tmp) / "data", tls=certificate)
        try:
            spec = LoadSpec(agents=count, channel_size=count, senders=1, duration=1.0)
            topology = await build_topology(daemon.address, spec, channels=False,
                                            cafile=certificate.cafile if certificate else None)
            frames = 0
            last_frame = 0.0
            limiter = trio.CapacityLimiter(STORM_CONCURRENCY)
            connected = 0
            all_connected = trio.Event()
            sampler = start_profiler(daemon.pid, profile) if profile is not None else None
            cpu_before = daemon.cpu_seconds()
            own_before = time.process_time()
            started = time.monotonic()
            connect_s = 0.0
            async with trio.open_nursery() as nursery:

                async def agent(token: str) -> None:
                    nonlocal frames, last_frame, connected, connect_s
                    client = BrokerClient(topology.ws_url, token, reconnect=False,
                                          presence=presence, auto_ack=False,
                                          connect_timeout=STORM_CONNECT_TIMEOUT_S,
                                          ssl_context=topology.ssl_context)
                    async with limiter:
                        await nursery.start(client.run)
                    connected += 1
                    if connected == count:
                        connect_s = time.monotonic() - started
                        all_connected.set()
                    async for _event in client.events():
                        frames += 1
                        last_frame = time.monotonic()

                for member in topology.agents:
                    nursery.start_soon(agent, member.token)
                await all_connected.wait()
                while True:  # until no frame has come for QUIET_S
                    silent = time.monotonic() - max(last_frame, started)
                    if silent >= QUIET_S:
                        break
                    await trio.sleep(QUIET_S - silent)
                cpu = daemon.cpu_seconds() - cpu_before
                own = time.process_time() - own_before
                if sampler is not None:
                    stop_profiler(sampler)
                nursery.cancel_scope.cancel()
        finally:
            daemon.stop()
    quiet_s = max(last_frame, started + connect_s) - started
    step = {"agents": count, "url": topology.http_url, "tls": topology.tls,
            "connect_seconds": round(connect_s, 2),
            "until_quiet_seconds": round(quiet_s, 2), "frames": frames,
            "frames_per_agent": round(frames / count, 2),
            "daemon_cpu_seconds": round(cpu, 2), "generator_cpu_seconds": round(own, 2)}
    print(f"connect: {count} agents of one workspace connected in {connect_s:.2f} s; "
          f"event frames until quiet {quiet_s:.2f} s, {frames / count:.2f} per agent; "
          f"CPU: daemon {cpu:.2f} s, generator {own:.2f} s", file=sys.stderr)
    return step
