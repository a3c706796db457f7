"""The fanout hub: committed facts routed to live sessions, without ever awaiting a socket.

The writer publishes each committed batch of facts on `engine.facts`; the
hub's one task takes them in commit order and, for each fact, hands it to
the outbox of every session that must see it: the sessions of each agent
that got a durable delivery (with that delivery's seq), and, for an
ephemeral event, the sessions of its audience or of the whole workspace.
Workspace observers see every fact of their workspace.

Handing over is a synchronous, bounded operation (`Outbox.offer_*`), so a
slow socket can only ever fill its own outbox; the hub, the writer behind
it and every other session keep going (DESIGN invariant 7). A session whose
outbox is full stops taking live deliveries and later catches up from the
database, where the rows are durable (see `Outbox`).

Each fact is wrapped once in a `FactView`, shared by all its recipients: the
JSON payload the engine encoded is reused as is, and the other forms a
session may need (MessagePack, the Relaycast node payload, the node's
`context.update` frame, the observer's flat event) are derived at most once
per fact, on first use.
"""

from __future__ import annotations

import enum
import logging
from collections import deque
from collections.abc import Iterable
from typing import Any, Literal, Protocol

import msgspec
import trio

from broker.engine.facts import Fact
from broker.engine.reads import MESSAGE_EVENTS  # message-bearing events: data is a message
from protocol import frames as fr
from protocol.codec import json_to_msgpack

log = logging.getLogger(__name__)

# Frames a session's outbox holds before it stops taking live deliveries.
DEFAULT_OUTBOX_FRAMES = 1000

_json = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()


Topic = Literal["agent", "channel", "presence", "thread"]


class ContextUpdate(msgspec.Struct, kw_only=True):
    """`FleetContextUpdateMessage`: an ephemeral event pushed to a Relaycast node socket."""

    v: int = fr.PROTOCOL_VERSION
    type: Literal["context.update"] = "context.update"
    topic: Topic
    event: str
    data: Any


class FactView:
    """One event as sessions send it; every derived encoding is computed once and shared.

    type: the event type; payload: the engine's `{"type","data"}` JSON bytes.
    message_id: the message the event is about, when known without decoding.
    """

    __slots__ = ("type", "workspace_id", "payload", "channel_id", "_message_id", "_msgpack",
                 "_decoded", "_node", "_flat", "_context")

    def __init__(self, type: str, workspace_id: int, payload: bytes, *,
                 message_id: int | None = None, channel_id: int | None = None) -> None:
        self.type = type
        self.workspace_id = workspace_id
        self.payload = payload
        self.channel_id = channel_id
        self._message_id = message_id
        self._msgpack: bytes | None = None
        self._decoded: dict[str, Any] | None = None
        self._node: bytes | None = None
        self._flat: tuple[bytes, str | None] | None = None
        self._context: bytes | None = None

    @classmethod
    def of(cls, fact: Fact) -> FactView:
        return cls(fact.type, fact.workspace_id, fact.payload, channel_id=fact.channel_id)

    def raw(self, msgpack: bool = False) -> msgspec.Raw:
        """The payload as a frame embeds it: the engine's JSON, or MessagePack made once."""
        if not msgpack:
            return msgspec.Raw(self.payload)
        if self._msgpack is None:
            self._msgpack = json_to_msgpack(self.payload)
        return msgspec.Raw(self._msgpack)

    @property
    def data(self) -> Any:
        """The payload's `data`, decoded once."""
        if self._decoded is None:
            decoded = _json.decode(self.payload)
            self._decoded = decoded if isinstance(decoded, dict) else {"data": decoded}
        return self._decoded.get("data")

    def message_object(self) -> dict[str, Any]:
        """The message an event carries (its data, or data.message), as a dict."""
        data = self.data
        if not isinstance(data, dict):
            return {}
        inner = data.get("message")
        return inner if isinstance(inner, dict) else data

    @property
    def message_id(self) -> str:
        """The id of the message the event is about ("" when there is none)."""
        if self._message_id is not None:
            return str(self._message_id)
        data = self.data
        if not isinstance(data, dict):
            return ""
        if self.type in MESSAGE_EVENTS:
            value = self.message_object().get("id")
        else:
            value = data.get("message_id")
        return "" if value is None else str(value)

    @property
    def mode(self) -> str:
        """The message's injection mode, `wait` unless it says `steer`."""
        mode = self.message_object().get("injection_mode") if self.type in MESSAGE_EVENTS else None
        return "steer" if mode == "steer" else "wait"

    def node_payload(self) -> msgspec.Raw:
        """The payload for a Relaycast node socket.

        The SDK reads a message event's author from `data.from_name`
        (ws.js, transformServerLikeEvent); our message objects name it
        `agent_name`, so the node form adds `from_name`. Made once per fact.
        """
        if self._node is None:
            data = self.data
            if (self.type in MESSAGE_EVENTS and isinstance(data, dict)
                    and "from_name" not in data):
                author = self.message_object().get("agent_name")
                self._node = _encoder.encode({"type": self.type,
                                              "data": {**data, "from_name": author}})
            else:
                self._node = self.payload
        return msgspec.Raw(self._node)

    def flat_event(self) -> tuple[bytes, str | None]:
        """The Relaycast observer form (a flat ServerEvent) and the channel it concerns.

        Shapes from @relaycast/types events.d.ts: message events become
        `{type, id, channel|conversation_id, message}`; the rest spread their
        data next to `type`. Made once per fact.
        """
        if self._flat is None:
            self._flat = _flatten(self.type, self.data, self.message_object())
        return self._flat


    def context_update(self) -> msgspec.Raw:
        """The whole `context.update` frame a Relaycast node socket gets. Made once per fact.

        Every node session of the workspace sends the same bytes, so a
        presence change seen by a thousand nodes is encoded once.
        """
        if self._context is None:
            self._context = _encode_context_update(self.type, self.data)
        return msgspec.Raw(self._context)


