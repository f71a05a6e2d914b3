"""Two engines in two real processes over loopback TCP.

Deadlines here are generous (a loaded 2-core CI machine, with another copy of the suite beside it):
a remote call's deadline (``call(..., timeout=)``, ``result(timeout=)``) covers moving and verifying
thousands of tensors, and data waits unclaimed far longer than a slow run needs (``ttl_s``). Where a
test shows that something fails *fast* (a killed peer), the bound it asserts is well below the
deadline the wait would otherwise run into, so the two cannot be confused, yet far above what a
quiet machine needs.
"""

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
CFG = dict(FAST, timeout_s=60.0, peer_timeout_s=5.0, heartbeat_s=0.25, ttl_s=900.0, pool_bytes=512 * 2**20)
CALL_S = 600.0  # deadline of one remote call that moves or checks thousands of tensors
FAST_FAIL_S = 15.0  # "fails fast": well under CFG's timeout_s (60), far above a quiet machine's < 1 s


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


@pytest.mark.timeout(600)
def test_push_24_requests_x_32_layers_recv_before_and_after(procs):
    _push_recv_before_and_after(procs, 24)


@pytest.mark.soak
@pytest.mark.timeout(1200)
def test_push_200_requests_x_32_layers_recv_before_and_after(procs):
    _push_recv_before_and_after(procs, 200)


def _push_recv_before_and_after(procs, n: int) -> None:
    prod, cons = procs(), procs()
    tids = [f"xfer-{i:04d}" for i in range(n)]
    half = n // 2
    early, late = tids[:half], tids[half:]
    # 1) the consumer waits first, the producer sends afterwards (the pause only makes that order
    #    likely; either order must pass)
    cons.start("recv_many", early, LAYERS, SHAPE, timeout=CFG["timeout_s"])
    time.sleep(0.5)
    assert prod.call("send_many", cons.address, early, LAYERS, SHAPE, timeout=CALL_S) == half * LAYERS
    assert cons.result(timeout=CALL_S) == 0
    # 2) the data is all there (acked) before the consumer asks
    seeds = list(range(half, n))
    prod.call("send_many", cons.address, late, LAYERS, SHAPE, timeout=CALL_S, seed_of=seeds)
    st = cons.call("stats")
    assert st["inbox"]["held"] == (n - half) * LAYERS
    assert cons.call("recv_many", late, LAYERS, SHAPE, timeout=CALL_S, seed_of=seeds, use_out=True) == 0
    st = cons.call("stats")
    assert st["pool"]["in_use"] == 0 and st["inbox"]["held"] == 0
    assert st["tensors_received"] == n * LAYERS
    assert st["pool"]["overflow_allocs"] == 0


@pytest.mark.timeout(600)
def test_pull_24_requests_x_32_layers(procs):
    _pull_before_and_after_publish(procs, 24)


@pytest.mark.soak
@pytest.mark.timeout(1200)
def test_pull_200_requests_x_32_layers(procs):
    _pull_before_and_after_publish(procs, 200)


def _pull_before_and_after_publish(procs, n: int) -> None:
    prod, cons = procs(), procs()
    tids = [f"pull-{i:04d}" for i in range(n)]
    half = n // 2
    # half published before the pulls, half after (pulls wait at the publisher)
    prod.call("publish_many", tids[:half], LAYERS, SHAPE, timeout=CALL_S)
    assert cons.call("pull_many", prod.address, tids[:half], LAYERS, SHAPE, timeout=CALL_S) == 0
    cons.start("pull_many", prod.address, tids[half:], LAYERS, SHAPE, timeout=CFG["timeout_s"])
    time.sleep(0.5)  # makes "pull before publish" likely; either order must pass
    # publish with the same seeds (index within the list) the consumer expects
    prod.call("publish_many", tids[half:], LAYERS, SHAPE, timeout=CALL_S)
    assert cons.result(timeout=CALL_S) == 0
    st = _settled(prod)
    assert st["pool"]["in_use"] == 0 and st["pulls_served"] == n * LAYERS


