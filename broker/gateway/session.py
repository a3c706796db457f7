"""A WebSocket session's lifetime: receive loop, pump, liveness deadlines, one way to close.

Each accepted socket runs its tasks in one nursery, and nothing else ever
writes to the socket but the pump (and, once, the closer):

- the receive loop decodes frames and hands them to the session kind
  (requests run in their own tasks, at most `max_requests_in_flight`);
  every frame it reads may owe the client one frame back (a reply, a
  pong, an error), so it reads nothing while the replies owed plus the
  session's own frames queued reach `max_requests_in_flight`: a client
  that sends and never reads stops being read, and the frame queue stays
  within `outbox_frames + max_requests_in_flight + 1` (a ping);
- the pump takes frames from the session's bounded `FrameQueue`
  (`broker.gateway.frame_queue`) and writes them, and when the queue says
  so, catches up from the database;
- one task fires the session's deadlines (`broker.gateway.deadline`) as
  they pass: close a socket that accepts nothing for `slow_client_timeout`
  (4008), a client silent after a ping or, unpinged, silent for
  `idle_timeout` (4408), a credential that expires (`expire_credential_at`,
  4401); queue the next ping (native sessions). Each is a `Deadline` the
  session moves, not a clock polled on a tick.

A session is OPEN, then CLOSING (it decided to close: the close frame is
on its way) or CLOSED (the peer went away, or the close is done). Leaving
OPEN is one transition (`_end`), whoever asks: detach from the hub at once
(so nothing is routed to a dead session and presence is updated), close
the frame queue, cancel the tasks, and when the session closes, send the
close frame from a task that outlives them; if the frame is not out within
`close_grace`, reset the connection. A socket write stuck on a client that
reads nothing cannot be cancelled (see `broker.gateway.websocket`); the
reset is what frees it.

The durable delivery stream (replay, redelivery, held pushes) is added by
`DeliverySession` (`broker.gateway.delivery`).
"""

from __future__ import annotations

import enum
import itertools
import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import msgspec
import trio

from broker.auth import authorize
from broker.engine.engine import Engine
from broker.engine.errors import BrokerError
from broker.engine.workspaces import Principal
from broker.gateway.deadline import Alarms, Deadline
from broker.gateway.frame_queue import (
    DeliverItem,
    EventItem,
    FrameQueue,
    FrameQueueStatistics,
    Mode,
)
from broker.gateway.recorder import DeliveryRecorder
from broker.gateway.settings import GatewaySettings
from broker.gateway.views import FactView
from broker.gateway.websocket import ConnectionClosed, WebSocket
from broker.operations.registry import Call, Operation
from broker.ratelimit import RateLimited, RateLimiter
from protocol import frames as fr
from protocol.codec import CloseCode, Codec, FrameError

if TYPE_CHECKING:
    from broker.gateway.presence import PresenceBatch

log = logging.getLogger(__name__)


class SessionHost(Protocol):
    """What a session needs of the gateway that owns it (`broker.gateway.Gateway`).

    Named here, where it is used, so the session modules do not import the
    gateway that imports them.
    """

    engine: Engine
    settings: GatewaySettings
    recorder: DeliveryRecorder
    limiter: RateLimiter
    # The base of absolute URLs in replies (`http.public_url`; None: root-relative).
    public_url: str | None
    # Socket request frame type -> the operation it runs.
    request_operations: dict[type, Operation[Any]]
    # Told each socket request's operation and seconds, when set.
    on_request: Callable[[str, float], object] | None
    # Sessions closed because they could not keep up (a counter for statistics).
    slow_closes: int

    def attach(self, session: Session) -> None: ...

    def detach(self, session: Session) -> None: ...

_session_ids = itertools.count(1)
# A close reason is at most 123 bytes (RFC 6455, 5.5.1).
MAX_REASON_BYTES = 123
# Frames the pump writes with one socket write when it finds several queued.
WRITE_BATCH = 64
# Queued frames one flush of a session that asked for batches takes (its
# deliveries then travel as `deliver.batch` frames): more than WRITE_BATCH,
# since a run of deliveries costs one frame, but bounded so that one write
# stays a bounded piece of the stall deadline and a client sees the first
# delivery of a flush without parsing a thousand (docs/protocol.md).
BATCHED_FLUSH = 256


