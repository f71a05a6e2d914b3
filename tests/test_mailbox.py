import threading
import time

import pytest
import torch

from p2pkv import (BufferPool, PeerLost, ShapeMismatch, TransferAborted, TransferEvicted, TransferKey,
                   TransferTimeout)
from p2pkv.errors import DuplicateKey
from p2pkv.mailbox import Mailbox


def put(mb, pool, key, value=1.0, src=None):
    buf = pool.alloc(16)
    buf.view(torch.float32, (4,)).fill_(value)
    assert mb.deliver(key, buf, torch.float32, (4,), src) is None
    return buf


def test_claim_after_and_before_delivery():
    pool, mb = BufferPool(4096), Mailbox(10)
    k = TransferKey("t", "a")
    put(mb, pool, k, 2.0)
    s = mb.claim(k, 1)
    assert s.tensor().tolist() == [2.0] * 4
    s.buf.release()
    k2 = TransferKey("t", "b")
    threading.Timer(0.1, put, args=(mb, pool, k2, 3.0)).start()
    t0 = time.monotonic()
    s = mb.claim(k2, 60)
    assert time.monotonic() - t0 < 30  # woken by the delivery, not at the deadline
    assert s.tensor()[0].item() == 3.0
    s.buf.release()


def test_timeout_and_duplicate():
    pool, mb = BufferPool(4096), Mailbox(10)
    with pytest.raises(TransferTimeout):
        mb.claim(TransferKey("t", "never"), 0.1)
    k = TransferKey("t", "a")
    put(mb, pool, k)
    buf = pool.alloc(16)
    assert isinstance(mb.deliver(k, buf, torch.float32, (4,)), DuplicateKey)
    buf.release()


def test_check_failure_keeps_data():
    pool, mb = BufferPool(4096), Mailbox(10)
    k = TransferKey("t", "a")
    put(mb, pool, k)

    def check(slot):
        raise ShapeMismatch("no")

    with pytest.raises(ShapeMismatch):
        mb.claim(k, 1, check)
    assert mb.claim(k, 1).key == k


def test_abort_frees_and_blocks_late_data_and_wakes_waiters():
    pool, mb = BufferPool(4096), Mailbox(10)
    put(mb, pool, TransferKey("t", "a"))
    put(mb, pool, TransferKey("u", "a"))
    got = {}

    def waiter():
        try:
            mb.claim(TransferKey("t", "z"), 60)
        except TransferAborted as e:
            got["e"] = e

    th = threading.Thread(target=waiter)
    th.start()
    time.sleep(0.1)
    bufs = mb.abort("t")
    th.join(30)
    assert "e" in got
    assert len(bufs) == 1
    for b in bufs:
        b.release()
    assert pool.stats()["in_use"] == 256
    buf = pool.alloc(16)
    assert isinstance(mb.deliver(TransferKey("t", "b"), buf, torch.float32, (4,)), TransferAborted)
    with pytest.raises(TransferAborted):
        mb.claim(TransferKey("t", "a"), 1)


def test_ttl_eviction_reports_evicted():
    pool, mb = BufferPool(4096), Mailbox(0.05)
    k = TransferKey("t", "a")
    put(mb, pool, k)
    time.sleep(0.1)
    for b in mb.expire():
        b.release()
    assert pool.stats()["in_use"] == 0
    with pytest.raises(TransferEvicted, match="not claimed"):
        mb.claim(k, 1)


def test_source_lost_fails_missing_keeps_arrived():
    pool, mb = BufferPool(4096), Mailbox(10)
    put(mb, pool, TransferKey("t", "l0"), src="peer1")
    put(mb, pool, TransferKey("other", "l0"), src="peer2")
    got = {}

    def waiter():
        try:
            mb.claim(TransferKey("t", "l1"), 60)
        except PeerLost as e:
            got["e"] = e

    th = threading.Thread(target=waiter)
    th.start()
    time.sleep(0.1)
    t0 = time.monotonic()
    assert mb.source_lost("peer1", lambda: PeerLost("gone")) == ["t"]
    th.join(30)
    assert "e" in got and time.monotonic() - t0 < 20  # woken at once, not at the 60 s deadline
    assert mb.claim(TransferKey("t", "l0"), 1).key.name == "l0"  # arrived data is kept
    with pytest.raises(TransferTimeout):
        mb.claim(TransferKey("other", "l1"), 0.1)  # other source unaffected
