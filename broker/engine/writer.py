"""The writer actor: the only connection that writes, with group commit.

One task drains a bounded trio memory channel of commands. It takes the first
waiting command, then every command already queued (up to `max_batch`), and
applies the batch in one `BEGIN IMMEDIATE ... COMMIT` in a worker thread, so
the event loop never blocks on fsync. Batches form while the previous commit
runs; there is no artificial wait.

Failure isolation without a SAVEPOINT per command (which costs a large
share of the writer's throughput: BENCHMARKS.md, "Figures behind the
code"): a command validates by reading before it writes, so a domain error
usually leaves nothing to undo, and the writer can tell from
`total_changes()` whether the failing command changed any row. If it did,
the whole transaction is rolled back and replayed without the failed
command(s); the failed command is not retried and its caller gets its error.
Either way a failing command's writes are undone and the others commit.

If COMMIT fails, every command of the batch fails and nothing is
acknowledged. `submit` returns only after the COMMIT holding the command
returned (ack after durability). Facts produced by committed commands are
then published, in commit order, on the facts channel for the fanout.

Commit signals wake in-process consumers that watch a table rather than
the facts (the webhook dispatcher watches the outbox, the sweeper watches
for deleted workspaces): a command raises a named signal with
`tx.signal(name)`, and after the COMMIT holding it the writer calls every
callback registered with `on_commit(name, callback)`. Signals of a command
that failed, or of a batch whose COMMIT failed, are dropped with its writes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, NamedTuple, Protocol, TypeVar, cast

import apsw
import trio

from broker.engine.config import EngineConfig, Limits
from broker.engine.database import WriterLock, open_writer
from broker.engine.errors import BrokerError
from broker.engine.facts import Fact
from broker.engine.histogram import Histogram, HistogramSnapshot
from broker.engine.ids import IdAllocator
from protocol.objects import MESSAGE_EVENTS, iso

log = logging.getLogger(__name__)

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)

# Upper bounds of the batch-size histogram buckets (the last bucket is open).
BATCH_SIZE_BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# Upper bounds, in seconds, of the commit-latency histogram buckets.
COMMIT_LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)
# Tables whose largest id seeds the id allocator at start.
_ID_TABLES = (
    "workspaces", "agents", "channels", "conversations", "messages", "files",
    "message_log", "reactions", "webhook_subscriptions", "outbox",
)


# What Tx.read_once has not read yet (None and False are values it remembers).
_UNREAD = object()


class Tx:
    """What a command sees while it runs inside the writer's transaction.

    conn: the write connection (inside BEGIN IMMEDIATE).
    now_ms: the batch's wall-clock time, milliseconds since the epoch.
    """

    def __init__(self, conn: apsw.Connection, ids: IdAllocator, limits: Limits) -> None:
        self.conn = conn
        self.ids = ids
        self.limits = limits
        self.now_ms = 0
        self.facts: list[Fact] = []
        self.signals: set[str] = set()
        self._iso_ms = -1
        self._iso = ""
        self._reads: dict[Hashable, Any] = {}

    @property
    def now_iso(self) -> str:
        """now_ms as an ISO 8601 string, formatted once per batch."""
        if self._iso_ms != self.now_ms:
            self._iso_ms, self._iso = self.now_ms, iso(self.now_ms) or ""
        return self._iso

    def new_id(self) -> int:
        return self.ids.next()

    def read_once(self, key: Hashable, read: Callable[[], T]) -> T:
        """`read()`, remembered under `key` while only commands that keep the topology run.

        For the reads every send repeats (its author, its channel with the
        author's membership, the channel's recipients, whether its workspace
        has webhook subscriptions): a batch of sends to one channel reads
        them once. The writer forgets every remembered read at each BEGIN (a
        replayed batch reads again) and after every command whose class does
        not declare `keeps_topology = True` (one that could change agents,
        channels, memberships or subscriptions), so a read is never older
        than the last write that could change it. A read that raises is not
        remembered. The value is shared: callers must not mutate it.
        """
        value = self._reads.get(key, _UNREAD)
        if value is _UNREAD:
            value = self._reads[key] = read()
        return value  # type: ignore[no-any-return]

    def forget_reads(self) -> None:
        self._reads.clear()

    def emit(self, fact: Fact) -> None:
        """Publish `fact` after COMMIT, if this command's writes are committed."""
        self.facts.append(fact)

    def signal(self, name: str) -> None:
        """Call the writer's `on_commit(name, ...)` callbacks after COMMIT, if this
        command's writes are committed (once per batch, however often raised)."""
        self.signals.add(name)


