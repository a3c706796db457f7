"""One shard of a load run: its agents' connections, its senders, its recipients.

A run is split into shards by agent index (agent i belongs to shard
i % procs); each shard runs in its own process (`shard_process`, started
with multiprocessing's spawn method) or, with procs=0, in the caller's
trio loop. Every connection is a `broker.client.BrokerClient`: the same
code path (handshake, framing, msgspec encode and decode, request
bookkeeping) drives the broker and the echo server.

The phases, with a barrier across shards between them:

1. connect every agent of the shard; start a consumer per recipient;
   (barrier) wait until the events of connecting stop arriving;
2. (barrier) send: each sender keeps `window` requests in flight (closed
   loop) or sends on a fixed schedule (`rate`, open loop) until the
   duration ends or its share of `messages` is sent;
3. (barrier: every shard has stopped sending) drain: each recipient acks
   what it processed, durably, and asks for its unacked deliveries until
   there are none, so what it received is final and the loss count exact.

Latencies are measured on CLOCK_MONOTONIC (shared by every process of
the machine): a message carries its send time in `data.lt` =
[sender, n, t]; for an open-loop run t is the scheduled time, so a late
send counts against the latency (no coordinated omission).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue as queue_module
import time
import traceback
from collections.abc import Callable
from typing import Any, Protocol

import msgspec
import trio

from broker.client import BrokerClient, ConnectionLost, RequestError
from broker.gc_tuning import settle_heap
from broker.loadtest.stats import Bits, Histogram
from broker.loadtest.topology import Topology, is_dm

log = logging.getLogger(__name__)

# Connections opened at once while a shard connects, and how long one may take
# (a big workspace's connects are written in presence batches behind them).
CONNECT_CONCURRENCY = 32
CONNECT_TIMEOUT_S = 300.0
# Connecting is over when no event arrived for SETTLE_QUIET_S (see Shard._settle).
SETTLE_QUIET_S = 1.0
SETTLE_LIMIT_S = 300.0
# How long recipients may take to receive everything once sending stopped.
DRAIN_TIMEOUT_S = 120.0
DRAIN_POLL_S = 0.02
PROGRESS_INTERVAL_S = 1.0
CLOSE_TIMEOUT_S = 10.0
# Barrier waits: longer than connecting the largest shard or draining.
BARRIER_TIMEOUT_S = 600.0
# A client's delivery buffer (frames decoded but not yet consumed).
DELIVERY_BUFFER = 1024

BROKER = "broker"
ECHO = "echo"


class ShardResult(msgspec.Struct, kw_only=True):
    """What one shard measured; `merge_results` (broker.loadtest.report) adds them up."""

    shard: int
    mode: str
    connections: int = 0
    started: float = 0.0
    send_stopped: float = 0.0
    last_reply: float = 0.0
    last_delivery: float = 0.0
    drained: float = 0.0
    sends: int = 0
    sends_acked: int = 0
    deliveries: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    foreign: int = 0
    errors: dict[str, int] = msgspec.field(default_factory=dict)
    reply: Histogram = msgspec.field(default_factory=Histogram)
    deliver: Histogram = msgspec.field(default_factory=Histogram)
    # Open loop: how late the generator sent, after the scheduled time.
    lateness: Histogram = msgspec.field(default_factory=Histogram)
    # sender index -> message numbers tried (n < count) and acknowledged (a bitmap).
    sent_count: dict[int, int] = msgspec.field(default_factory=dict)
    acked: dict[int, bytes] = msgspec.field(default_factory=dict)
    # recipient index -> sender index -> message numbers received (a bitmap).
    received: dict[int, dict[int, bytes]] = msgspec.field(default_factory=dict)
    # (sender, n, recipient name): acknowledged, but the recipient's mailbox was full.
    mailbox_full: list[tuple[int, int, str]] = msgspec.field(default_factory=list)
    cpu_seconds: float = 0.0


class ShardSync(Protocol):
    """How a shard waits for the others (a barrier, used once per phase) and reports progress."""

    async def wait_others(self) -> None: ...

    def progress(self, shard: int, sends: int, deliveries: int) -> None: ...


class LocalSync:
    """procs=0: one shard in the caller's loop; nothing to wait for."""

    def __init__(self, report: Callable[[int, int, int], None] | None = None) -> None:
        self.report = report

    async def wait_others(self) -> None:
        pass

    def progress(self, shard: int, sends: int, deliveries: int) -> None:
        if self.report is not None:
            self.report(shard, sends, deliveries)


