"""An engine that is never closed is still collected: its thread and sockets end, with a warning."""

import gc
import threading
import time
import warnings
import weakref

import pytest
import torch

from p2pkv import Engine, TransferKey

from .conftest import FAST


@pytest.mark.timeout(60)
def test_unclosed_engine_is_collected_and_warns():
    with Engine(**FAST) as peer:
        base = threading.active_count()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            e = Engine(**FAST)
            e.send(peer.address, TransferKey("lc", "0"), torch.ones(4)).wait(5)
            ref = weakref.ref(e)
            del e
            end = time.monotonic() + 60
            while ref() is not None or threading.active_count() > base:
                assert time.monotonic() < end, "the unclosed engine was not collected"
                gc.collect()
                time.sleep(0.05)
        assert any(issubclass(w.category, ResourceWarning) and "not closed" in str(w.message) for w in seen)
        assert torch.equal(peer.recv(TransferKey("lc", "0"), timeout=5), torch.ones(4))
