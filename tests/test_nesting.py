"""Documents nested too deep: refused with a clear error on every decode path, never a 500.

The protocol's bound (`protocol.nesting`) at the exact limit and one past
it, then each binding that decodes outside input: REST bodies (anonymous
and as an agent), inbound webhook bodies, native WebSocket frames in JSON
and MessagePack, the node socket, the observer, and the TOML configuration.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import trio_websocket
from hypothesis import given
from hypothesis import strategies as st

from broker.config import ConfigError, load_settings
from broker.server import BrokerServer
from protocol import frames as fr
from protocol import requests as rq
from protocol.codec import MSGPACK_SUBPROTOCOL, CloseCode, Codec, FrameError
from protocol.nesting import (
    MAX_NESTING_DEPTH,
    NestingTooDeep,
    decode_json,
    decode_msgpack,
    json_head,
    json_openers,
    msgpack_head,
    msgpack_openers,
    nesting_exceeds,
)
from tests.helpers.realtime import Live, closed_with, next_frame, raw_socket, send_json
from tests.helpers.rest import RestWorld, call, make_rest_world

LIMIT = MAX_NESTING_DEPTH
# Deep enough that msgspec and tomllib run out of recursion (the reported cases).
FAR_TOO_DEEP = 5000
IN_DATA = 2000


def arrays(levels: int) -> Any:
    """`levels` nested lists around an empty one's place: [[[...]]] (levels deep)."""
    value: Any = []
    for _ in range(levels - 1):
        value = [value]
    return value


def objects(levels: int) -> Any:
    """`levels` nested objects: {"a":{"a":...{"a":1}}} (levels deep)."""
    value: Any = 1
    for _ in range(levels):
        value = {"a": value}
    return value


def deep_json(levels: int) -> str:
    """`levels` nested arrays as JSON text, built without encoding (msgspec would recurse)."""
    return "[" * levels + "]" * levels


def deep_msgpack(levels: int) -> bytes:
    """`levels` nested one-element arrays as MessagePack, the innermost empty."""
    return b"\x91" * (levels - 1) + b"\x90"


# -- the protocol's bound -----------------------------------------------------------------


def depth(value: Any) -> int:
    """Reference depth, by plain recursion (only for the small values of these tests)."""
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in [*value, *value.values()]), default=0)
    if isinstance(value, list | tuple):
        return 1 + max((depth(v) for v in value), default=0)
    return 0


@pytest.mark.parametrize("make", [arrays, objects], ids=["arrays", "objects"])
def test_nesting_exceeds_at_the_limit_and_one_past(make: Any) -> None:
    assert depth(make(LIMIT)) == LIMIT
    assert not nesting_exceeds(make(LIMIT))
    assert nesting_exceeds(make(LIMIT + 1))
    assert not nesting_exceeds(make(3), limit=3) and nesting_exceeds(make(4), limit=3)
    assert not nesting_exceeds("scalar", limit=0) and nesting_exceeds([], limit=0)


def test_nesting_counts_structs_and_msgpack_tuple_keys() -> None:
    frame = rq.SendMessage(channel="c", text="t", data=objects(LIMIT - 1))
    assert not nesting_exceeds(frame)
    assert nesting_exceeds(rq.SendMessage(channel="c", text="t", data=objects(LIMIT)))
    # MessagePack map keys may be arrays; msgspec makes them tuples.
    key: Any = ()
    for _ in range(LIMIT - 1):
        key = (key,)
    assert not nesting_exceeds({key: 1}, limit=LIMIT + 1)
    assert nesting_exceeds({key: 1}, limit=LIMIT)


@pytest.mark.parametrize("levels", [LIMIT, LIMIT + 1, FAR_TOO_DEEP])
def test_decode_json_takes_the_limit_and_refuses_one_more(levels: int) -> None:
    decoder = msgspec.json.Decoder()
    for document in (deep_json(levels), deep_json(levels).encode()):
        if levels <= LIMIT:
            assert depth(decode_json(decoder, document)) == levels
            continue
        with pytest.raises(NestingTooDeep) as refused:
            decode_json(decoder, document)
        # A DecodeError, so every caller that refuses bad JSON refuses this too.
        assert isinstance(refused.value, msgspec.DecodeError)
        assert str(refused.value) == f"nested deeper than {LIMIT} levels"