class ProcessSync:
    """Shards in processes: multiprocessing barriers (waited on in a thread) and a queue."""

    def __init__(self, barrier: Any, messages: Any) -> None:
        self.barrier = barrier
        self.messages = messages

    async def wait_others(self) -> None:
        await trio.to_thread.run_sync(self.barrier.wait, BARRIER_TIMEOUT_S)

    def progress(self, shard: int, sends: int, deliveries: int) -> None:
        self.messages.put(("progress", shard, sends, deliveries))


class _Recipient:
    __slots__ = ("index", "client", "received", "processed", "last_seq")

    def __init__(self, index: int, client: BrokerClient) -> None:
        self.index = index
        self.client = client
        self.received: dict[int, Bits] = {}
        self.processed = 0
        self.last_seq = 0


class Shard:
    """The agents of one shard and what they measure (`run` drives the phases)."""

    def __init__(self, topology: Topology, url: str, mode: str, shard: int, procs: int,
                 sync: ShardSync) -> None:
        self.topology = topology
        self.spec = topology.spec
        self.url = url
        self.mode = mode
        self.shard = shard
        self.sync = sync
        stride = max(procs, 1)
        self.agents = [i for i in range(self.spec.agents) if i % stride == shard]
        all_senders = topology.senders()
        self.senders = [s for s in all_senders if s % stride == shard]
        self.quota: dict[int, int] = {}
        if self.spec.messages is not None:
            base, extra = divmod(self.spec.messages, len(all_senders))
            self.quota = {s: base + (j < extra) for j, s in enumerate(all_senders)}
        self.result = ShardResult(shard=shard, mode=mode)
        self.clients: dict[int, BrokerClient] = {}
        self.recipients: list[_Recipient] = []
        self._acked: dict[int, Bits] = {}
        self._stop_at = float("inf")
        self._closing = False

    # -- phases -----------------------------------------------------------------------------

    async def run(self) -> ShardResult:
        result = self.result
        async with trio.open_nursery() as nursery:
            await self._connect_all(nursery)
            result.connections = len(self.clients)
            if self.mode == BROKER:
                for index in self.agents:
                    recipient = _Recipient(index, self.clients[index])
                    self.recipients.append(recipient)
                    nursery.start_soon(self._consume, recipient)
            nursery.start_soon(self._report_progress)
            await self.sync.wait_others()
            await self._settle()
            await self.sync.wait_others()
            cpu_before = _process_cpu()
            result.started = time.monotonic()
            if self.spec.duration is not None:
                self._stop_at = result.started + self.spec.duration
            async with trio.open_nursery() as senders:
                for sender in self.senders:
                    senders.start_soon(self._send_loop, sender)
            result.send_stopped = time.monotonic()
            await self.sync.wait_others()
            if self.mode == BROKER:
                with trio.move_on_after(DRAIN_TIMEOUT_S) as scope:
                    async with trio.open_nursery() as drains:
                        for recipient in self.recipients:
                            drains.start_soon(self._drain, recipient)
                if scope.cancelled_caught:
                    result.errors["drain_timeout"] = result.errors.get("drain_timeout", 0) + 1
            result.drained = time.monotonic()
            self._report()
            self._closing = True
            with trio.move_on_after(CLOSE_TIMEOUT_S):
                async with trio.open_nursery() as closing:
                    for client in self.clients.values():
                        closing.start_soon(client.close)
            nursery.cancel_scope.cancel()
        result.acked = {s: bytes(bits.data) for s, bits in self._acked.items()}
        result.received = {r.index: {s: bytes(b.data) for s, b in r.received.items()}
                           for r in self.recipients}
        result.cpu_seconds = _process_cpu() - cpu_before
        return result

    async def _connect_all(self, nursery: trio.Nursery) -> None:
        limiter = trio.CapacityLimiter(CONNECT_CONCURRENCY)
        spec = self.spec

        async def connect(index: int) -> None:
            client = BrokerClient(
                self.url, self.topology.agents[index].token, msgpack=spec.msgpack,
                batch=spec.batch,
                request_timeout=spec.request_timeout, reconnect=True,
                connect_timeout=CONNECT_TIMEOUT_S, delivery_buffer=DELIVERY_BUFFER,
                ssl_context=self.topology.ssl_context)
            async with limiter:
                await nursery.start(self._run_client, client)
            self.clients[index] = client

        with trio.fail_after(CONNECT_TIMEOUT_S + len(self.agents) * 0.05):
            async with trio.open_nursery() as connecting:
                for index in self.agents:
                    connecting.start_soon(connect, index)

    async def _settle(self) -> None:
        """Until the events of connecting stop arriving (or SETTLE_LIMIT_S passed).

        The generator's sessions do not ask for presence, but connects still
        produce events (observers, webhooks) and presence commands; their tail
        must not overlap the measurement.
        """
        def events() -> int:
            return sum(c.events_dropped + c.events().statistics().current_buffer_used
                       for c in self.clients.values())

        with trio.move_on_after(SETTLE_LIMIT_S):
            seen = -1
            while (now := events()) != seen:
                seen = now
                await trio.sleep(SETTLE_QUIET_S)

    async def _run_client(self, client: BrokerClient, *,
                          task_status: trio.TaskStatus[None]) -> None:
        """The client's connection; once it is up, its failure is counted, not raised.

        (A server ping that arrives while the client closes makes the client's
        pong raise ConnectionLost out of `run`; that must not end the shard.)
        """
        started = False

        def report() -> None:
            nonlocal started
            started = True
            task_status.started()

        status = _Started(report)
        try:
            await client.run(task_status=status)
        except (ConnectionLost, OSError, trio.TooSlowError):
            if not started:
                raise
            if not self._closing:
                self._error("connection_lost")

    # -- sending ------------------------------------------------------------------------------

    async def _send_loop(self, sender: int) -> None:
        spec = self.spec
        client = self.clients[sender]
        quota = self.quota.get(sender)
        counter = iter(range(quota) if quota is not None else _count())
        self._acked[sender] = Bits()
        if spec.rate is None:
            async with trio.open_nursery() as window:
                for _ in range(spec.window):
                    window.start_soon(self._closed_loop, client, sender, counter)
            return
        # Open loop: every sender sends at rate/senders, phase-shifted so the
        # senders of the run do not fire together.
        interval = len(self.topology.senders()) / spec.rate
        slots = trio.Semaphore(spec.window)
        scheduled = self.result.started + interval * (
            self.topology.senders().index(sender) / len(self.topology.senders()))
        async with trio.open_nursery() as window:
            for n in counter:
                delay = scheduled - time.monotonic()
                if delay > 0:
                    await trio.sleep(delay)
                if scheduled >= self._stop_at:
                    break
                await slots.acquire()
                window.start_soon(self._send_one_released, client, sender, n, scheduled, slots)
                scheduled += interval

    async def _closed_loop(self, client: BrokerClient, sender: int, counter: Any) -> None:
        for n in counter:
            t0 = time.monotonic()
            if t0 >= self._stop_at:
                return
            await self._send_one(client, sender, n, t0)

    async def _send_one_released(self, client: BrokerClient, sender: int, n: int, t0: float,
                                 slots: trio.Semaphore) -> None:
        self.result.lateness.add(max(time.monotonic() - t0, 1e-6))
        try:
            await self._send_one(client, sender, n, t0)
        finally:
            slots.release()

    async def _send_one(self, client: BrokerClient, sender: int, n: int, t0: float) -> None:
        result = self.result
        topology = self.topology
        result.sends += 1
        result.sent_count[sender] = max(result.sent_count.get(sender, 0), n + 1)
        marker = {"lt": [sender, n, t0]}
        text = f"load {sender}:{n} ".ljust(self.spec.text_bytes, "x")
        try:
            if is_dm(n, self.spec.dm_share):
                partner = topology.agents[topology.partner(sender)].name
                data = await client.request("dm.send", to=partner, text=text, data=marker)
                message = data.get("message") if isinstance(data, dict) else None
            else:
                channel = topology.channel_name(topology.channel_of(sender))
                message = await client.request("message.send", channel=channel, text=text,
                                               data=marker)
        except RequestError as exc:
            self._error(exc.code)
            return
        except ConnectionLost:
            self._error("connection_lost")
            return
        except trio.TooSlowError:
            self._error("timeout")
            return
        now = time.monotonic()
        result.sends_acked += 1
        result.last_reply = now
        result.reply.add(now - t0)
        self._acked[sender].set(n)
        if isinstance(message, dict):
            for name in message.get("mailbox_full") or ():
                result.mailbox_full.append((sender, n, str(name)))

    def _error(self, code: str) -> None:
        self.result.errors[code] = self.result.errors.get(code, 0) + 1

    # -- receiving ----------------------------------------------------------------------------

    async def _consume(self, recipient: _Recipient) -> None:
        result = self.result
        async for delivery in recipient.client.deliveries():
            now = time.monotonic()
            if delivery.seq <= recipient.last_seq:
                result.out_of_order += 1
            recipient.last_seq = delivery.seq
            marker = _marker(delivery.data)
            if marker is None:
                result.foreign += 1
            else:
                sender, n, t0 = marker
                bits = recipient.received.get(sender)
                if bits is None:
                    bits = recipient.received[sender] = Bits()
                if bits.set(n):
                    result.deliveries += 1
                    result.deliver.add(now - t0)
                    result.last_delivery = now
                else:
                    result.duplicates += 1
            recipient.processed = delivery.seq

    async def _drain(self, recipient: _Recipient) -> None:
        """Until the broker holds no unacked delivery for this recipient."""
        client = recipient.client
        while True:
            try:
                if recipient.processed:
                    await client.ack(recipient.processed, wait=True)
                pending = await client.request("delivery.list", limit=1)
            except ConnectionLost:
                # The client reconnects and replays what is unacked; ask again then.
                self._error("drain_reconnect")
                await client.wait_connected()
                continue
            except trio.TooSlowError:
                self._error("drain_slow_reply")
                continue
            except RequestError as exc:
                self._error(f"drain_{exc.code}")
                return
            if not pending:
                return
            await trio.sleep(DRAIN_POLL_S)

    # -- progress -----------------------------------------------------------------------------

    async def _report_progress(self) -> None:
        while True:
            await trio.sleep(PROGRESS_INTERVAL_S)
            self._report()

    def _report(self) -> None:
        self.sync.progress(self.shard, self.result.sends_acked, self.result.deliveries)


