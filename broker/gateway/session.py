"""A WebSocket session: receive loop, pump, liveness watch; and the durable delivery stream.

Each accepted socket runs three tasks in one nursery, and nothing else
ever writes to the socket but the pump (and, once, the closer):

- the receive loop decodes frames and hands them to the session kind
  (requests run in their own tasks, at most `max_requests_in_flight`);
  every frame it reads may owe the client one frame back (a reply, a
  pong, an error), so it reads nothing while the replies owed plus the
  session's own frames queued reach `max_requests_in_flight`: a client
  that sends and never reads stops being read, and the outbox stays within
  `outbox_frames + max_requests_in_flight + 1` (a ping);
- the pump takes frames from the session's bounded `Outbox` and writes
  them, and when the outbox says so, catches up from the database;
- the watch closes the session when the socket accepts nothing for
  `slow_client_timeout` (4008), when the client stays silent after a
  ping (4408), or when the credential it opened with expires
  (`credential_deadline`, 4401).

Closing is one path (`close`): detach from the hub at once (so nothing is
routed to a dead session and presence is updated), cancel the three
tasks, then send the close frame from a task that outlives them; if the
frame is not out within `close_grace`, reset the connection. A socket
write stuck on a client that reads nothing cannot be cancelled (see
`broker.gateway.websocket`); the reset is what frees it.

`DeliverySession` adds the durable stream of one agent (the native session
and the Relaycast node socket are both one): replay from the database on
connect, live push from the hub after, and catching up again after an
overflow, all through the seam described in `broker.fanout.Outbox`. It
also pushes again what the agent gave back (failed or deferred), below the
stream's cursor: on `mailbox.changed`, when a deferral falls due, and once
after connecting (see `broker.gateway.redelivery`).
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from typing import TYPE_CHECKING, Any

import msgspec
import trio

from broker.engine.errors import BrokerError
from broker.engine.mailbox import MAILBOX_CHANGED, list_pending
from broker.engine.realtime import seq_marks
from broker.fanout import DeliverItem, EventItem, FactView, Mode, Outbox, OutboxStatistics
from broker.gateway.redelivery import Held, held_deliveries, is_held
from broker.gateway.websocket import ConnectionClosed, WebSocket
from protocol import frames as fr
from protocol.codec import CloseCode, Codec, FrameError

if TYPE_CHECKING:
    from broker.gateway import Gateway

log = logging.getLogger(__name__)

_session_ids = itertools.count(1)
# A close reason is at most 123 bytes (RFC 6455, 5.5.1).
MAX_REASON_BYTES = 123
# Frames the pump writes with one socket write when it finds several queued.
WRITE_BATCH = 64
# Errors of a database read that mean the session's credential is gone: the
# agent was deactivated or its workspace deleted after the handshake, and
# the event that says so was published before the session could see it.
CREDENTIAL_GONE = frozenset({"agent_not_found", "workspace_not_found"})


class SessionStatistics(msgspec.Struct, kw_only=True):
    id: int
    kind: str
    agent_id: int | None
    frames_received: int
    frames_sent: int
    replayed: int
    redelivered: int
    read_pauses: int
    close_code: int | None
    outbox: OutboxStatistics


class Session:
    """One accepted socket. Subclasses decide what frames mean (`handle`) and look like."""

    kind = "session"
    # Native sessions are pinged; Relaycast ones only have an idle timeout.
    pings = True

    def __init__(
        self, gateway: Gateway, ws: WebSocket, codec: Codec, *, workspace_id: int,
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
        self.outbox = Outbox(self.settings.outbox_frames)
        self.close_code: int | None = None
        self.frames_received = 0
        self.frames_sent = 0
        self.replayed = 0
        self.redelivered = 0
        self.read_pauses = 0
        self.last_received = trio.current_time()
        self._send_started: float | None = None
        self._ping_written_at: float | None = None
        self._ping_queued = False
        # When the credential the socket opened with stops working (trio time).
        self.credential_deadline = math.inf
        # When a deferred delivery falls due and must be pushed again (trio time).
        self.redeliver_deadline = math.inf
        self._requests = trio.Semaphore(self.settings.max_requests_in_flight)
        self._outer: trio.Nursery | None = None
        self._work: trio.Nursery | None = None
        # Set when the session decides to end (a close, or the peer went away).
        self.ending = trio.Event()
        self.finished = trio.Event()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id} agent={self.agent_id}>"

    # -- what the hub calls (never blocks) -----------------------------------------------

    def offer_delivery(self, seq: int, view: FactView) -> None:
        self.outbox.offer_delivery(seq, view)

    def offer_event(self, view: FactView) -> None:
        if not self.revoked_by(view):
            self.outbox.offer_event(view)

    def offer_fact(self, view: FactView) -> None:
        """Observers see every fact of their workspace; other sessions ignore this."""

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
                try:
                    async with trio.open_nursery() as work:
                        self._work = work
                        work.start_soon(self._receive_loop)
                        work.start_soon(self._pump)
                        work.start_soon(self._watch)
                        work.start_soon(self.on_attach)
                finally:
                    self.gateway.detach(self)
                    self.outbox.close()
        finally:
            self.finished.set()

    async def on_attach(self) -> None:
        """Runs once beside the session's tasks, after it is attached to the hub (subclasses)."""

    def spawn(self, fn: Any, *args: Any) -> None:
        """Run `fn(*args)` beside the session's tasks (it ends with them); nothing once it ends."""
        if self._work is None or self.ending.is_set():
            return
        try:
            self._work.start_soon(fn, *args)
        except RuntimeError:
            pass  # the nursery already closed: the session has ended

    def close(self, code: int, reason: str = "", final: Any = None) -> None:
        """Close with `code`: stop everything now, send `final` (if any) and the close frame."""
        if self.close_code is not None:
            return
        self.close_code = code
        self.ending.set()
        log.info("session %d (%s, agent %s): closing with %d %s", self.id, self.kind,
                 self.agent_id, code, reason)
        self.gateway.detach(self)
        self.outbox.close()
        if self._work is not None:
            self._work.cancel_scope.cancel()
        if self._outer is not None:
            self._outer.start_soon(self._send_close, code, reason, final)

    def _peer_closed(self, code: int | None) -> None:
        if self.close_code is None:
            self.close_code = code if code is not None else CloseCode.NORMAL
        self.ending.set()
        self.gateway.detach(self)
        self.outbox.close()
        if self._work is not None:
            self._work.cancel_scope.cancel()

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
        outbox = self.outbox
        paused = False
        while outbox.own + (limit - self._requests.value) >= limit and not outbox.closed:
            if not paused:
                paused = True
                self.read_pauses += 1
            await outbox.wait_room()

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
        self.outbox.put(fr.Reply(re=request_id, ok=False, error=fr.ErrorBody(code, message)))

    def final_error(self, code: str, message: str) -> Any:
        """The frame sent before closing on an unanswerable frame (None: send none)."""
        return fr.Reply(re=None, ok=False, error=fr.ErrorBody(code, message))

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
            self.outbox.room_changed()

    # -- sending ------------------------------------------------------------------------------

    async def _pump(self) -> None:
        outbox = self.outbox
        try:
            while not outbox.closed:
                item = outbox.take_nowait()
                if item is not None:
                    if len(outbox) and self._batches:
                        await self._write_batch(item)
                    else:
                        await self._write(item)
                elif outbox.needs_catch_up:
                    await self.catch_up()
                elif outbox.redelivery_wanted:
                    await self.redeliver()
                else:
                    await outbox.wait()
        except ConnectionClosed as closed:
            # End the session here too: a receive loop waiting for room would
            # never learn that nothing takes the outbox any more.
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
        """`first` and what else is queued (up to WRITE_BATCH) in one socket write."""
        items = [first]
        while len(items) < WRITE_BATCH and (item := self.outbox.take_nowait()) is not None:
            items.append(item)
        frames = [data for data in map(self._encode_item, items) if data is not None]
        self._send_started = trio.current_time()
        try:
            await self.ws.send_many(frames)
        finally:
            self._send_started = None
        self.frames_sent += len(frames)
        for item in items:
            if isinstance(item, DeliverItem):
                self.delivered(item.seq)
            elif isinstance(item, fr.ServerPing):
                self._ping_written()

    def _ping_written(self) -> None:
        self._ping_written_at = trio.current_time()
        self._ping_queued = False

    def _encode_item(self, item: Any) -> str | bytes | None:
        if isinstance(item, DeliverItem):
            return self.codec.encode(self.delivery_frame(item.seq, item.view))
        if isinstance(item, EventItem):
            frame = self.event_frame(item.view)
            return None if frame is None else self.codec.encode(frame)
        return self.codec.encode(item)

    async def send_frame(self, frame: Any) -> None:
        await self.send_bytes(self.codec.encode(frame))

    async def send_bytes(self, data: str | bytes) -> None:
        """Write one frame; the watch measures how long the socket takes it."""
        self._send_started = trio.current_time()
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
        self.outbox.mode = Mode.LIVE

    async def redeliver(self) -> None:
        """Push again what the agent gave back (sessions with a delivery stream)."""
        self.outbox.redelivery_wanted = False

    async def flush_queued(self) -> None:
        """Send what the outbox holds now (replies and events queued during a replay)."""
        while (item := self.outbox.take_nowait()) is not None:
            await self._write(item)

    # -- liveness -----------------------------------------------------------------------------

    async def _watch(self) -> None:
        s = self.settings
        liveness = s.pong_timeout_seconds if self.pings else s.idle_timeout_seconds
        tick = min(s.slow_client_timeout_seconds, liveness, s.ping_interval_seconds) / 4
        next_ping = trio.current_time() + s.ping_interval_seconds
        while True:
            await trio.sleep(tick)
            now = trio.current_time()
            if now >= self.credential_deadline:
                self.close(CloseCode.UNAUTHORIZED, "the token was rotated and its grace ended")
                return
            if now >= self.redeliver_deadline:
                self.redeliver_deadline = math.inf
                self.outbox.want_redelivery()
            started = self._send_started
            if started is not None and now - started >= s.slow_client_timeout_seconds:
                self.gateway.slow_closes += 1
                self.close(CloseCode.SLOW_CLIENT, "slow client: nothing read for "
                           f"{s.slow_client_timeout_seconds:g} s")
                return
            if not self.pings:
                if now - self.last_received >= s.idle_timeout_seconds:
                    self.close(CloseCode.PONG_TIMEOUT, "no frame received in time")
                    return
                continue
            written = self._ping_written_at
            if written is not None and self.last_received < written \
                    and now - written >= s.pong_timeout_seconds:
                self.close(CloseCode.PONG_TIMEOUT, "no pong in time")
                return
            if now >= next_ping:
                # One ping queued at most: a socket that takes nothing gets 4008, not pings.
                if not self._ping_queued:
                    self._ping_queued = True
                    self.outbox.put(fr.ServerPing())
                next_ping = now + s.ping_interval_seconds

    def expire_credential_at(self, wall_ms: int) -> None:
        """The credential stops working at `wall_ms` (epoch ms): close with 4401 then.

        Already past: close now. The watch checks the deadline on each tick.
        """
        remaining = wall_ms / 1000 - time.time()
        if remaining <= 0:
            self.close(CloseCode.UNAUTHORIZED, "the token was rotated and its grace ended")
            return
        self.credential_deadline = min(self.credential_deadline,
                                       trio.current_time() + remaining)

    def statistics(self) -> SessionStatistics:
        return SessionStatistics(
            id=self.id, kind=self.kind, agent_id=self.agent_id,
            frames_received=self.frames_received, frames_sent=self.frames_sent,
            replayed=self.replayed, redelivered=self.redelivered, read_pauses=self.read_pauses,
            close_code=self.close_code,
            outbox=self.outbox.statistics(),
        )


