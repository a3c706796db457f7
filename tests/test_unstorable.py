"""Integers outside the signed 64-bit range and MessagePack extensions: refused where
they come in, never a 500.

Before, such a value in a body or frame reached SQLite (an OverflowError)
or, with gateway processes, the MessagePack link to the writer, which
cannot carry it: a 500 and a traceback per request, and an ack holding one
failed the whole receipts command its gateway had built, other agents' and
other workspaces' acks with it. Now every decoder of outside input refuses
it (`protocol.nesting.Unstorable`), and MCP checks the arguments its SDK
decoded. Run in both process models.
"""

from __future__ import annotations

import httpx
import msgspec
import pytest

from broker.server import BrokerServer
from protocol import frames as fr
from protocol.codec import MSGPACK_SUBPROTOCOL, Codec, FrameError
from protocol.nesting import (
    MAX_INTEGER,
    MIN_INTEGER,
    Unstorable,
    decode_json,
    decode_msgpack,
    json_may_be_unstorable,
    unstorable,
)
from tests.helpers.mcp import error_code, mcp_client, mcp_url
from tests.helpers.realtime import next_frame, raw_socket, send_json
from tests.helpers.rest import RestWorld, call, make_rest_world

pytestmark = pytest.mark.both_process_models

HUGE = 2**70
_any_json = msgspec.json.Decoder()
_any_msgpack = msgspec.msgpack.Decoder()


# -- the protocol's bound ---------------------------------------------------------------


@pytest.mark.parametrize("value", [MAX_INTEGER + 1, MIN_INTEGER - 1, HUGE, -HUGE, 2**64 - 1])
def test_integers_past_the_range_are_refused_anywhere_in_a_document(value: int) -> None:
    for document in ({"a": value}, [1, [2, {"b": value}]], {"x": {"y": [value]}}):
        problem = unstorable(document)
        assert problem is not None and str(value) in problem
        with pytest.raises(Unstorable):
            decode_json(_any_json, msgspec.json.encode(document))
        if MIN_INTEGER - 1 < value <= 2**64 - 1:  # what MessagePack can carry at all
            with pytest.raises(Unstorable):
                decode_msgpack(_any_msgpack, msgspec.msgpack.encode(document))


def test_the_range_itself_and_strings_of_digits_pass() -> None:
    document = {"max": MAX_INTEGER, "min": MIN_INTEGER, "id": str(HUGE), "f": 1.5e300,
                "flag": True}
    assert unstorable(document) is None
    assert decode_json(_any_json, msgspec.json.encode(document)) == document
    assert decode_msgpack(_any_msgpack, msgspec.msgpack.encode(document)) == document


def test_ids_in_strings_do_not_make_a_document_walked() -> None:
    assert not json_may_be_unstorable('{"thread_id":"7532614489343000576","n":12}')
    assert json_may_be_unstorable('{"n":1234567890123456789}')


def test_msgpack_extension_values_are_refused() -> None:
    packed = msgspec.msgpack.encode({"data": {"x": msgspec.msgpack.Ext(5, b"abc")}})
    with pytest.raises(Unstorable, match="extension value"):
        decode_msgpack(_any_msgpack, packed)


@pytest.mark.parametrize("msgpack", [False, True], ids=["json", "msgpack"])
def test_codec_answers_an_ack_past_the_range_with_its_id(msgpack: bool) -> None:
    codec = Codec(fr.NATIVE_CONTROL_FRAMES, msgpack=msgpack)
    frame = {"v": 1, "id": "a1", "type": "delivery.ack", "up_to_seq": 2**64 - 1}
    with pytest.raises(FrameError) as refused:
        codec.decode(msgspec.msgpack.encode(frame) if msgpack
                     else msgspec.json.encode(frame).decode())
    assert (refused.value.code, refused.value.request_id) == ("invalid_request", "a1")
    assert "64-bit" in refused.value.message


# -- the bindings, on a live daemon -----------------------------------------------------


@pytest.fixture
async def world(client: httpx.AsyncClient) -> RestWorld:
    return await make_rest_world(client, agents=("alice", "bob"))


async def count(server: BrokerServer, table: str) -> int:
    return int(await server.engine.read(
        lambda conn: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]))


async def post_raw(client: httpx.AsyncClient, path: str, body: str, token: str,
                   method: str = "POST") -> httpx.Response:
    return await client.request(method, path, content=body.encode(), headers={
        "Authorization": f"Bearer {token}", "Content-Type": "application/json"})


