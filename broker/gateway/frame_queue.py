"""A session's frame queue: what its pump writes next, and where its delivery stream stands.

The hub offers live deliveries and events to the queue without ever
blocking (`offer_*`), so a slow socket can only ever fill its own queue;
the hub, the writer behind it and every other session keep going (DESIGN
invariant 7). A queue that is full stops taking live deliveries and its
session later catches up from the database, where the rows are durable.
The seam between that replay and live push is described on `FrameQueue`.

Not to be confused with the webhook outbox (`broker.engine.outbox`), a
table: this queue lives in memory and belongs to one socket.
"""

from __future__ import annotations

import enum
import logging
from collections import deque
from typing import Any

import msgspec
import trio

from broker.gateway.views import FactView

log = logging.getLogger(__name__)

# Frames a session's queue holds before it stops taking live deliveries.
DEFAULT_QUEUE_FRAMES = 1000


class Mode(enum.Enum):
    """Where a session's deliveries come from."""

    LIVE = "live"  # from the hub, straight into the queue
    CATCHING_UP = "catching_up"  # from the database; live ones are buffered meanwhile
    LAGGING = "lagging"  # the queue overflowed: live ones are ignored until it drains


class DeliverItem(msgspec.Struct, frozen=True, array_like=True):
    seq: int
    view: FactView


class EventItem(msgspec.Struct, frozen=True, array_like=True):
    view: FactView


class FrameQueueStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of one session's frame queue (`FrameQueue.statistics()`).

    capacity: deliveries and events it holds before it stops taking them.
    depth, max_depth: frames queued now and at most (own frames included).
    own, max_own: the session's own frames (replies, pongs, errors, pings)
    queued now and at most.
    buffered, max_buffered: live deliveries buffered during a catch-up, now
    and at most.
    mode: `live`, `catching_up` or `lagging` (see `Mode`).
    cursor: the highest seq handed to the pump.
    live_deliveries: deliveries taken from the hub (not replayed).
    overflows: times the queue was full and the stream fell back to the database.
    buffer_overflows: times the catch-up buffer overflowed (the replay went round again).
    gaps: live seqs that did not follow the cursor (a catch-up instead).
    events_dropped: ephemeral events not taken because the queue was full.
    catch_ups: replays from the database started (the one on connect included).
    """

    capacity: int
    depth: int
    max_depth: int
    own: int
    max_own: int
    buffered: int
    max_buffered: int
    mode: str
    cursor: int
    live_deliveries: int
    overflows: int
    buffer_overflows: int
    gaps: int
    events_dropped: int
    catch_ups: int


class FrameQueue:
    """A session's bounded queue of frames to send, and where its delivery stream stands.

    The hub offers (never blocks); the session's pump takes. `cursor` is the
    highest seq already handed to the pump (by the queue or by a replay),
    so duplicates (a fact seen both in the database and live) are dropped
    by seq.

    The seam between database replay and live push (`start_catch_up`,
    `finish_catch_up`): the pump first switches the queue to CATCHING_UP,
    so live deliveries are buffered from that instant; only then it reads
    the agent's highest allocated seq `hi` and replays the database up to
    it. Every delivery committed after `hi` was read is published after
    buffering began, so it is in the buffer; every one committed before is
    in the database. `finish_catch_up` then moves the buffered deliveries
    above the cursor into the queue, in order, and goes LIVE. If the buffer
    overflowed meanwhile it is discarded and the pump goes round again
    (buffer first, then a new `hi`).

    A new queue starts LAGGING at cursor 0: the first thing its pump does
    is catch up from the database (the replay on connect).

    The session's own frames (replies, pongs, error frames, pings) are
    always taken, and sent before the deliveries and events queued: a
    sender's reply does not wait behind the fanout of a big channel
    (deliveries keep their order among themselves, events theirs); `own`
    counts those queued. They are bounded by the session, not here: it reads no frame
    from its socket while the answers it owes could exceed its bound
    (`wait_room`), so a client that sends and never reads is not read
    either.
    """

    def __init__(self, capacity: int = DEFAULT_QUEUE_FRAMES) -> None:
        if capacity < 1:
            raise ValueError("a frame queue holds at least one frame")
        self.capacity = capacity
        self.mode = Mode.LAGGING
        self.cursor = 0
        self._items: deque[DeliverItem | EventItem] = deque()
        self._own: deque[Any] = deque()
        self._buffer: deque[DeliverItem] = deque()
        self._buffer_lost = False
        self._wake = trio.Event()
        self._room = trio.Event()
        self.closed = False
        # Deliveries at or below the cursor must be read again (mailbox.changed).
        self.redelivery_wanted = False
        self.own = 0
        self.max_own = 0
        self.max_depth = 0
        self.max_buffered = 0
        self.live_deliveries = 0
        self.overflows = 0
        self.buffer_overflows = 0
        self.gaps = 0
        self.events_dropped = 0
        self.catch_ups = 0

    def __len__(self) -> int:
        return len(self._items) + len(self._own)

    # -- producers: the hub and the session itself; none of these block ------------------

    def offer_delivery(self, seq: int, view: FactView) -> None:
        """A live durable delivery; taken, buffered, or left to the database (never lost)."""
        if self.closed:
            return
        if self.mode is Mode.LIVE:
            if seq <= self.cursor:
                return
            if seq != self.cursor + 1:
                # Cannot happen while seqs are gap-free per agent; if it ever
                # does, the database has the missing rows: catch up from it.
                self.gaps += 1
                log.warning("frame queue: live seq %d after %d; catching up from the database",
                            seq, self.cursor)
                self._lag()
                return
            if len(self._items) >= self.capacity:
                self.overflows += 1
                self._lag()
                return
            self._append(DeliverItem(seq, view))
            self.cursor = seq
            self.live_deliveries += 1
        elif self.mode is Mode.CATCHING_UP:
            if self._buffer_lost:
                return
            if len(self._buffer) >= self.capacity:
                self._buffer.clear()
                self._buffer_lost = True
                self.buffer_overflows += 1
                return
            self._buffer.append(DeliverItem(seq, view))
            self.max_buffered = max(self.max_buffered, len(self._buffer))

    def offer_event(self, view: FactView) -> bool:
        """An ephemeral event; dropped (False) when the queue is full, it has no seq to resume."""
        if self.closed:
            return False
        if len(self._items) >= self.capacity:
            self.events_dropped += 1
            return False
        self._append(EventItem(view))
        return True

    def put(self, frame: Any) -> None:
        """A frame of the session's own (reply, pong, error, ping): always taken.

        The session bounds these itself: it stops reading its socket while
        `own` plus the replies it still owes reach its bound (see the class
        docstring), so they never wait behind a full queue of deliveries.
        """
        if not self.closed:
            self.own += 1
            if self.own > self.max_own:
                self.max_own = self.own
            self._own.append(frame)
            self._queued()

    def close(self) -> None:
        """Take nothing more; wake the pump and a reader waiting for room so they can notice."""
        self.closed = True
        self._items.clear()
        self._own.clear()
        self._buffer.clear()
        self.own = 0
        self._wake.set()
        self._room.set()

    def fall_behind(self) -> None:
        """Live deliveries may have been lost before they reached the hub (a gateway
        process missed a batch of the writer's facts): resume from the database.

        LIVE: lag, as after an overflow. CATCHING_UP: the buffer may lack one,
        so the catch-up goes round again. LAGGING: the next catch-up reads
        the database anyway.
        """
        if self.closed:
            return
        self.gaps += 1
        if self.mode is Mode.LIVE:
            self._lag()
        elif self.mode is Mode.CATCHING_UP:
            self._buffer.clear()
            self._buffer_lost = True

    def _append(self, item: DeliverItem | EventItem) -> None:
        self._items.append(item)
        self._queued()

    def _queued(self) -> None:
        """A frame was queued (own or not): keep the high-water mark, wake the pump."""
        if len(self) > self.max_depth:
            self.max_depth = len(self)
        self._wake.set()

    def _lag(self) -> None:
        self.mode = Mode.LAGGING
        self._wake.set()

    # -- the consumer: the session's pump ---------------------------------------------------

    def take_nowait(self) -> Any | None:
        """The next frame to send (the session's own first), or None."""
        if self._own:
            self.own -= 1
            self._room.set()
            return self._own.popleft()
        if not self._items:
            return None
        return self._items.popleft()

    def want_redelivery(self) -> None:
        """The agent gave deliveries back: the pump reads them again once the queue is sent."""
        if not self.closed:
            self.redelivery_wanted = True
            self._wake.set()

    def room_changed(self) -> None:
        """Something besides a taken frame made room (a request ended): wake `wait_room`."""
        self._room.set()

    async def wait_room(self) -> None:
        """Until an own frame is taken, `room_changed` is called, or the queue closes.

        The caller checks its condition and calls this with no checkpoint in
        between, so no wakeup is lost.
        """
        if self.closed:
            return
        self._room = trio.Event()
        await self._room.wait()

    @property
    def needs_catch_up(self) -> bool:
        """Everything queued is sent and the stream must resume from the database."""
        return self.mode is Mode.LAGGING and not self._items and not self.closed

    async def wait(self) -> None:
        """Until there is something to send, to catch up or to redeliver (at once if so)."""
        while (not self._items and not self._own and not self.needs_catch_up
               and not self.redelivery_wanted and not self.closed):
            self._wake = trio.Event()
            await self._wake.wait()

    def start_catch_up(self) -> None:
        """Buffer live deliveries from now on; read the high seq only after this call."""
        self.mode = Mode.CATCHING_UP
        self._buffer.clear()
        self._buffer_lost = False
        self.catch_ups += 1

    def advance(self, seq: int) -> None:
        """The replay handed everything up to `seq` to the socket (or found it settled)."""
        if seq > self.cursor:
            self.cursor = seq

    def finish_catch_up(self) -> bool:
        """Go LIVE with the buffered deliveries above the cursor; False if the buffer overflowed.

        After False the queue is buffering afresh: read a new high seq and
        replay again.
        """
        if self._buffer_lost:
            self.start_catch_up()
            return False
        buffered, self._buffer = self._buffer, deque()
        for item in buffered:
            if item.seq <= self.cursor:
                continue
            if item.seq != self.cursor + 1:
                self.gaps += 1
                self.start_catch_up()
                return False
            self._append(item)
            self.cursor = item.seq
            self.live_deliveries += 1
        self.mode = Mode.LIVE
        return True

    def statistics(self) -> FrameQueueStatistics:
        return FrameQueueStatistics(
            capacity=self.capacity, depth=len(self), max_depth=self.max_depth,
            own=self.own, max_own=self.max_own,
            buffered=len(self._buffer), max_buffered=self.max_buffered, mode=self.mode.value,
            cursor=self.cursor, live_deliveries=self.live_deliveries, overflows=self.overflows,
            buffer_overflows=self.buffer_overflows, gaps=self.gaps,
            events_dropped=self.events_dropped, catch_ups=self.catch_ups,
        )
