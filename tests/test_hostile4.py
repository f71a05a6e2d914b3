"""Hostile peers against what landed on 2026-12-03: the work-conserving I/O share, the give-back of a failed
``recv_request`` handle. Each test failed before its fix."""

import threading
import time

import pytest
import torch
import zmq

from p2pkv import Engine, TransferKey, TransferTimeout
from p2pkv.control.messages import encode

from .conftest import FAST, layout_known

pytestmark = pytest.mark.timeout(120)

LAYERS = [(f"layer{i}", torch.full((64,), float(i))) for i in range(32)]


def test_a_sessionless_stranger_does_not_make_a_lone_producers_share_bind(tiny_share):
    """Contention is another *session* sending work. A stranger that never said hello (no session) and
    sends decodable headers every 0.2 s made an honest producer alone with the consumer be refused
    with PoolExhausted on every offer over its share: the work-conserving rule undone from outside."""
    with Engine(**FAST) as cons, Engine(**FAST) as prod:
        stop = threading.Event()
        ctx = zmq.Context.instance()

        def stranger() -> None:
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(f"tcp://{cons.address}")
            try:
                while not stop.is_set():
                    s.send(encode("fq"))  # decodes; no session: answered no_session
                    s.send(encode("abort", tid="x"))
                    stop.wait(0.2)
            finally:
                s.close()

        th = threading.Thread(target=stranger, daemon=True)
        th.start()
        try:
            time.sleep(0.5)
            for i in range(5):
                req = prod.send_request(cons.address, f"lone-{i}", LAYERS)
                req.send_all([t for _, t in LAYERS])
                req.wait(30)  # raised PoolExhausted ("share") from the second request on
                with cons.recv_request(f"lone-{i}", timeout=30) as h:
                    assert torch.equal(h.wait().tensor("layer7"), LAYERS[7][1])
        finally:
            stop.set()
            th.join(30)
        assert cons.stats().get("offers_over_budget", 0) == 0


A = torch.arange(4096, dtype=torch.float32)
B = torch.arange(4096, dtype=torch.float32) + 10_000


def _more_requests(prod: Engine, cons: Engine, prefix: str, n: int) -> None:
    """``n`` more requests of two tensors (other values than A and B), each sent and taken whole."""
    for i in range(n):
        other = [("a", torch.full((4096,), -1.0 - i)), ("b", torch.full((4096,), -2.0 - i))]
        req = prod.send_request(cons.address, f"{prefix}-{i}", other)
        req.send_all([t for _, t in other])
        req.wait(20)
        with cons.recv_request(f"{prefix}-{i}", timeout=20) as z:
            z.wait()


def test_release_from_another_thread_while_a_failed_handle_gives_back(shm_pair, monkeypatch):
    """``release()`` is allowed from another thread. Run while the failing handle gives its same-host record
    back (after the record was relisted, before the handle forgot it), it must not drop the record's
    reference a second time: two later takers of half the request each, and the first one's release would
    free the lease room the second one still reads (a producer's next request overwriting its view).
    (Holds: the give-back runs under the handle's lock; kept as a guard.)"""
    prod, cons = shm_pair
    req = prod.send_request(cons.address, "gb", [("a", A), ("b", B)])
    req.send("a", A)  # b comes later: the first handle fails at its deadline
    layout_known(cons, "gb")
    h = cons.recv_request("gb", timeout=1.0)
    plane = cons._fast
    orig = plane.give_back
    threads: list[threading.Thread] = []

    def racing_give_back(rec, taken, **kw):  # the caller's other thread releases the handle right now
        ok = orig(rec, taken, **kw)
        th = threading.Thread(target=h.release)
        th.start()
        th.join(0.5)  # (it waits for the handle's lock, if the give-back holds it)
        threads.append(th)
        return ok

    monkeypatch.setattr(plane, "give_back", racing_give_back)
    with pytest.raises(TransferTimeout):
        h.wait()
    monkeypatch.setattr(plane, "give_back", orig)
    for th in threads:
        th.join(30)
    req.send("b", B)
    req.wait(20)
    x = cons.recv_request("gb", names=["a"], timeout=20)
    y = cons.recv_request("gb", names=["b"], timeout=20)
    vb = y.wait().tensor("b")
    assert torch.equal(vb, B)
    assert torch.equal(x.wait().tensor("a"), A)
    x.release()  # y still holds b: its room must stay ours
    _more_requests(prod, cons, "next", 4)  # the producer's next requests go to free lease room
    assert torch.equal(vb, B), "a view still held was overwritten: its room was freed under it"
    y.release()


def test_a_handle_failed_after_a_view_gives_back_the_tensors_it_did_not_hand_out(tcp_shm_pair):
    """The caller got a view of ``a``; the handle then failed at its deadline (``b`` late). ``b`` is not the
    caller's: a later ``recv`` of it must get it (over TCP it did; over the same-host path the handle kept
    the whole record, and ``b`` was freed unseen on release: the next taker timed out). ``a``'s view stays
    valid until the handle is released, also while the producer's next requests land."""
    prod, cons = tcp_shm_pair
    req = prod.send_request(cons.address, "pv", [("a", A), ("b", B)])
    req.send("a", A)
    layout_known(cons, "pv")
    x = cons.recv_request("pv", timeout=1.5)
    end = time.monotonic() + 20
    while True:
        try:
            va = x.tensor("a")
            break
        except TransferTimeout:
            assert time.monotonic() < end
    with pytest.raises(TransferTimeout, match="'b'"):
        x.wait()
    req.send("b", B)
    req.wait(20)
    got = cons.recv(TransferKey("pv", "b"), timeout=20)  # timed out on the same-host path
    assert torch.equal(got, B)
    _more_requests(prod, cons, "pv-next", 3)  # the room of a stays ours while x holds its view
    assert torch.equal(va, A)
    x.release()
    with pytest.raises(TransferTimeout):  # a stayed with x: freed on its release, not offered again
        cons.recv(TransferKey("pv", "a"), timeout=0.5)


def test_a_refused_session_fails_sends_at_once_typed_and_a_later_one_gets_in():
    """Out of session places (max_sessions_per_peer): a dialing engine's send, send_request and connect fail
    at once with SessionRefused (no wait for a deadline), and once a place is free its next send goes
    through on a new session (the refusal is not remembered for the peer)."""
    from p2pkv import SessionRefused

    with Engine(**dict(FAST, max_sessions_per_peer=1)) as cons, Engine(**FAST) as a, Engine(**FAST) as b:
        a.connect(cons.address, timeout=30)
        t = torch.ones(4)
        with pytest.raises(SessionRefused, match="max_sessions_per_peer=1"):
            b.send(cons.address, TransferKey("sr", "x"), t).wait(30)

        def request() -> None:
            r = b.send_request(cons.address, "sr-req", [("x", t)])
            r.send_all([t])
            r.wait(30)

        with pytest.raises(SessionRefused):
            request()
        with pytest.raises(SessionRefused):
            b.connect(cons.address, timeout=30)
        a.close()  # its place frees once the consumer sees its connection close
        end = time.monotonic() + 30
        while True:
            try:
                b.send(cons.address, TransferKey("sr", "y"), t).wait(30)
                break
            except SessionRefused:
                assert time.monotonic() < end, "the place never came free"
                time.sleep(0.1)
        assert torch.equal(cons.recv(TransferKey("sr", "y"), timeout=30), t)
