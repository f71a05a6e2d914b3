import itertools
import random
import threading
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pkv import BufferPool, InvalidTensor, PoolExhausted
from p2pkv.pool import ALIGN


def test_alloc_release_roundtrip_and_views():
    p = BufferPool(1 << 20)
    b = p.alloc(1000)
    assert b.offset % ALIGN == 0 and b.nbytes == 1000 and b.size == 1024
    v = b.view(torch.int32, (250,))
    v.copy_(torch.arange(250, dtype=torch.int32))
    assert b.data.numel() == 1000
    assert p.stats()["in_use"] == 1024
    b.release()
    b.release()  # harmless
    s = p.stats()
    assert s["in_use"] == 0 and s["live_buffers"] == 0 and s["high_water"] == 1024
    with pytest.raises(Exception, match="after release"):
        _ = b.data


def test_context_manager_and_zero_size():
    p = BufferPool(4096)
    with p.alloc(0) as b:
        assert b.view(torch.float32, (0, 3)).shape == (0, 3)
    assert p.stats()["in_use"] == 0


def test_exhaustion_is_typed_and_bounded():
    p = BufferPool(4096)
    a = p.alloc(4096)
    t0 = time.monotonic()
    with pytest.raises(PoolExhausted, match="within"):
        p.alloc(16, timeout=0.2)
    assert 0.15 < time.monotonic() - t0 < 10
    with pytest.raises(PoolExhausted, match="never fit"):
        p.alloc(8192, timeout=10)
    assert p.try_alloc(16) is None
    assert p.stats()["failed"] >= 3
    a.release()
    p.alloc(16).release()


def test_blocking_alloc_wakes_on_release():
    p = BufferPool(4096)
    a = p.alloc(4096)
    threading.Timer(0.1, a.release).start()
    b = p.alloc(2048, timeout=60)
    b.release()


def test_bad_sizes():
    p = BufferPool(4096)
    for bad in (-1, 1.5, "3", True):
        with pytest.raises(InvalidTensor):
            p.try_alloc(bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidTensor):
        BufferPool(0)


def test_overflow_when_fragmented():
    p = BufferPool(4 * 1024)
    bufs = [p.alloc(1024) for _ in range(4)]
    bufs[0].release()
    bufs[2].release()  # 2 KiB free, but in two pieces
    assert p.try_alloc(2048) is None
    o = p.try_alloc(2048, overflow=True)
    assert o is not None and o.overflow
    assert p.stats()["overflow_in_use"] == 2048
    o.release()
    for b in bufs:
        b.release()
    s = p.stats()
    assert s["overflow_in_use"] == 0 and s["in_use"] == 0 and s["largest_free"] == 4096


def test_coalescing_restores_one_extent():
    p = BufferPool(1 << 16)
    bufs = [p.alloc(random.randint(1, 3000)) for _ in range(16)]
    random.shuffle(bufs)
    for b in bufs:
        b.release()
    s = p.stats()
    assert s["largest_free"] == p.capacity and s["fragmentation"] == 0.0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 20_000)), max_size=200))
def test_random_ops_never_overlap(ops):
    p = BufferPool(64 * 1024)
    live = []
    for is_free, n in ops:
        if is_free and live:
            live.pop(n % len(live)).release()
        else:
            b = p.try_alloc(n)
            if b is not None:
                live.append(b)
        spans = sorted((b.offset, b.offset + b.size) for b in live)
        for (_, e0), (s1, _) in itertools.pairwise(spans):
            assert e0 <= s1
        assert p.stats()["in_use"] == sum(b.size for b in live)
        assert p.stats()["free"] + p.stats()["in_use"] == p.capacity
    for b in live:
        b.release()
    assert p.stats()["largest_free"] == p.capacity


def test_threads_hammer():
    p = BufferPool(1 << 20)
    errors = []

    def worker(seed):
        rng = random.Random(seed)
        try:
            for _ in range(2000):
                b = p.alloc(rng.randint(1, 8192), timeout=5)
                b.data[:1] = 1
                b.release()
        except Exception as e:  # pragma: no cover
            errors.append(e)

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not errors
    assert p.stats()["in_use"] == 0 and p.stats()["live_buffers"] == 0


def test_steady_state_allocates_nothing_new():
    p = BufferPool(1 << 20)
    base = p.arena.data_ptr()
    ptrs = set()
    for _ in range(10_000):
        with p.alloc(4096) as b:
            ptrs.add(b.data.data_ptr())
    assert all(base <= x < base + p.capacity for x in ptrs)
    assert p.stats()["overflow_allocs"] == 0


def test_try_alloc_many_is_all_or_nothing_and_release_many_gives_all_back():
    p = BufferPool(64 * ALIGN)
    bufs = p.try_alloc_many([1, ALIGN, 3 * ALIGN, 0])
    assert bufs is not None and [b.size for b in bufs] == [ALIGN, ALIGN, 3 * ALIGN, ALIGN]
    assert len({b.offset for b in bufs}) == 4 and p.stats()["in_use"] == 6 * ALIGN
    bufs[1].data.fill_(7)  # each is a view of its own place in the arena
    assert bufs[0].data.sum() == 0 and bufs[1].data.sum() == 7 * ALIGN
    # more than is free: nothing taken without overflow...
    assert p.try_alloc_many([ALIGN] * 60) is None
    assert p.stats()["in_use"] == 6 * ALIGN and p.stats()["live_buffers"] == 4
    # ...and the rest outside the arena with it, counted as overflow
    more = p.try_alloc_many([ALIGN] * 60, overflow=True)
    assert more is not None and sum(b.overflow for b in more) == 2
    assert p.stats()["overflow_in_use"] == 2 * ALIGN and p.room == 0
    bufs[2].release()  # released once already: release_many skips it
    p.release_many(bufs + more)
    st_ = p.stats()
    assert st_["in_use"] == 0 and st_["overflow_in_use"] == 0 and st_["live_buffers"] == 0
    assert st_["free"] == p.capacity and st_["largest_free"] == p.capacity
    assert all(b.released for b in bufs + more)
