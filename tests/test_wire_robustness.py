"""Hostile or broken peers: the engine answers with errors and keeps serving."""

import os
import socket
import time

import msgpack
import pytest
import torch
import zmq

from p2pkv import Engine, TransferKey
from p2pkv.control.messages import PROTOCOL_VERSION, decode, encode

from .conftest import FAST

V = PROTOCOL_VERSION


class Raw:
    """A hand-driven DEALER talking to an engine's ROUTER."""

    def __init__(self, address: str, plain: str | None = None):
        self.ctx = zmq.Context()
        self.s = self.ctx.socket(zmq.DEALER)
        self.s.setsockopt(zmq.LINGER, 0)
        if plain is not None:  # the engine's auth_token travels as a ZMQ PLAIN password
            self.s.setsockopt(zmq.PLAIN_USERNAME, b"p2pkv")
            self.s.setsockopt(zmq.PLAIN_PASSWORD, plain.encode())
        self.s.connect(f"tcp://{address}")

    def send(self, *frames: bytes) -> None:
        self.s.send_multipart(list(frames))

    def reply(self, timeout: float = 30.0) -> dict:
        assert self.s.poll(int(timeout * 1000)), "no reply"
        frames = self.s.recv_multipart()
        return decode(frames[0])

    def credit(self, n: int = 1 << 16) -> int:
        """Ask for ``n`` bytes of credit, as an honest sender does before pushing data."""
        self.send(encode("creq", need=n, want=n))
        rep = self.reply()
        assert rep["t"] == "grant", rep
        return rep["n"]

    def hello(self, tok=None) -> dict:
        fields = dict(eid="raw", host="h", pid=1, dev="cpu", caps={})
        if tok is not None:
            fields["tok"] = tok
        self.send(encode("hello", **fields))
        return self.reply()

    def close(self) -> None:
        self.s.close(0)
        self.ctx.term()


@pytest.fixture
def eng():
    with Engine(**dict(FAST, max_message_bytes=1 << 20)) as e, Engine(**FAST) as peer:
        yield e, peer


def still_serves(e: Engine, peer: Engine, tag: str) -> None:
    t = torch.arange(100, dtype=torch.float32)
    peer.send(e.address, TransferKey("ok-" + tag, "0"), t, timeout=60).wait(60)
    assert torch.equal(e.recv(TransferKey("ok-" + tag, "0"), timeout=60), t)


def data_hdr(**over):
    h = dict(seq=1, key=["t", "l"], dt="float32", sh=[4], n=16, x="tcp")
    h.update(over)
    return encode("data", **h)


BAD_HEADERS = {
    "not msgpack": b"\xc1\xc1\xc1",
    "truncated": encode("ping")[:-3],
    "empty": b"",
    "array": msgpack.packb([V, "ping"]),
    "wrong version": msgpack.packb({"v": V + 1, "t": "ping"}),
    "no version": msgpack.packb({"t": "ping"}),
    "unknown type": msgpack.packb({"v": V, "t": "format_disk"}),
    "reply type as request": encode("ack", seq=1),
    "field of wrong type": msgpack.packb({"v": V, "t": "creq", "need": "all", "want": 1}),
    "huge int": msgpack.packb({"v": V, "t": "creq", "need": 2**64 - 1, "want": 1}),
    "nested junk": msgpack.packb({"v": V, "t": "data", "seq": 1, "key": [[["x"]]], "dt": "f", "sh": [],
                                  "n": 0, "x": "tcp"}),
}


@pytest.mark.parametrize("name", list(BAD_HEADERS))
def test_malformed_headers_get_error_replies(eng, name):
    e, peer = eng
    raw = Raw(e.address)
    try:
        raw.hello()
        raw.send(BAD_HEADERS[name], b"trailing payload frame")
        rep = raw.reply()
        assert rep["t"] in ("err", "nack"), rep
        assert rep.get("code") in ("protocol", "invalid_key", "invalid_tensor"), rep
        raw.send(encode("ping"))
        assert raw.reply()["t"] == "pong"  # the session survives
    finally:
        raw.close()
    still_serves(e, peer, name.replace(" ", "-"))


