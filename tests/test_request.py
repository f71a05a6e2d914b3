"""Whole-request transfers (Engine.send_request): one offer, one grant, the data, one completion.

CPU engines (TCP) in one process and in separate processes; the GPU transports
are tested in tests/test_request_gpu.py.
"""

import time

import pytest
import torch

from p2pkv import (DuplicateKey, Engine, InvalidKey, InvalidTensor, PeerLost, PoolExhausted, RequestState,
                   ShapeMismatch, TransferAborted, TransferKey, TransferTimeout)
from p2pkv.control.messages import decode, encode
from p2pkv.synthetic import PRESETS, kv_layer, same_bits
from p2pkv.testing import RemoteEngine

from .conftest import FAST
from .test_wire_robustness import Raw, still_serves

LLAMA = PRESETS["llama3-8b"]
SHAPE = tuple(LLAMA.layer_shape(16))
NAMES = [f"model.layers.{i}.self_attn" for i in range(LLAMA.layers)]


def layers(seed: int, n: int = LLAMA.layers, shape=SHAPE) -> list[tuple[str, torch.Tensor]]:
    return [(NAMES[i], kv_layer(seed, i, shape)) for i in range(n)]


def check_all(eng: Engine, tid: str, data, timeout: float = 5.0) -> None:
    for name, t in data:
        got = eng.recv(TransferKey(tid, name), timeout=timeout)
        assert same_bits(got, t), name


@pytest.mark.timeout(60)
def test_request_roundtrip_any_order(pair):
    a, b = pair
    data = layers(1)
    req = a.send_request(b.address, "r1", data)
    assert req.state in (RequestState.OFFERED, RequestState.GRANTED)
    for name, t in reversed(data):  # handed over in any order, moves in the layout's order
        req.send(name, t)
    check_all(b, "r1", data)
    req.wait(5)
    assert req.state is RequestState.DONE and req.error is None and req.latency_s > 0
    assert "r1" in repr(req)
    # the receiver waits before anything was offered; a spec-only layout works too
    data2 = layers(2)
    req2 = a.send_request(b.address, "r2", [(n, t.dtype, tuple(t.shape)) for n, t in data2])
    req2.wait(0) if req2.done() else None
    for name, t in data2:
        req2.send(name, t)
    check_all(b, "r2", data2)
    req2.wait(5)
    s = b.stats()
    assert s["requests_received"] == 2 and s["pool"]["in_use"] == 0
    assert a.stats()["requests_done"] == 2


@pytest.mark.timeout(60)
def test_request_bad_input_is_typed(pair):
    a, b = pair
    with pytest.raises(InvalidTensor):
        a.send_request(b.address, "bad", [])
    with pytest.raises(InvalidTensor):
        a.send_request(b.address, "bad", [("x", torch.zeros(2)), ("x", torch.zeros(2))])
    with pytest.raises(InvalidKey):
        a.send_request(b.address, "", [("x", torch.zeros(2))])
    with pytest.raises(InvalidKey):
        a.send_request(b.address, "bad", [("x\n", torch.zeros(2))])
    with pytest.raises(InvalidTensor):
        a.send_request(b.address, "bad", [("x", "float32", (2,))])
    req = a.send_request(b.address, "bad2", [("x", torch.float32, (4,)), ("y", torch.float32, (4,))])
    with pytest.raises(InvalidKey):
        req.send("nope", torch.zeros(4))
    with pytest.raises(ShapeMismatch):
        req.send("x", torch.zeros(5))
    with pytest.raises(ShapeMismatch):
        req.send("x", torch.zeros(4, dtype=torch.float64))
    with pytest.raises(InvalidTensor):
        req.send("x", torch.zeros(8)[::2])
    req.send("x", torch.ones(4))
    with pytest.raises(InvalidKey):
        req.send("x", torch.ones(4))  # twice
    req.send("y", torch.ones(4) * 2)
    req.wait(5)
    assert torch.equal(b.recv(TransferKey("bad2", "y"), timeout=5), torch.ones(4) * 2)
    b.recv(TransferKey("bad2", "x"), timeout=5)


