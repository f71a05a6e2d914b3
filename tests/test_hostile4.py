"""Hostile peers against what landed on 2026-12-03: the work-conserving I/O share, the give-back of a failed
``recv_request`` handle. Each test failed before its fix."""

import threading
import time

import pytest
import torch
import zmq

from p2pkv import Engine, TransferKey
from p2pkv._engine import state
from p2pkv.control.messages import encode

from .conftest import FAST

pytestmark = pytest.mark.timeout(120)

LAYERS = [(f"layer{i}", torch.full((64,), float(i))) for i in range(32)]


@pytest.fixture
def tiny_share(monkeypatch):
    monkeypatch.setattr(state, "_IO_SHARE", 1e-9)
    monkeypatch.setattr(state, "_IO_BURST_S", 1e-9)


def test_a_sessionless_stranger_does_not_make_a_lone_producers_share_bind(tiny_share):
    """Contention is another *session* sending work. A stranger that never said hello (no session) and sends decodable headers every 0.2 s made an honest producer alone with the consumer be
    refused with PoolExhausted on every offer over its share: the work-conserving rule undone from outside."""
    with Engine(**FAST) as cons, Engine(**FAST) as prod:
        stop = threading.Event()
        ctx = zmq.Context.instance()

        def stranger() -> None:
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(f"tcp://{cons.address}")
            try:
                while not stop.is_set():
                    s.send(encode("fq"))  # decodes; no session: answered no_session
                    s.send(encode("abort", tid="x"))
                    stop.wait(0.2)
            finally:
                s.close()

        th = threading.Thread(target=stranger, daemon=True)
        th.start()
        try:
            time.sleep(0.5)
            for i in range(5):
                req = prod.send_request(cons.address, f"lone-{i}", LAYERS)
                req.send_all([t for _, t in LAYERS])
                req.wait(30)  # raised PoolExhausted ("share") from the second request on
                with cons.recv_request(f"lone-{i}", timeout=30) as h:
                    assert torch.equal(h.wait().tensor("layer7"), LAYERS[7][1])
        finally:
            stop.set()
            th.join(30)
        assert cons.stats().get("offers_over_budget", 0) == 0