@pytest.mark.parametrize(("method", "path", "body", "token"), [
    ("POST", "/v1/channels/general/messages", '{"text":"x","data":{"n":%d}}', "alice"),
    ("POST", "/v1/deliveries/ack", '{"up_to_seq":%d}', "bob"),
    ("POST", "/v1/channels", '{"name":"big","metadata":{"n":[%d]}}', "alice"),
    ("PATCH", "/v1/agents/alice", '{"metadata":{"n":%d}}', "key"),
    ("POST", "/v1/dm", '{"to":"bob","text":"x","data":{"n":%d}}', "alice"),
], ids=["send", "ack", "channel", "agent", "dm"])
async def test_rest_refuses_with_400_and_writes_nothing(
    server: BrokerServer, client: httpx.AsyncClient, world: RestWorld,
    method: str, path: str, body: str, token: str,
) -> None:
    """The reported requests: each was a 500 with gateway processes."""
    bearer = world.key if token == "key" else world.tokens[token]
    before = {t: await count(server, t) for t in ("messages", "channels", "message_log")}
    for value in (HUGE, MAX_INTEGER + 1, MIN_INTEGER - 1):
        response = await post_raw(client, path, body.replace("%d", str(value)), bearer, method)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "invalid_request"
        assert error["message"] == (
            f"the body holds an integer outside the signed 64-bit range: {value}")
    assert {t: await count(server, t) for t in before} == before
    # the edge of the range is a value like any other
    sent = await post_raw(client, "/v1/channels/general/messages",
                          f'{{"text":"x","data":{{"n":{MAX_INTEGER}}}}}', world.tokens["alice"])
    assert sent.status_code == 201, sent.text
    got = await call(client, "GET", f"/v1/messages/{sent.json()['data']['id']}",
                     world.tokens["alice"])
    assert got.data["data"] == {"n": MAX_INTEGER}


async def test_a_bad_ack_leaves_other_agents_acks_alone(
    server: BrokerServer, client: httpx.AsyncClient, world: RestWorld,
) -> None:
    """Before: the bad ack joined the gateway's next receipts command, and every
    ack in it (here another workspace's) was answered `internal_error`."""
    other = await make_rest_world(client, name="other", agents=("mallory",))
    for n in range(3):
        sent = await call(client, "POST", "/v1/channels/general/messages",
                          world.tokens["alice"], json={"text": f"m{n}"})
        assert sent.status == 201
    async with raw_socket(server, other.tokens["mallory"]) as mallory, \
            raw_socket(server, world.tokens["bob"]) as bob:
        for seq in (1, 2, 3):
            await send_json(mallory, {"v": 1, "id": f"bad{seq}", "type": "delivery.ack",
                                      "up_to_seq": HUGE})
            await send_json(bob, {"v": 1, "id": f"good{seq}", "type": "delivery.ack",
                                  "up_to_seq": seq})
            bad = await next_frame(mallory, "reply")
            assert (bad["re"], bad["ok"], bad["error"]["code"]) == (
                f"bad{seq}", False, "invalid_request")
            good = await next_frame(bob, "reply")
            assert (good["re"], good["ok"]) == (f"good{seq}", True), good
        # the sockets stay open and serve
        await send_json(mallory, {"v": 1, "id": "me", "type": "agent.me"})
        assert (await next_frame(mallory, "reply"))["data"]["name"] == "mallory"
    acked = await server.engine.read(lambda conn: conn.execute(
        "SELECT acked_seq FROM mailboxes WHERE agent_id = ?",
        (int(world.agents["bob"]),)).fetchone()[0])
    assert acked == 3


async def test_msgpack_socket_refuses_an_extension_in_data(
    server: BrokerServer, world: RestWorld,
) -> None:
    async with raw_socket(server, world.tokens["alice"],
                          subprotocols=[MSGPACK_SUBPROTOCOL]) as alice:
        await alice.send_message(msgspec.msgpack.encode({
            "v": 1, "id": "x1", "type": "message.send", "channel": "general", "text": "hi",
            "data": {"x": msgspec.msgpack.Ext(5, b"abc")}}))
        reply = msgspec.msgpack.decode(await alice.get_message())
        while reply.get("type") != "reply":
            reply = msgspec.msgpack.decode(await alice.get_message())
        assert (reply["re"], reply["ok"], reply["error"]["code"]) == ("x1", False,
                                                                     "invalid_request")
        assert "extension value (type 5)" in reply["error"]["message"]
    assert await count(server, "messages") == 0


async def test_mcp_refuses_arguments_past_the_range(
    server: BrokerServer, world: RestWorld,
) -> None:
    async with mcp_client(mcp_url(server), world.tokens["alice"]) as alice:
        result = await alice.call_tool("message.post", {
            "channel": "general", "text": "x", "data": {"n": HUGE}})
        assert error_code(result) == "invalid_request"
        assert str(HUGE) in str(result.structured_content)
    assert await count(server, "messages") == 0
