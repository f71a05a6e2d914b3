"""Two engines in two real processes over loopback TCP."""

import time

import pytest
import torch

from p2pkv import Engine, PeerLost, TransferKey, TransferState
from p2pkv.synthetic import PRESETS
from p2pkv.testing import RemoteEngine, RemoteError

from .conftest import FAST

LLAMA = PRESETS["llama3-8b"]
SHAPE = list(LLAMA.layer_shape(16))  # one 16-token block per layer: [2, 1, 16, 8, 128] bf16 = 64 KiB
LAYERS = LLAMA.layers
CFG = dict(FAST, timeout_s=30.0, peer_timeout_s=2.0, heartbeat_s=0.25, pool_bytes=512 * 2**20)


@pytest.fixture
def procs():
    made = []

    def make(**over):
        r = RemoteEngine(**dict(CFG, **over))
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


@pytest.mark.timeout(240)
def test_push_200_requests_x_32_layers_recv_before_and_after(procs):
    prod, cons = procs(), procs()
    tids = [f"xfer-{i:04d}" for i in range(200)]
    early, late = tids[:100], tids[100:]
    # 1) the consumer waits first, the producer sends afterwards
    cons.start("recv_many", early, LAYERS, SHAPE, timeout=60)
    time.sleep(0.3)
    assert prod.call("send_many", cons.address, early, LAYERS, SHAPE, timeout=60) == 100 * LAYERS
    assert cons.result(timeout=120) == 0
    # 2) the data is all there (acked) before the consumer asks
    seeds = list(range(100, 200))
    prod.call("send_many", cons.address, late, LAYERS, SHAPE, timeout=60, seed_of=seeds)
    st = cons.call("stats")
    assert st["inbox"]["held"] == 100 * LAYERS
    assert cons.call("recv_many", late, LAYERS, SHAPE, timeout=10, seed_of=seeds, use_out=True) == 0
    st = cons.call("stats")
    assert st["pool"]["in_use"] == 0 and st["inbox"]["held"] == 0
    assert st["tensors_received"] == 200 * LAYERS
    assert st["pool"]["overflow_allocs"] == 0


@pytest.mark.timeout(240)
def test_pull_200_requests_x_32_layers(procs):
    prod, cons = procs(), procs()
    tids = [f"pull-{i:04d}" for i in range(200)]
    # half published before the pulls, half after (pulls wait at the publisher)
    prod.call("publish_many", tids[:100], LAYERS, SHAPE, timeout=60)
    assert cons.call("pull_many", prod.address, tids[:100], LAYERS, SHAPE, timeout=30) == 0
    cons.start("pull_many", prod.address, tids[100:], LAYERS, SHAPE, timeout=30)
    time.sleep(0.3)
    # publish with the same seeds (index within the list) the consumer expects
    prod.call("publish_many", tids[100:], LAYERS, SHAPE, timeout=60)
    assert cons.result(timeout=180) == 0
    st = _settled(prod)
    assert st["pool"]["in_use"] == 0 and st["pulls_served"] == 200 * LAYERS


@pytest.mark.timeout(120)
def test_killed_producer_fails_pending_recv_within_timeout(procs):
    prod = procs()
    with Engine(**CFG) as cons:
        tid = "victim"
        prod.call("connect", cons.address)
        # stream only 5 of the 32 layers, then the producer dies
        prod.call("send_many", cons.address, [tid], 5, SHAPE, timeout=10)
        for layer in range(5):
            cons.recv(TransferKey(tid, f"model.layers.{layer}.self_attn"), timeout=5)
        prod.call("send_many", cons.address, [tid + "-held"], 3, SHAPE, timeout=10)
        t0 = time.monotonic()
        prod.kill()
        with pytest.raises(PeerLost):
            cons.recv(TransferKey(tid, "model.layers.5.self_attn"), timeout=CFG["timeout_s"])
        elapsed = time.monotonic() - t0
        assert elapsed <= CFG["peer_timeout_s"] + 1.0, elapsed
        # data that fully arrived stays claimable; a missing key fails at once
        t1 = time.monotonic()
        with pytest.raises(PeerLost):
            cons.recv(TransferKey(tid + "-held", "model.layers.7.self_attn"), timeout=10)
        assert time.monotonic() - t1 < 0.5
        cons.recv(TransferKey(tid + "-held", "model.layers.0.self_attn"), timeout=1)
        # the caller gives up on the transfer: its memory is freed at once
        assert cons.stats()["pool"]["in_use"] > 0
        cons.abort(tid + "-held")
        assert cons.stats()["pool"]["in_use"] == 0
        assert cons.stats()["sessions_lost"] == 1


@pytest.mark.timeout(120)
def test_killed_consumer_fails_pending_sends_and_frees_them(procs):
    cons = procs(pool_bytes=2 * 2**20)  # small: most sends wait for credit
    with Engine(**CFG) as prod:
        prod.connect(cons.address)
        big = torch.zeros(SHAPE, dtype=torch.bfloat16)
        handles = [prod.send(cons.address, TransferKey("k", str(i)), big) for i in range(64)]
        time.sleep(0.5)
        assert any(h.state is TransferState.PENDING for h in handles)
        t0 = time.monotonic()
        cons.kill()
        for h in handles:
            try:
                h.wait(CFG["timeout_s"])
            except PeerLost:
                pass
        assert time.monotonic() - t0 <= CFG["peer_timeout_s"] + 1.0
        failed = [h for h in handles if h.state is TransferState.FAILED]
        assert failed and all(isinstance(h.error, PeerLost) for h in failed)
        assert all(h._tensor is None for h in handles)  # payload references dropped
        st = prod.stats()
        assert st["peers"] == 0 and st["peers_lost"] == 1


@pytest.mark.timeout(120)
def test_peer_restart_on_same_address(procs):
    with Engine(**CFG) as prod:
        cons = procs()
        port = int(cons.address.rsplit(":", 1)[1])
        prod.send(cons.address, TransferKey("r", "0"), torch.ones(4)).wait(10)
        cons.kill()
        cons2 = procs(port=port)
        deadline = time.monotonic() + 20
        while True:  # the first attempts may still see the dead peer; the engine recovers by itself
            h = prod.send(cons2.address, TransferKey("r", "1"), torch.ones(4), timeout=5)
            try:
                h.wait(10)
                break
            except PeerLost:
                assert time.monotonic() < deadline
        assert cons2.call("recv_many", [], 0, [4]) == 0
        st = cons2.call("stats")
        assert st["inbox"]["held"] == 1


def test_remote_errors_are_reported(procs):
    r = procs()
    r.start("recv_many", ["nope"], 1, [4], timeout=0.2)
    with pytest.raises(RemoteError, match="TransferTimeout"):
        r.result(timeout=30)


def _settled(r, seconds=3.0):
    """Stats once buffers that ZMQ was still sending from are back (released asynchronously)."""
    deadline = time.monotonic() + seconds
    while True:
        st = r.call("stats")
        if st["pool"]["in_use"] == 0 or time.monotonic() > deadline:
            return st
        time.sleep(0.05)