def _topic(event_type: str) -> Topic:
    if event_type.startswith("agent.status."):
        return "presence"
    if event_type.startswith(("channel.", "member.")):
        return "channel"
    return "agent"


def _encode_context_update(event_type: str, data: Any) -> bytes:
    return _encoder.encode(ContextUpdate(topic=_topic(event_type), event=event_type, data=data))


def _flatten(event_type: str, data: Any, message: dict[str, Any]) -> tuple[bytes, str | None]:
    event: dict[str, Any]
    channel: str | None = None
    if event_type in MESSAGE_EVENTS:
        summary = {
            "id": message.get("id"), "agent_id": message.get("agent_id"),
            "agent_name": message.get("agent_name"), "text": message.get("text"),
            "attachments": message.get("attachments") or [],
            "injection_mode": message.get("injection_mode") or "wait",
        }
        event = {"type": event_type, "id": str(message.get("id") or "")}
        if event_type in ("dm.received", "group_dm.received"):
            outer = data if isinstance(data, dict) else {}
            event["conversation_id"] = outer.get("conversation_id") or message.get(
                "conversation_id")
        else:
            channel = message.get("channel_name")
            event["channel"] = channel
            if event_type == "thread.reply":
                event["parent_id"] = message.get("thread_id")
        event["message"] = summary
    elif event_type.startswith("channel.") and isinstance(data, dict) and "channel" not in data:
        channel = data.get("name")
        event = {"type": event_type, "channel": data}
    elif isinstance(data, dict):
        event = {**data, "type": event_type}
        named = data.get("channel")
        if isinstance(named, str):
            channel = named
        elif isinstance(named, dict) and isinstance(named.get("name"), str):
            channel = named["name"]
    else:
        event = {"type": event_type, "data": data}
    return _encoder.encode(event), channel if isinstance(channel, str) else None


# -- the per-session outbox ------------------------------------------------------------


class Mode(enum.Enum):
    """Where a session's deliveries come from."""

    LIVE = "live"  # from the hub, straight into the outbox
    CATCHING_UP = "catching_up"  # from the database; live ones are buffered meanwhile
    LAGGING = "lagging"  # the outbox overflowed: live ones are ignored until it drains


class DeliverItem(msgspec.Struct, frozen=True, array_like=True):
    seq: int
    view: FactView


class EventItem(msgspec.Struct, frozen=True, array_like=True):
    view: FactView


class OutboxStatistics(msgspec.Struct, kw_only=True):
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


class Outbox:
    """A session's bounded queue of frames to send, and where its delivery stream stands.

    The hub offers (never blocks); the session's pump takes. `cursor` is the
    highest seq already handed to the pump (by the outbox or by a replay),
    so duplicates (a fact seen both in the database and live) are dropped
    by seq.

    The seam between database replay and live push (`start_catch_up`,
    `finish_catch_up`): the pump first switches the outbox to CATCHING_UP,
    so live deliveries are buffered from that instant; only then it reads
    the agent's highest allocated seq `hi` and replays the database up to
    it. Every delivery committed after `hi` was read is published after
    buffering began, so it is in the buffer; every one committed before is
    in the database. `finish_catch_up` then moves the buffered deliveries
    above the cursor into the outbox, in order, and goes LIVE. If the buffer
    overflowed meanwhile it is discarded and the pump goes round again
    (buffer first, then a new `hi`).

    A new outbox starts LAGGING at cursor 0: the first thing its pump does
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

    def __init__(self, capacity: int = DEFAULT_OUTBOX_FRAMES) -> None:
        if capacity < 1:
            raise ValueError("an outbox holds at least one frame")
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
                log.warning("outbox: live seq %d after %d; catching up from the database",
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
        """An ephemeral event; dropped (False) when the outbox is full, it has no seq to resume."""
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
        docstring), so they never wait behind a full outbox of deliveries.
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
        """Until an own frame is taken, `room_changed` is called, or the outbox closes.

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

        After False the outbox is buffering afresh: read a new high seq and
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

    def statistics(self) -> OutboxStatistics:
        return OutboxStatistics(
            capacity=self.capacity, depth=len(self), max_depth=self.max_depth,
            own=self.own, max_own=self.max_own,
            buffered=len(self._buffer), max_buffered=self.max_buffered, mode=self.mode.value,
            cursor=self.cursor, live_deliveries=self.live_deliveries, overflows=self.overflows,
            buffer_overflows=self.buffer_overflows, gaps=self.gaps,
            events_dropped=self.events_dropped, catch_ups=self.catch_ups,
        )