class SessionState(enum.Enum):
    """Where a session is in its life (hypercorn's `ASGIWebsocketState` is the model)."""

    OPEN = "open"  # serving: reading, pumping, watching its deadlines
    CLOSING = "closing"  # it decided to close: tasks cancelled, the close frame on its way
    CLOSED = "closed"  # the peer went away, the close is done, or its tasks ended


class SessionStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of one session (`Session.statistics()`).

    id, kind, agent_id: which session (`agent`, `node` or `observer`; no
    agent for an observer).
    state: `open`, `closing` or `closed` (see `SessionState`).
    frames_received, frames_sent: frames read from and written to the socket.
    replayed: deliveries pushed from the database (on connect, after an overflow).
    redelivered: held deliveries pushed again (failed or deferred, then due).
    read_pauses: times the socket was not read because the answers owed
    reached the bound.
    close_code: the code the session closed with (None while open).
    queue: its frame queue (see `FrameQueueStatistics`).
    """

    id: int
    kind: str
    agent_id: int | None
    state: str
    frames_received: int
    frames_sent: int
    replayed: int
    redelivered: int
    read_pauses: int
    close_code: int | None
    queue: FrameQueueStatistics


class Session:
    """One accepted socket. Subclasses decide what frames mean (`handle`) and look like."""

    kind = "session"
    # Native sessions are pinged; Relaycast ones only have an idle timeout.
    pings = True
    # Whether the gateway's presence feed gives this session presence
    # batches (`offer_presence`); a native session asks for them.
    wants_presence = False
    # Deliveries go out as `deliver.batch` frames (a native client asked for them).
    batch = False

    def __init__(
        self, gateway: SessionHost, ws: WebSocket, codec: Codec, *, workspace_id: int,
        agent_id: int | None = None, agent_name: str | None = None,
    ) -> None:
        self.gateway = gateway
        self.settings = gateway.settings
        self.engine = gateway.engine
        self.ws = ws
        # A WebSocket without send_many (a test's fake) gets one write per frame.
        self._batches = hasattr(ws, "send_many")
        self.codec = codec
        self.workspace_id = workspace_id
        self.agent_id = agent_id
        self.agent_name = agent_name
        self.id = next(_session_ids)
        self.queue = FrameQueue(self.settings.outbox_frames)
        self.state = SessionState.OPEN
        self.close_code: int | None = None
        self.frames_received = 0
        self.frames_sent = 0
        self.replayed = 0
        self.redelivered = 0
        self.read_pauses = 0
        self.last_received = trio.current_time()
        self._send_started: float | None = None
        self._ping_written_at = -math.inf
        self._ping_queued = False
        self._alarms = Alarms()
        # When the credential the socket opened with stops working.
        self._credential_expiry = self._alarms.deadline(self._credential_expired)
        # When the client must have sent a frame (a pong, or anything at all).
        self._silence = self._alarms.deadline(self._silence_passed)
        # When the write in progress makes the client a slow one.
        self._stall = self._alarms.deadline(self._stall_passed)
        # When the next ping is queued (native sessions).
        self._next_ping = self._alarms.deadline(self._ping_due)
        self._requests = trio.Semaphore(self.settings.max_requests_in_flight)
        self._outer: trio.Nursery | None = None
        self._work: trio.Nursery | None = None
        # Set when the session leaves OPEN (a close, or the peer went away).
        self.ending = trio.Event()
        self.finished = trio.Event()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id} agent={self.agent_id}>"

    # -- what the hub calls (never blocks) -----------------------------------------------

    def offer_delivery(self, seq: int, view: FactView) -> None:
        self.queue.offer_delivery(seq, view)

    def offer_event(self, view: FactView) -> None:
        if not self.revoked_by(view):
            self.queue.offer_event(view)

    def offer_fact(self, view: FactView) -> None:
        """Observers see every fact of their workspace; other sessions ignore this."""

    def offer_presence(self, batch: PresenceBatch) -> None:
        """The net presence changes of an interval: one coalesced `presence` event."""
        self.queue.offer_event(batch.coalesced)

    def revoked_by(self, view: FactView) -> bool:
        """Close (4401) when the event takes this session's credential away.

        A deleted workspace ends all its sessions; a deactivated agent ends
        its own. The frames already queued are dropped: nobody may read them.
        """
        if view.type == "workspace.deleted":
            reason = "the workspace was deleted"
        elif (view.type == "agent.deactivated" and self.agent_id is not None
                and isinstance(view.data, dict)
                and view.data.get("agent_id") == str(self.agent_id)):
            reason = "the agent was deactivated"
        else:
            return False
        self.close(CloseCode.UNAUTHORIZED, reason)
        return True

    # -- lifetime ---------------------------------------------------------------------------

    async def serve(self) -> None:
        """Run the session until the socket is closed (the handshake is already accepted)."""
        try:
            async with trio.open_nursery() as outer:
                self._outer = outer
                self.gateway.attach(self)
                async with trio.open_nursery() as work:
                    self._work = work
                    self.start_tasks(work)
                    work.start_soon(self.on_attach)
                    # The nursery stays open while this waits, and this leaves
                    # OPEN before it can close (the tasks failed, or the daemon
                    # is being cancelled): `spawn` never meets a closed nursery.
                    try:
                        await trio.sleep_forever()
                    finally:
                        self._end(None)
        finally:
            self.state = SessionState.CLOSED
            self.finished.set()

    def start_tasks(self, nursery: trio.Nursery) -> None:
        """Start the session's tasks in `nursery`, its work nursery (subclasses add theirs)."""
        nursery.start_soon(self._receive_loop)
        nursery.start_soon(self._pump)
        nursery.start_soon(self._alarms.run)
        if self.pings:
            self._next_ping.move(trio.current_time() + self.settings.ping_interval_seconds)
        else:
            self._silence.move(self.last_received + self.settings.idle_timeout_seconds)

    def alarm(self, on_pass: Callable[[], object]) -> Deadline:
        """A deadline of this session's, fired by its one deadline task (subclasses' own)."""
        return self._alarms.deadline(on_pass)

    async def on_attach(self) -> None:
        """Runs once beside the session's tasks, after it is attached to the hub (subclasses)."""

    def spawn(self, fn: Any, *args: Any) -> None:
        """Run `fn(*args)` beside the session's tasks (it ends with them); nothing once it ends.

        The work nursery is open for as long as the session is OPEN (see
        `serve`), so this never starts a task in a closed nursery.
        """
        if self.state is SessionState.OPEN and self._work is not None:
            self._work.start_soon(fn, *args)

    def close(self, code: int, reason: str = "", final: Any = None) -> None:
        """Close with `code`: stop everything now, send `final` (if any) and the close frame."""
        self._end(code, reason, final, send_close=True)

    def _peer_closed(self, code: int | None) -> None:
        self._end(code if code is not None else CloseCode.NORMAL)

    def _end(self, code: int | None, reason: str = "", final: Any = None,
             send_close: bool = False) -> None:
        """The one way out of OPEN (later calls do nothing).

        send_close: the session closes with `code` (CLOSING until the frame
        is out); otherwise the peer went away with `code`, or the tasks
        ended without either (None: no code), and the session is CLOSED.
        """
        if self.state is not SessionState.OPEN:
            return
        self.state = SessionState.CLOSING if send_close else SessionState.CLOSED
        self.close_code = code
        self.ending.set()
        if send_close:
            log.info("session %d (%s, agent %s): closing with %d %s", self.id, self.kind,
                     self.agent_id, code, reason)
        self.gateway.detach(self)
        self.queue.close()
        self._alarms.stop()
        if self._work is not None:
            self._work.cancel_scope.cancel()
        if send_close and code is not None and self._outer is not None:
            self._outer.start_soon(self._send_close, code, reason, final)

    async def _send_close(self, code: int, reason: str, final: Any) -> None:
        reason = reason.encode()[:MAX_REASON_BYTES].decode(errors="ignore")
        with trio.move_on_after(self.settings.close_grace_seconds) as scope:
            try:
                if final is not None:
                    await self.ws.send(self.codec.encode(final))
                await self.ws.close(code, reason)
            except ConnectionClosed:
                pass
        if scope.cancelled_caught and not self.ws.abort():
            # A stuck write holds the connection and a reset was the only way out.
            log.warning("session %d: could not reset a stuck connection", self.id)
        self.state = SessionState.CLOSED

    # -- receiving ----------------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        while True:
            await self._wait_for_room()
            try:
                data = await self.ws.receive()
            except ConnectionClosed as closed:
                self._peer_closed(closed.code)
                return
            self.last_received = trio.current_time()
            self.frames_received += 1
            try:
                frame = self.codec.decode(data)
            except FrameError as err:
                if self.frame_error(err):
                    continue
                return
            await self.handle(frame)

    async def _wait_for_room(self) -> None:
        """Until the answer to one more frame fits: replies owed + own frames queued < bound.

        Each frame read adds at most one to that sum (a request in flight,
        then its reply; a pong; an error reply), and only the pump taking
        an own frame lowers it, so this bounds the session's own frames
        whatever the client sends.
        """
        limit = self.settings.max_requests_in_flight
        queue = self.queue
        paused = False
        while queue.own + (limit - self._requests.value) >= limit and not queue.closed:
            if not paused:
                paused = True
                self.read_pauses += 1
            await queue.wait_room()

    async def handle(self, frame: Any) -> None:
        """Act on one decoded frame (subclasses)."""
        raise NotImplementedError

    def frame_error(self, err: FrameError) -> bool:
        """Answer a frame that could not be taken; False when the session closes for it.

        An error reply when the request id could be read, otherwise a last
        error frame and a close with the error's close code.
        """
        if err.request_id is not None:
            self.refuse(err.request_id, err.code, err.message)
            return True
        self.close(err.close_code, err.code, self.final_error(err.code, err.message))
        return False

    def refuse(self, request_id: str | None, code: str, message: str) -> None:
        """Answer a request with an error (subclasses choose the frame)."""
        self.queue.put(fr.Reply(re=request_id, ok=False, error=fr.ErrorBody(code, message)))

    def final_error(self, code: str, message: str) -> Any:
        """The frame sent before closing on an unanswerable frame (None: send none)."""
        return fr.Reply(re=None, ok=False, error=fr.ErrorBody(code, message))

    @property
    def principal(self) -> Principal:
        """Who the socket's requests run as (no agent: the workspace key)."""
        return Principal(self.workspace_id, self.agent_id, self.agent_name)

    async def answer(self, op: Operation[Any], frame: Any) -> None:
        """Run request `frame` as operation `op` in a request task; its reply is queued.

        The socket's token must be of a kind `op` takes (`forbidden`), and the
        rate limits are taken first: a refused request writes nothing and gets
        an error reply like any other (the session stays open).
        """
        try:
            authorize(op.auth, self.principal)
            self.gateway.limiter.take_request(op.name, self.workspace_id, self.agent_id, "")
        except RateLimited as exc:
            self.queue.put(fr.Reply(re=frame.id, ok=False, error=fr.ErrorBody(
                exc.code, exc.message, retry_after_ms=exc.verdict.retry_after_ms)))
            return
        except BrokerError as exc:
            self.refuse(frame.id, exc.code, exc.message)
            return
        await self.spawn_request(self._request, op, frame, trio.current_time())

    async def _request(self, op: Operation[Any], frame: Any, received: float) -> None:
        """Run one request and queue its reply; `received`: trio time the frame was read."""
        call = Call(self.principal, idempotency_key=frame.idempotency_key,
                    base_url=self.gateway.public_url)
        try:
            result = await op.handler(self.engine, call, frame)
        except BrokerError as exc:
            self.refuse(frame.id, exc.code, exc.message)
        except Exception:
            log.exception("session %d: request %s (%s) failed", self.id, frame.id, op.name)
            self.refuse(frame.id, "internal_error", "the broker failed to handle this request")
        else:
            self.queue.put(fr.Reply(re=frame.id, ok=True, data=result))
        if self.gateway.on_request is not None:
            self.gateway.on_request(op.name, trio.current_time() - received)

    async def spawn_request(self, fn: Any, *args: Any) -> None:
        """Run `fn(*args)` as a request task, waiting while too many are in flight."""
        await self._requests.acquire()
        assert self._work is not None
        self._work.start_soon(self._run_request, fn, args)

    async def _run_request(self, fn: Any, args: tuple[Any, ...]) -> None:
        try:
            await fn(*args)
        finally:
            self._requests.release()
            self.queue.room_changed()

    # -- sending ------------------------------------------------------------------------------

    async def _pump(self) -> None:
        queue = self.queue
        try:
            while not queue.closed:
                item = queue.take_nowait()
                if item is not None:
                    if len(queue) and self._batches:
                        await self._write_batch(item)
                    else:
                        await self._write(item)
                elif queue.needs_catch_up:
                    await self.catch_up()
                elif queue.redelivery_wanted:
                    await self.redeliver()
                else:
                    await queue.wait()
        except ConnectionClosed as closed:
            # End the session here too: a receive loop waiting for room would
            # never learn that nothing takes the queue any more.
            self._peer_closed(closed.code)

    async def _write(self, item: Any) -> None:
        if isinstance(item, DeliverItem):
            await self.send_delivery(item.seq, item.view)
        elif isinstance(item, EventItem):
            frame = self.event_frame(item.view)
            if frame is not None:
                await self.send_frame(frame)
        elif isinstance(item, fr.ServerPing):
            await self.send_frame(item)
            self._ping_written()
        else:
            await self.send_frame(item)

    async def _write_batch(self, first: Any) -> None:
        """`first` and what else is queued (up to WRITE_BATCH, BATCHED_FLUSH with batches)
        in one socket write."""
        limit = BATCHED_FLUSH if self.batch else WRITE_BATCH
        items = [first]
        while len(items) < limit and (item := self.queue.take_nowait()) is not None:
            items.append(item)
        await self.send_frames(self._encode_items(items))
        for item in items:
            if isinstance(item, DeliverItem):
                self.delivered(item.seq)
            elif isinstance(item, fr.ServerPing):
                self._ping_written()

    def _ping_written(self) -> None:
        """A ping went out: the client must answer (any frame) within pong_timeout."""
        now = trio.current_time()
        self._ping_written_at = now
        self._ping_queued = False
        self._silence.move(now + self.settings.pong_timeout_seconds)

    def _writing(self) -> None:
        """A socket write starts now: arm the stall deadline if it is not armed."""
        now = trio.current_time()
        self._send_started = now
        if self._stall.when == math.inf:
            self._stall.move(now + self.settings.slow_client_timeout_seconds)

    def _encode_items(self, items: list[Any]) -> list[str | bytes]:
        """The frames of `items`, in order; with batches, each run of deliveries is spliced
        into `deliver.batch` frames (an event or an own frame between two ends a run)."""
        if not self.batch:
            return [data for data in map(self._encode_item, items) if data is not None]
        frames: list[str | bytes] = []
        run: list[bytes] = []
        for item in items:
            if isinstance(item, DeliverItem):
                run.append(self.codec.encode_bytes(self.delivery_frame(item.seq, item.view)))
                continue
            if run:
                frames += self.codec.encode_batch(run, self.settings.max_frame_bytes)
                run = []
            data = self._encode_item(item)
            if data is not None:
                frames.append(data)
        if run:
            frames += self.codec.encode_batch(run, self.settings.max_frame_bytes)
        return frames

    def _encode_item(self, item: Any) -> str | bytes | None:
        if isinstance(item, DeliverItem):
            return self.codec.encode(self.delivery_frame(item.seq, item.view))
        if isinstance(item, EventItem):
            frame = self.event_frame(item.view)
            return None if frame is None else self.codec.encode(frame)
        return self.codec.encode(item)

    async def send_frame(self, frame: Any) -> None:
        await self.send_bytes(self.codec.encode(frame))

    async def send_frames(self, frames: list[str | bytes]) -> None:
        """Write encoded frames in order, with one socket write where the socket allows."""
        if len(frames) == 1 or not self._batches:
            for data in frames:
                await self.send_bytes(data)
            return
        self._writing()
        try:
            await self.ws.send_many(frames)
        finally:
            self._send_started = None
        self.frames_sent += len(frames)

    async def send_bytes(self, data: str | bytes) -> None:
        """Write one frame; the stall deadline measures how long the socket takes it."""
        self._writing()
        try:
            await self.ws.send(data)
        finally:
            self._send_started = None
        self.frames_sent += 1

    async def send_delivery(self, seq: int, view: FactView, redelivery: bool = False,
                            changed_at: int | None = None) -> None:
        """Push one durable delivery (sessions with a delivery stream).

        changed_at: a held row's `updated_at` as read (see `broker.gateway.redelivery`).
        """
        raise NotImplementedError

    def delivery_frame(self, seq: int, view: FactView, redelivery: bool = False) -> Any:
        """The frame of one durable delivery (sessions with a delivery stream).

        redelivery: a delivery the agent gave back, pushed again (see
        `broker.gateway.redelivery`).
        """
        raise NotImplementedError

    def delivered(self, seq: int, redelivery: bool = False,
                  changed_at: int | None = None) -> None:
        """Delivery `seq` was written to the socket (sessions with a delivery stream).

        redelivery: it was a held delivery pushed again, read with
        `updated_at` = changed_at.
        """

    def event_frame(self, view: FactView) -> Any:
        """The frame of an ephemeral event for this session (None: not sent)."""
        return fr.Event(payload=view.raw(self.codec.msgpack))

    async def catch_up(self) -> None:
        """Resume the delivery stream from the database (sessions with one)."""
        self.queue.mode = Mode.LIVE

    async def redeliver(self) -> None:
        """Push again what the agent gave back (sessions with a delivery stream)."""
        self.queue.redelivery_wanted = False

    async def flush_queued(self) -> None:
        """Send what the queue holds now (replies and events queued during a replay)."""
        while (item := self.queue.take_nowait()) is not None:
            await self._write(item)

    # -- liveness: one task per deadline, and the ping loop -----------------------------------
    #
    # A frame received or a write started only records its time: moving a
    # deadline on each would cost every frame a timer update. When a
    # deadline passes, the recorded time decides, and the deadline is moved
    # to where it belongs.

    def _stall_passed(self) -> None:
        """Close with 4008 once one socket write has taken slow_client_timeout."""
        timeout = self.settings.slow_client_timeout_seconds
        started = self._send_started
        if started is None:
            return  # no write under way; the next one arms it again
        if trio.current_time() < started + timeout:
            self._stall.move(started + timeout)
            return
        self.gateway.slow_closes += 1
        self.close(CloseCode.SLOW_CLIENT, f"slow client: nothing read for {timeout:g} s")

    def _silence_passed(self) -> None:
        """Close with 4408 when the client is silent: after a ping, or at all (not pinged).

        A pinged session's deadline is set when a ping is written (pong_timeout
        later); any frame received after that ping answers it. A session
        that is not pinged must send some frame every idle_timeout.
        """
        if self.pings:
            if self.last_received >= self._ping_written_at:
                return  # answered: the next ping sets it
            reason = "no pong in time"
        else:
            idle = self.settings.idle_timeout_seconds
            if trio.current_time() < self.last_received + idle:
                self._silence.move(self.last_received + idle)
                return
            reason = "no frame received in time"
        self.close(CloseCode.PONG_TIMEOUT, reason)

    def _credential_expired(self) -> None:
        self.close(CloseCode.UNAUTHORIZED, "the token was rotated and its grace ended")

    def _ping_due(self) -> None:
        """Queue a ping every ping_interval (native sessions)."""
        self._next_ping.move(trio.current_time() + self.settings.ping_interval_seconds)
        # One ping queued at most: a socket that takes nothing gets 4008, not pings.
        if not self._ping_queued:
            self._ping_queued = True
            self.queue.put(fr.ServerPing())

    def expire_credential_at(self, wall_ms: int) -> None:
        """The credential stops working at `wall_ms` (epoch ms): close with 4401 then.

        Already past: close now. An earlier expiry set before stays.
        """
        remaining = wall_ms / 1000 - time.time()
        if remaining <= 0:
            self.close(CloseCode.UNAUTHORIZED, "the token was rotated and its grace ended")
            return
        expiry = self._credential_expiry
        expiry.move(min(expiry.when, trio.current_time() + remaining))

    def statistics(self) -> SessionStatistics:
        """A snapshot of the session (see `SessionStatistics`)."""
        return SessionStatistics(
            id=self.id, kind=self.kind, agent_id=self.agent_id, state=self.state.value,
            frames_received=self.frames_received, frames_sent=self.frames_sent,
            replayed=self.replayed, redelivered=self.redelivered, read_pauses=self.read_pauses,
            close_code=self.close_code,
            queue=self.queue.statistics(),
        )
