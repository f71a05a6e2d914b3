"""Whole requests on GPUs: CUDA IPC between processes (one GPU) and NCCL between two GPUs,
including the NCCL ordering hazards (a refused, aborted or timed-out request must never shift
data onto the next one)."""

import os
import time

import pytest
import torch

from p2pkv import Engine, PeerLost, TransferAborted, TransferKey, TransferTimeout
from p2pkv.synthetic import PRESETS, kv_layer, same_bits
from p2pkv.testing import RemoteEngine

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
LLAMA = PRESETS["llama3-8b"]
SHAPE = list(LLAMA.layer_shape(64))
L = LLAMA.layers
BASE = dict(timeout_s=30.0, peer_timeout_s=3.0, heartbeat_s=0.25, pool_bytes=512 * 2**20)


def _name(i: int) -> str:
    return f"model.layers.{i}.self_attn"


def _settle(cond, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "state did not settle"
        time.sleep(0.05)


def _held(s: dict) -> int:
    """Pool bytes holding data (a same-host fast-path lease is room, not data)."""
    return s["pool"]["in_use"] - s["fast"]["lease_bytes"] + s["fast"]["held"]


def _roundtrip(prod: RemoteEngine, cons: RemoteEngine, tids: list[str]) -> None:
    cons.start("recv_many", tids, L, SHAPE, timeout=60)
    assert prod.call("send_requests", cons.address, tids, L, SHAPE, req_timeout=60) == {"done": len(tids)}
    assert cons.result(timeout=120) == 0


# ----------------------------------------------------------------------------- one GPU: CUDA IPC
@pytest.mark.gpu
@pytest.mark.timeout(300)
def test_ipc_requests_between_processes():
    cfg = dict(BASE, device="cuda:0", transport="ipc")
    with RemoteEngine(**cfg) as prod, RemoteEngine(**cfg) as cons:
        _roundtrip(prod, cons, [f"i{i:03d}" for i in range(50)])
        s = cons.call("stats")
        # the first request asks for the same-host fast path and goes the ordinary IPC way; the rest take it
        assert s["requests_received"] + s.get("requests_received_fast", 0) == 50 and _held(s) == 0
        ps = prod.call("stats")
        assert ps["sent_ipc"] + ps.get("sent_fast", 0) == 50 * L
        # a request given up half-way, and one whose layers never all come: both sides end clean
        prod.call("send_requests", cons.address, ["ia"], L, SHAPE, only=5, abort=True, req_timeout=10)
        out = prod.call("send_requests", cons.address, ["it"], L, SHAPE, only=5, req_timeout=2)
        assert out == {"TransferTimeout": 1}
        cons.call("abort", "ia")
        cons.call("abort", "it")
        _settle(lambda: _held(cons.call("stats")) == 0)
        _roundtrip(prod, cons, ["i-after"])


@pytest.mark.gpu
@pytest.mark.timeout(120)
def test_request_to_self_and_to_cpu():
    with Engine(**dict(BASE, device="cuda:0")) as g, Engine(**BASE) as c:
        data = [(_name(i), kv_layer(1, i, tuple(SHAPE), device=g.device)) for i in range(L)]
        req = g.send_request(g.address, "self", data)
        for n, t in data:
            req.send(n, t)
        req.wait(20)
        for n, t in data:
            assert same_bits(g.recv(TransferKey("self", n), timeout=5), t)
        req = g.send_request(c.address, "tocpu", data)  # CUDA engine -> CPU engine: TCP, staged
        for n, t in data:
            req.send(n, t)
        req.wait(20)
        for n, t in data:
            assert same_bits(c.recv(TransferKey("tocpu", n), timeout=5), t.cpu())
        assert _held(g.stats()) == 0 and _held(c.stats()) == 0


# ----------------------------------------------------------------------------- two GPUs: NCCL
@pytest.fixture
def nccl_pair():
    pytest.importorskip("nccl.core")
    prod = RemoteEngine(**dict(BASE, device="cuda:0", transport="nccl"))
    cons = RemoteEngine(**dict(BASE, device="cuda:1", transport="nccl"))
    yield prod, cons
    prod.close()
    cons.close()


@pytest.mark.gpu
@pytest.mark.multi_gpu
@pytest.mark.timeout(600)
def test_nccl_requests_and_tensors_interleaved(nccl_pair):
    prod, cons = nccl_pair
    _roundtrip(prod, cons, [f"n{i:03d}" for i in range(100)])
    # per-tensor sends and whole requests at once: separate communicators, no mixing
    tids = [f"m{i:02d}" for i in range(10)]
    cons.start("recv_many", tids + ["t0", "t1"], L, SHAPE, timeout=60)
    prod.call("send_many", cons.address, ["t0"], L, SHAPE, wait=False, seed_of=[10])
    prod.call("send_requests", cons.address, tids, L, SHAPE, wait=False, req_timeout=60)
    prod.call("send_many", cons.address, ["t1"], L, SHAPE, wait=False, seed_of=[11])
    assert cons.result(timeout=120) == 0
    s = prod.call("stats")
    assert s["sent_nccl"] >= 110 * L


@pytest.mark.gpu
@pytest.mark.multi_gpu
@pytest.mark.timeout(600)
def test_nccl_gave_up_requests_never_shift_data(nccl_pair):
    prod, cons = nccl_pair
    _roundtrip(prod, cons, ["warm"])
    comms = prod.call("stats")["nccl_comms"]
    # producer aborts after 5 layers landed (so after the grant): what the consumer posted for the other
    # 27 is drained, the communicator stays in step
    cons.start("recv_many", ["pa"], 5, SHAPE, timeout=30)
    prod.call("send_requests", cons.address, ["pa"], L, SHAPE, only=5, wait=False, req_timeout=20)
    assert cons.result(timeout=60) == 0
    prod.call("abort", "pa")
    _roundtrip(prod, cons, ["after-pa"])
    assert prod.call("stats")["drained_items"] >= L - 5
    assert prod.call("stats")["nccl_comms"] == comms  # no rebuild
    # consumer aborts mid-request
    cons.start("recv_many", ["ca"], 3, SHAPE, timeout=30)
    prod.call("send_requests", cons.address, ["ca"], L, SHAPE, only=3, wait=False, req_timeout=20)
    assert cons.result(timeout=60) == 0
    cons.call("abort", "ca")
    _roundtrip(prod, cons, ["after-ca"])
    # a refused offer (its keys are already waiting) posts nothing
    cons.start("recv_many", ["dup"], L, SHAPE, timeout=30)
    _ = prod.call("send_requests", cons.address, ["dup"], L, SHAPE, req_timeout=20)
    assert cons.result(timeout=60) == 0
    prod.call("send_requests", cons.address, ["dup2"], L, SHAPE, req_timeout=20)
    assert prod.call("send_requests", cons.address, ["dup2"], L, SHAPE, req_timeout=20) == {"DuplicateKey": 1}
    cons.call("abort", "dup2")
    _roundtrip(prod, cons, ["after-dup"])
    # layers that never come: both sides fail at the deadline, the communicator is rebuilt, then all is well
    assert prod.call("send_requests", cons.address, ["to"], L, SHAPE, only=4, req_timeout=2) == {"TransferTimeout": 1}
    _roundtrip(prod, cons, ["after-to"])
    cons.call("abort", "to")
    _settle(lambda: cons.call("stats")["pool"]["in_use"] == 0)


@pytest.mark.gpu
@pytest.mark.multi_gpu
@pytest.mark.timeout(300)
def test_nccl_request_killed_producer_fails_fast():
    pytest.importorskip("nccl.core")
    prod = RemoteEngine(**dict(BASE, device="cuda:0", transport="nccl"))
    try:
        with Engine(**dict(BASE, device="cuda:1", transport="nccl")) as cons:
            prod.call("send_requests", cons.address, ["k"], L, SHAPE, only=4, wait=False, req_timeout=30)
            cons.recv(TransferKey("k", _name(3)), timeout=30)
            prod.kill()
            t0 = time.monotonic()
            with pytest.raises((PeerLost, TransferAborted, TransferTimeout)) as ei:
                cons.recv(TransferKey("k", _name(10)), timeout=30)
            assert isinstance(ei.value, PeerLost), ei.value
            assert time.monotonic() - t0 < BASE["peer_timeout_s"] + 2
            cons.abort("k")
            _settle(lambda: cons.stats()["pool"]["in_use"] == 0 and not cons._incoming)
    finally:
        prod.close()


@pytest.mark.gpu
@pytest.mark.multi_gpu
@pytest.mark.timeout(300)
def test_nccl_stream_ordered_send_does_not_block_caller():
    """send() returns before the caller's stream has produced the tensor; the data still arrives right."""
    pytest.importorskip("nccl.core")
    cons = RemoteEngine(**dict(BASE, device="cuda:1", transport="nccl"))
    try:
        with Engine(**dict(BASE, device="cuda:0", transport="nccl")) as prod:
            data = [(_name(i), torch.empty(SHAPE, dtype=torch.bfloat16, device="cuda:0")) for i in range(L)]
            src = [kv_layer(0, i, tuple(SHAPE), device=torch.device("cuda:0")) for i in range(L)]
            torch.cuda.synchronize()
            prod.connect(cons.address, timeout=30)
            # warm up: the communicator's first operation sets up NCCL's connections (one time, may block)
            cons.start("recv_many", ["warm"], L, SHAPE, timeout=60)
            warm = [(n, kv_layer(0, i, tuple(SHAPE), device=torch.device("cuda:0"))) for i, (n, _) in enumerate(data)]
            wreq = prod.send_request(cons.address, "warm", warm)
            for n, t in warm:
                wreq.send(n, t)
            wreq.wait(30)
            assert cons.result(timeout=60) == 0
            cons.start("recv_many", ["so"], L, SHAPE, timeout=60)
            req = prod.send_request(cons.address, "so", data)
            torch.cuda._sleep(200_000_000)  # the caller's stream is busy for ~0.1 s
            t0 = time.monotonic()
            for i, (n, t) in enumerate(data):
                t.copy_(src[i])  # queued behind the sleep
                req.send(n, t)
            host = time.monotonic() - t0
            req.wait(30)
            assert cons.result(timeout=60) == 0
            assert host < 0.05, f"send blocked the caller for {host:.3f}s"
    finally:
        cons.close()
