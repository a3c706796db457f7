"""The scenarios beside the traffic run: memory per idle connection, history-page latency.

Idle memory: a daemon of its own, one agent per connection (in workspaces
of 100 agents, see `idle_memory`); the daemon's
RSS (/proc) is read once it has settled with no connection, then after
opening the first count of idle WebSocket connections, then after the
next, and so on (cumulative). Per connection = RSS growth / connections.

History: for each size, a fresh data directory is filled with that many
channel messages by `bulk_load`, through the writer actor itself (the
command every send runs, `SendChannelMessage`, submitted by many tasks at
once so group commit batches them; `synchronous=OFF` and large batches for
the load only), then a daemon is started on it and an agent pages through
the channel over the native WebSocket protocol: the newest page, and a
page from the middle (`before` = the id of the middle message).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import trio

from broker.client import BrokerClient
from broker.engine.channels import CreateChannel
from broker.engine.config import EngineConfig
from broker.engine.engine import Engine
from broker.engine.messages import SendChannelMessage
from broker.engine.workspaces import CreateWorkspace, RegisterAgent
from broker.loadtest.processes import raise_fd_limit, start_daemon
from broker.loadtest.stats import Histogram
from broker.loadtest.tls import certificate_for
from broker.loadtest.topology import LoadSpec, Topology, build_topology, websocket_url

# How long the daemon is left alone before its RSS is read.
SETTLE_S = 3.0
CONNECT_CONCURRENCY = 64
IDLE_CONNECT_TIMEOUT_S = 60.0
IDLE_WORKSPACE_AGENTS = 100
# Sends submitted at once during a bulk load (bounds the writer's batches).
BULK_CONCURRENCY = 2000
BULK_MAX_BATCH = 2000
HISTORY_CHANNEL = "history"
HISTORY_TEXT = "a stored message of ordinary length, for paging through history"


# -- memory per idle connection -----------------------------------------------------------


async def idle_memory(counts: list[int], data_dir: Path | None = None, *,
                      tls: bool = False) -> dict[str, Any]:
    """RSS growth of a fresh daemon per idle native connection, at each cumulative count
    (over TLS with `tls`: broker.loadtest.tls)."""
    limit = raise_fd_limit()
    total = max(counts)
    if total * 2 + 100 > limit:
        raise ValueError(f"{total} connections need more than the open-files limit {limit}")
    with tempfile.TemporaryDirectory(prefix="broker-idle-") as tmp:
        certificate = certificate_for(Path(tmp), tls)
        cafile = certificate.cafile if certificate else None
        daemon = start_daemon(data_dir or Path(tmp) / "data", tls=certificate)
        try:
            # Agents in workspaces of IDLE_WORKSPACE_AGENTS, as in every earlier
            # run of this scenario, so the figures stay comparable.
            tokens: list[str] = []
            topology: Topology | None = None
            for first in range(0, total, IDLE_WORKSPACE_AGENTS):
                size = min(IDLE_WORKSPACE_AGENTS, total - first)
                spec = LoadSpec(agents=size, channel_size=size, senders=1, duration=1.0)
                topology = await build_topology(daemon.address, spec, channels=False,
                                                cafile=cafile)
                tokens.extend(agent.token for agent in topology.agents)
            assert topology is not None
            await trio.sleep(SETTLE_S)
            base = daemon.rss_bytes()
            print(f"idle: daemon RSS {base / 2**20:.1f} MiB with no connection", file=sys.stderr)
            steps: list[dict[str, Any]] = []
            clients: list[BrokerClient] = []
            limiter = trio.CapacityLimiter(CONNECT_CONCURRENCY)
            async with trio.open_nursery() as nursery:

                async def connect(index: int) -> None:
                    assert topology is not None
                    client = BrokerClient(topology.ws_url, tokens[index], reconnect=False,
                                          connect_timeout=IDLE_CONNECT_TIMEOUT_S,
                                          ssl_context=topology.ssl_context)
                    async with limiter:
                        await nursery.start(client.run)
                    clients.append(client)

                for count in sorted(counts):
                    started = time.monotonic()
                    async with trio.open_nursery() as opening:
                        for index in range(len(clients), count):
                            opening.start_soon(connect, index)
                    opened = time.monotonic() - started
                    await trio.sleep(SETTLE_S)
                    rss = daemon.rss_bytes()
                    per = (rss - base) / count
                    steps.append({"connections": count, "rss_mib": round(rss / 2**20, 1),
                                  "per_connection_kib": round(per / 1024, 1),
                                  "open_seconds": round(opened, 2)})
                    print(f"idle: {count} connections, RSS {rss / 2**20:.1f} MiB, "
                          f"{per / 1024:.1f} KiB each (opened in {opened:.1f} s)",
                          file=sys.stderr)
                nursery.cancel_scope.cancel()
        finally:
            daemon.stop()
    return {"scenario": "idle", "url": topology.http_url, "tls": topology.tls,
            "base_rss_mib": round(base / 2**20, 1), "steps": steps}


# -- history pages ---------------------------------------------------------------------------


class BulkLoaded(msgspec.Struct, kw_only=True):
    token: str
    channel: str
    messages: int
    middle_id: str
    seconds: float


async def bulk_load(data_dir: Path, count: int) -> BulkLoaded:
    """`count` messages in one channel of a new workspace, written through the writer actor."""
    config = EngineConfig(synchronous="OFF", max_batch=BULK_MAX_BATCH,
                          queue_size=BULK_CONCURRENCY * 2)
    async with Engine.open(data_dir, config) as engine:
        ws = await engine.submit(CreateWorkspace("history"))
        wid = int(ws.workspace_id)
        agent = await engine.submit(RegisterAgent(workspace_id=wid, name="reader"))
        aid = int(agent.id)
        await engine.submit(CreateChannel(workspace_id=wid, agent_id=aid, name=HISTORY_CHANNEL))
        middle = count // 2
        middle_id = ""
        next_index = 0
        started = time.perf_counter()
        last_report = started

        async def writer_task() -> None:
            nonlocal next_index, middle_id, last_report
            while next_index < count:
                i = next_index
                next_index += 1
                sent = await engine.submit(SendChannelMessage(
                    workspace_id=wid, agent_id=aid, channel=HISTORY_CHANNEL,
                    text=f"{HISTORY_TEXT} {i}"))
                if i == middle:
                    middle_id = sent.id
                now = time.perf_counter()
                if now - last_report >= 5:
                    last_report = now
                    print(f"bulk load: {next_index} of {count} "
                          f"({next_index / (now - started):,.0f}/s)", file=sys.stderr)

        async with trio.open_nursery() as nursery:
            for _ in range(min(BULK_CONCURRENCY, count)):
                nursery.start_soon(writer_task)
        seconds = time.perf_counter() - started
    return BulkLoaded(token=agent.token, channel=HISTORY_CHANNEL, messages=count,
                      middle_id=middle_id, seconds=seconds)


async def history_latency(sizes: list[int], pages: int = 300,
                          keep_dir: Path | None = None) -> dict[str, Any]:
    """Latency of `message.list` pages (50 messages) with each size of stored history."""
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="broker-history-") as tmp:
        root = keep_dir or Path(tmp)
        for size in sizes:
            data_dir = root / f"history-{size}"
            loaded = await bulk_load(data_dir, size)
            print(f"bulk load: {size} messages in {loaded.seconds:.1f} s "
                  f"({size / loaded.seconds:,.0f}/s)", file=sys.stderr)
            daemon = start_daemon(data_dir)
            try:
                url = websocket_url(daemon.address)
                client = BrokerClient(url, loaded.token, reconnect=False)
                async with trio.open_nursery() as nursery:
                    await nursery.start(client.run)
                    row: dict[str, Any] = {"messages": size,
                                           "bulk_load_seconds": round(loaded.seconds, 1),
                                           "bulk_load_per_s": round(size / loaded.seconds)}
                    for name, before in (("newest", None), ("middle", loaded.middle_id)):
                        histogram = Histogram()
                        fields: dict[str, Any] = {"channel": loaded.channel, "limit": 50}
                        if before is not None:
                            fields["before"] = before
                        for i in range(pages + 20):
                            t0 = time.monotonic()
                            page = await client.request("message.list", **fields)
                            if i >= 20:  # the first pages warm the page cache
                                histogram.add(time.monotonic() - t0)
                            if len(page) != 50:
                                raise RuntimeError(f"a {name} page held {len(page)} messages")
                        summary = histogram.summary()
                        row[f"{name}_p50_ms"] = round(summary["p50"], 3)
                        row[f"{name}_p99_ms"] = round(summary["p99"], 3)
                    row["db_mib"] = round(sum(
                        f.stat().st_size for f in data_dir.iterdir() if f.is_file()) / 2**20)
                    rows.append(row)
                    print(f"history {size}: newest page p50 {row['newest_p50_ms']} ms, p99 "
                          f"{row['newest_p99_ms']} ms; middle page p50 {row['middle_p50_ms']} "
                          f"ms, p99 {row['middle_p99_ms']} ms", file=sys.stderr)
                    await client.close()
                    nursery.cancel_scope.cancel()
            finally:
                daemon.stop()
    return {"scenario": "history", "pages": pages, "rows": rows}


def parse_counts(text: str) -> list[int]:
    """`1000,5000` or `1e6` -> a list of ints."""
    counts = [int(float(part)) for part in text.split(",") if part.strip()]
    if not counts or min(counts) < 1:
        raise ValueError(f"{text!r}: expected positive counts separated by commas")
    return counts
