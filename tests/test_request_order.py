"""Whole requests over TCP do not wait in line behind each other (found by a newcomer): every request to
one peer used to be posted in offer order, so a request handed over layer by layer, or left half-sent,
held every later request to that peer until it was complete or its deadline passed (30 s by default).
TCP tensors are addressed by request and index: only NCCL (and IPC) requests need one global order."""

import pytest
import torch

from p2pkv import Engine, RequestState

from .conftest import FAST

pytestmark = pytest.mark.timeout(120)

TCP = dict(FAST, timeout_s=30.0, transport="tcp")
L = [(f"l{i}", torch.full((256,), float(i))) for i in range(4)]


def test_a_half_sent_request_does_not_stall_the_next_one():
    with Engine(**TCP) as prod, Engine(**TCP) as cons:
        first = prod.send_request(cons.address, "first", L)
        first.send(*L[0])  # the rest later (a forward pass still computing them)
        second = prod.send_request(cons.address, "second", L)
        second.send_all([t for _, t in L])
        second.wait(10)  # timed out (30 s deadline of the first) before
        with cons.recv_request("second", timeout=10) as h:
            got = h.wait().tensors()
            assert all(torch.equal(got[n], t) for n, t in L)
        assert first.state is not RequestState.DONE
        for n, t in L[1:]:
            first.send(n, t)
        first.wait(10)
        with cons.recv_request("first", timeout=10) as h:
            got = h.wait().tensors()
            assert all(torch.equal(got[n], t) for n, t in L)


def test_layers_of_interleaved_requests_arrive_as_they_are_handed_over():
    with Engine(**TCP) as prod, Engine(**TCP) as cons:
        a = prod.send_request(cons.address, "A", L)
        b = prod.send_request(cons.address, "B", L)
        ha = cons.recv_request("A", timeout=30)
        hb = cons.recv_request("B", timeout=30)
        for i, (n, t) in enumerate(L):
            a.send(n, t)
            b.send(n, t)
            # B's layer i lands while A is still incomplete (before: B waited for all of A)
            assert torch.equal(hb.tensor(n), t)
            assert torch.equal(ha.tensor(n), t)
            if i < len(L) - 1:
                assert not a.done()
        a.wait(10)
        b.wait(10)
        ha.wait().release()
        hb.wait().release()
