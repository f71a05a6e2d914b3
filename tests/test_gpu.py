"""One-GPU tests: CUDA pool, CUDA IPC between processes, NCCL on a one-rank communicator,
GPU tensors over TCP. Marked `gpu`; skipped without CUDA."""

import os
import time

import pytest
import torch

from p2pkv import Engine, PeerLost, TransferKey, TransportError
from p2pkv.synthetic import PRESETS, kv_layer, same_bits
from p2pkv.testing import RemoteEngine

pytestmark = pytest.mark.gpu

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
LLAMA = PRESETS["llama3-8b"]
SHAPE = list(LLAMA.layer_shape(64))  # 4 blocks of 16 tokens: 256 KiB per layer
GCFG = dict(device="cuda", timeout_s=30.0, peer_timeout_s=3.0, heartbeat_s=0.25, pool_bytes=256 * 2**20)
K = TransferKey


@pytest.fixture
def procs():
    made = []

    def make(**over):
        r = RemoteEngine(**dict(GCFG, **over))
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def test_gpu_pool_is_exportable_and_flat_over_10000_transfers():
    with Engine(**dict(GCFG, transport="ipc")) as a, Engine(**dict(GCFG, transport="ipc")) as b:
        assert a._ipc_handle is not None and len(a._ipc_handle) == 64
        t = torch.randn(64, 1024, device="cuda")
        a.send(b.address, K("warm", "0"), t).wait(10)
        with b.claim(K("warm", "0")):
            pass
        torch.cuda.synchronize()
        base_alloc = torch.cuda.memory_allocated()
        base_pool = b.stats()["pool"]
        for i in range(10_000):
            h = a.send(b.address, K("s", str(i)), t)
            with b.claim(K("s", str(i)), timeout=10) as v:
                if i % 1000 == 0:
                    assert torch.equal(v, t)
        h.wait(10)
        torch.cuda.synchronize()
        time.sleep(0.2)  # buffers return once their last GPU reader is done
        sb, sa = b.stats(), a.stats()
        assert torch.cuda.memory_allocated() == base_alloc
        assert sb["pool"]["in_use"] == 0 and sb["pool"]["overflow_allocs"] == 0
        assert sb["pool"]["capacity"] == base_pool["capacity"]
        assert sa["sent_ipc"] >= 10_000 and sb["received_ipc"] >= 10_000
        assert sa["pool"]["in_use"] == 0  # staging buffers all returned


def test_gpu_send_from_pool_buffer_is_zero_copy():
    with Engine(**dict(GCFG, transport="ipc")) as a, Engine(**dict(GCFG, transport="ipc")) as b:
        buf = a.alloc_buffer(4096 * 4)
        v = buf.view(torch.float32, (4096,))
        v.copy_(torch.arange(4096, dtype=torch.float32, device="cuda"))
        a.send(b.address, K("zc", "0"), v).wait(10)
        allocs_before = a.stats()["pool"]["allocs"]
        a.send(b.address, K("zc", "1"), v).wait(10)
        assert a.stats()["pool"]["allocs"] == allocs_before  # no staging buffer
        buf.release()
        assert torch.equal(b.recv(K("zc", "1")), torch.arange(4096, dtype=torch.float32, device="cuda"))


@pytest.mark.timeout(300)
def test_ipc_two_processes_push_and_pull_100x32(procs):
    prod, cons = procs(transport="ipc"), procs(transport="ipc")
    tids = [f"ipc-{i:03d}" for i in range(100)]
    cons.start("recv_many", tids, LLAMA.layers, SHAPE, timeout=60)
    prod.call("send_many", cons.address, tids, LLAMA.layers, SHAPE, timeout=60)
    assert cons.result(timeout=200) == 0
    st_c, st_p = cons.call("stats"), prod.call("stats")
    assert st_c["received_ipc"] == 100 * LLAMA.layers and st_c["pool"]["in_use"] == 0
    assert st_p["sent_ipc"] == 100 * LLAMA.layers
    ptids = [f"ipcpull-{i:03d}" for i in range(100)]
    # 20 requests (160 MiB) wait published; the other 80 are published while the pulls run
    prod.call("publish_many", ptids[:20], LLAMA.layers, SHAPE, timeout=60)
    cons.start("pull_many", prod.address, ptids, LLAMA.layers, SHAPE, timeout=60)
    time.sleep(0.5)
    prod.call("publish_many_from", ptids[20:], 20, LLAMA.layers, SHAPE, timeout=60)
    assert cons.result(timeout=200) == 0
    deadline = time.monotonic() + 5
    while prod.call("stats")["pool"]["in_use"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert prod.call("stats")["pool"]["in_use"] == 0


@pytest.mark.timeout(120)
def test_ipc_killed_peer_fails_pending_and_unmaps(procs):
    with Engine(**dict(GCFG, transport="ipc")) as cons:
        free0 = torch.cuda.mem_get_info()[0]
        prod = procs(transport="ipc")
        prod.call("send_many", cons.address, ["v"], 4, SHAPE, timeout=30)
        assert cons.stats()["ipc_mappings"] == 1
        prod.kill()
        t0 = time.monotonic()
        with pytest.raises(PeerLost):
            cons.recv(K("v", "model.layers.4.self_attn"), timeout=30)
        assert time.monotonic() - t0 < GCFG["peer_timeout_s"] + 1.5
        cons.abort("v")
        torch.cuda.synchronize()
        time.sleep(1.0)
        free1 = torch.cuda.mem_get_info()[0]
        # the dead producer's pool (256 MiB) is not held alive by our mapping
        assert free1 > free0 - 64 * 2**20, (free0, free1)
        assert cons.stats()["pool"]["in_use"] == 0


def test_gpu_tensors_over_tcp(procs):
    prod, cons = procs(transport="tcp", pinned_bytes=32 * 2**20), procs(transport="tcp")
    tids = [f"tcp-{i}" for i in range(8)]
    cons.start("recv_many", tids, LLAMA.layers, SHAPE, timeout=60)
    prod.call("send_many", cons.address, tids, LLAMA.layers, SHAPE, timeout=60)
    assert cons.result(timeout=120) == 0
    assert prod.call("stats")["sent_tcp"] == 8 * LLAMA.layers
    prod.call("publish_many", tids, 4, SHAPE, timeout=60)
    assert cons.call("pull_many", prod.address, tids, 4, SHAPE, timeout=60) == 0


def test_cpu_tensor_to_gpu_engine_and_back():
    with Engine(**GCFG) as g, Engine(timeout_s=10) as c:
        t = kv_layer(0, 0, (4, 8), torch.float16)
        c.send(g.address, K("x", "0"), t).wait(10)
        got = g.recv(K("x", "0"))
        assert got.device.type == "cuda" and same_bits(got.cpu(), t)
        g.send(c.address, K("x", "1"), got).wait(10)
        assert same_bits(c.recv(K("x", "1")), t)


# ----------------------------------------------------------------------------- NCCL
def _nccl():
    pytest.importorskip("nccl.core", reason="nccl4py is not installed")
    from p2pkv.transport import nccl

    return nccl


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int8,
                                   torch.uint8, torch.int32, torch.int64, torch.bool, torch.float8_e4m3fn,
                                   torch.float8_e5m2])
