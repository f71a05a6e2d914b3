import multiprocessing as mp
import multiprocessing.context
import time

import pytest
import torch

from p2pkv import Engine

# Tests start short-deadline engines; keep every wait bounded.
FAST = dict(timeout_s=5.0, peer_timeout_s=1.5, heartbeat_s=0.2, ttl_s=30.0, pool_bytes=64 * 2**20)


def process_context() -> multiprocessing.context.BaseContext:
    """Where tests start their peer processes: a forkserver with torch and p2pkv already imported.

    Each child is forked from that server (a process holding no thread, socket or CUDA context:
    importing p2pkv touches none), so it starts as clean as a spawned one, without paying the
    seconds a fresh interpreter spends importing torch on a loaded 2-core machine. Children see
    the environment the server started with, not later changes to os.environ.
    """
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "p2pkv"])
    return ctx


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs one CUDA GPU")
    config.addinivalue_line("markers", "multi_gpu: needs two or more CUDA GPUs")
    config.addinivalue_line("markers", "soak: long soak and stress runs; deselected by default (pytest.ini), "
                            "run with `python -m pytest -m soak` (CI's soak stage)")
    config.addinivalue_line("markers", "vllm: needs the real vllm package")
    config.addinivalue_line("markers", "sglang: needs the real sglang package")
    config.addinivalue_line("markers", "hostile2: attacks of issue 20 (run alone: -m hostile2)")


def pytest_collection_modifyitems(config, items):
    ngpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_multi = pytest.mark.skip(reason="needs two or more CUDA GPUs")
    for item in items:
        if "gpu" in item.keywords and ngpu < 1:
            item.add_marker(skip_gpu)
        if "multi_gpu" in item.keywords and ngpu < 2:
            item.add_marker(skip_multi)


@pytest.fixture
def fast_cfg():
    return dict(FAST)


@pytest.fixture
def pair():
    """Two engines in this process (threads), closed after the test."""
    a = Engine(**FAST)
    b = Engine(**FAST)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def outcome(fn, *args, **kw):
    """``fn(*args, **kw)``, or the p2pkv error it raised."""
    from p2pkv import P2pkvError

    try:
        return fn(*args, **kw)
    except P2pkvError as exc:
        return exc


def layout_known(cons: Engine, tid: str) -> None:
    """Wait (20 s at most) until ``cons`` knows the layout of request ``tid``."""
    end = time.monotonic() + 20
    while not cons._fast._index.get(tid):
        assert time.monotonic() < end, "the request's layout never arrived"
        time.sleep(0.01)


@pytest.fixture
def shm_pair():
    """A producer and a consumer on the same-host fast path (CPU engines, ``transport="shm"``), warmed up."""
    from .test_fast import CFG, warm_up

    prod, cons = Engine(**CFG), Engine(**CFG)
    try:
        warm_up(prod, cons)  # later requests take the same-host fast path
        yield prod, cons
    finally:
        prod.close()
        cons.close()


@pytest.fixture(params=["tcp", "shm"])
def tcp_shm_pair(request):
    """A producer and a consumer over TCP, then (the second parameter) over the same-host fast path."""
    from .test_fast import CFG, warm_up

    cfg = dict(CFG) if request.param == "shm" else {k: v for k, v in CFG.items() if k != "transport"}
    prod, cons = Engine(**cfg), Engine(**cfg)
    try:
        if request.param == "shm":
            warm_up(prod, cons)  # later requests take the same-host fast path
        yield prod, cons
    finally:
        prod.close()
        cons.close()


@pytest.fixture
def tiny_share(monkeypatch):
    """Every offer goes over its session's share of the I/O thread (checks when the share refuses)."""
    from p2pkv._engine import state

    monkeypatch.setattr(state, "_IO_SHARE", 1e-9)
    monkeypatch.setattr(state, "_IO_BURST_S", 1e-9)
