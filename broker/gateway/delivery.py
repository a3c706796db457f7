"""The durable delivery stream of one agent, on a session (native or Relaycast node).

`DeliverySession` adds to a socket's lifetime (`broker.gateway.session`)
what makes its pushes durable: replay from the database on connect, live
push from the hub after, and catching up again after an overflow, all
through the seam described in `broker.gateway.frame_queue.FrameQueue`. It
also pushes again what the agent gave back (failed or deferred), below the
stream's cursor: on `mailbox.changed`, when a deferral falls due, and once
after connecting if anything was unacked (see `broker.gateway.redelivery`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import apsw
import trio

from broker.engine.agents import TOKEN_ROTATED
from broker.engine.errors import BrokerError
from broker.engine.mailbox import MAILBOX_CHANGED, SeqMarks, list_pending, seq_marks
from broker.gateway.redelivery import Held, held_deliveries, is_held
from broker.gateway.session import Session
from broker.gateway.views import FactView
from protocol.codec import CloseCode

# Errors of a database read that mean the session's credential is gone: the
# agent was deactivated or its workspace deleted after the handshake, and
# the event that says so was published before the session could see it.
CREDENTIAL_GONE = frozenset({"agent_not_found", "workspace_not_found"})


class Push(NamedTuple):
    """One delivery to push: as read from the database (replay) or held and due again.

    changed_at: a held row's `updated_at` as read (see `broker.gateway.redelivery`).
    """

    seq: int
    view: FactView
    redelivery: bool = False
    changed_at: int | None = None


def marks_and_expiry(
    conn: apsw.Connection, workspace_id: int, agent_id: int,
    expiry: Callable[[apsw.Connection, int, int, bytes], int | None], credential: bytes,
) -> tuple[SeqMarks, int | None]:
    """The agent's delivery marks and when its credential stops working, in one snapshot."""
    return seq_marks(conn, workspace_id, agent_id), expiry(conn, workspace_id, agent_id,
                                                           credential)