class Command(Protocol[T_co]):
    """A write: everything it does in `apply` commits or rolls back as one.

    A command class may declare `keeps_topology = True`: it never changes
    agents, channels, memberships or webhook subscriptions, so the reads
    `Tx.read_once` remembered before it stay valid after it (the send paths,
    the receipts).
    """

    def apply(self, tx: Tx) -> T_co: ...


class Maintenance(Generic[T]):
    """A writer job that must run alone, outside any transaction.

    `PRAGMA wal_checkpoint` and `PRAGMA optimize` cannot run inside
    BEGIN ... COMMIT; subclasses implement `run(conn)`, and the writer runs
    them between batches on its own connection.
    """

    def run(self, conn: apsw.Connection) -> T:
        raise NotImplementedError

    def apply(self, tx: Tx) -> T:
        return self.run(tx.conn)


class _Pending(Generic[T]):
    __slots__ = ("command", "done", "result", "error", "facts", "signals", "submitted")

    def __init__(self, command: Command[T]) -> None:
        self.command = command
        self.submitted = time.perf_counter()
        self.done = trio.Event()
        self.result: T | None = None
        self.error: BaseException | None = None
        self.facts: list[Fact] = []
        self.signals: set[str] = set()


@dataclass(frozen=True)
class WriterStatistics:
    """What `WriterActor.statistics()` returns: the writer's figures as of the call.

    running: the actor is taking commands. queue_depth: commands waiting in
    its channel; queue_size: the channel's bound; tasks_waiting_send:
    callers blocked because it is full. batches, commands: committed so
    far; failed_commands: commands that raised (their writes undone);
    failed_commits: batches whose COMMIT failed; replays: transactions
    rolled back and applied again without a failed command. messages:
    messages committed (channel messages, thread replies, DMs, group DMs);
    deliveries: durable delivery rows committed.
    mean_batch_size: commands per batch. batch_sizes: that distribution.
    commit_latency: seconds per batch from the event loop; queue_wait:
    seconds a command waited for its batch; apply_time and sync_time:
    seconds per batch in its commands and in its COMMIT, with the writer
    thread's CPU seconds in each stage summed in apply_cpu_seconds and
    sync_cpu_seconds.
    """

    running: bool
    queue_depth: int
    queue_size: float
    tasks_waiting_send: int
    batches: int
    commands: int
    failed_commands: int
    failed_commits: int
    replays: int
    messages: int
    deliveries: int
    mean_batch_size: float
    batch_sizes: HistogramSnapshot
    commit_latency: HistogramSnapshot
    queue_wait: HistogramSnapshot
    apply_time: HistogramSnapshot
    sync_time: HistogramSnapshot
    apply_cpu_seconds: float
    sync_cpu_seconds: float


class _BatchTimes(NamedTuple):
    """Seconds one batch took in the writer thread: wall clock, and the thread's own CPU."""

    apply: float
    sync: float
    apply_cpu: float
    sync_cpu: float


class _OwnThread:
    """The writer's thread limiter: one thread at a time, taken without a schedule point.

    The writer task runs one batch at a time, so it never has two threads to
    limit; `trio.CapacityLimiter.acquire_on_behalf_of` would yield to every
    runnable task before the thread starts, with the writer thread idle
    meanwhile (BENCHMARKS.md, Tuning, session 11).
    """

    def __init__(self) -> None:
        self._borrower: object | None = None

    async def acquire_on_behalf_of(self, borrower: object) -> None:
        if self._borrower is not None:
            raise RuntimeError("the writer runs one thread at a time")
        self._borrower = borrower

    def release_on_behalf_of(self, borrower: object) -> None:
        if self._borrower is not borrower:
            raise RuntimeError("the writer's thread is not held by this borrower")
        self._borrower = None


def _wall_clock() -> float:
    # time.time looked up at each call, as a bare `time.time()` would be.
    return time.time()


