"""Acks and delivery marks, coalesced into one writer command per flush.

Clients ack often (the Relaycast SDK acks every single delivery) and the
pump marks every frame it pushes; one writer command per frame, or even per
agent, would spend the writer on bookkeeping. The recorder is an actor:
sessions hand it acks and marks without waiting (`ack_nowait`,
`delivered`), and its one task turns everything that is due into one
`RecordReceipts` command per flush (per AGENTS_PER_COMMAND agents),
holding each agent's marks and its highest cumulative ack (acks are
cumulative: the highest wins). While a
flush commits, the next one accumulates, so the batching adapts to the
load.

The fold: an ordinary push is marked `delivered` and, moments later, the
client acks it; written apart, the row is rewritten twice. So the mark of an
ordinary push waits up to FOLD_WINDOW_S for the agent's ack: when the ack
comes in time, one statement marks and acks the row (attempts + 1,
delivered_at and acked_at set). Once the window has passed the marks are
written, with the agent's ack if one is held (not yet due), else alone.
Marks of held deliveries pushed again (`redelivery`) do not wait: they go
out with the next flush, before that agent's ack in the same command, so
that the ack finds them delivered (a held row is settled by a cumulative
ack only once its push is marked; see `broker.engine.mailbox`).

An ack nobody waits for (`ack_nowait`) is held up to ACK_DELAY_S: a busy
agent acks every few milliseconds, and its cumulative acks of that time
cost one write. A session that must answer an ack (`delivery.ack` with an
`id`) awaits `ack`, which is written with the next flush and returns once
it has committed. One agent's refusal (agent_not_found after a
deactivation) fails that agent's waiters only; the command commits the
others.

Memory: pending marks grow with the pushes of one fold window plus one
commit latency, bounded by what the sockets can take in that time.
"""

from __future__ import annotations

import logging
import math
import time

import msgspec
import trio

from broker.engine.engine import Engine
from broker.engine.errors import BrokerError
from broker.engine.mailbox import AgentReceipts, RecordReceipts
from protocol.objects import AckResult

log = logging.getLogger(__name__)


# How long the mark of an ordinary push waits for the agent's ack, to be
# written with it in one statement. The Python client acks every 200 ms at
# most, the Relaycast SDK every delivery.
FOLD_WINDOW_S = 0.25
# How long an agent's cumulative ack nobody waits for is held, so that the
# acks that follow it (cumulative: the highest wins) cost one write.
ACK_DELAY_S = 0.1
# Agents per RecordReceipts command: bounds one transaction, and what one
# unexpected failure takes with it.
AGENTS_PER_COMMAND = 500


