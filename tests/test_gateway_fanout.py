"""The fanout hub, the per-session outbox and FactView, without sockets or a database."""

from __future__ import annotations

from typing import Any, cast

import msgspec
import pytest
import trio
import trio.testing

from broker.engine.engine import Engine
from broker.engine.events import encode_payload
from broker.engine.facts import Delivery, Fact
from broker.fanout import FanoutHub
from broker.gateway import Gateway, views
from broker.gateway.frame_queue import DeliverItem, EventItem, FrameQueue, Mode
from broker.gateway.node import NodeSession
from broker.gateway.views import FactView
from tests.helpers.realtime import FakeWebSocket

_MESSAGE = {"id": "42", "channel_name": "general", "conversation_id": None, "agent_id": "7",
            "agent_name": "alice", "text": "hi", "thread_id": None, "attachments": [],
            "injection_mode": "steer"}


def view(seq_note: str = "x", event_type: str = "message.created", data: Any = None) -> FactView:
    payload = encode_payload(event_type, data if data is not None else {**_MESSAGE,
                                                                         "text": seq_note})
    return FactView(event_type, 1, payload)


def live_outbox(capacity: int = 4, cursor: int = 0) -> FrameQueue:
    outbox = FrameQueue(capacity)
    outbox.start_catch_up()
    outbox.advance(cursor)
    assert outbox.finish_catch_up()
    return outbox


def drain(outbox: FrameQueue) -> list[Any]:
    items = []
    while (item := outbox.take_nowait()) is not None:
        items.append(item)
    return items


# -- the outbox ---------------------------------------------------------------------------


def test_frame_queue_catches_up_from_database_first() -> None:
    """A new frame queue catches up from the database first."""
    outbox = FrameQueue(4)
    assert outbox.mode is Mode.LAGGING and outbox.needs_catch_up
    outbox.offer_delivery(1, view())  # before catch-up starts: left to the database
    assert len(outbox) == 0


def test_frame_queue_live_deliveries_in_order_deduplicated() -> None:
    """Live deliveries are queued in order and duplicates dropped."""
    outbox = live_outbox(cursor=3)
    outbox.offer_delivery(3, view())  # already replayed
    outbox.offer_delivery(4, view())
    outbox.offer_delivery(4, view())
    outbox.offer_delivery(5, view())
    assert [i.seq for i in drain(outbox)] == [4, 5]
    assert outbox.cursor == 5 and outbox.live_deliveries == 2


def test_frame_queue_full_lags() -> None:
    """A full frame queue stops taking live deliveries and lags."""
    outbox = live_outbox(capacity=2)
    for seq in (1, 2, 3, 4):
        outbox.offer_delivery(seq, view())
    assert outbox.mode is Mode.LAGGING and outbox.overflows == 1
    assert not outbox.needs_catch_up  # what is queued goes out first
    assert [i.seq for i in drain(outbox)] == [1, 2]
    assert outbox.needs_catch_up and outbox.cursor == 2  # resume after 2, from the database
    assert outbox.max_depth == 2


def test_seam_buffers_live_deliveries_above_replay() -> None:
    """The seam buffers live deliveries and hands over those above the replay."""
    outbox = FrameQueue(8)
    outbox.start_catch_up()
    # Live deliveries arrive while the replay reads the database (hi = 3).
    for seq in (3, 4, 5):
        outbox.offer_delivery(seq, view())
    for seq in (1, 2, 3):  # the replay
        outbox.advance(seq)
    assert outbox.finish_catch_up()
    assert outbox.mode is Mode.LIVE
    assert [i.seq for i in drain(outbox)] == [4, 5]  # 3 was replayed: dropped
    outbox.offer_delivery(6, view())
    assert [i.seq for i in drain(outbox)] == [6]


def test_seam_replay_past_hi_adds_only_above() -> None:
    """The replay may run past hi, and the buffer then only adds what is above."""
    outbox = FrameQueue(8)
    outbox.start_catch_up()
    for seq in (4, 5, 6):
        outbox.offer_delivery(seq, view())
    outbox.advance(5)  # a later page already held 4 and 5
    assert outbox.finish_catch_up()
    assert [i.seq for i in drain(outbox)] == [6]