@pytest.mark.parametrize("hdr,payload,code", [
    (data_hdr(key=["", "l"]), b"\0" * 16, "invalid_key"),
    (data_hdr(key=["t\n", "l"]), b"\0" * 16, "invalid_key"),
    (data_hdr(key="t/l"), b"\0" * 16, "protocol"),
    (data_hdr(dt="complex128"), b"\0" * 16, "invalid_tensor"),
    (data_hdr(sh=[-1]), b"\0" * 16, "invalid_tensor"),
    (data_hdr(sh=[2] * 40), b"\0" * 16, "invalid_tensor"),
    (data_hdr(n=17), b"\0" * 17, "protocol"),
    (data_hdr(), b"\0" * 8, "protocol"),     # payload shorter than announced
    (data_hdr(), b"\0" * 64, "protocol"),    # longer: truncated, never written past the buffer
    (data_hdr(x="rdma"), b"\0" * 16, "protocol"),
    (data_hdr(sh=[2**20], n=2**22), b"", "invalid_tensor"),  # over max_message_bytes
])
def test_bad_data_messages_are_nacked(eng, hdr, payload, code):
    e, peer = eng
    raw = Raw(e.address)
    try:
        raw.hello()
        raw.credit()
        raw.send(hdr, payload)
        rep = raw.reply()
        assert rep["t"] in ("nack", "err") and rep["code"] == code and rep["seq"] == 1, rep
    finally:
        raw.close()
    assert e.stats()["pool"]["in_use"] == 0
    still_serves(e, peer, code)


def test_data_without_payload(eng):
    e, peer = eng
    raw = Raw(e.address)
    try:
        raw.hello()
        raw.send(data_hdr())
        rep = raw.reply()
        assert rep["t"] == "nack" and "payload" in rep["msg"]
    finally:
        raw.close()
    still_serves(e, peer, "nopayload")


def test_requests_before_hello_are_refused(eng):
    e, peer = eng
    raw = Raw(e.address)
    try:
        for msg in (data_hdr(), encode("pull", seq=3, key=["a", "b"], to=1.0, x="tcp"), encode("abort", tid="t")):
            raw.send(msg, b"\0" * 16)
            rep = raw.reply()
            assert rep["t"] == "err" and rep["code"] == "no_session"
    finally:
        raw.close()
    still_serves(e, peer, "nohello")


def test_wrong_auth_token_gets_nothing():
    # With auth_token the ROUTER is a ZMQ PLAIN server: a peer without the token is refused in the
    # handshake, so its hello, pull or abort is never even read (no reply at all).
    with Engine(**dict(FAST, auth_token="right")) as e, Engine(**dict(FAST, auth_token="right")) as peer:
        e.publish(TransferKey("secret", "0"), torch.ones(4))
        for tok in (None, "wrong", "righ", "right" + "x"):
            raw = Raw(e.address, plain=tok)
            try:
                raw.send(encode("hello", eid="raw", host="h", pid=1, dev="cpu", caps={}, tok=tok or "x"))
                raw.send(encode("pull", seq=1, key=["secret", "0"], to=1.0, x="tcp"))
                raw.send(encode("abort", tid="secret"))
                assert not raw.s.poll(300), "an unauthenticated peer got an answer"
            finally:
                raw.close()
        assert e.stats()["auth_failures"] >= 4
        assert e.stats()["outbox"]["held"] == 1  # nothing was pulled or aborted
        assert torch.equal(peer.pull(e.address, TransferKey("secret", "0"), timeout=5), torch.ones(4))


def test_oversized_frame_drops_only_that_connection(eng):
    e, peer = eng
    raw = Raw(e.address)
    try:
        raw.hello()
        raw.send(data_hdr(sh=[2**19], n=2**21), os.urandom(2**21 + 70000))  # beyond MAXMSGSIZE
        time.sleep(0.3)
    finally:
        raw.close()
    assert e.stats()["pool"]["in_use"] == 0
    still_serves(e, peer, "oversized")


def test_random_bytes_on_the_port(eng):
    e, peer = eng
    host, port = e.address.rsplit(":", 1)
    for i in range(20):
        with socket.create_connection((host, int(port)), timeout=2) as s:
            try:
                s.sendall(os.urandom(1 + i * 997))
                s.settimeout(0.2)
                s.recv(100)
            except OSError:
                pass
    # a well-formed ZMTP greeting followed by junk
    with socket.create_connection((host, int(port)), timeout=2) as s:
        s.sendall(b"\xff" + b"\0" * 8 + b"\x7f\x03\x00NULL" + b"\0" * 16 + os.urandom(4096))
    still_serves(e, peer, "randombytes")


def test_out_of_order_and_replayed_messages(eng):
    e, peer = eng
    raw = Raw(e.address)
    try:
        raw.hello()
        raw.send(encode("pdone", seq=99))            # never pulled
        raw.send(encode("cret", n=2**40))             # returns credit it never had
        raw.send(encode("creq", need=2**60, want=2**60))  # can never be granted: refused at once
        rep = raw.reply()
        assert rep["t"] == "err" and rep["code"] == "pool_exhausted", rep
        raw.send(encode("ping"))
        assert raw.reply()["t"] == "pong"
        raw.credit()
        # replay of another peer's seq numbers: acks cannot be forged toward us
        raw.send(data_hdr(seq=1), b"\0" * 16)
        assert raw.reply()["t"] == "ack"
        raw.send(data_hdr(seq=1), b"\0" * 16)         # same key again
        assert raw.reply()["code"] == "duplicate_key"
    finally:
        raw.close()
    still_serves(e, peer, "ooo")