class DeliverySession(Session):
    """A session that carries one agent's durable deliveries (native or Relaycast node).

    credential: the digest of the token the socket was opened with (None: a
    test's session, never cut). `credential_expiry` is the read that says
    when that token stops working (epoch ms; None: it does not), asked with
    the replay's first read on connect and on each `agent.token_rotated` event: a token rotated out
    closes the socket with 4401 at the end of its grace.
    """

    agent_id: int

    def __init__(self, *args: Any, batch: bool = False, credential: bytes | None = None,
                 **kwargs: Any) -> None:
        """batch: send deliveries as `deliver.batch` frames (the client asked for them)."""
        super().__init__(*args, **kwargs)
        self.batch = batch
        self.credential = credential
        # Held deliveries this session pushed again, as they were then (see redelivery).
        self._held_pushed: dict[int, Held] = {}
        self._connected = False  # the replay on connect is done
        self._checked = False  # the credential was read on connect
        # When a deferred delivery falls due and must be pushed again (trio time).
        # Fired by the session's deadline task: ask the pump to push again.
        self._redeliver_due = self.alarm(self.queue.want_redelivery)

    # The credential is first read with the replay's first marks, in one read
    # (`_replay`): after the session is attached, as a separate read would be.

    def offer_event(self, view: FactView) -> None:
        if view.type == MAILBOX_CHANGED:
            # Audience: this agent. The event still goes out: it is documented.
            self.queue.want_redelivery()
        elif view.type == TOKEN_ROTATED:
            # Audience: this agent. Read where its token stands now; the
            # event still goes to the client, which may want the new token.
            self.spawn(self._check_credential)
        super().offer_event(view)

    def credential_expiry(self) -> Callable[[apsw.Connection, int, int, bytes], int | None]:
        """The read of when this kind of socket's token stops working (each kind its own)."""
        raise NotImplementedError

    async def _check_credential(self) -> None:
        """Close (4401) at the end of the grace if the socket's token was rotated out."""
        if self.credential is None:
            return
        try:
            expires = await self.engine.read(self.credential_expiry(), self.workspace_id,
                                             self.agent_id, self.credential)
        except BrokerError as exc:
            self._read_refused(exc)
            return
        if expires is not None:
            self.expire_credential_at(expires)

    async def catch_up(self) -> None:
        """Replay from the database up to the highest seq known, then go live (no gap, in order).

        Closes the session with 4401 when the agent is gone from the
        database (deactivated, or its workspace deleted, between the
        handshake and the replay).
        """
        try:
            marks = await self._replay()
        except BrokerError as exc:
            self._read_refused(exc)
            return
        if not self._connected:
            self._connected = True
            # The replay skipped deliveries held (failed, or deferred past
            # now): push the due ones again and find when to come back. Held
            # rows are above the acked seq, so where the replay's snapshot
            # had nothing unacked there are none to read; a row held later
            # comes with `mailbox.changed`, which asks again.
            if marks.acked_seq < marks.last_seq:
                self.queue.want_redelivery()

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
        queue = self.queue
        queue.redelivery_wanted = False  # a change from now on asks again
        up_to, after, page_size = queue.cursor, 0, self.settings.replay_page
        seen: dict[int, Held] = {}
        while True:
            page = await self.engine.read(held_deliveries, self.workspace_id, self.agent_id,
                                          after, up_to, int(time.time() * 1000), page_size)
            pushes: list[Push] = []
            for row in page.rows:
                seen[row.seq] = row.version
                if self._held_pushed.get(row.seq) == row.version:
                    continue  # pushed already; its mark is on its way
                view = FactView(row.type, self.workspace_id, row.payload,
                                message_id=row.message_id)
                pushes.append(Push(row.seq, view, True, row.updated_at))
            await self.send_deliveries(pushes)
            self.redelivered += len(pushes)
            if len(page.rows) < page_size:
                break
            after = page.rows[-1].seq
        self._held_pushed = seen
        if page.next_due is None:
            self._redeliver_due.move(math.inf)
        else:
            self._redeliver_due.move(trio.current_time() + max(
                0.0, page.next_due / 1000 - time.time()))

    async def _replay(self) -> SeqMarks:
        """Replay up to the high seq; the marks read last (the snapshot the replay ended on)."""
        queue = self.queue
        page_size = self.settings.replay_page
        queue.start_catch_up()
        while True:
            # Read `hi` only after buffering started: see FrameQueue.
            if not self._connected and self.credential is not None and not self._checked:
                # On connect, with the credential's expiry: one read, not two.
                self._checked = True
                marks, expires = await self.engine.read(
                    marks_and_expiry, self.workspace_id, self.agent_id,
                    self.credential_expiry(), self.credential)
                if expires is not None:
                    self.expire_credential_at(expires)
            else:
                marks = await self.engine.read(seq_marks, self.workspace_id, self.agent_id)
            while queue.cursor < marks.last_seq:
                page = await self.engine.read(
                    list_pending, self.workspace_id, self.agent_id, queue.cursor, page_size,
                    int(time.time() * 1000),
                )
                pushes: list[Push] = []
                for row in page:
                    view = FactView(row.type, self.workspace_id, bytes(row.payload),
                                    message_id=row.message_id)
                    held = is_held(row.state, row.available_at)
                    pushes.append(Push(row.seq, view, held, row.updated_at if held else None))
                    if held:
                        self._held_pushed[row.seq] = (row.state, row.attempts, row.available_at,
                                                      row.updated_at)
                # One page is one flush: with batches, its deliveries share frames.
                await self.send_deliveries(pushes)
                if page:
                    queue.advance(page[-1].seq)
                self.replayed += len(page)
                if len(page) < page_size:
                    # Nothing else is pending up to `hi` (acked, dead or deferred).
                    queue.advance(marks.last_seq)
                await self.flush_queued()
            if queue.finish_catch_up():
                return marks

    async def send_delivery(self, seq: int, view: FactView, redelivery: bool = False,
                            changed_at: int | None = None) -> None:
        if self.batch:
            await self.send_deliveries([Push(seq, view, redelivery, changed_at)])
            return
        await self.send_bytes(self.codec.encode(self.delivery_frame(seq, view, redelivery)))
        self.delivered(seq, redelivery, changed_at)

    async def send_deliveries(self, pushes: list[Push]) -> None:
        """Push these deliveries in order: in `deliver.batch` frames when the client asked
        for batches (split at `max_frame_bytes`), otherwise one `deliver` frame each."""
        if not self.batch:
            for push in pushes:
                await self.send_delivery(*push)
            return
        if not pushes:
            return
        encode, frame = self.codec.encode_bytes, self.delivery_frame
        items = [encode(frame(p.seq, p.view, p.redelivery)) for p in pushes]
        await self.send_frames(self.codec.encode_batch(items, self.settings.max_frame_bytes))
        for push in pushes:
            self.delivered(push.seq, push.redelivery, push.changed_at)

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