def test_seam_buffer_overflow_repeats_pump() -> None:
    """A buffer overflow during the replay makes the pump go round again."""
    outbox = FrameQueue(2)
    outbox.start_catch_up()
    for seq in (1, 2, 3):
        outbox.offer_delivery(seq, view())
    assert outbox.buffer_overflows == 1
    outbox.advance(3)
    assert not outbox.finish_catch_up()  # buffering again, read a new hi
    assert outbox.mode is Mode.CATCHING_UP and outbox.catch_ups == 2
    outbox.offer_delivery(4, view())
    outbox.advance(3)
    assert outbox.finish_catch_up()
    assert [i.seq for i in drain(outbox)] == [4]


def test_frame_queue_gap_falls_back_to_database() -> None:
    """A gap in live seqs falls back to the database."""
    outbox = live_outbox(cursor=1)
    outbox.offer_delivery(3, view())
    assert outbox.mode is Mode.LAGGING and outbox.gaps == 1
    assert outbox.needs_catch_up and outbox.cursor == 1


def test_frame_queue_drops_events_not_own_frames_when_full() -> None:
    """Events are dropped when full, and own frames never are."""
    outbox = live_outbox(capacity=1)
    assert outbox.offer_event(view())
    assert not outbox.offer_event(view())
    outbox.put("reply")
    items = drain(outbox)
    assert items[0] == "reply" and isinstance(items[1], EventItem)
    assert outbox.events_dropped == 1


def test_frame_queue_own_frames_first() -> None:
    """Own frames go before queued deliveries, which keep their order."""
    # A sender's reply must not wait behind the fanout of a big channel.
    outbox = live_outbox()
    for seq in (1, 2, 3):
        outbox.offer_delivery(seq, view())
    outbox.put("reply")
    outbox.offer_delivery(4, view())
    outbox.put("pong")
    items = drain(outbox)
    assert items[:2] == ["reply", "pong"]
    assert [item.seq for item in items[2:]] == [1, 2, 3, 4]
    assert outbox.own == 0 and len(outbox) == 0


def test_frame_queue_closed_takes_nothing() -> None:
    """A closed frame queue takes nothing."""
    outbox = live_outbox()
    outbox.offer_delivery(1, view())
    outbox.close()
    outbox.offer_delivery(2, view())
    outbox.put("reply")
    assert drain(outbox) == [] and not outbox.needs_catch_up


class StubEngine:
    """Sessions that never catch up from the database need no engine."""

    facts = None


# -- the hub --------------------------------------------------------------------------------


class Recorder:
    def __init__(self, workspace_id: int, agent_id: int | None) -> None:
        self.workspace_id = workspace_id
        self.agent_id = agent_id
        self.got: list[tuple[str, Any]] = []

    def offer_delivery(self, seq: int, view: FactView) -> None:
        self.got.append(("deliver", seq))

    def offer_event(self, view: FactView) -> None:
        self.got.append(("event", view.type))

    def offer_fact(self, view: FactView) -> None:
        self.got.append(("fact", view.type))


def fact(event_type: str, *, workspace_id: int = 1, deliveries: tuple[Delivery, ...] = (),
         audience: tuple[int, ...] | None = None, log_id: int | None = None) -> Fact:
    return Fact(type=event_type, workspace_id=workspace_id,
                payload=encode_payload(event_type, {"x": 1}), deliveries=deliveries,
                audience=audience, log_id=log_id)


def test_hub_routes_deliveries_to_every_session() -> None:
    """The hub routes deliveries to every session of the agent."""
    hub = FanoutHub()
    bob1, bob2, carol = Recorder(1, 20), Recorder(1, 20), Recorder(1, 30)
    assert hub.attach(bob1) is True
    assert hub.attach(bob2) is False
    assert hub.attach(carol) is True
    hub.publish([fact("message.created", log_id=9,
                      deliveries=(Delivery(20, 5), Delivery(30, 1)))])
    assert bob1.got == bob2.got == [("deliver", 5)]
    assert carol.got == [("deliver", 1)]
    assert hub.detach(bob1) is False
    assert hub.detach(bob2) is True
    assert hub.detach(bob2) is False  # idempotent