@pytest.mark.parametrize("levels", [LIMIT, LIMIT + 1, FAR_TOO_DEEP])
def test_decode_msgpack_takes_the_limit_and_refuses_one_more(levels: int) -> None:
    decoder = msgspec.msgpack.Decoder()
    if levels <= LIMIT:
        assert depth(decode_msgpack(decoder, deep_msgpack(levels))) == levels
    else:
        with pytest.raises(NestingTooDeep):
            decode_msgpack(decoder, deep_msgpack(levels))


def test_openers_ignore_brackets_inside_strings() -> None:
    """Brackets inside strings do not count."""
    text = "[{" * 5000
    assert decode_json(msgspec.json.Decoder(), msgspec.json.encode({"text": text})) == {
        "text": text}
    packed = msgspec.msgpack.encode({"text": "\x91\x80" * 5000})
    assert msgpack_openers(packed) > LIMIT
    assert decode_msgpack(msgspec.msgpack.Decoder(), packed) == {"text": "\x91\x80" * 5000}


_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1)
    | st.text(alphabet="[]{}é\x91", max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner,
                                                                 max_size=3),
    max_leaves=30,
)


@given(value=_values, limit=st.integers(0, 8))
def test_openers_bound_depth_and_walk_is_exact(value: Any, limit: int) -> None:
    """The byte counts bound the depth, and the walk is exact."""
    as_json, as_msgpack = msgspec.json.encode(value), msgspec.msgpack.encode(value)
    assert json_openers(as_json) >= depth(value)
    assert msgpack_openers(as_msgpack) >= depth(value)
    assert nesting_exceeds(value, limit) == (depth(value) > limit)
    for decode, data in ((decode_json, as_json), (decode_msgpack, as_msgpack)):
        decoder: Any = (msgspec.json.Decoder() if decode is decode_json
                        else msgspec.msgpack.Decoder())
        if depth(value) > limit:
            with pytest.raises(NestingTooDeep):
                decode(decoder, data, limit=limit)
        else:
            assert decode(decoder, data, limit=limit) == value


def test_head_is_members_before_first_nested() -> None:
    """The head of a document is its members before the first nested value."""
    assert json_head('{"v":1,"id":"c[1]{","data":[[[') == '{"v":1,"id":"c[1]{","data":null}'
    assert json_head(b' {"id":"c\\"1", "x": {') == b' {"id":"c\\"1", "x": null}'
    for flat in ('{"id":"c1"}', '[[1]]', '{"id":"unterminated [', "", "[]"):
        assert json_head(flat) is None
    packed = msgspec.msgpack.encode({"v": 1, "id": "c1", "n": -5, "f": 1.5, "b": b"x",
                                     "data": [[1]], "after": "x"})
    assert msgspec.msgpack.decode(msgpack_head(packed) or b"") == {
        "v": 1, "id": "c1", "n": -5, "f": 1.5, "b": b"x"}
    assert msgpack_head(msgspec.msgpack.encode([1])) is None
    assert msgpack_head(b"") is None


# -- the WebSocket codec ------------------------------------------------------------------

SEND = fr.request_frame("message.send", rq.SendMessage)
INBOUND = (*fr.NATIVE_CONTROL_FRAMES, SEND)


def send_frame(data_levels: int, *, with_id: bool = True, id_last: bool = False) -> str:
    """A message.send frame whose `data` nests `data_levels` levels (objects), as JSON text."""
    head = '{"v":1,' + ('"id":"c1",' if with_id and not id_last else "")
    tail = ',"id":"c1"}' if with_id and id_last else "}"
    data = '{"a":' * data_levels + "1" + "}" * data_levels
    return f'{head}"type":"message.send","channel":"general","text":"hi","data":{data}{tail}'


