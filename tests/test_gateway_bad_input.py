"""Bad input on /v1/ws: an error reply when the id can be read, else a documented close code.

Every case also checks that nothing was written and that another session of
the same server keeps working.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
import trio
import trio_websocket
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.client import connect
from broker.gateway.settings import GatewaySettings
from broker.server import BrokerServer
from protocol.codec import MSGPACK_SUBPROTOCOL, CloseCode
from protocol.nesting import MAX_NESTING_DEPTH
from tests.helpers.daemon import serve
from tests.helpers.engine import TEST_DEADLINE_S, make_world
from tests.helpers.realtime import (
    Live,
    closed_with,
    next_frame,
    post,
    raw_socket,
    send_json,
    ws_url,
)

SMALL_FRAMES = GatewaySettings(max_frame_bytes=4096)


@pytest.fixture
def gateway_settings() -> GatewaySettings:
    return SMALL_FRAMES
# Every close code the server may use on a session that sent bad frames.
DOCUMENTED_CLOSES = {int(c) for c in CloseCode}


async def written(server: BrokerServer) -> tuple[int, int]:
    """Rows that a stray write would add: messages and deliveries."""
    row = await server.engine.read(lambda c: c.execute(
        "SELECT (SELECT count(*) FROM messages), (SELECT count(*) FROM deliveries)").fetchone())
    return int(row[0]), int(row[1])


async def others_still_work(live: Live) -> None:
    """A bystander session sends and receives as if nothing happened."""
    async with connect(ws_url(live.server), live.world.tokens["carol"]) as carol, \
            connect(ws_url(live.server), live.world.tokens["dave"]) as dave:
        sent = await carol.request("message.send", channel="general", text="still here")
        async for delivery in dave.deliveries():
            if delivery.data["id"] == sent["id"]:
                break


CLOSING = [
    pytest.param("{not json", CloseCode.INVALID_PAYLOAD, "invalid_json", id="not-json"),
    pytest.param('["a", "list"]', CloseCode.BAD_FRAME, "invalid_frame", id="not-an-object"),
    pytest.param('{"v":1,"type":"nope"}', CloseCode.BAD_FRAME, "unknown_type",
                 id="unknown-type-no-id"),
    pytest.param('{"v":1,"type":"message.send","channel":"general","text":"hi"}',
                 CloseCode.BAD_FRAME, "invalid_request", id="missing-id"),
    pytest.param('{"v":1,"type":"delivery.ack","up_to_seq":"seven"}',
                 CloseCode.BAD_FRAME, "invalid_request", id="ack-wrong-type-no-id"),
]


@pytest.mark.parametrize(("frame", "close", "code"), CLOSING)
async def test_socket_unanswerable_frames_close_documented(
    live: Live, frame: str, close: CloseCode, code: str
) -> None:
    """Unanswerable frames close with a documented code."""
    before = await written(live.server)
    async with raw_socket(live.server, live.world.tokens["alice"]) as alice:
        await alice.send_message(frame)
        last = await next_frame(alice, "reply")
        assert last["re"] is None and last["ok"] is False
        assert last["error"]["code"] == code
        assert await closed_with(alice) == close
    assert await written(live.server) == before
    await others_still_work(live)


ANSWERED = [
    pytest.param({"v": 1, "id": "x1", "type": "nope"}, "unknown_type", id="unknown-type"),
    pytest.param({"v": 1, "id": "x2", "type": "message.send", "channel": 5, "text": "hi"},
                 "invalid_request", id="wrong-field-type"),
    pytest.param({"v": 1, "id": "x3", "type": "message.send", "channel": "general"},
                 "invalid_request", id="missing-field"),
    pytest.param({"v": 2, "id": "x4", "type": "message.send", "channel": "general",
                  "text": "hi"}, "unsupported_version", id="other-version"),
    pytest.param({"v": 1, "id": "x5", "type": "delivery.ack", "up_to_seq": -3},
                 "invalid_request", id="negative-ack"),
    pytest.param({"v": 1, "id": "x6", "type": "message.send", "channel": "general",
                  "text": ""}, "invalid_text", id="empty-text"),
]


@pytest.mark.parametrize(("frame", "code"), ANSWERED)
async def test_socket_answerable_bad_frames_get_error_reply(
    live: Live, frame: dict[str, Any], code: str
) -> None:
    """Answerable bad frames get an error reply, and the session goes on."""
    before = await written(live.server)
    async with raw_socket(live.server, live.world.tokens["alice"]) as alice:
        await send_json(alice, frame)
        reply = await next_frame(alice, "reply")
        assert reply["re"] == frame["id"] and reply["ok"] is False
        assert reply["error"]["code"] == code
        await send_json(alice, {"v": 1, "id": "ok", "type": "agent.me"})
        assert (await next_frame(alice, "reply"))["data"]["name"] == "alice"
    assert await written(live.server) == before
    await others_still_work(live)


async def test_socket_oversized_frame_closes_1009(live: Live) -> None:
    """An oversized frame closes with 1009."""
    before = await written(live.server)
    async with raw_socket(live.server, live.world.tokens["alice"]) as alice:
        await send_json(alice, {"v": 1, "id": "big", "type": "message.send",
                                "channel": "general", "text": "x" * 5000})
        assert await closed_with(alice) == CloseCode.MESSAGE_TOO_BIG
    assert await written(live.server) == before
    await others_still_work(live)


async def test_socket_binary_without_msgpack_closes_1003(
    live: Live,
) -> None:
    """A binary frame without the MessagePack subprotocol closes with 1003."""
    async with raw_socket(live.server, live.world.tokens["alice"]) as alice:
        await alice.send_message(msgspec.msgpack.encode(
            {"v": 1, "id": "b", "type": "message.send", "channel": "general", "text": "hi"}))
        assert await closed_with(alice) == CloseCode.UNSUPPORTED_DATA
    assert await written(live.server) == (0, 0)
    await others_still_work(live)


async def test_socket_garbage_binary_on_msgpack_closes_1007(live: Live) -> None:
    """Garbage binary on a MessagePack session closes with 1007."""
    async with raw_socket(live.server, live.world.tokens["alice"],
                          subprotocols=[MSGPACK_SUBPROTOCOL]) as alice:
        await alice.send_message(b"\xc1\xc1")
        assert await closed_with(alice) == CloseCode.INVALID_PAYLOAD
    await others_still_work(live)


# -- random frames at a live session --------------------------------------------------------

_TYPES = ["message.send", "channel.join", "delivery.ack", "ping", "pong", "agent.me",
          "reaction.add", "dm.send", "thread.reply", "nope", ""]
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=3),
    max_leaves=8,
)
_frame_dicts = st.fixed_dictionaries(
    {},
    optional={
        "v": st.sampled_from([1, 1, 1, 2, "1", None]),
        "id": st.one_of(st.text(min_size=1, max_size=8), st.integers(), st.none()),
        "type": st.sampled_from(_TYPES) | st.text(max_size=10),
        "channel": st.sampled_from(["general", "nowhere"]) | _json_values,
        "text": st.text(max_size=50) | _json_values,
        "up_to_seq": st.integers(-5, 10**20) | _json_values,
        "message_id": st.text(max_size=20) | st.integers(),
        "to": st.sampled_from(["bob", "zed"]) | _json_values,
        "emoji": st.text(max_size=5),
        "extra": _json_values,
    },
)
_frame_objects = _frame_dicts.map(lambda d: msgspec.json.encode(d).decode())


def _fit_msgpack(value: Any) -> Any:
    """`value` with integers beyond MessagePack's 64 bits clamped (JSON takes any size)."""
    if isinstance(value, dict):
        return {k: _fit_msgpack(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_fit_msgpack(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool):
        return max(-(2**63), min(value, 2**64 - 1))
    return value


_packed_objects = _frame_dicts.map(lambda d: msgspec.msgpack.encode(_fit_msgpack(d)))


@st.composite
def _deep_frames(draw: st.DrawFn, packed: bool) -> str | bytes:
    """A frame with one field nested around the depth limit, or past msgspec's recursion.

    Built by hand (msgspec would recurse encoding it); with or without an
    id, a known or unknown type, the depth in a known or an ignored field.
    """
    levels = draw(st.integers(MAX_NESTING_DEPTH - 2, MAX_NESTING_DEPTH + 2)
                  | st.integers(900, 1500))
    arrays = draw(st.booleans())
    fields: dict[str, Any] = {"v": 1}
    if draw(st.booleans()):
        fields["id"] = "deep"
    fields.update(type=draw(st.sampled_from(["message.send", "ping", "nope"])),
                  channel="general", text="x")
    key = draw(st.sampled_from(["data", "extra"]))
    if packed:
        head = msgspec.msgpack.encode(fields)
        nested = (b"\x91" * (levels - 1) + b"\x90" if arrays
                  else b"\x81\xa1a" * levels + b"\x01")
        return bytes([head[0] + 1]) + head[1:] + msgspec.msgpack.encode(key) + nested
    if not arrays:
        levels = min(levels, 600)  # 5 bytes a level: stay under SMALL_FRAMES
    nested_text = ("[" * levels + "]" * levels if arrays
                   else '{"a":' * levels + "1" + "}" * levels)
    return msgspec.json.encode(fields).decode()[:-1] + f',"{key}":{nested_text}}}'


def _frames(packed: bool) -> st.SearchStrategy[str | bytes]:
    """Frames for a JSON session, or for a MessagePack one (which still takes JSON text)."""
    objects = _packed_objects if packed else _frame_objects
    return st.one_of(
        objects, objects, objects, _deep_frames(packed),
        _frame_objects,
        st.text(max_size=60),
        st.binary(max_size=60),
        _json_values.map(lambda v: msgspec.json.encode(v).decode()),
    )


@st.composite
def _sessions(draw: st.DrawFn) -> tuple[bool, list[str | bytes]]:
    """MessagePack or not, and the frames to send."""
    packed = draw(st.booleans())
    frames = draw(st.lists(_frames(packed), min_size=1, max_size=12))
    if draw(st.booleans()):
        # Most random frames close the session: a deep one sent first is sure to be read.
        frames.insert(0, draw(_deep_frames(packed)))
    return packed, frames


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(session=_sessions())
async def test_socket_random_frames_errors_or_documented_close(
    tmp_path_factory: pytest.TempPathFactory, session: tuple[bool, list[str | bytes]]
) -> None:
    """Random frames get errors or a documented close, and others keep working.

    JSON and MessagePack sessions, with frames nested around the depth limit among them.
    """
    packed, frames = session
    with trio.fail_after(TEST_DEADLINE_S):
        async with serve(tmp_path_factory.mktemp("fuzz"), SMALL_FRAMES) as server:
            world = await make_world(server.engine)
            live = Live(server, world)
            subprotocols = [MSGPACK_SUBPROTOCOL] if packed else None
            async with raw_socket(server, world.tokens["alice"],
                                  subprotocols=subprotocols) as alice:
                close: int | None = None
                try:
                    for frame in frames:
                        await alice.send_message(frame)
                    await send_json(alice, {"v": 1, "id": "final", "type": "ping"})
                    while True:
                        frame = await next_frame(alice)
                        assert frame.get("v") == 1
                        assert frame["type"] in ("reply", "pong", "event", "deliver", "ping")
                        if frame["type"] == "reply" and frame["ok"] is False:
                            assert isinstance(frame["error"]["code"], str)
                            assert frame["error"]["code"] != "internal_error"
                        if frame.get("re") == "final":
                            break
                except trio_websocket.ConnectionClosed as closed:
                    assert closed.reason is not None
                    close = closed.reason.code
                if close is not None:
                    # Bad input is the client's fault: never the server's 1011.
                    assert close in DOCUMENTED_CLOSES and close != CloseCode.INTERNAL_ERROR
            await post(server.engine, world.workspace_id, world.agents["alice"], "general",
                       "after the storm")
            await others_still_work(live)
