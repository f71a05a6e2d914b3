"""The receiver's counters cover whole requests on every path (found by a newcomer): ``received_tcp``
(and ``_ipc``, ``_nccl``) counted single sends only, and on the same-host fast path ``tensors_received``
and ``bytes_received`` left out request tensors (4096 bytes received against 20480 sent)."""

import pytest
import torch

import p2pkv
from p2pkv import RequestLayout

pytestmark = pytest.mark.timeout(120)

N = 5
L = RequestLayout([(f"l{i}", torch.float32, (256,)) for i in range(4)])


def test_request_tensors_are_counted_once_where_they_land(tcp_shm_pair):
    prod, cons = tcp_shm_pair
    before_c, before_p = cons.stats(), prod.stats()
    sent = 0
    for r in range(N):
        tid = p2pkv.new_transfer_id()
        q = prod.send_request(cons.address, tid, L)
        q.send_all([torch.full((256,), float(r))] * 4)
        q.wait(10)
        with cons.recv_request(tid, timeout=10) as h:
            assert torch.equal(h.wait().tensors()["l3"], torch.full((256,), float(r)))
        sent += L.nbytes
    c, p = cons.stats(), prod.stats()
    assert p["bytes_sent"] - before_p["bytes_sent"] == sent
    assert c["bytes_received"] - before_c["bytes_received"] == sent
    assert c["tensors_received"] - before_c["tensors_received"] == 4 * N
    fast = c["requests_received_fast"] - before_c["requests_received_fast"]
    per_transport = sum(c[f"received_{x}"] - before_c[f"received_{x}"] for x in ("tcp", "ipc", "nccl"))
    if fast:  # the same-host path is no transport of its own (see requests_received_fast)
        assert fast == N and per_transport == 0
    else:
        assert c["received_tcp"] - before_c["received_tcp"] == 4 * N == per_transport