def packed_send_frame(data_levels: int, *, with_id: bool = True) -> bytes:
    """The same frame as MessagePack, built by hand (msgspec would recurse encoding it)."""
    fields: dict[str, Any] = {"v": 1, "type": "message.send", "channel": "general",
                              "text": "hi"}
    if with_id:
        fields = {"id": "c1", **fields}
    head = msgspec.msgpack.encode(fields)
    data = (b"\x81\xa1a" * data_levels) + b"\x01"
    return bytes([head[0] + 1]) + head[1:] + msgspec.msgpack.encode("data") + data


@pytest.mark.parametrize("msgpack", [False, True], ids=["json", "msgpack"])
def test_codec_takes_a_frame_at_the_limit_and_answers_one_past_it(msgpack: bool) -> None:
    codec = Codec(INBOUND, msgpack=msgpack)
    encode: Any = packed_send_frame if msgpack else send_frame
    kind = "msgpack" if msgpack else "json"
    # The frame is level 1, so its `data` may nest LIMIT - 1 levels.
    assert codec.decode(encode(LIMIT - 1)).data == objects(LIMIT - 1)
    for levels in (LIMIT, IN_DATA):
        with pytest.raises(FrameError) as refused:
            codec.decode(encode(levels))
        err = refused.value
        assert (err.code, err.request_id) == (f"invalid_{kind}", "c1")
        assert err.message == f"the frame is nested deeper than {LIMIT} levels"
        with pytest.raises(FrameError) as refused:
            codec.decode(encode(levels, with_id=False))
        err = refused.value
        assert (err.code, err.request_id, err.close_code) == (
            f"invalid_{kind}", None, CloseCode.INVALID_PAYLOAD)


@pytest.mark.parametrize("msgpack", [False, True], ids=["json", "msgpack"])
def test_codec_counts_the_fields_it_ignores(msgpack: bool) -> None:
    """Unknown fields are dropped, but their depth is refused like any other."""
    codec = Codec(INBOUND, msgpack=msgpack)
    encode: Any = msgspec.msgpack.encode if msgpack else (
        lambda frame: msgspec.json.encode(frame).decode())
    ping = {"v": 1, "id": "p1", "type": "ping"}
    assert isinstance(codec.decode(encode({**ping, "extra": arrays(LIMIT - 1)})), fr.Ping)
    with pytest.raises(FrameError) as refused:
        codec.decode(encode({**ping, "extra": arrays(LIMIT)}))
    assert (refused.value.code, refused.value.request_id) == (
        "invalid_msgpack" if msgpack else "invalid_json", "p1")


def test_codec_reads_the_id_only_before_the_first_nested_value() -> None:
    codec = Codec(INBOUND)
    for levels in (LIMIT, IN_DATA):
        with pytest.raises(FrameError) as refused:
            codec.decode(send_frame(levels, id_last=True))
        assert refused.value.request_id is None
        assert refused.value.close_code == CloseCode.INVALID_PAYLOAD


# -- REST ---------------------------------------------------------------------------------


def no_error_logged(caplog: pytest.LogCaptureFixture) -> None:
    logged = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert logged == [], [r.getMessage() for r in logged]


async def count(server: BrokerServer, table: str) -> int:
    row = await server.engine.read(
        lambda c: c.execute(f"SELECT count(*) FROM {table}").fetchone())  # noqa: S608
    return int(row[0])


async def post_raw(client: httpx.AsyncClient, path: str, body: str,
                   token: str | None = None) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return await client.post(path, content=body.encode(), headers=headers)


@pytest.fixture
async def rest_world(client: httpx.AsyncClient) -> RestWorld:
    return await make_rest_world(client, agents=("alice", "bob"))


