"""The sans-IO protocol: frames and codec, with no socket and no trio."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import frames as fr
from protocol import requests as rq
from protocol.codec import (
    JSON_SUBPROTOCOL,
    MSGPACK_SUBPROTOCOL,
    CloseCode,
    Codec,
    FrameError,
    json_to_msgpack,
    negotiate,
)

SEND = fr.request_frame("message.send", rq.SendMessage)
JOIN = fr.request_frame("channel.join", rq.JoinChannel)
INBOUND = (*fr.NATIVE_CONTROL_FRAMES, SEND, JOIN)


@pytest.fixture
def codec() -> Codec:
    return Codec(INBOUND)


@pytest.fixture
def packed() -> Codec:
    return Codec(INBOUND, msgpack=True)


def refusal(codec: Codec, data: str | bytes) -> FrameError:
    with pytest.raises(FrameError) as caught:
        codec.decode(data)
    return caught.value


# -- decoding the native frames ------------------------------------------------------------


def test_codec_request_decodes_to_operation_input(codec: Codec) -> None:
    """A request decodes to its operation input."""
    frame = codec.decode('{"v":1,"id":"c1","type":"message.send","channel":"ops","text":"hi"}')
    assert isinstance(frame, rq.SendMessage)
    assert (frame.id, frame.channel, frame.text, frame.mode) == ("c1", "ops", "hi", "wait")
    assert frame.idempotency_key is None


def test_codec_request_idempotency_key_and_unknown_fields(codec: Codec) -> None:
    """A request may carry an idempotency key and unknown fields."""
    frame = codec.decode(
        '{"id":"c2","type":"message.send","channel":"ops","text":"x",'
        '"idempotency_key":"k-1","extra":[1,2]}'
    )
    assert frame.idempotency_key == "k-1"


def test_codec_control_frames_decode(codec: Codec) -> None:
    """Control frames decode."""
    ack = codec.decode('{"v":1,"type":"delivery.ack","up_to_seq":17}')
    assert isinstance(ack, fr.DeliveryAck) and ack.up_to_seq == 17 and ack.id is None
    ping = codec.decode('{"v":1,"type":"ping","id":"p"}')
    assert isinstance(ping, fr.Ping) and ping.id == "p"
    assert isinstance(codec.decode('{"v":1,"type":"pong"}'), fr.Pong)


def test_codec_msgpack_binary_and_text_frames(packed: Codec) -> None:
    """MessagePack binary frames decode, and text frames still work."""
    data = msgspec.msgpack.encode({"v": 1, "id": "m", "type": "channel.join", "channel": "ops"})
    frame = packed.decode(data)
    assert isinstance(frame, rq.JoinChannel) and frame.channel == "ops"
    assert isinstance(packed.decode('{"type":"ping"}'), fr.Ping)


# -- bad input: answered when the id can be read, otherwise a close code -------------------------


def test_codec_not_json_closes_1007(codec: Codec) -> None:
    """Not JSON closes with 1007."""
    err = refusal(codec, "{not json")
    assert (err.code, err.request_id, err.close_code) == (
        "invalid_json", None, CloseCode.INVALID_PAYLOAD)


def test_codec_not_msgpack_closes_1007(packed: Codec) -> None:
    """Not MessagePack closes with 1007."""
    err = refusal(packed, b"\xc1")
    assert (err.code, err.close_code) == ("invalid_msgpack", CloseCode.INVALID_PAYLOAD)


def test_codec_binary_without_subprotocol_closes_1003(codec: Codec) -> None:
    """Binary frame without the subprotocol closes with 1003."""
    err = refusal(codec, msgspec.msgpack.encode({"type": "ping"}))
    assert (err.code, err.close_code) == ("binary_not_negotiated", CloseCode.UNSUPPORTED_DATA)


@pytest.mark.parametrize("data", ["[1,2]", '"text"', "3", "{}", '{"type":5,"x":1}'])
def test_codec_non_frame_document_closes_4400(codec: Codec, data: str) -> None:
    """A document that is not a frame closes with 4400."""
    err = refusal(codec, data)
    assert err.code == "invalid_frame" and err.request_id is None
    assert err.close_code == CloseCode.BAD_FRAME


def test_codec_unknown_type_with_id_answered(codec: Codec) -> None:
    """Unknown type with an id is answered."""
    err = refusal(codec, '{"v":1,"id":"c9","type":"nope"}')
    assert (err.code, err.request_id) == ("unknown_type", "c9")


def test_codec_unknown_type_without_id_closes(codec: Codec) -> None:
    """Unknown type without an id closes."""
    err = refusal(codec, '{"v":1,"type":"nope"}')
    assert (err.code, err.request_id, err.close_code) == ("unknown_type", None, CloseCode.BAD_FRAME)


def test_codec_request_without_id_closes_4400(codec: Codec) -> None:
    """Request without id closes with 4400."""
    err = refusal(codec, '{"v":1,"type":"message.send","channel":"ops","text":"hi"}')
    assert (err.code, err.request_id, err.close_code) == (
        "invalid_request", None, CloseCode.BAD_FRAME)
    assert "id" in err.message


@pytest.mark.parametrize("bad_id", ["5", '""', "null", '["a"]', '"' + "x" * 129 + '"'])
def test_codec_unanswerable_id(codec: Codec, bad_id: str) -> None:
    """An id that is not a short string cannot be answered."""
    err = refusal(codec, '{"id":' + bad_id + ',"type":"channel.join","channel":"ops"}')
    assert err.request_id is None


def test_codec_wrong_field_type_names_field(codec: Codec) -> None:
    """Wrong field type is answered and names the field."""
    err = refusal(codec, '{"v":1,"id":"c3","type":"message.send","channel":7,"text":"hi"}')
    assert (err.code, err.request_id) == ("invalid_request", "c3")
    assert "$.channel" in err.message


def test_codec_missing_field_answered(codec: Codec) -> None:
    """Missing field is answered."""
    err = refusal(codec, '{"id":"c4","type":"message.send","channel":"ops"}')
    assert (err.code, err.request_id) == ("invalid_request", "c4")
    assert "text" in err.message


def test_codec_negative_ack_refused(codec: Codec) -> None:
    """Negative ack is refused."""
    err = refusal(codec, '{"id":"a","type":"delivery.ack","up_to_seq":-1}')
    assert (err.code, err.request_id) == ("invalid_request", "a")


def test_codec_other_versions_refused(codec: Codec) -> None:
    """Other protocol versions are refused."""
    err = refusal(codec, '{"v":2,"id":"c5","type":"ping"}')
    assert (err.code, err.request_id) == ("unsupported_version", "c5")
    err = refusal(codec, '{"v":2,"id":"c6","type":"message.send"}')
    assert (err.code, err.request_id) == ("unsupported_version", "c6")


def test_codec_oversized_frames_close_1009() -> None:
    """Oversized frames close with 1009."""
    small = Codec(INBOUND, max_frame_bytes=64)
    err = refusal(small, '{"id":"c","type":"message.send","text":"' + "x" * 64 + '"}')
    assert (err.code, err.close_code) == ("frame_too_large", CloseCode.MESSAGE_TOO_BIG)
    # The limit is in bytes of UTF-8, not characters.
    text = '{"type":"ping","pad":"' + "é" * 30 + '"}'
    assert len(text) <= 64 < len(text.encode())
    assert refusal(small, text).code == "frame_too_large"
    packed_small = Codec(INBOUND, msgpack=True, max_frame_bytes=64)
    assert refusal(packed_small, b"\x90" * 65).close_code == CloseCode.MESSAGE_TOO_BIG


# Documents nested from shallow to past msgspec's recursion, JSON and MessagePack, in a frame.
_deep_documents = st.builds(
    lambda levels, arrays, head, packed: (
        bytes([0x81, 0xA4]) + b"data" + (b"\x91" if arrays else b"\x81\xa1a") * levels + b"\x01"
        if packed else head + ("[" if arrays else '{"a":') * levels + "1"
        + ("]" if arrays else "}") * levels + "}"),
    st.integers(1, 3000), st.booleans(),
    st.sampled_from(['{"v":1,"id":"c1","type":"message.send","data":', '{"type":"ping","x":',
                     '{"data":']),
    st.booleans(),
)


@given(st.binary(max_size=200) | st.text(max_size=200) | _deep_documents)
def test_codec_decode_raises_only_frame_error(data: bytes | str) -> None:
    """Decode never raises anything but FrameError."""
    for codec in (Codec(INBOUND), Codec(INBOUND, msgpack=True)):
        try:
            codec.decode(data)
        except FrameError as err:
            assert err.request_id is not None or err.close_code >= 1000


# -- encoding ------------------------------------------------------------------------------


def test_codec_encode_documented_shape(codec: Codec) -> None:
    """Frames encode in the documented shape."""
    deliver = fr.Deliver(seq=17, delivery_id="5:17",
                         payload=codec.payload(b'{"type":"message.created","data":{}}'))
    assert codec.encode(deliver) == (
        '{"v":1,"type":"deliver","seq":17,"delivery_id":"5:17",'
        '"payload":{"type":"message.created","data":{}}}'
    )
    assert codec.encode(fr.Reply(re="c1", ok=True, data={"id": "1"})) == (
        '{"v":1,"type":"reply","re":"c1","ok":true,"data":{"id":"1"}}'
    )
    assert codec.encode(fr.Reply(re="c1", ok=False, error=fr.ErrorBody("not_found", "no"))) == (
        '{"v":1,"type":"reply","re":"c1","ok":false,'
        '"error":{"code":"not_found","message":"no"}}'
    )
    assert codec.encode(fr.ServerPong()) == '{"v":1,"type":"pong"}'
    assert codec.encode(fr.ServerPong(re="p")) == '{"v":1,"type":"pong","re":"p"}'
    assert codec.encode(fr.ServerPing()) == '{"v":1,"type":"ping"}'


def test_codec_msgpack_frames_embed_payload(packed: Codec) -> None:
    """MessagePack frames embed the payload as MessagePack."""
    payload = b'{"type":"message.created","data":{"text":"hi","n":[1,2]}}'
    data = packed.encode(fr.Deliver(seq=1, delivery_id="1:1", payload=packed.payload(payload)))
    assert isinstance(data, bytes)
    assert msgspec.msgpack.decode(data) == {
        "v": 1, "type": "deliver", "seq": 1, "delivery_id": "1:1",
        "payload": {"type": "message.created", "data": {"text": "hi", "n": [1, 2]}},
    }
    assert msgspec.msgpack.decode(json_to_msgpack(b'{"a":[true,null]}')) == {"a": [True, None]}


def test_subprotocol_negotiation() -> None:
    assert negotiate([JSON_SUBPROTOCOL, MSGPACK_SUBPROTOCOL]) == MSGPACK_SUBPROTOCOL
    assert negotiate([JSON_SUBPROTOCOL]) == JSON_SUBPROTOCOL
    assert negotiate(["graphql-ws"]) is None
    assert negotiate([]) is None


def test_request_frame_refuses_envelope_names() -> None:
    """A request input may not use envelope names."""
    class Clashing(rq.Request):
        id: str

    with pytest.raises(ValueError, match="reserved"):
        fr.request_frame("x.get", Clashing)


def test_codec_refuses_duplicate_tags() -> None:
    with pytest.raises(ValueError):
        Codec((fr.Ping, fr.Ping))


def test_observer_frames_have_no_version() -> None:
    codec = Codec(fr.OBSERVER_INBOUND_FRAMES, version=None)
    frame = codec.decode('{"type":"subscribe","channels":["general"]}')
    assert isinstance(frame, fr.Subscribe) and frame.channels == ["general"]
    resync = codec.decode('{"type":"resync","last_seen_seq":3,"since":"2024-01-01T00:00:00Z"}')
    assert isinstance(resync, fr.Resync) and resync.last_seen_seq == 3


def test_node_frames_take_the_sdk_shapes() -> None:
    codec = Codec(fr.NODE_INBOUND_FRAMES)
    register = codec.decode(
        '{"v":1,"id":"sdk-direct-1","type":"node.register","node_id":"n1","name":"a-direct",'
        '"capabilities":[],"max_agents":1,"tags":["implicit"],"version":"sdk-typescript/6.0.2"}'
    )
    assert isinstance(register, fr.NodeRegister) and register.node_id == "n1"
    ack = codec.decode('{"v":1,"type":"delivery.ack","agent":"alice","up_to_seq":4}')
    assert isinstance(ack, fr.DeliveryAck) and (ack.agent, ack.up_to_seq) == ("alice", 4)
    beat = codec.decode('{"v":1,"type":"node.heartbeat","load":0,"active_agents":1,'
                        '"handlers_live":false}')
    assert isinstance(beat, fr.NodeHeartbeat)