def test_nccl_one_rank_send_to_self_every_dtype(dtype):
    nccl = _nccl()
    comm = nccl.Comm(1, 0, nccl.new_unique_id(), torch.device("cuda", 0), deadline=time.monotonic() + 60)
    try:
        while comm.poll() == "init":
            time.sleep(0.01)
        assert comm.state == "ready", comm.error
        src = kv_layer(3, 1, (257, 33), dtype, "cuda")
        dst = torch.empty_like(src)
        comm.send_recv(src.view(torch.uint8),
                       dst.view(torch.uint8), comm.stream)
        comm.stream.synchronize()
        assert same_bits(dst, src)
    finally:
        comm.abort()


def test_nccl_lifecycle_and_init_timeout():
    nccl = _nccl()
    dev = torch.device("cuda", 0)
    free0 = torch.cuda.mem_get_info()[0]
    for _ in range(3):  # create, use, abort, rebuild
        comm = nccl.Comm(1, 0, nccl.new_unique_id(), dev, deadline=time.monotonic() + 60)
        while comm.poll() == "init":
            time.sleep(0.01)
        x = torch.arange(1024, device="cuda", dtype=torch.int32)
        y = torch.empty_like(x)
        comm.send_recv(x, y)
        comm.stream.synchronize()
        assert torch.equal(x, y)
        comm.abort()
        comm.abort()  # idempotent
        assert comm.state == "closed"
        with pytest.raises(TransportError):
            comm.send(x)
    comm = nccl.Comm(1, 0, nccl.new_unique_id(), dev, deadline=time.monotonic() + 60)
    while comm.poll() == "init":
        time.sleep(0.01)
    comm.destroy()
    torch.cuda.synchronize()
    assert torch.cuda.mem_get_info()[0] > free0 - 256 * 2**20
    # a peer that never joins: a clear failure by the deadline, not a hang
    t0 = time.monotonic()
    lonely = nccl.Comm(2, 0, nccl.new_unique_id(), dev, deadline=time.monotonic() + 2.0)
    while lonely.poll() == "init":
        time.sleep(0.02)
        assert time.monotonic() - t0 < 10
    assert lonely.state == "failed" and "never joined" in lonely.error
    assert time.monotonic() - t0 < 4


def test_engine_nccl_loopback_32_layers():
    _nccl()
    with Engine(**dict(GCFG, transport="nccl")) as e:
        layers = [kv_layer(7, i, tuple(SHAPE), torch.bfloat16, "cuda") for i in range(LLAMA.layers)]
        hs = [e.send(e.address, K("loop", str(i)), t) for i, t in enumerate(layers)]
        for h in hs:
            h.wait(60)
        for i, t in enumerate(layers):
            assert same_bits(e.recv(K("loop", str(i))), t)
        st = e.stats()
        assert st["sent_nccl"] == LLAMA.layers and st["nccl_comms"] == 1
        assert st["pool"]["in_use"] == 0


def test_engine_nccl_forced_to_cpu_peer_fails_clearly():
    _nccl()
    with Engine(**dict(GCFG, transport="nccl")) as g, Engine(timeout_s=5) as c:
        h = g.send(c.address, K("n", "0"), torch.ones(4, device="cuda"))
        with pytest.raises(TransportError, match="nccl"):
            h.wait(10)
