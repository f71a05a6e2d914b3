import multiprocessing as mp
import multiprocessing.context

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