@pytest.mark.parametrize("token", [None, "agent"], ids=["anonymous", "agent"])
async def test_rest_workspace_create_nested_5000_deep_is_400_invalid_json(
    server: BrokerServer, client: httpx.AsyncClient, rest_world: RestWorld,
    caplog: pytest.LogCaptureFixture, token: str | None,
) -> None:
    """The reported case: a 500 and a RecursionError traceback per request, before."""
    before = await count(server, "workspaces")
    response = await post_raw(client, "/v1/workspaces",
                              '{"name":' + deep_json(FAR_TOO_DEEP) + "}",
                              rest_world.tokens["alice"] if token else None)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == {
        "code": "invalid_json", "message": f"the body is nested deeper than {LIMIT} levels"}
    assert await count(server, "workspaces") == before
    served = await call(client, "POST", "/v1/workspaces", json={"name": "next"})
    assert served.status == 201
    no_error_logged(caplog)


async def test_rest_send_with_2000_levels_in_data_is_400_and_writes_nothing(
    server: BrokerServer, client: httpx.AsyncClient, rest_world: RestWorld,
    caplog: pytest.LogCaptureFixture,
) -> None:
    alice = rest_world.tokens["alice"]
    path = "/v1/channels/general/messages"
    for levels in (IN_DATA, LIMIT):  # far past the limit, and just past it
        data = '{"a":' * levels + "1" + "}" * levels
        response = await post_raw(client, path, '{"text":"hi","data":' + data + "}", alice)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == "invalid_json"
    assert await count(server, "messages") == 0
    assert await count(server, "deliveries") == 0
    # The body is level 1: `data` may nest LIMIT - 1 levels, and it comes back whole.
    sent = await call(client, "POST", path, alice,
                      json={"text": "deep enough", "data": objects(LIMIT - 1)})
    assert sent.status == 201, sent.body
    got = await call(client, "GET", f"/v1/messages/{sent.data['id']}", alice)
    assert got.data["data"] == objects(LIMIT - 1)
    no_error_logged(caplog)


async def test_inbound_hook_body_nested_too_deep_is_400_and_posts_nothing(
    server: BrokerServer, client: httpx.AsyncClient, rest_world: RestWorld,
    caplog: pytest.LogCaptureFixture,
) -> None:
    hook = (await call(client, "POST", "/v1/webhooks", rest_world.key,
                       json={"channel": "general", "name": "CI"})).data
    for body in ('{"action":' + deep_json(FAR_TOO_DEEP) + "}",
                 msgspec.json.encode({"action": arrays(LIMIT)}).decode()):
        response = await post_raw(client, hook["url"], body, hook["token"])
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == "invalid_json"
    assert await count(server, "messages") == 0
    posted = await call(client, "POST", hook["url"], hook["token"],
                        json={"action": arrays(LIMIT - 1)})
    assert posted.status == 201, posted.body
    no_error_logged(caplog)


# -- WebSocket sessions on a live server ----------------------------------------------------


@pytest.mark.parametrize("levels", [LIMIT, IN_DATA])
@pytest.mark.parametrize("msgpack", [False, True], ids=["json", "msgpack"])
async def test_native_socket_answers_a_deep_frame_with_its_id_and_goes_on(
    live: Live, caplog: pytest.LogCaptureFixture, msgpack: bool, levels: int,
) -> None:
    """Before: the session closed with 1011 and logged a RecursionError."""
    subprotocols = [MSGPACK_SUBPROTOCOL] if msgpack else None
    async with raw_socket(live.server, live.world.tokens["alice"],
                          subprotocols=subprotocols) as alice:
        await alice.send_message(packed_send_frame(levels) if msgpack else send_frame(levels))
        reply = await next_frame(alice, "reply")
        assert (reply["re"], reply["ok"]) == ("c1", False)
        assert reply["error"]["code"] == ("invalid_msgpack" if msgpack else "invalid_json")
        await send_json(alice, {"v": 1, "id": "after", "type": "agent.me"})
        assert (await next_frame(alice, "reply"))["data"]["name"] == "alice"
    assert await count(live.server, "messages") == 0
    no_error_logged(caplog)