def test_hub_ephemeral_events_to_audience_or_workspace() -> None:
    """Ephemeral events go to their audience or the whole workspace."""
    hub = FanoutHub()
    bob, carol, other = Recorder(1, 20), Recorder(1, 30), Recorder(2, 40)
    for sub in (bob, carol, other):
        hub.attach(sub)
    hub.publish([fact("channel.created"), fact("message.reacted", audience=(30,)),
                 fact("message.created", log_id=3)])  # durable with no recipient: no event
    assert bob.got == [("event", "channel.created")]
    assert carol.got == [("event", "channel.created"), ("event", "message.reacted")]
    assert other.got == []


def test_hub_observers_see_own_workspace_only() -> None:
    """Observers see every fact of their workspace only."""
    hub = FanoutHub()
    observer, elsewhere = Recorder(1, None), Recorder(2, None)
    hub.attach(observer)
    hub.attach(elsewhere)
    hub.publish([fact("message.created", log_id=1, deliveries=(Delivery(20, 1),)),
                 fact("agent.status.active")])
    assert observer.got == [("fact", "message.created"), ("fact", "agent.status.active")]
    assert elsewhere.got == []
    assert hub.statistics().observers == 2


# -- FactView: each derived form once, in the Relaycast shapes -------------------------------------


def test_fact_view_msgpack_payload_made_once() -> None:
    """The MessagePack payload is made once and shared."""
    v = view()
    first, second = v.raw(msgpack=True), v.raw(msgpack=True)
    assert bytes(first) == bytes(second)
    assert msgspec.msgpack.decode(bytes(first))["data"]["text"] == "x"
    assert bytes(v.raw()) == v.payload  # the engine's JSON, passed through as is


def test_node_payload_adds_from_name_for_the_sdk() -> None:
    v = view("hello")
    node = msgspec.json.decode(bytes(v.node_payload()))
    assert node["data"]["from_name"] == "alice" and node["data"]["text"] == "hello"
    assert v.node_payload() is not None and v.message_id == "42" and v.mode == "steer"
    reacted = view(event_type="message.reacted",
                   data={"message_id": "42", "emoji": "eyes", "agent_name": "bob"})
    assert bytes(reacted.node_payload()) == reacted.payload
    assert reacted.message_id == "42" and reacted.mode == "wait"


@pytest.mark.parametrize(("event_type", "data", "flat", "channel"), [
    ("message.created", _MESSAGE,
     {"type": "message.created", "id": "42", "channel": "general",
      "message": {"id": "42", "agent_id": "7", "agent_name": "alice", "text": "hi",
                  "attachments": [], "injection_mode": "steer"}}, "general"),
    ("thread.reply", {**_MESSAGE, "thread_id": "40"},
     {"type": "thread.reply", "id": "42", "channel": "general", "parent_id": "40",
      "message": {"id": "42", "agent_id": "7", "agent_name": "alice", "text": "hi",
                  "attachments": [], "injection_mode": "steer"}}, "general"),
    ("dm.received", {**_MESSAGE, "channel_name": None, "conversation_id": "9"},
     {"type": "dm.received", "id": "42", "conversation_id": "9",
      "message": {"id": "42", "agent_id": "7", "agent_name": "alice", "text": "hi",
                  "attachments": [], "injection_mode": "steer"}}, None),
    ("message.reacted", {"message_id": "42", "emoji": "eyes", "agent_name": "bob",
                         "action": "added"},
     {"type": "message.reacted", "message_id": "42", "emoji": "eyes", "agent_name": "bob",
      "action": "added"}, None),
    ("channel.created", {"id": "5", "name": "ops", "topic": None},
     {"type": "channel.created", "channel": {"id": "5", "name": "ops", "topic": None}}, "ops"),
    ("member.joined", {"channel": "ops", "agent_name": "bob"},
     {"type": "member.joined", "channel": "ops", "agent_name": "bob"}, "ops"),
    ("agent.status.active", {"agent": {"name": "bob"}, "status": "active"},
     {"type": "agent.status.active", "agent": {"name": "bob"}, "status": "active"}, None),
])
def test_views_observer_events_relaycast_shapes(
    event_type: str, data: Any, flat: dict[str, Any], channel: str | None
) -> None:
    """Flat observer events have the Relaycast shapes."""
    encoded, concerns = view(event_type=event_type, data=data).flat_event()
    assert msgspec.json.decode(encoded) == flat
    assert concerns == channel


