"""A failed ``recv_request`` handle loses no delivered data: what it took and did not hand out goes back,
so that a later ``recv_request`` or ``recv`` gets it (found by a newcomer: a handle asking for a name the
request lacks took one tensor, waited for its deadline and dropped it; the next handle then timed out on
the tensor the first had dropped, and dropped the other one too). Over TCP (the request's layout record and
inbox slots) and over the same-host fast path (``transport="shm"``: one record for the whole request)."""

import time

import pytest
import torch

from p2pkv import InvalidKey, TransferKey, TransferTimeout
from p2pkv.recv_request import RecvState

from .conftest import layout_known

pytestmark = pytest.mark.timeout(120)

A = torch.arange(4, dtype=torch.float32)
B = torch.arange(6, dtype=torch.float32).reshape(2, 3) + 100


def test_names_the_request_lacks_fail_at_once_and_take_nothing(tcp_shm_pair):
    prod, cons = tcp_shm_pair
    req = prod.send_request(cons.address, "r1", [("a", A), ("b", B)])
    req.send_all([A, B])
    req.wait(20)
    layout_known(cons, "r1")
    h = cons.recv_request("r1", names=["a", "c"], timeout=20)
    t0 = time.monotonic()
    with pytest.raises(InvalidKey, match="'c'"):
        h.wait()
    assert time.monotonic() - t0 < 10  # at once, not at the handle's deadline
    assert h.state is RecvState.FAILED
    # nothing was lost: the whole request is still there, even before the failed handle is released
    with cons.recv_request("r1", timeout=20) as whole:
        got = whole.wait().tensors()
        assert torch.equal(got["a"], A) and torch.equal(got["b"], B)
    h.release()


def test_a_handle_failed_at_its_deadline_gives_back_what_it_took(tcp_shm_pair):
    prod, cons = tcp_shm_pair
    req = prod.send_request(cons.address, "r2", [("a", A), ("b", B)])
    req.send("a", A)  # b comes later
    layout_known(cons, "r2")
    h = cons.recv_request("r2", timeout=1.0)
    with pytest.raises(TransferTimeout, match="'b'"):
        h.wait()
    assert h.state is RecvState.FAILED
    req.send("b", B)
    req.wait(20)
    # a new handle takes the whole request, with the tensor the failed handle had taken
    with cons.recv_request("r2", timeout=20) as again:
        got = again.wait().tensors()
        assert torch.equal(got["a"], A) and torch.equal(got["b"], B)
    h.release()  # (nothing left in it; harmless)


def test_a_failed_handle_keeps_what_it_handed_out(tcp_shm_pair):
    """A tensor the caller already holds a view of stays with the handle (it is freed on release): giving it
    back would let a second taker reuse memory the caller still reads."""
    prod, cons = tcp_shm_pair
    req = prod.send_request(cons.address, "r3", [("a", A), ("b", B)])
    req.send("a", A)
    layout_known(cons, "r3")
    h = cons.recv_request("r3", timeout=1.0)
    end = time.monotonic() + 20
    while True:  # wait for a alone (its view is handed out), then let the handle fail on b
        try:
            va = h.tensor("a")
            break
        except TransferTimeout:
            assert time.monotonic() < end
    assert torch.equal(va, A)
    with pytest.raises(TransferTimeout):
        h.wait()
    assert torch.equal(va, A)  # still valid: the handle holds it until release
    h.release()
    with pytest.raises(TransferTimeout):
        cons.recv(TransferKey("r3", "a"), timeout=0.5)