@pytest.mark.timeout(60)
def test_request_abort_by_producer_frees_both_sides(pair):
    a, b = pair
    data = layers(3)
    req = a.send_request(b.address, "ab1", data)
    for name, t in data[:5]:
        req.send(name, t)
    check_all(b, "ab1", data[:5])  # what arrived is real data
    a.abort("ab1")
    with pytest.raises(TransferAborted):
        req.wait(5)
    assert req.state is RequestState.ABORTED
    with pytest.raises(TransferAborted):
        b.recv(TransferKey("ab1", NAMES[10]), timeout=5)
    with pytest.raises(TransferAborted):
        req.send(NAMES[20], data[20][1])
    _settle(lambda: b.stats()["pool"]["in_use"] == 0 and not b._incoming)
    still_serves(b, a, "ab1")


@pytest.mark.timeout(60)
def test_request_abort_by_consumer_fails_producer_fast(pair):
    a, b = pair
    data = layers(4)
    req = a.send_request(b.address, "ab2", data)
    req.send(*data[0])
    b.recv(TransferKey("ab2", NAMES[0]), timeout=5)
    t0 = time.monotonic()
    b.abort("ab2")
    with pytest.raises(TransferAborted):
        req.wait(5)
    assert time.monotonic() - t0 < 2.0
    _settle(lambda: b.stats()["pool"]["in_use"] == 0 and not b._incoming)


@pytest.mark.timeout(60)
def test_request_deadline_when_layers_never_come(pair):
    a, b = pair
    data = layers(5)
    req = a.send_request(b.address, "dl", data, timeout=1.0)
    for name, t in data[:3]:
        req.send(name, t)
    t0 = time.monotonic()
    with pytest.raises(TransferTimeout, match="handed over"):
        req.wait(5)
    assert time.monotonic() - t0 < 2.0
    with pytest.raises(TransferTimeout):  # the receiver's waiters fail too, not at their own deadline
        b.recv(TransferKey("dl", NAMES[20]), timeout=10)
    check_all(b, "dl", data[:3])  # what arrived stays claimable
    _settle(lambda: b.stats()["pool"]["in_use"] == 0 and not b._incoming)