def test_deliver_items_keep_the_shared_view() -> None:
    v = view()
    outbox = live_outbox()
    outbox.offer_delivery(1, v)
    (item,) = drain(outbox)
    assert isinstance(item, DeliverItem) and item.view is v


async def test_views_context_update_encoded_once_per_fact(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock,
) -> None:
    """A context update is encoded once per fact for every node."""
    encodings: list[str] = []
    encode = views._encode_context_update

    def counted(event_type: str, data: Any) -> bytes:
        encodings.append(event_type)
        return encode(event_type, data)

    monkeypatch.setattr(views, "_encode_context_update", counted)
    gw = Gateway(cast(Engine, StubEngine()))
    sockets = [FakeWebSocket() for _ in range(3)]
    nodes = [NodeSession(gw, ws, gw.node_codec, workspace_id=1, agent_id=2 + n,
                         agent_name=f"a{n}", node_id=f"node_{2 + n}", node_name=f"a{n}-direct")
             for n, ws in enumerate(sockets)]
    presence = view(event_type="agent.status.active",
                    data={"agent": {"name": "bob"}, "status": "active"})
    async with trio.open_nursery() as nursery:
        for node in nodes:
            node.queue.mode = Mode.LIVE  # nothing to replay
            nursery.start_soon(node.serve)
        for node in nodes:
            node.offer_event(presence)
        await trio.sleep(1)  # on the autojump clock: until every pump has written
        nursery.cancel_scope.cancel()
    assert encodings == ["agent.status.active"]
    for ws in sockets:
        assert ws.sent == [{"v": 1, "type": "context.update", "topic": "presence",
                            "event": "agent.status.active",
                            "data": {"agent": {"name": "bob"}, "status": "active"}}]


def test_hub_empty_audience_reaches_only_observers() -> None:
    """An empty audience reaches no session, but observers see it."""
    hub = FanoutHub()
    bob, observer = Recorder(1, 20), Recorder(1, None)
    hub.attach(bob)
    hub.attach(observer)
    hub.publish([fact("group_dm.participant_removed", audience=())])
    assert bob.got == []  # not "the whole workspace"
    assert observer.got == [("fact", "group_dm.participant_removed")]


class _Watcher:
    def __init__(self, workspace_id: int, agent_id: int) -> None:
        self.workspace_id, self.agent_id = workspace_id, agent_id
        self.seen: list[tuple[str, int | None]] = []

    def offer_delivery(self, seq: int, view: Any) -> None:
        self.seen.append((view.type, seq))

    def offer_event(self, view: Any) -> None:
        self.seen.append((view.type, None))

    def offer_fact(self, view: Any) -> None:
        self.seen.append(("fact", None))


def test_fanout_watcher_sees_its_agent_and_counts_as_no_session() -> None:
    """A watcher gets its agent's deliveries, audience events and workspace events (not
    presence, not other agents'); it never makes the agent online or keeps it so."""
    hub: FanoutHub[Fact] = FanoutHub()
    watcher = _Watcher(1, 7)
    hub.watch(cast(Any, watcher))
    payload = encode_payload("message.created", _MESSAGE)
    hub.publish([
        Fact(type="message.created", workspace_id=1, payload=payload, log_id=1,
             deliveries=(Delivery(7, 3), Delivery(8, 5))),
        Fact(type="agent.token_rotated", workspace_id=1, payload=payload, audience=(7,),
             internal=True),
        Fact(type="agent.deactivated", workspace_id=1, payload=payload),
        Fact(type="agent.status.active", workspace_id=1, payload=payload),
        Fact(type="message.created", workspace_id=2, payload=payload, log_id=2,
             deliveries=(Delivery(9, 1),)),
    ])
    assert watcher.seen == [("message.created", 3), ("agent.token_rotated", None),
                            ("agent.deactivated", None)]
    assert hub.statistics().sessions == 0 and not hub.sessions_of(7)
    session = _Watcher(1, 7)
    assert hub.attach(cast(Any, session)) is True  # still the agent's first session
    assert hub.detach(cast(Any, session)) is True  # and its last
    hub.unwatch(cast(Any, watcher))
    hub.publish([Fact(type="message.created", workspace_id=1, payload=payload, log_id=3,
                      deliveries=(Delivery(7, 4),))])
    assert len(watcher.seen) == 3