class _Waiter:
    __slots__ = ("done", "result", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: AckResult | None = None
        self.error: BaseException | None = None


class _Agent:
    """What one agent's sessions did since its receipts were last written."""

    __slots__ = ("workspace_id", "pushed", "pushed_since", "pushed_again", "up_to_seq",
                 "ack_since", "waiters")

    def __init__(self, workspace_id: int) -> None:
        self.workspace_id = workspace_id
        self.pushed: list[int] = []  # ordinary pushes not marked yet
        self.pushed_since = 0.0  # trio time of the oldest of them
        self.pushed_again: dict[int, int] = {}  # seq -> its latest push time (epoch ms)
        self.up_to_seq: int | None = None
        self.ack_since = 0.0  # trio time of the oldest ack not written yet
        self.waiters: list[_Waiter] = []

    @property
    def empty(self) -> bool:
        return not self.pushed and not self.pushed_again and self.up_to_seq is None


class RecorderStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of the recorder (`DeliveryRecorder.statistics()`); counts since start.

    acks_received: cumulative acks taken from sessions;
    marks_received: pushes (ordinary and again) taken from sessions;
    flushes: flushes run;
    commands: RecordReceipts commands submitted (one per flush with something due,
    more for a flush of over AGENTS_PER_COMMAND agents);
    marks_folded: ordinary pushes written together with an ack covering them
    (the database folds those still pending);
    failures: commands that failed;
    pending_acks: agents with an ack not written yet (now);
    pending_marks: pushes not written yet (now).
    """

    acks_received: int
    marks_received: int
    flushes: int
    commands: int
    marks_folded: int
    failures: int
    pending_acks: int
    pending_marks: int


class DeliveryRecorder:
    """Start with `await nursery.start(recorder.run)`; `aclose()` flushes and stops it."""

    def __init__(self, engine: Engine, fold_window: float = FOLD_WINDOW_S,
                 ack_delay: float = ACK_DELAY_S) -> None:
        self.engine = engine
        self.fold_window = fold_window
        self.ack_delay = ack_delay
        self._agents: dict[int, _Agent] = {}
        self._next_due = math.inf  # when the oldest waiting mark must be written
        self._wake = trio.Event()
        self._committing = 0  # flushes whose commands are in flight
        self._committed = trio.Event()  # set once none is in flight any more
        self._closed = False
        self.acks_received = 0
        self.marks_received = 0
        self.flushes = 0
        self.commands = 0
        self.marks_folded = 0
        self.failures = 0

    # -- producers ---------------------------------------------------------------------

    def ack_nowait(self, workspace_id: int, agent_id: int, up_to_seq: int) -> None:
        """Record a cumulative ack; it is committed within ACK_DELAY_S."""
        self._ack(workspace_id, agent_id, up_to_seq)

    async def ack(self, workspace_id: int, agent_id: int, up_to_seq: int) -> AckResult:
        """Record a cumulative ack and wait until it is durable.

        Raises the BrokerError the ack got (agent_not_found, invalid_seq),
        or BrokerError("shutting_down") when the recorder is stopping.
        """
        if self._closed:
            raise BrokerError("shutting_down", "the broker is shutting down")
        waiter = _Waiter()
        self._ack(workspace_id, agent_id, up_to_seq).waiters.append(waiter)
        self._wake.set()  # somebody waits: written with the next flush
        await waiter.done.wait()
        if waiter.error is not None:
            raise waiter.error
        assert waiter.result is not None
        return waiter.result

    def _ack(self, workspace_id: int, agent_id: int, up_to_seq: int) -> _Agent:
        self.acks_received += 1
        agent = self._agent(workspace_id, agent_id)
        if agent.up_to_seq is None:
            agent.up_to_seq = up_to_seq
            agent.ack_since = trio.current_time()
            self._due(agent.ack_since + self.ack_delay)
        elif up_to_seq > agent.up_to_seq:
            agent.up_to_seq = up_to_seq
        return agent

    def delivered(self, workspace_id: int, agent_id: int, seq: int,
                  redelivery: bool = False, pushed_at: int | None = None) -> None:
        """Record that a delivery was pushed (state delivered, one more attempt).

        redelivery: a held delivery pushed again; its mark is not held back,
        and carries `pushed_at` (epoch ms, default now): a held row failed or
        deferred at or after it is left held (a late mark).
        """
        self.marks_received += 1
        agent = self._agent(workspace_id, agent_id)
        if redelivery:
            at = int(time.time() * 1000) if pushed_at is None else pushed_at
            agent.pushed_again[seq] = max(at, agent.pushed_again.get(seq, 0))
            self._wake.set()
            return
        if not agent.pushed:
            agent.pushed_since = trio.current_time()
            self._due(agent.pushed_since + self.fold_window)
        agent.pushed.append(seq)

    def _due(self, when: float) -> None:
        """Something must be written at `when`: wake the actor if it sleeps longer."""
        if when < self._next_due:
            self._next_due = when
            self._wake.set()

    def _agent(self, workspace_id: int, agent_id: int) -> _Agent:
        agent = self._agents.get(agent_id)
        if agent is None:
            agent = self._agents[agent_id] = _Agent(workspace_id)
        return agent

    # -- the actor -----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Flush whenever something is due, until `aclose()`; then flush everything."""
        task_status.started()
        while True:
            with trio.move_on_at(self._next_due):
                await self._wake.wait()
            self._wake = trio.Event()
            await self._flush_once(everything=self._closed)
            if self._closed and not self._agents:
                break

    async def flush(self) -> None:
        """Commit everything recorded so far, marks still waiting for an ack too.

        (Used at shutdown and by tests.)
        """
        while self._agents or self._committing:
            if self._agents:
                await self._flush_once(everything=True)
            else:
                # `run` took the rest and its commit is in flight: wait for it.
                await self._committed.wait()

    async def aclose(self) -> None:
        """Stop taking acks that wait; `run` returns after a last flush."""
        self._closed = True
        self._wake.set()

    async def _flush_once(self, everything: bool) -> None:
        """Write what is due: acks waited for or held long enough, pushes again, and
        ordinary marks covered by an ack written now or past the fold window."""
        now = trio.current_time()
        entries: list[AgentReceipts] = []
        waiters: list[list[_Waiter]] = []
        next_due = math.inf
        for agent_id, agent in list(self._agents.items()):
            marks_due = bool(agent.pushed) and (
                everything or agent.pushed_since + self.fold_window <= now)
            up_to = agent.up_to_seq
            if up_to is not None and not (
                everything or agent.waiters or marks_due
                or agent.ack_since + self.ack_delay <= now
            ):
                up_to = None  # not due yet (marks going out take a held ack along)
            pushed: list[int] = []
            if agent.pushed:
                if marks_due:
                    pushed, agent.pushed = agent.pushed, []
                elif up_to is not None:
                    pushed = [seq for seq in agent.pushed if seq <= up_to]
                    if pushed:
                        agent.pushed = [seq for seq in agent.pushed if seq > up_to]
            if pushed or agent.pushed_again or up_to is not None:
                if up_to is not None:
                    self.marks_folded += sum(1 for seq in pushed if seq <= up_to)
                entries.append(AgentReceipts(
                    workspace_id=agent.workspace_id, agent_id=agent_id,
                    pushed=sorted(set(pushed)), pushed_again=sorted(agent.pushed_again.items()),
                    up_to_seq=up_to))
                agent.pushed_again = {}
                if up_to is None:
                    waiters.append([])
                else:
                    waiters.append(agent.waiters)
                    agent.up_to_seq, agent.waiters = None, []
            if agent.pushed:
                next_due = min(next_due, agent.pushed_since + self.fold_window)
            if agent.up_to_seq is not None:
                next_due = min(next_due, agent.ack_since + self.ack_delay)
            elif agent.empty:
                del self._agents[agent_id]
        self._next_due = next_due
        self.flushes += 1
        if not entries:
            return
        if not self._committing:
            self._committed = trio.Event()
        self._committing += 1
        try:
            async with trio.open_nursery() as nursery:
                for start in range(0, len(entries), AGENTS_PER_COMMAND):
                    end = start + AGENTS_PER_COMMAND
                    nursery.start_soon(self._commit, entries[start:end], waiters[start:end])
        finally:
            self._committing -= 1
            if not self._committing:
                self._committed.set()

    async def _commit(self, entries: list[AgentReceipts], waiters: list[list[_Waiter]]) -> None:
        self.commands += 1
        results: list[AckResult | BrokerError | None]
        try:
            results = await self.engine.submit(RecordReceipts(tuple(entries)))
        except BrokerError as exc:
            # The broker is stopping (or the writer died): the marks are lost,
            # which only means attempts not counted; unacked rows come again.
            self.failures += 1
            log.info("recorder: receipts of %d agents refused: %s", len(entries), exc)
            results = [exc] * len(entries)
        except Exception as exc:
            self.failures += 1
            log.exception("recorder: receipts of %d agents failed: %r", len(entries), exc)
            results = [BrokerError("internal_error", "the ack could not be recorded")
                       ] * len(entries)
        for entry, result, agent_waiters in zip(entries, results, waiters, strict=True):
            if isinstance(result, BrokerError):
                log.info("recorder: receipts of agent %d refused: %s", entry.agent_id, result)
                for waiter in agent_waiters:
                    waiter.error = result
                    waiter.done.set()
            else:
                for waiter in agent_waiters:
                    waiter.result = result
                    waiter.done.set()

    def statistics(self) -> RecorderStatistics:
        """Counts since start."""
        return RecorderStatistics(
            acks_received=self.acks_received, marks_received=self.marks_received,
            flushes=self.flushes, commands=self.commands, marks_folded=self.marks_folded,
            failures=self.failures,
            pending_acks=sum(1 for a in self._agents.values() if a.up_to_seq is not None),
            pending_marks=sum(len(a.pushed) + len(a.pushed_again)
                              for a in self._agents.values()),
        )