class _Started:
    """A task status that calls `fn` when started (trio's own cannot be wrapped otherwise)."""

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn = fn

    def started(self, value: object = None) -> None:
        self.fn()


def _count() -> Any:
    n = 0
    while True:
        yield n
        n += 1


def _marker(data: Any) -> tuple[int, int, float] | None:
    if not isinstance(data, dict):
        return None
    inner = data.get("data")
    if not isinstance(inner, dict):
        message = data.get("message")
        inner = message.get("data") if isinstance(message, dict) else None
    marker = inner.get("lt") if isinstance(inner, dict) else None
    if not isinstance(marker, list) or len(marker) != 3:
        return None
    return int(marker[0]), int(marker[1]), float(marker[2])


def _process_cpu() -> float:
    times = os.times()
    return times.user + times.system


async def run_local(topology: Topology, url: str, mode: str,
                    report: Callable[[int, int, int], None] | None = None) -> list[ShardResult]:
    """Run one shard with every agent in the caller's trio loop (procs=0)."""
    return [await Shard(topology, url, mode, 0, 0, LocalSync(report)).run()]


# -- shards in processes ---------------------------------------------------------------------

_encoder = msgspec.msgpack.Encoder()


def shard_process(topology_bytes: bytes, url: str, mode: str, shard: int, procs: int,
                  barrier: Any, messages: Any) -> None:
    """The body of a shard process: run the shard, put its result (or traceback) on `messages`."""
    try:
        topology = msgspec.msgpack.decode(topology_bytes, type=Topology)
        settle_heap()  # the generator's own collector pauses would count as latency
        result = trio.run(
            Shard(topology, url, mode, shard, procs, ProcessSync(barrier, messages)).run)
        messages.put(("result", shard, _encoder.encode(result)))
    except BaseException:
        barrier.abort()
        messages.put(("error", shard, traceback.format_exc()))


