"""Acks and delivery marks, coalesced into few writer commands.

Clients ack often (the Relaycast SDK acks every single delivery) and the
pump marks every frame it pushes; one writer command per frame would spend
the writer on bookkeeping. The recorder is an actor: sessions hand it acks
and marks without waiting (`ack_nowait`, `delivered`), and its one task
turns everything that accumulated since the last flush into one `AckUpTo`
per agent (the highest `up_to_seq` wins: acks are cumulative) and one
`MarkDelivered` per agent and chunk of seqs, all submitted at once so the
writer commits them in one group. While a flush commits, the next one
accumulates, so the batching adapts to the load with no timer.

A session that must answer an ack (`delivery.ack` with an `id`) awaits
`ack`, which returns once the flush holding it has committed.

An agent with both marks and an ack in one flush gets them as one command,
the marks first (`MarksThenAck`). The client acks only what it received,
so the marks of those pushes are in this flush or an earlier one; applied
in that order, the ack always finds them. It matters for a delivery the
agent gave back (failed or deferred) and that was pushed again: a
cumulative ack settles it only once its push is marked, and two commands
of one flush commit in no particular order.

Memory: pending marks grow with the pushes that happen during one flush;
that is bounded by what sockets can take in one commit latency.
"""

from __future__ import annotations

import logging

import msgspec
import trio

from broker.engine.engine import Engine
from broker.engine.errors import BrokerError
from broker.engine.mailbox import MAX_MARK, AckUpTo, MarkDelivered
from broker.engine.writer import Tx
from protocol.objects import AckResult

log = logging.getLogger(__name__)


