"""The client side of a peer run: the processes that publish to a peer and receive from it.

`broker.loadtest.peers` starts the peer and these processes (one for the
receivers, P for the senders) and reads their results; each process runs
`peer_process`, which drives a `PeerShard` (what the shard does and counts,
shared by both clients) through the peer's own client: `JetStreamShard`
(nats-py, asyncio) or `MqttShard` (paho-mqtt, its network thread). A message
carries (sender, n, send time, padding text), so the loss is counted as for
the broker. The clients come from the `[bench]` extra and are imported only
inside these processes.
"""

from __future__ import annotations

import asyncio
import os
import queue as queue_module
import sys
import threading
import time
import traceback
from typing import Any

import msgspec

from broker.loadtest.runner import ShardResult
from broker.loadtest.stats import Bits
from broker.loadtest.topology import Topology

JETSTREAM = "jetstream"
JETSTREAM_DEFAULT = "jetstream-default"
MOSQUITTO = "mosquitto"

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
# How long a draining JetStream receiver waits for the server to confirm an
# ack (nats-py's default for ack_sync is 1 s, which a loaded 2-core machine
# can exceed; the drain as a whole is bounded by DRAIN_TIMEOUT_S).
ACK_SYNC_TIMEOUT_S = 30.0
BARRIER_TIMEOUT_S = 300.0
PROGRESS_INTERVAL_S = 1.0
CONNECT_TIMEOUT_S = 30.0
# The shard number of the receivers' process; senders' processes are 1..P.
RECEIVERS = 0

_encoder = msgspec.msgpack.Encoder()
_payload = msgspec.msgpack.Decoder(tuple[int, int, float, str])


def receivers(topology: Topology) -> list[int]:
    """The agents that receive in a peer run: the channel's members that do not send."""
    senders = set(topology.senders())
    return [i for i in topology.members(0) if i not in senders]


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
                # Only the drain's own deadline ends up here: a consumer
                # records its errors itself (nats-py's TimeoutError is a
                # TimeoutError too, and would read as this one).
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

        try:
            await self._consume_until_drained(subscription, receiver)
        except nats.errors.Error as exc:
            self.part.error(f"consume_{type(exc).__name__}")

    async def _consume_until_drained(self, subscription: Any, receiver: int) -> None:
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
                await self._ack_confirmed(batch[-1])
            if self.draining:
                try:
                    # within the JetStream context's own timeout (5 s in nats-py)
                    info = await subscription.consumer_info()
                except nats.errors.TimeoutError:
                    continue  # ask again (the drain's own deadline still holds)
                if info.num_pending == 0 and info.num_ack_pending == 0:
                    return

    @staticmethod
    async def _ack_confirmed(message: Any) -> None:
        """Ack `message` (and, by AckPolicy.ALL, all before it) until the server confirms.

        An ack whose confirmation timed out may or may not have reached the
        server; acking the same message again is harmless either way.
        """
        import nats.errors

        while True:
            try:
                await message.ack_sync(timeout=ACK_SYNC_TIMEOUT_S)
            except nats.errors.TimeoutError:
                continue  # the drain's own deadline still holds
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