@pytest.mark.timeout(60)
def test_request_back_pressure_and_never_fits():
    one = sum(t.numel() * t.element_size() for _, t in layers(0))  # bytes of one request
    cfg = dict(FAST, pool_bytes=int(one * 1.5), credit_bytes=int(one * 1.5))
    with Engine(**cfg) as a, Engine(**cfg) as b:
        d1, d2 = layers(6), layers(7)
        r1 = a.send_request(b.address, "bp1", d1)
        for n, t in d1:
            r1.send(n, t)
        r1.wait(5)
        r2 = a.send_request(b.address, "bp2", d2)  # waits for room: r1's data is still held
        for n, t in d2:
            r2.send(n, t)
        time.sleep(0.5)
        assert r2.state is RequestState.OFFERED
        check_all(b, "bp1", d1)  # claiming frees room: r2 is granted and completes
        r2.wait(5)
        check_all(b, "bp2", d2)
        big = [(f"t{i}", torch.zeros(one // 8, dtype=torch.uint8)) for i in range(16)]
        r3 = a.send_request(b.address, "bp3", big)
        with pytest.raises(PoolExhausted, match="never fit"):
            r3.wait(5)


@pytest.mark.timeout(60)
def test_request_duplicate_keys_refused(pair):
    a, b = pair
    d = layers(8, 4)
    r1 = a.send_request(b.address, "dup", d)
    for n, t in d:
        r1.send(n, t)
    r1.wait(5)
    r2 = a.send_request(b.address, "dup", layers(9, 4))
    with pytest.raises(DuplicateKey):
        r2.wait(5)
    check_all(b, "dup", d)  # the first request's data is intact


@pytest.mark.timeout(120)
def test_request_between_processes_bit_exact():
    with RemoteEngine(**FAST) as prod, RemoteEngine(**FAST) as cons:
        tids = [f"p{i:02d}" for i in range(20)]
        cons.start("recv_many", tids, LLAMA.layers, list(SHAPE), timeout=30)
        done = prod.call("send_requests", cons.address, tids, LLAMA.layers, list(SHAPE), req_timeout=30)
        assert done == {"done": 20}
        assert cons.result(timeout=60) == 0
        s = cons.call("stats")
        assert s["requests_received"] == 20 and s["pool"]["in_use"] == 0
        assert prod.call("stats")["requests_done"] == 20


@pytest.mark.timeout(120)
def test_request_producer_killed_fails_waits_fast():
    prod = RemoteEngine(**FAST)
    try:
        with Engine(**FAST) as cons:
            prod.call("send_requests", cons.address, ["k1"], LLAMA.layers, list(SHAPE), only=4, wait=False,
                      req_timeout=20)
            cons.recv(TransferKey("k1", NAMES[3]), timeout=10)
            prod.kill()
            t0 = time.monotonic()
            with pytest.raises(PeerLost):
                cons.recv(TransferKey("k1", NAMES[10]), timeout=20)
            assert time.monotonic() - t0 < FAST["peer_timeout_s"] + 1.0
            cons.abort("k1")
            _settle(lambda: cons.stats()["pool"]["in_use"] == 0 and not cons._incoming)
    finally:
        prod.close()


@pytest.mark.timeout(60)
def test_malformed_offers_answered_and_engine_serves(pair):
    a, b = pair
    r = Raw(b.address)
    try:
        assert r.hello()["t"] == "hok"
        bad = [
            dict(seq=1, tid="t", items="x", x="tcp", to=1.0),
            dict(seq=2, tid="t", items=[], x="tcp", to=1.0),
            dict(seq=3, tid="t", items=[["a", "float32", [4], 15]], x="tcp", to=1.0),  # nbytes lies
            dict(seq=4, tid="t", items=[["a", "nope", [4], 16]], x="tcp", to=1.0),
            dict(seq=5, tid="t", items=[["a", "float32", [4], 16], ["a", "float32", [4], 16]], x="tcp", to=1.0),
            dict(seq=6, tid="", items=[["a", "float32", [4], 16]], x="tcp", to=1.0),
            dict(seq=7, tid="t", items=[["a", "float32", [4], 16]], x="nccl", to=1.0),
            dict(seq=8, tid="t", items=[["a", "float32", [2**40], 2**42]], x="tcp", to=1.0),
            dict(seq=9, tid="t", items=[["a", "float32", [4], 16]], x="ipc", to=1.0),
            dict(seq=10, tid="t", items=[[f"n{i}", "uint8", [1], 1] for i in range(3000)], x="tcp", to=1.0),
        ]
        for m in bad:
            r.send(encode("offer", **m))
            rep = r.reply()
            assert rep["t"] in ("oerr", "err") and rep["seq"] == m["seq"], (m, rep)
        # a good offer, then data for an unknown seq and a wrong index: ignored, nothing allocated
        r.send(encode("offer", seq=20, tid="good", items=[["a", "float32", [4], 16]], x="tcp", to=2.0))
        rep = r.reply()
        assert rep["t"] == "ogrant"
        r.send(encode("odata", seq=99, idx=0, n=16), b"\0" * 16)
        r.send(encode("odata", seq=20, idx=5, n=16), b"\0" * 16)
        r.send(encode("odata", seq=20, idx=0, n=16), torch.arange(4, dtype=torch.float32).numpy().tobytes())
        assert decode(r.s.recv_multipart()[0])["t"] == "odone"
        assert torch.equal(b.recv(TransferKey("good", "a"), timeout=5), torch.arange(4, dtype=torch.float32))
    finally:
        r.close()
    still_serves(b, a, "offers")


def _settle(cond, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "state did not settle"
        time.sleep(0.02)


@pytest.mark.timeout(60)
def test_eager_requests_move_before_the_grant_and_refusals_never_shift(pair):
    a, b = pair
    d0 = layers(20, 8)
    r0 = a.send_request(b.address, "e0", d0)  # no credit yet: waits for its grant, asks for credit
    for n, t in d0:
        r0.send(n, t)
    r0.wait(5)
    for i in range(1, 4):
        d = layers(20 + i, 8)
        r = a.send_request(b.address, f"e{i}", d)
        for n, t in d:
            r.send(n, t)
        r.wait(5)
        check_all(b, f"e{i}", d)
    assert a.stats().get("requests_eager", 0) >= 2
    # an eager offer the receiver refuses (its keys already wait there): its frames are dropped, the next
    # request is intact
    dup = layers(30, 8)
    r = a.send_request(b.address, "e0", dup)
    for n, t in dup:
        try:
            r.send(n, t)
        except DuplicateKey:  # the refusal came back already: later sends say why at once
            break
    with pytest.raises(DuplicateKey):
        r.wait(5)
    d = layers(31, 8)
    r = a.send_request(b.address, "e9", d)
    for n, t in d:
        r.send(n, t)
    r.wait(5)
    check_all(b, "e9", d)
    check_all(b, "e0", d0)
    assert b.stats()["pool"]["in_use"] == 0


@pytest.mark.timeout(60)
def test_eager_can_be_turned_off():
    with Engine(**dict(FAST, eager_requests=False)) as a, Engine(**FAST) as b:
        for i in range(3):
            d = layers(40 + i, 4)
            r = a.send_request(b.address, f"ne{i}", d)
            for n, t in d:
                r.send(n, t)
            r.wait(5)
            check_all(b, f"ne{i}", d)
        assert a.stats().get("requests_eager", 0) == 0


@pytest.mark.timeout(60)
def test_refused_eager_requests_do_not_leak_credit(pair):
    """Found by an attack: every refused eager request used to keep its size as credit at the receiver."""
    a, b = pair
    t = torch.randn(1 << 18)  # 1 MiB

    def one(tid):
        r = a.send_request(b.address, tid, [("l0", t)], timeout=2)
        try:
            r.send("l0", t)
            r.wait(3)
            return "ok"
        except Exception as exc:
            return type(exc).__name__

    assert one("DUP") == "ok" and one("W1") == "ok"
    outcomes = {one("DUP") for _ in range(40)}  # DUP/l0 still waits unclaimed at b
    assert outcomes == {"DuplicateKey"}
    sess = next(iter(b._sessions.values()))
    peer = a._peers[b.address]
    assert sess.outstanding == peer.credit  # both sides agree on what is left
    assert [one(f"N{k}") for k in range(5)] == ["ok"] * 5
    check_all(b, "N4", [("l0", t)])


class _LyingReceiver:
    """A ROUTER that speaks p2pkv's handshake and then answers offers as ``how`` says."""

    def __init__(self, hok: dict, how: str):
        import threading

        import zmq

        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.address = f"127.0.0.1:{self.sock.bind_to_random_port('tcp://127.0.0.1')}"
        self.hok, self.how, self.stop = hok, how, False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stop:
            if not self.sock.poll(50):
                continue
            frames = self.sock.recv_multipart()
            ident, m = frames[0], decode(frames[1])

            def reply(t, ident=ident, **kw):
                self.sock.send_multipart([ident, encode(t, **kw)])

            if m["t"] == "hello":
                reply("hok", **self.hok)
            elif m["t"] == "ping":
                reply("pong")
            elif m["t"] == "offer" and self.how == "early_done":
                reply("odone", seq=m["seq"])
            elif m["t"] == "offer" and self.how == "grant_silent":
                reply("ogrant", seq=m["seq"])

    def close(self):
        self.stop = True
        self.thread.join(5)
        self.sock.close(0)
        self.ctx.term()


def _hok_of(eng: Engine) -> dict:
    r = Raw(eng.address)
    try:
        hok = r.hello()
    finally:
        r.close()
    for k in ("v", "t"):
        hok.pop(k)
    hok["eid"] = "lying-receiver"
    return hok


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["early_done", "grant_silent"])
def test_a_lying_or_silent_receiver_cannot_fake_success_or_pile_up_requests(pair, how):
    a, b = pair
    fake = _LyingReceiver(_hok_of(b), how)
    try:
        results = set()
        # 20 requests outstanding at once (each waits out its own 1 s deadline together, not in turn)
        started = []
        for k in range(20):
            ts = [torch.randn(1 << 16), torch.randn(1 << 16)]
            r = a.send_request(fake.address, f"L{k}", [("x", ts[0]), ("y", ts[1])], timeout=1.0)
            try:
                r.send("x", ts[0])
                r.send("y", ts[1])
            except Exception as exc:
                results.add(type(exc).__name__)
            started.append(r)
        for r in started:
            try:
                r.wait(4)
                results.add("ok")
            except Exception as exc:
                results.add(type(exc).__name__)
        assert "ok" not in results  # nothing ever reached it: never reported done
        _settle(lambda: not a._peers[fake.address].reqs and not a._peers[fake.address].req_order, 10)
        assert a.stats().get("internal_errors", 0) == 0
        still_serves(b, a, how)
    finally:
        fake.close()