class WriterActor:
    """The single writing connection and the task that owns it.

    Start it with `await nursery.start(writer.run)`; stop it with `aclose()`,
    which lets every queued command commit first.
    """

    def __init__(
        self,
        db_path: Path,
        config: EngineConfig | None = None,
        *,
        facts: trio.MemorySendChannel[list[Fact]] | None = None,
    ) -> None:
        self.db_path = db_path
        self.config = config or EngineConfig()
        self._facts = facts
        self._send, self._receive = trio.open_memory_channel[_Pending[Any]](
            self.config.queue_size
        )
        self._conn: apsw.Connection | None = None
        self._lock: WriterLock | None = None
        self._tx: Tx | None = None
        self._running = False
        # Its own thread token: a commit never waits for trio's default
        # limiter, which readers' and file uploads' threads also draw from.
        # (A "CapacityLimiter-like object", as trio.to_thread.run_sync documents
        # its `limiter`; its annotation names only the class.)
        self._thread = cast(trio.CapacityLimiter, _OwnThread())
        self._on_commit: dict[str, list[Callable[[], None]]] = {}
        # The wall clock each batch's `tx.now_ms` and new ids come from; tests
        # that need timestamps to move (or stand still) replace it.
        self.clock: Callable[[], float] = _wall_clock
        self.batches = 0
        self.commands = 0
        self.failed_commands = 0
        self.failed_commits = 0
        self.replays = 0
        # Committed messages (channel, thread, DM, group DM) and the durable
        # deliveries written for them: the console's sends/s and deliveries/s.
        self.messages = 0
        self.deliveries = 0
        self.batch_sizes = Histogram(BATCH_SIZE_BUCKETS)
        self.commit_latency = Histogram(COMMIT_LATENCY_BUCKETS)
        # Where a command's time goes: waiting in the queue for its batch,
        # then the batch's statements, then its COMMIT (the fsync).
        self.queue_wait = Histogram(COMMIT_LATENCY_BUCKETS)
        self.apply_time = Histogram(COMMIT_LATENCY_BUCKETS)
        self.sync_time = Histogram(COMMIT_LATENCY_BUCKETS)
        # The writer thread's CPU time in the same two stages, summed: what
        # apply and sync took beyond it, the thread spent not running
        # (waiting for the GIL, which the event loop holds, for a core or
        # for the disk).
        self.apply_cpu_seconds = 0.0
        self.sync_cpu_seconds = 0.0

    # -- lifecycle ---------------------------------------------------------

    def open(self) -> None:
        """Open, lock and migrate the file (done by `run` if not done before)."""
        if self._conn is not None:
            return
        conn, lock = open_writer(self.db_path, self.config)
        # Ids carry their millisecond: from the same clock as `tx.now_ms`.
        ids = IdAllocator(floor=_largest_id(conn), clock=lambda: self.clock())
        self._conn, self._lock = conn, lock
        self._tx = Tx(conn, ids, self.config.limits)

    @property
    def connection(self) -> apsw.Connection:
        """The write connection, for diagnostics and fault-injection tests only."""
        if self._conn is None:
            raise RuntimeError("writer is not open")
        return self._conn

    @property
    def running(self) -> bool:
        return self._running

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Apply batches until `aclose()` and the queue is drained; then close the file."""
        self.open()
        try:
            async with self._receive:
                self._running = True
                task_status.started()
                log.info("writer %s: running", self.db_path)
                held: _Pending[Any] | None = None
                while True:
                    if held is not None:
                        first, held = held, None
                    else:
                        try:
                            # What queued during the last batch starts at once:
                            # `receive` would first let every task woken by
                            # that batch run, with the writer thread idle.
                            first = self._receive.receive_nowait()
                        except trio.WouldBlock:
                            try:
                                first = await self._receive.receive()
                            except trio.EndOfChannel:
                                break
                        except trio.EndOfChannel:
                            break
                    if isinstance(first.command, Maintenance):
                        await self._run_alone(first)
                        continue
                    batch = [first]
                    while len(batch) < self.config.max_batch:
                        try:
                            pending = self._receive.receive_nowait()
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break
                        if isinstance(pending.command, Maintenance):
                            held = pending  # runs alone, right after this batch
                            break
                        batch.append(pending)
                    await self._run_batch(batch)
        finally:
            self._running = False
            self._close()

    async def aclose(self) -> None:
        """Stop taking commands; `run` returns once the queued ones have committed."""
        await self._send.aclose()

    def _close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.execute("pragma wal_checkpoint(TRUNCATE)")
            except apsw.Error:
                log.warning("writer %s: checkpoint at close failed", self.db_path, exc_info=True)
            self._conn.close()
            self._conn = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def on_commit(self, name: str, callback: Callable[[], None]) -> Callable[[], None]:
        """Call `callback()` after every COMMIT that holds a command raising signal `name`.

        The callback runs on the event loop, right after the commit and
        before the batch's facts are published; it must not block (set an
        event, nothing more). Returns a function that unregisters it.
        """
        callbacks = self._on_commit.setdefault(name, [])
        callbacks.append(callback)

        def remove() -> None:
            if callback in callbacks:
                callbacks.remove(callback)

        return remove

    # -- submitting ----------------------------------------------------------

    async def submit(self, command: Command[T]) -> T:
        """Run `command` in the next transaction; return its result once it is durable.

        Cancellation does not withdraw a command: once it is in the queue it
        is applied and committed even if the caller is cancelled while
        waiting (its result or error is then dropped). Only a caller
        cancelled while the queue is full, before the command got in, sends
        nothing. A caller that must know the outcome retries with an
        idempotency key, or reads the rows back.

        Raises the command's own exception (a BrokerError for refused input),
        or BrokerError("commit_failed") when the batch could not be committed,
        or BrokerError("shutting_down") once the writer is closing.

        A command with a `prepare(limits)` method (messages.Send) has it called
        here, in the caller's task, and the command it returns is the one
        applied: checks that need no transaction run outside the writer
        thread, and input they refuse never enters the queue.
        """
        prepare = getattr(command, "prepare", None)
        if prepare is not None:
            command = prepare(self.config.limits)
        pending: _Pending[T] = _Pending(command)
        # A cancelled caller sends nothing, as `send` would refuse it; with
        # room in the queue the command goes in without a trip through the
        # scheduler (`send` yields even then): `done.wait()` below is this
        # call's schedule point, one per command instead of two.
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            try:
                self._send.send_nowait(pending)
            except trio.WouldBlock:
                await self._send.send(pending)
        except trio.ClosedResourceError:
            raise BrokerError("shutting_down", "the broker is shutting down") from None
        except trio.BrokenResourceError:
            # the writer task has died; the daemon is on its way out
            raise BrokerError("writer_failed", "the writer has stopped") from None
        await pending.done.wait()
        if pending.error is not None:
            raise pending.error
        return pending.result  # type: ignore[return-value]

    # -- applying --------------------------------------------------------------

    async def _run_batch(self, batch: list[_Pending[Any]]) -> None:
        started = time.perf_counter()
        for pending in batch:
            self.queue_wait.observe(started - pending.submitted)
        try:
            times = await trio.to_thread.run_sync(
                self._apply_batch, batch, limiter=self._thread)
        except BaseException as exc:
            # The writer is dying (the daemon exits and systemd restarts it);
            # nobody in this batch may wait forever or believe it committed.
            for pending in batch:
                pending.error = BrokerError("writer_failed", f"the writer stopped: {exc!r}")
                pending.done.set()
            raise
        self.commit_latency.observe(time.perf_counter() - started)
        self.apply_time.observe(times.apply)
        self.sync_time.observe(times.sync)
        self.apply_cpu_seconds += times.apply_cpu
        self.sync_cpu_seconds += times.sync_cpu
        self.batches += 1
        self.commands += len(batch)
        self.batch_sizes.observe(len(batch))
        facts: list[Fact] = []
        signals: set[str] = set()
        for pending in batch:
            if pending.error is None:
                facts.extend(pending.facts)
                signals |= pending.signals
            else:
                self.failed_commands += 1
            pending.done.set()
        for fact in facts:
            self.deliveries += len(fact.deliveries)
            if fact.type in MESSAGE_EVENTS:
                self.messages += 1
        for name in sorted(signals):
            for callback in tuple(self._on_commit.get(name, ())):
                callback()
        if facts and self._facts is not None:
            try:
                self._facts.send_nowait(facts)  # no scheduling round while there is room
            except trio.WouldBlock:
                await self._facts.send(facts)

    async def _run_alone(self, pending: _Pending[Any]) -> None:
        job = pending.command
        assert isinstance(job, Maintenance)
        try:
            pending.result = await trio.to_thread.run_sync(
                job.run, self.connection, limiter=self._thread)
        except Exception as exc:
            pending.error = exc
        finally:
            pending.done.set()

    def _apply_batch(self, batch: list[_Pending[Any]]) -> _BatchTimes:
        """In the worker thread: one transaction for the whole batch.

        Returns the seconds spent applying the commands and in COMMIT, by
        the clock and in this thread's CPU.
        """
        conn, tx = self.connection, self._tx
        assert tx is not None
        started, started_cpu = time.perf_counter(), time.thread_time()
        tx.now_ms = int(self.clock() * 1000)
        excluded: set[int] = set()
        while True:
            tx.forget_reads()
            conn.execute("BEGIN IMMEDIATE")
            try:
                if self._apply_all(conn, tx, batch, excluded):
                    break
            except BaseException:
                if not conn.get_autocommit():
                    conn.execute("ROLLBACK")
                raise
            # A failed command had written rows, or SQLite itself ended the
            # transaction (an I/O error, a full disk, OR ROLLBACK): undo
            # what is left and replay the others.
            if not conn.get_autocommit():
                conn.execute("ROLLBACK")
            self.replays += 1
        applied, applied_cpu = time.perf_counter(), time.thread_time()
        try:
            conn.execute("COMMIT")
        except apsw.Error as exc:
            self.failed_commits += 1
            log.error("writer %s: COMMIT failed, batch of %d refused: %s",
                      self.db_path, len(batch), exc)
            if not conn.get_autocommit():
                conn.execute("ROLLBACK")
            for pending in batch:
                pending.result, pending.facts, pending.signals = None, [], set()
                pending.error = BrokerError(
                    "commit_failed", f"the transaction could not be committed: {exc}"
                )
        return _BatchTimes(applied - started, time.perf_counter() - applied,
                           applied_cpu - started_cpu, time.thread_time() - applied_cpu)

    @staticmethod
    def _apply_all(
        conn: apsw.Connection, tx: Tx, batch: list[_Pending[Any]], excluded: set[int]
    ) -> bool:
        """Apply every command not excluded; False if a failure left writes to undo."""
        for index, pending in enumerate(batch):
            if index in excluded:
                continue
            before = conn.total_changes()
            tx.facts, tx.signals = [], set()
            try:
                pending.result = pending.command.apply(tx)
            except Exception as exc:
                pending.result, pending.facts, pending.error = None, [], exc
                pending.signals = set()
                excluded.add(index)
                if conn.total_changes() != before or conn.get_autocommit():
                    return False
                continue
            finally:
                # What the batch read may be stale after a command that could
                # change agents, channels, memberships or subscriptions
                # (Tx.read_once).
                if not getattr(pending.command, "keeps_topology", False):
                    tx.forget_reads()
            pending.error = None
            pending.facts, pending.signals = tx.facts, tx.signals
        return True

    # -- reporting -------------------------------------------------------------

    def statistics(self) -> WriterStatistics:
        """Queue depth, batches, commands, batch sizes, commit latency and its stages so far.

        A frozen snapshot: every figure, the histograms' counts included, is
        copied as of this call.
        """
        stats = self._send.statistics()
        return WriterStatistics(
            running=self._running,
            queue_depth=stats.current_buffer_used,
            queue_size=stats.max_buffer_size,
            tasks_waiting_send=stats.tasks_waiting_send,
            batches=self.batches,
            commands=self.commands,
            failed_commands=self.failed_commands,
            failed_commits=self.failed_commits,
            replays=self.replays,
            messages=self.messages,
            deliveries=self.deliveries,
            mean_batch_size=self.batch_sizes.mean,
            batch_sizes=self.batch_sizes.snapshot(),
            commit_latency=self.commit_latency.snapshot(),
            queue_wait=self.queue_wait.snapshot(),
            apply_time=self.apply_time.snapshot(),
            sync_time=self.sync_time.snapshot(),
            apply_cpu_seconds=self.apply_cpu_seconds,
            sync_cpu_seconds=self.sync_cpu_seconds,
        )


def _largest_id(conn: apsw.Connection) -> int:
    largest = 0
    for table in _ID_TABLES:
        row = conn.execute(f"SELECT max(id) FROM {table}").fetchone()
        if row is not None and row[0] is not None:
            largest = max(largest, int(row[0]))
    return largest