@pytest.mark.parametrize("msgpack", [False, True], ids=["json", "msgpack"])
async def test_native_socket_closes_with_1007_on_a_deep_frame_without_id(
    live: Live, caplog: pytest.LogCaptureFixture, msgpack: bool,
) -> None:
    subprotocols = [MSGPACK_SUBPROTOCOL] if msgpack else None
    async with raw_socket(live.server, live.world.tokens["alice"],
                          subprotocols=subprotocols) as alice:
        await alice.send_message(packed_send_frame(IN_DATA, with_id=False) if msgpack
                                 else send_frame(IN_DATA, with_id=False))
        last = await next_frame(alice, "reply")
        assert (last["re"], last["error"]["code"]) == (
            None, "invalid_msgpack" if msgpack else "invalid_json")
        assert await closed_with(alice) == CloseCode.INVALID_PAYLOAD
    assert await count(live.server, "messages") == 0
    no_error_logged(caplog)


async def test_node_socket_answers_a_deep_frame_and_closes_with_1007_without_id(
    live: Live, caplog: pytest.LogCaptureFixture,
) -> None:
    assert live.server.url is not None
    async with httpx.AsyncClient(base_url=live.server.url) as http:
        issued = (await http.post(
            "/v1/agent/node-token", json={},
            headers={"Authorization": f"Bearer {live.world.tokens['bob']}"})).json()["data"]
    deep = deep_json(IN_DATA)
    async with raw_socket(live.server, issued["token"], path="/v1/node/ws",
                          subprotocols=[]) as node:
        await node.send_message(
            '{"v":1,"id":"n1","type":"node.register","node_id":"x","capabilities":' + deep + "}")
        error = await next_frame(node, "error")
        assert (error["id"], error["code"]) == ("n1", "invalid_json")
        await send_json(node, {"v": 1, "id": "n2", "type": "node.heartbeat"})
        assert (await next_frame(node, "reply"))["id"] == "n2"
        await node.send_message('{"v":1,"type":"node.heartbeat","x":' + deep + "}")
        assert await closed_with(node) == CloseCode.INVALID_PAYLOAD
    no_error_logged(caplog)


async def test_observer_closes_with_1007_on_a_deep_frame(
    live: Live, caplog: pytest.LogCaptureFixture,
) -> None:
    async with raw_socket(live.server, live.world.key, subprotocols=[]) as observer:
        await observer.send_message(
            '{"type":"subscribe","channels":' + deep_json(FAR_TOO_DEEP) + "}")
        error = await next_frame(observer, "error")
        assert error["code"] == "invalid_json"
        with pytest.raises(trio_websocket.ConnectionClosed) as closed:
            await next_frame(observer)
        assert closed.value.reason is not None
        assert closed.value.reason.code == CloseCode.INVALID_PAYLOAD
    no_error_logged(caplog)


# -- the configuration file -----------------------------------------------------------------

DEEP_TOML = [
    pytest.param("x = " + deep_json(FAR_TOO_DEEP) + "\n", id="array"),
    pytest.param("x = " + "{a = " * FAR_TOO_DEEP + "1" + "}" * FAR_TOO_DEEP + "\n",
                 id="inline-table"),
    pytest.param("[webhooks]\nallow_hosts = " + deep_json(LIMIT + 1) + "\n", id="just-past"),
    pytest.param("[" + ".".join(["a"] * (LIMIT + 1)) + "]\nb = 1\n", id="dotted-tables"),
]


@pytest.mark.parametrize("text", DEEP_TOML)
def test_config_file_nested_too_deep_is_a_config_error(tmp_path: Path, text: str) -> None:
    config = tmp_path / "broker.toml"
    config.write_text(text)
    with pytest.raises(ConfigError) as refused:
        load_settings(config)
    assert str(refused.value) == (
        f"{config}: arrays or tables nested deeper than {LIMIT} levels")


def test_config_file_nested_too_deep_exits_2_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "broker.toml"
    config.write_text("x = " + deep_json(FAR_TOO_DEEP) + "\n")
    done = subprocess.run(
        [sys.executable, "-m", "broker", "serve", "--config", str(config)],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "nested deeper than" in done.stderr