# -- the hub -----------------------------------------------------------------------------


class Subscriber(Protocol):
    """A live session as the hub sees it.

    agent_id is None for a workspace observer, which sees every fact of the
    workspace through `offer_fact`.
    """

    workspace_id: int
    agent_id: int | None

    def offer_delivery(self, seq: int, view: FactView) -> None: ...

    def offer_event(self, view: FactView) -> None: ...

    def offer_fact(self, view: FactView) -> None: ...


class HubStatistics(msgspec.Struct, kw_only=True):
    sessions: int
    agents_online: int
    observers: int
    batches: int
    facts: int
    deliveries_routed: int
    events_routed: int


class FanoutHub:
    """Routes committed facts to subscribers; `run` consumes `engine.facts`.

    `attach` / `detach` return True when they change whether the agent has
    any session at all (first connect, last disconnect), for presence.
    """

    def __init__(self) -> None:
        self._by_agent: dict[int, set[Subscriber]] = {}
        self._by_workspace: dict[int, set[Subscriber]] = {}
        self._observers: dict[int, set[Subscriber]] = {}
        self.batches = 0
        self.facts = 0
        self.deliveries_routed = 0
        self.events_routed = 0

    def attach(self, sub: Subscriber) -> bool:
        """Start routing to `sub`; True if it is its agent's first session."""
        if sub.agent_id is None:
            self._observers.setdefault(sub.workspace_id, set()).add(sub)
            return False
        self._by_workspace.setdefault(sub.workspace_id, set()).add(sub)
        sessions = self._by_agent.setdefault(sub.agent_id, set())
        sessions.add(sub)
        return len(sessions) == 1

    def detach(self, sub: Subscriber) -> bool:
        """Stop routing to `sub` (idempotent); True if it was its agent's last session."""
        if sub.agent_id is None:
            _discard(self._observers, sub.workspace_id, sub)
            return False
        _discard(self._by_workspace, sub.workspace_id, sub)
        sessions = self._by_agent.get(sub.agent_id)
        if sessions is None or sub not in sessions:
            return False
        sessions.discard(sub)
        if sessions:
            return False
        del self._by_agent[sub.agent_id]
        return True

    def sessions_of(self, agent_id: int) -> frozenset[Subscriber]:
        return frozenset(self._by_agent.get(agent_id, ()))

    async def run(
        self, facts: trio.MemoryReceiveChannel[list[Fact]],
        *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Route every batch until the engine closes the channel."""
        async with facts:
            task_status.started()
            async for batch in facts:
                self.publish(batch)

    def publish(self, batch: Iterable[Fact]) -> None:
        """Route one committed batch, in order (synchronous: nothing here awaits)."""
        self.batches += 1
        # A subscriber may detach while it is offered something (a session
        # closes when its credential is revoked), so each set is copied first.
        for fact in batch:
            self.facts += 1
            view = FactView.of(fact)
            if not fact.internal:
                for sub in tuple(self._observers.get(fact.workspace_id, ())):
                    sub.offer_fact(view)
            if fact.deliveries:
                for delivery in fact.deliveries:
                    for sub in tuple(self._by_agent.get(delivery.agent_id, ())):
                        self.deliveries_routed += 1
                        sub.offer_delivery(delivery.seq, view)
            elif fact.audience is not None:
                for agent_id in fact.audience:
                    for sub in tuple(self._by_agent.get(agent_id, ())):
                        if sub.workspace_id == fact.workspace_id:
                            self.events_routed += 1
                            sub.offer_event(view)
            elif not fact.log_id:
                for sub in tuple(self._by_workspace.get(fact.workspace_id, ())):
                    self.events_routed += 1
                    sub.offer_event(view)

    def statistics(self) -> HubStatistics:
        return HubStatistics(
            sessions=sum(len(s) for s in self._by_workspace.values()),
            agents_online=len(self._by_agent),
            observers=sum(len(s) for s in self._observers.values()),
            batches=self.batches, facts=self.facts,
            deliveries_routed=self.deliveries_routed, events_routed=self.events_routed,
        )


def _discard(index: dict[int, set[Subscriber]], key: int, sub: Subscriber) -> None:
    members = index.get(key)
    if members is not None:
        members.discard(sub)
        if not members:
            del index[key]
