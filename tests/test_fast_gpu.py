"""The same-host fast path on a GPU: CUDA IPC writes straight into the consumer's pool, flags written
by the producer's stream into shared host memory, and stream-ordered waits on the consumer."""

import os
import threading
import time

import pytest
import torch

from p2pkv import Engine, InvalidKey, InvalidTensor, PeerLost, RequestLayout, TransferKey, TransferTimeout
from p2pkv.recv_request import RecvState
from p2pkv.synthetic import PRESETS, kv_layer, same_bits
from p2pkv.testing import RemoteEngine

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
LLAMA = PRESETS["llama3-8b"]
SHAPE = list(LLAMA.layer_shape(64))
L = LLAMA.layers
BASE = dict(timeout_s=30.0, peer_timeout_s=3.0, heartbeat_s=0.25, pool_bytes=512 * 2**20, device="cuda:0")


def _name(i: int) -> str:
    return f"model.layers.{i}.self_attn"


def _settle(cond, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "state did not settle"
        time.sleep(0.02)


def _held(s: dict) -> int:
    return s["pool"]["in_use"] - s["fast"]["lease_bytes"] + s["fast"]["held"]


def _warm(prod: Engine, cons: Engine) -> None:
    req = prod.send_request(cons.address, "warm-up", [("w", torch.zeros(64, device=prod.device))])
    req.send("w", torch.zeros(64, device=prod.device))
    req.wait(20)
    cons.recv_request("warm-up").wait(20).release()
    _settle(lambda: prod._fast_ready(cons.address) is not None)


@pytest.mark.gpu
@pytest.mark.timeout(300)
def test_fast_ipc_between_processes():
    with RemoteEngine(**BASE) as prod, RemoteEngine(**BASE) as cons:
        assert prod.call("send_requests", cons.address, ["w0"], 1, [64]) == {"done": 1}  # asks for the path
        assert cons.call("recv_requests", ["w0"], 1, [64]) == 0
        time.sleep(0.5)
        tids = [f"f{i:03d}" for i in range(40)]
        cons.start("recv_requests", tids[:20], L, SHAPE, timeout=60)
        assert prod.call("send_requests", cons.address, tids[:20], L, SHAPE, many=True, req_timeout=60) == \
            {"done": 20}
        assert cons.result(timeout=120) == 0
        cons.start("recv_requests", tids[20:], L, SHAPE, timeout=60, use_outs=True)
        assert prod.call("send_requests", cons.address, tids[20:], L, SHAPE, req_timeout=60) == {"done": 20}
        assert cons.result(timeout=120) == 0
        # per-key recv of fast requests
        cons.start("recv_many", ["k0", "k1"], L, SHAPE, timeout=60, use_out=True)
        assert prod.call("send_requests", cons.address, ["k0", "k1"], L, SHAPE, many=True) == {"done": 2}
        assert cons.result(timeout=120) == 0
        ps, cs = prod.call("stats"), cons.call("stats")
        assert ps["requests_fast"] >= 40 and cs["requests_received_fast"] >= 40
        _settle(lambda: _held(cons.call("stats")) == 0)
        # given up half-way, and layers that never come: both sides end clean, the path goes on
        prod.call("send_requests", cons.address, ["ab"], L, SHAPE, only=5, abort=True, req_timeout=10)
        assert prod.call("send_requests", cons.address, ["dl"], L, SHAPE, only=5, req_timeout=2) == \
            {"TransferTimeout": 1}
        cons.call("abort", "ab")
        cons.call("abort", "dl")
        _settle(lambda: _held(cons.call("stats")) == 0)
        cons.start("recv_requests", ["after"], L, SHAPE, timeout=60)
        assert prod.call("send_requests", cons.address, ["after"], L, SHAPE, many=True) == {"done": 1}
        assert cons.result(timeout=60) == 0


@pytest.mark.gpu
@pytest.mark.timeout(120)
def test_wait_layer_is_stream_ordered():
    """The consumer queues a stream wait per layer and work behind it before any data exists; the
    host never blocks on the data, and the work sees every layer."""
    with Engine(**BASE) as prod, Engine(**BASE) as cons:
        _warm(prod, cons)
        data = [(_name(i), kv_layer(3, i, tuple(SHAPE), device=prod.device)) for i in range(L)]
        req = prod.send_request(cons.address, "so", data)
        h = cons.recv_request("so")
        s = torch.cuda.Stream(cons.device)
        # what the work behind the waits writes is allocated first: an allocation that needs cudaMalloc (a
        # device-wide synchronization) while a stream waits would wait for the data too
        copies = [torch.empty_like(t) for _, t in data]
        torch.cuda.synchronize()
        t0 = time.monotonic()
        with torch.cuda.stream(s):
            for (n, _), c in zip(data, copies, strict=True):
                v = h.wait_layer(n, s)
                c.copy_(v)
        queued = time.monotonic() - t0
        ev = torch.cuda.Event()
        ev.record(s)
        assert not ev.query(), "the stream must wait for the data"

        def later() -> None:
            time.sleep(0.3)
            req.send_many(data)

        th = threading.Thread(target=later)
        th.start()
        ev.synchronize()
        th.join()
        assert queued < 0.25, "queueing the waits must not wait for the data"
        for (n, t), got in zip(data, copies, strict=True):
            assert same_bits(got, t), n
        h.wait(10)
        assert h.error is None
        h.release()
        req.wait(10)


@pytest.mark.gpu
@pytest.mark.timeout(120)
def test_stream_wait_released_at_the_deadline():
    """Layers that never come must not hang the consumer's stream: at the deadline the wait is
    released and the request fails."""
    with Engine(**BASE) as prod, Engine(**dict(BASE, timeout_s=2.0, peer_timeout_s=1.0)) as cons:
        _warm(prod, cons)
        data = [(_name(i), kv_layer(4, i, tuple(SHAPE), device=prod.device)) for i in range(4)]
        req = prod.send_request(cons.address, "never", data, timeout=1.0)
        req.send_many(data[:1])
        h = cons.recv_request("never")
        s = torch.cuda.Stream(cons.device)
        for n, _ in data:
            h.wait_layer(n, s)
        ev = torch.cuda.Event()
        ev.record(s)
        t0 = time.monotonic()
        while not ev.query():
            assert time.monotonic() - t0 < 20, "the stream was never released"
            time.sleep(0.01)
        with pytest.raises(TransferTimeout):
            h.wait()
        assert h.state is RecvState.FAILED
        h.release()
        with pytest.raises(TransferTimeout):
            req.wait(10)


@pytest.mark.gpu
@pytest.mark.timeout(120)
def test_in_process_and_outs():
    with Engine(**BASE) as prod, Engine(**BASE) as cons:
        _warm(prod, cons)
        for i in range(10):
            data = [(_name(j), kv_layer(i, j, tuple(SHAPE), device=prod.device)) for j in range(L)]
            outs = {n: torch.empty_like(t) for n, t in data} if i % 2 else None
            h = cons.recv_request(f"p{i}", outs=outs)
            req = prod.send_request(cons.address, f"p{i}", data)
            req.send_many(data)
            h.wait(20)
            torch.cuda.current_stream(cons.device).synchronize()
            for n, t in data:
                assert same_bits(h.tensor(n), t)
            h.release()
            req.wait(20)
        out = torch.empty(tuple(SHAPE), dtype=torch.bfloat16, device=cons.device)
        data = [(_name(j), kv_layer(99, j, tuple(SHAPE), device=prod.device)) for j in range(L)]
        prod.send_request(cons.address, "key", data).send_many(data)
        assert same_bits(cons.recv(TransferKey("key", _name(5)), out=out, timeout=20), data[5][1])
        cons.abort("key")
        _settle(lambda: _held(cons.stats()) == 0)
        assert prod.stats()["requests_fast"] >= 11


@pytest.mark.gpu
@pytest.mark.timeout(180)
def test_killed_producer_fails_the_wait():
    with Engine(**dict(BASE, timeout_s=30.0)) as cons, RemoteEngine(**BASE) as prod:
        assert prod.call("send_requests", cons.address, ["w"], 1, [64]) == {"done": 1}
        cons.recv_request("w").wait(20).release()
        time.sleep(0.5)
        h = cons.recv_request("dead", timeout=25)
        prod.start("send_requests", cons.address, ["dead"], L, SHAPE, only=3, req_timeout=20)
        _settle(lambda: h._progress() or h.state is RecvState.ARRIVING, timeout=20)
        prod.kill()
        t0 = time.monotonic()
        with pytest.raises(PeerLost):
            h.wait()
        assert time.monotonic() - t0 < BASE["peer_timeout_s"] + 5
        h.release()


@pytest.mark.gpu
@pytest.mark.timeout(120)
def test_one_sided_read_of_registered_memory():
    """A producer registers a tensor; a same-host consumer maps it, reads it with its own copy and says so."""
    shape = [8, 16, 8, 128]
    with RemoteEngine(**BASE) as prod, Engine(**BASE) as cons:
        prod.call("register_pattern", "cache0", shape, 5)
        prod.start("expose_wait", "rd1", 30.0)
        views = cons.remote_memory(prod.address, timeout=20)
        v = views["cache0"]
        assert tuple(v.shape) == tuple(shape) and v.dtype == torch.bfloat16
        full = kv_layer(5, 0, (shape[0] + 1, *shape[1:]), device=cons.device)
        assert same_bits(v.clone(), full[1:])
        assert cons.remote_memory(prod.address) is views  # mapped once
        cons.read_done(prod.address, "rd1")
        assert prod.result(timeout=30) == "done"


@pytest.mark.gpu
@pytest.mark.timeout(180)
def test_send_all_one_launch_bit_exact():
    """send_all on the same-host CUDA path: one launch copies every tensor (sizes that are and are not
    multiples of 16 bytes, a tensor smaller than one work unit, one of several units) and writes the
    flags after the last copy; the copy is ordered after the caller's current stream (data still being
    written there when send_all is called); more requests in flight than the copier's table ring."""
    shapes = [(3, 5), (4096, 128), (7,), (2, 64, 8, 128), (1,), (33, 1025)]
    dts = [torch.bfloat16, torch.float32, torch.uint8, torch.bfloat16, torch.float64, torch.float16]
    names = [f"t{i}" for i in range(len(shapes))]
    lay = RequestLayout([(n, dt, sh) for n, dt, sh in zip(names, dts, shapes, strict=True)])
    with Engine(**BASE) as prod, Engine(**BASE) as cons:
        _warm(prod, cons)
        side = torch.cuda.Stream(prod.device)
        sent, reqs = [], []
        for r in range(40):  # more than the 32 table slots, none waited for before the next
            with torch.cuda.stream(side):
                data = [torch.full(sh, float(r % 7 + i), dtype=dt, device=prod.device)
                        for i, (sh, dt) in enumerate(zip(shapes, dts, strict=True))]
                big = data[1]
                for _ in range(20):  # still writing on the caller's stream when send_all is called
                    big.mul_(1.0)
                req = prod.send_request(cons.address, f"sa{r}", lay)
                req.send_all(data)
            sent.append(data)
            reqs.append(req)
        for r, data in enumerate(sent):
            h = cons.recv_request(f"sa{r}").wait(30)
            torch.cuda.current_stream(cons.device).synchronize()
            for n, t in zip(names, data, strict=True):
                assert same_bits(h.tensor(n), t), (r, n)
            h.release()
        for req in reqs:
            req.wait(30)
        from p2pkv.kernels.batch import copier_for

        assert copier_for(prod.device)._launcher, "the one-launch driver path was not used"
        # refused at the boundary, nothing sent: a tensor on the wrong device, then a second send_all
        req = prod.send_request(cons.address, "sa-bad", lay)
        cpu = [torch.zeros(sh, dtype=dt) for sh, dt in zip(shapes, dts, strict=True)]
        with pytest.raises(InvalidTensor, match="cpu"):
            req.send_all(cpu)
        good = [c.to(prod.device) for c in cpu]
        req.send_all(good)
        with pytest.raises(InvalidKey, match="sent already"):
            req.send_all(good)
        req.wait(30)
        cons.recv_request("sa-bad").wait(30).release()
        _settle(lambda: _held(cons.stats()) == 0)