class _Waiter:
    __slots__ = ("done", "result", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: AckResult | None = None
        self.error: BaseException | None = None


class _PendingAck:
    __slots__ = ("workspace_id", "up_to_seq", "waiters")

    def __init__(self, workspace_id: int, up_to_seq: int) -> None:
        self.workspace_id = workspace_id
        self.up_to_seq = up_to_seq
        self.waiters: list[_Waiter] = []


class MarksThenAck(msgspec.Struct, frozen=True, kw_only=True):
    """One agent's push marks, then its cumulative ack, in one transaction (in that order)."""

    marks: tuple[MarkDelivered, ...]
    ack: AckUpTo

    def apply(self, tx: Tx) -> AckResult:
        for mark in self.marks:
            mark.apply(tx)
        return self.ack.apply(tx)


class RecorderStatistics(msgspec.Struct, kw_only=True):
    acks_received: int
    ack_commands: int
    marks_received: int
    mark_commands: int
    flushes: int
    failures: int
    pending_acks: int
    pending_marks: int


class DeliveryRecorder:
    """Start with `await nursery.start(recorder.run)`; `aclose()` flushes and stops it."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._acks: dict[int, _PendingAck] = {}
        self._marks: dict[int, tuple[int, list[int]]] = {}
        self._wake = trio.Event()
        self._closed = False
        self.acks_received = 0
        self.ack_commands = 0
        self.marks_received = 0
        self.mark_commands = 0
        self.flushes = 0
        self.failures = 0

    # -- producers ---------------------------------------------------------------------

    def ack_nowait(self, workspace_id: int, agent_id: int, up_to_seq: int) -> None:
        """Record a cumulative ack; it is committed with the next flush."""
        self._ack(workspace_id, agent_id, up_to_seq)

    async def ack(self, workspace_id: int, agent_id: int, up_to_seq: int) -> AckResult:
        """Record a cumulative ack and wait until it is durable.

        Raises the BrokerError of the AckUpTo command (agent_not_found, ...),
        or BrokerError("shutting_down") when the recorder is stopping.
        """
        if self._closed:
            raise BrokerError("shutting_down", "the broker is shutting down")
        waiter = _Waiter()
        self._ack(workspace_id, agent_id, up_to_seq).waiters.append(waiter)
        await waiter.done.wait()
        if waiter.error is not None:
            raise waiter.error
        assert waiter.result is not None
        return waiter.result

    def _ack(self, workspace_id: int, agent_id: int, up_to_seq: int) -> _PendingAck:
        self.acks_received += 1
        pending = self._acks.get(agent_id)
        if pending is None:
            pending = self._acks[agent_id] = _PendingAck(workspace_id, up_to_seq)
        elif up_to_seq > pending.up_to_seq:
            pending.up_to_seq = up_to_seq
        self._wake.set()
        return pending

    def delivered(self, workspace_id: int, agent_id: int, seq: int) -> None:
        """Record that a delivery was pushed (state delivered, one more attempt)."""
        self.marks_received += 1
        entry = self._marks.get(agent_id)
        if entry is None:
            self._marks[agent_id] = (workspace_id, [seq])
        else:
            entry[1].append(seq)
        self._wake.set()

    # -- the actor -----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Flush whenever something is pending, until `aclose()`; then flush what is left."""
        task_status.started()
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            if self._acks or self._marks:
                await self._flush_once()
            if self._closed and not (self._acks or self._marks):
                break

    async def flush(self) -> None:
        """Commit everything recorded so far (used at shutdown and by tests)."""
        while self._acks or self._marks:
            await self._flush_once()

    async def aclose(self) -> None:
        """Stop taking acks that wait; `run` returns after a last flush."""
        self._closed = True
        self._wake.set()

    async def _flush_once(self) -> None:
        acks, self._acks = self._acks, {}
        marks, self._marks = self._marks, {}
        self.flushes += 1
        async with trio.open_nursery() as nursery:
            for agent_id, pending in acks.items():
                entry = marks.pop(agent_id, None)
                chunks = [] if entry is None else _chunks(entry[1])
                nursery.start_soon(self._commit_ack, agent_id, pending, chunks)
            for agent_id, (workspace_id, seqs) in marks.items():
                for chunk in _chunks(seqs):
                    nursery.start_soon(self._commit_marks, workspace_id, agent_id, chunk)

    async def _commit_ack(self, agent_id: int, pending: _PendingAck,
                          marks: list[list[int]]) -> None:
        """The ack, after the agent's marks of this flush (one command when there are some)."""
        self.ack_commands += 1
        self.mark_commands += len(marks)
        result: AckResult | None = None
        error: BaseException | None = None
        ack = AckUpTo(workspace_id=pending.workspace_id, agent_id=agent_id,
                      up_to_seq=pending.up_to_seq)
        try:
            if marks:
                result = await self.engine.submit(MarksThenAck(
                    marks=tuple(MarkDelivered(workspace_id=pending.workspace_id,
                                              agent_id=agent_id, seqs=chunk)
                                for chunk in marks),
                    ack=ack))
            else:
                result = await self.engine.submit(ack)
        except BrokerError as exc:
            self.failures += 1
            error = exc
            log.info("recorder: ack of agent %d up to %d refused: %s", agent_id,
                     pending.up_to_seq, exc)
        except Exception as exc:
            self.failures += 1
            error = BrokerError("internal_error", "the ack could not be recorded")
            log.exception("recorder: ack of agent %d failed: %r", agent_id, exc)
        for waiter in pending.waiters:
            waiter.result, waiter.error = result, error
            waiter.done.set()

    async def _commit_marks(self, workspace_id: int, agent_id: int, seqs: list[int]) -> None:
        self.mark_commands += 1
        try:
            await self.engine.submit(MarkDelivered(
                workspace_id=workspace_id, agent_id=agent_id, seqs=seqs))
        except BrokerError as exc:
            # The agent went away or the broker is stopping: the rows stay
            # queued, which only means one attempt is not counted.
            self.failures += 1
            log.info("recorder: marking %d deliveries of agent %d refused: %s",
                     len(seqs), agent_id, exc)
        except Exception as exc:
            self.failures += 1
            log.exception("recorder: marking deliveries of agent %d failed: %r", agent_id, exc)

    def statistics(self) -> RecorderStatistics:
        """Counts since start; `mark_commands` counts each MarkDelivered, alone or with an ack."""
        return RecorderStatistics(
            acks_received=self.acks_received, ack_commands=self.ack_commands,
            marks_received=self.marks_received, mark_commands=self.mark_commands,
            flushes=self.flushes, failures=self.failures, pending_acks=len(self._acks),
            pending_marks=sum(len(s) for _, s in self._marks.values()),
        )


def _chunks(seqs: list[int]) -> list[list[int]]:
    """Distinct seqs in order, in chunks one MarkDelivered may take."""
    ordered = sorted(set(seqs))
    return [ordered[start:start + MAX_MARK] for start in range(0, len(ordered), MAX_MARK)]