class ShardProcesses:
    """Client processes spawned for one run, reporting on one queue; their results.

    Each process gets (its shard, the run's barrier, the queue) appended to
    `args(shard)` and puts ("progress", shard, sends, deliveries), ("result",
    shard, an encoded ShardResult) or ("error", shard, a traceback) on the
    queue. The broker's shards and a peer's clients are both run this way.
    """

    def __init__(self, name: str, target: Callable[..., None],
                 args: Callable[[int], tuple[Any, ...]], count: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.barrier = context.Barrier(count)
        self.messages = context.Queue()
        self.workers = [
            context.Process(target=target, name=f"{name}-{shard}",
                            args=(*args(shard), self.barrier, self.messages), daemon=True)
            for shard in range(count)
        ]
        self.results: dict[int, ShardResult] = {}
        self.failure: str | None = None

    def start(self) -> None:
        for worker in self.workers:
            worker.start()

    @property
    def waiting(self) -> bool:
        """Some process has not reported its result, and none has failed."""
        return len(self.results) < len(self.workers) and self.failure is None

    def take(self, item: tuple[Any, ...] | None,
             report: Callable[[int, int, int], None] | None) -> None:
        """One message from the queue; None: none came within PROGRESS_INTERVAL_S."""
        if item is None:
            dead = [w for w in self.workers if w.exitcode not in (None, 0)]
            if dead:
                self.failure = f"process {dead[0].name} died with {dead[0].exitcode}"
        elif item[0] == "progress":
            if report is not None:
                report(item[1], item[2], item[3])
        elif item[0] == "result":
            self.results[item[1]] = msgspec.msgpack.decode(item[2], type=ShardResult)
        elif item[0] == "error":
            self.failure = f"process {self.workers[item[1]].name} failed:\n{item[2]}"

    def stop(self) -> None:
        """Join every process (killing one that does not end), and close the queue."""
        for worker in self.workers:
            worker.join(timeout=10 if self.failure is None else 1)
            if worker.is_alive():
                worker.kill()
                worker.join()
        self.messages.close()

    def collected(self) -> list[ShardResult]:
        """The results in shard order. Raises RuntimeError with the failure, if one failed."""
        if self.failure is not None:
            raise RuntimeError(self.failure)
        return [self.results[shard] for shard in range(len(self.workers))]


async def run_processes(topology: Topology, url: str, mode: str, procs: int,
                        report: Callable[[int, int, int], None] | None = None,
                        ) -> list[ShardResult]:
    """Run `procs` shards, each in a spawned process; their results, in shard order.

    Raises RuntimeError with the shard's traceback when one fails.
    """
    encoded = _encoder.encode(topology)
    processes = ShardProcesses(f"loadtest-{mode}", shard_process,
                               lambda shard: (encoded, url, mode, shard, procs), procs)
    processes.start()
    try:
        while processes.waiting:
            try:
                item = await trio.to_thread.run_sync(
                    processes.messages.get, True, PROGRESS_INTERVAL_S, abandon_on_cancel=True)
            except queue_module.Empty:
                item = None
            processes.take(item, report)
    finally:
        processes.stop()
    return processes.collected()
