import msgpack
import pytest

from p2pkv import ProtocolError
from p2pkv.control.messages import MAX_HEADER_BYTES, PROTOCOL_VERSION, REQUEST_TYPES, decode, encode


def test_roundtrip():
    m = decode(encode("data", seq=1, key=["a", "b"], dt="bfloat16", sh=[2, 3], n=12, x="tcp"))
    assert m["t"] == "data" and m["key"] == ["a", "b"] and m["v"] == PROTOCOL_VERSION


@pytest.mark.parametrize("raw,needle", [
    (b"", "not valid msgpack"),
    (b"\xc1", "not valid msgpack"),
    (msgpack.packb([1, 2, 3]), "must be a msgpack map"),
    (msgpack.packb({"v": 99, "t": "ping"}), "unsupported protocol version"),
    (msgpack.packb({"t": "ping"}), "unsupported protocol version"),
    (msgpack.packb({"v": PROTOCOL_VERSION, "t": "launch"}), "unknown message type"),
    (msgpack.packb({"v": PROTOCOL_VERSION, "t": 5}), "unknown message type"),
    (msgpack.packb({"v": PROTOCOL_VERSION, "t": "data", "seq": 1}), "lacks field"),
    (msgpack.packb({"v": PROTOCOL_VERSION, "t": "creq", "need": "x", "want": 1}), "has type str"),
    (msgpack.packb({"v": PROTOCOL_VERSION, "t": "creq", "need": True, "want": 1}), "has type bool"),
    (msgpack.packb({"v": PROTOCOL_VERSION, "t": "creq", "need": -5, "want": 1}), "out of range"),
    (msgpack.packb({"v": PROTOCOL_VERSION, "t": "ping"})[:-2], "not valid msgpack"),
    (b"x" * (MAX_HEADER_BYTES + 1), "exceeds"),
    (msgpack.packb({1: 2}), "not valid msgpack"),
])
def test_decode_rejects(raw, needle):
    with pytest.raises(ProtocolError, match=needle):
        decode(raw)


def test_direction_is_checked():
    with pytest.raises(ProtocolError, match="not valid in this direction"):
        decode(encode("ack", seq=1), REQUEST_TYPES)