@pytest.mark.timeout(300)
def test_killed_producer_fails_pending_recv_within_timeout(procs):
    prod = procs()
    with Engine(**CFG) as cons:
        tid = "victim"
        prod.call("connect", cons.address)
        # stream only 5 of the 32 layers, then the producer dies
        prod.call("send_many", cons.address, [tid], 5, SHAPE, timeout=CALL_S)
        for layer in range(5):
            cons.recv(TransferKey(tid, f"model.layers.{layer}.self_attn"), timeout=CFG["timeout_s"])
        prod.call("send_many", cons.address, [tid + "-held"], 3, SHAPE, timeout=CALL_S)
        t0 = time.monotonic()
        prod.kill()
        with pytest.raises(PeerLost):
            cons.recv(TransferKey(tid, "model.layers.5.self_attn"), timeout=CFG["timeout_s"])
        elapsed = time.monotonic() - t0
        assert elapsed <= FAST_FAIL_S, elapsed  # the closed connection, not the recv's 60 s deadline
        # data that fully arrived stays claimable; a missing key fails at once
        t1 = time.monotonic()
        with pytest.raises(PeerLost):
            cons.recv(TransferKey(tid + "-held", "model.layers.7.self_attn"), timeout=CFG["timeout_s"])
        assert time.monotonic() - t1 < FAST_FAIL_S
        cons.recv(TransferKey(tid + "-held", "model.layers.0.self_attn"), timeout=CFG["timeout_s"])
        # the caller gives up on the transfer: its memory is freed at once
        assert cons.stats()["pool"]["in_use"] > 0
        cons.abort(tid + "-held")
        assert cons.stats()["pool"]["in_use"] == 0
        assert cons.stats()["sessions_lost"] == 1


@pytest.mark.timeout(300)
def test_killed_consumer_fails_pending_sends_and_frees_them(procs):
    cons = procs(pool_bytes=2 * 2**20)  # small: most sends wait for credit
    with Engine(**CFG) as prod:
        prod.connect(cons.address)
        big = torch.zeros(SHAPE, dtype=torch.bfloat16)
        handles = [prod.send(cons.address, TransferKey("k", str(i)), big) for i in range(64)]
        # 4 MiB into a 2 MiB pool that is never claimed: most sends wait for credit until the deadline
        time.sleep(0.5)
        assert any(h.state is TransferState.PENDING for h in handles)
        t0 = time.monotonic()
        cons.kill()
        for h in handles:
            try:
                h.wait(CFG["timeout_s"])
            except PeerLost:
                pass
        assert time.monotonic() - t0 <= FAST_FAIL_S  # the closed connection, not the sends' 60 s deadline
        failed = [h for h in handles if h.state is TransferState.FAILED]
        assert failed and all(isinstance(h.error, PeerLost) for h in failed)
        assert all(h._tensor is None for h in handles)  # payload references dropped
        st = prod.stats()
        assert st["peers"] == 0 and st["peers_lost"] == 1


@pytest.mark.timeout(300)
def test_peer_restart_on_same_address(procs):
    with Engine(**CFG) as prod:
        cons = procs()
        port = int(cons.address.rsplit(":", 1)[1])
        prod.send(cons.address, TransferKey("r", "0"), torch.ones(4)).wait(CFG["timeout_s"])
        cons.kill()
        cons2 = procs(port=port)
        deadline = time.monotonic() + 120
        while True:  # the first attempts may still see the dead peer; the engine recovers by itself
            h = prod.send(cons2.address, TransferKey("r", "1"), torch.ones(4), timeout=10)
            try:
                h.wait(20)
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


def _settled(r, seconds=60.0):
    """Stats once buffers that ZMQ was still sending from are back (released asynchronously)."""
    deadline = time.monotonic() + seconds
    while True:
        st = r.call("stats")
        if st["pool"]["in_use"] == 0 or time.monotonic() > deadline:
            return st
        time.sleep(0.05)
