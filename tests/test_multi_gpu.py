"""Two engine processes, one per GPU, over NCCL. Marked `multi_gpu`; skipped below two GPUs."""

import os
import time

import pytest

from p2pkv import Engine, PeerLost, TransferKey
from p2pkv.synthetic import PRESETS
from p2pkv.testing import RemoteEngine

pytestmark = [pytest.mark.gpu, pytest.mark.multi_gpu]

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
LLAMA = PRESETS["llama3-8b"]
SHAPE = list(LLAMA.layer_shape(64))
CFG = dict(timeout_s=60.0, peer_timeout_s=3.0, heartbeat_s=0.25, pool_bytes=512 * 2**20, transport="nccl")


@pytest.fixture
def pair():
    pytest.importorskip("nccl.core")
    prod = RemoteEngine(**dict(CFG, device="cuda:0"))
    cons = RemoteEngine(**dict(CFG, device="cuda:1"))
    yield prod, cons
    prod.close()
    cons.close()


@pytest.mark.timeout(600)
def test_nccl_push_and_pull_100x32(pair):
    prod, cons = pair
    tids = [f"n-{i:03d}" for i in range(100)]
    cons.start("recv_many", tids, LLAMA.layers, SHAPE, timeout=120)
    prod.call("send_many", cons.address, tids, LLAMA.layers, SHAPE, timeout=120)
    assert cons.result(timeout=300) == 0
    assert prod.call("stats")["sent_nccl"] == 100 * LLAMA.layers
    ptids = [f"np-{i:03d}" for i in range(100)]
    prod.call("publish_many", ptids[:40], LLAMA.layers, SHAPE, timeout=120)
    cons.start("pull_many", prod.address, ptids, LLAMA.layers, SHAPE, timeout=120)
    prod.call("publish_many_from", ptids[40:], 40, LLAMA.layers, SHAPE, timeout=120)
    assert cons.result(timeout=300) == 0


@pytest.mark.timeout(300)
def test_nccl_killed_peer_fails_within_timeout():
    pytest.importorskip("nccl.core")
    prod = RemoteEngine(**dict(CFG, device="cuda:0"))
    try:
        with Engine(**dict(CFG, device="cuda:1")) as cons:
            prod.call("send_many", cons.address, ["k"], 3, SHAPE, timeout=120)
            prod.kill()
            t0 = time.monotonic()
            with pytest.raises(PeerLost):
                cons.recv(TransferKey("k", "model.layers.3.self_attn"), timeout=60)
            assert time.monotonic() - t0 < CFG["peer_timeout_s"] + 2
            cons.abort("k")
            assert cons.stats()["pool"]["in_use"] == 0
    finally:
        prod.close()
