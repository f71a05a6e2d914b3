"""A request is not held back by its own session's unused credit (found by a newcomer): an offer that
goes without credit (the producer did not know of the credit yet, or other requests of its were still
open) waited behind the credit its own session held unused until that credit was idle long enough to
be revoked (4 heartbeats), although that credit was the only thing in its way. The receiver now takes
that credit back at once (``crev``); the offer is granted when the producer answers. The session never
gets more than its window meanwhile (tests/test_hostile*.py cover a peer that never answers)."""

import time

import pytest
import torch

import p2pkv
from p2pkv import Engine, RequestLayout, RequestState, TransferKey
from p2pkv.pool import BufferPool

from .conftest import FAST

pytestmark = pytest.mark.timeout(120)

# the idle revocation comes after 4 heartbeats (8 s here): each request below must be granted well before
CFG = dict(FAST, timeout_s=30.0, peer_timeout_s=20.0, heartbeat_s=2.0, transport="tcp")
SMALL = RequestLayout([(f"l{i}", torch.float32, (2, 4, 8)) for i in range(3)])


def _small() -> list[torch.Tensor]:
    return [torch.full((2, 4, 8), float(i)) for i in range(3)]


def test_a_request_behind_open_requests_is_not_held_back_by_the_credit_they_left():
    with Engine(**CFG) as prod, Engine(**CFG) as cons:
        for _ in range(2):  # warm: the producer holds credit from here on
            tid = p2pkv.new_transfer_id()
            w = prod.send_request(cons.address, tid, SMALL)
            w.send_all(_small())
            w.wait(10)
            cons.recv_request(tid, timeout=10).wait().release()
        # open requests, nothing handed over yet: each asked for credit, which piled up to the whole window
        opened = []
        for _ in range(6):
            opened.append(prod.send_request(cons.address, p2pkv.new_transfer_id(), SMALL))
            time.sleep(0.1)  # its credit request answered before the next one is offered: credit piles up
        b = prod.send_request(cons.address, "bbbbbbbb", SMALL)
        b.send_all(_small())
        b.wait(4)  # took 4 heartbeats (the idle revocation) before
        assert all(not r.done() for r in opened)
        with cons.recv_request("bbbbbbbb", timeout=10) as h:
            got = h.wait().tensors()
            assert all(torch.equal(got[f"l{i}"], t) for i, t in enumerate(_small()))
        for r in opened:
            r.send_all(_small())
        for r in opened:
            r.wait(10)
            assert r.state is RequestState.DONE
            cons.recv_request(r.transfer_id, timeout=10).wait().release()


def test_an_offer_that_only_its_own_unused_credit_keeps_out_takes_that_credit_back():
    window = 4 * 2**20
    cfg = dict(CFG, credit_bytes=window)
    big = RequestLayout([(f"l{i}", torch.float32, (2**18,)) for i in range(3)]
                        + [("tail", torch.float32, (2**14,))])
    need = sum(BufferPool.footprint(s.nbytes) for s in big.specs)
    with Engine(**cfg) as prod, Engine(**cfg) as cons:
        t = torch.ones(64)
        # granted a quarter of the window, most of it left unused
        prod.send(cons.address, TransferKey("warm", "t"), t).wait(10)
        assert torch.equal(cons.recv(TransferKey("warm", "t"), timeout=10), t)
        held = prod._peers[cons.address].credit
        assert 0 < held < need <= window < need + held  # it fits the window only without that credit
        ts = [torch.full((2**18,), float(i)) for i in range(3)] + [torch.full((2**14,), 7.0)]
        r = prod.send_request(cons.address, "big", big)
        r.send_all(ts)
        r.wait(4)  # took 4 heartbeats (the idle revocation) before
        with cons.recv_request("big", timeout=10) as h:
            got = h.wait().tensors()
            assert all(torch.equal(got[s.name], x) for s, x in zip(big.specs, ts, strict=True))
        # and credit works as before afterwards
        prod.send(cons.address, TransferKey("after", "t"), t).wait(10)
        assert torch.equal(cons.recv(TransferKey("after", "t"), timeout=10), t)