class DeliverySession(Session):
    """A session that carries one agent's durable deliveries (native or Relaycast node)."""

    agent_id: int

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Held deliveries this session pushed again, as they were then (see redelivery).
        self._held_pushed: dict[int, Held] = {}
        self._connected = False  # the replay on connect is done

    def offer_event(self, view: FactView) -> None:
        if view.type == MAILBOX_CHANGED:
            # Audience: this agent. The event still goes out: it is documented.
            self.outbox.want_redelivery()
        super().offer_event(view)

    async def catch_up(self) -> None:
        """Replay from the database up to the highest seq known, then go live (no gap, in order).

        Closes the session with 4401 when the agent is gone from the
        database (deactivated, or its workspace deleted, between the
        handshake and the replay).
        """
        try:
            await self._replay()
        except BrokerError as exc:
            self._read_refused(exc)
            return
        if not self._connected:
            # The replay skipped deliveries deferred past now: find when to come back.
            self._connected = True
            self.outbox.want_redelivery()

    async def redeliver(self) -> None:
        """Push again the held deliveries due, at or below the cursor; note the next due time.

        Closes with 4401 when the agent is gone from the database.
        """
        try:
            await self._push_held()
        except BrokerError as exc:
            self._read_refused(exc)

    def _read_refused(self, exc: BrokerError) -> None:
        if exc.code not in CREDENTIAL_GONE:
            raise exc
        self.close(CloseCode.UNAUTHORIZED, "the agent or its workspace is gone")

    async def _push_held(self) -> None:
        outbox = self.outbox
        outbox.redelivery_wanted = False  # a change from now on asks again
        up_to, after, page_size = outbox.cursor, 0, self.settings.replay_page
        seen: dict[int, Held] = {}
        while True:
            page = await self.engine.read(held_deliveries, self.workspace_id, self.agent_id,
                                          after, up_to, int(time.time() * 1000), page_size)
            for row in page.rows:
                seen[row.seq] = row.version
                if self._held_pushed.get(row.seq) == row.version:
                    continue  # pushed already; its mark is on its way
                view = FactView(row.type, self.workspace_id, row.payload,
                                message_id=row.message_id)
                await self.send_delivery(row.seq, view, redelivery=True,
                                         changed_at=row.updated_at)
                self.redelivered += 1
            if len(page.rows) < page_size:
                break
            after = page.rows[-1].seq
        self._held_pushed = seen
        if page.next_due is None:
            self.redeliver_deadline = math.inf
        else:
            self.redeliver_deadline = trio.current_time() + max(
                0.0, page.next_due / 1000 - time.time())

    async def _replay(self) -> None:
        outbox = self.outbox
        page_size = self.settings.replay_page
        outbox.start_catch_up()
        while True:
            # Read `hi` only after buffering started: see Outbox.
            marks = await self.engine.read(seq_marks, self.workspace_id, self.agent_id)
            while outbox.cursor < marks.last_seq:
                page = await self.engine.read(
                    list_pending, self.workspace_id, self.agent_id, outbox.cursor, page_size,
                    int(time.time() * 1000),
                )
                for row in page:
                    view = FactView(row.type, self.workspace_id, bytes(row.payload),
                                    message_id=row.message_id)
                    held = is_held(row.state, row.available_at)
                    await self.send_delivery(row.seq, view, redelivery=held,
                                             changed_at=row.updated_at if held else None)
                    if held:
                        self._held_pushed[row.seq] = (row.state, row.attempts, row.available_at,
                                                      row.updated_at)
                    outbox.advance(row.seq)
                    self.replayed += 1
                if len(page) < page_size:
                    # Nothing else is pending up to `hi` (acked, dead or deferred).
                    outbox.advance(marks.last_seq)
                await self.flush_queued()
            if outbox.finish_catch_up():
                return

    async def send_delivery(self, seq: int, view: FactView, redelivery: bool = False,
                            changed_at: int | None = None) -> None:
        await self.send_bytes(self.codec.encode(self.delivery_frame(seq, view, redelivery)))
        self.delivered(seq, redelivery, changed_at)

    def delivered(self, seq: int, redelivery: bool = False,
                  changed_at: int | None = None) -> None:
        pushed_at = None
        if redelivery:
            # Stamped after the fail or defer the row was read with, so the
            # mark of this push is never mistaken for a late one.
            now = int(time.time() * 1000)
            pushed_at = now if changed_at is None else max(now, changed_at + 1)
        self.gateway.recorder.delivered(self.workspace_id, self.agent_id, seq, redelivery,
                                        pushed_at)
