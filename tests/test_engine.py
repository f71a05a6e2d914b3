"""Engine behaviour with two engines in this process (real sockets, real threads)."""

import contextlib
import threading
import time

import pytest
import torch

import p2pkv
from p2pkv import (ConfigError, DuplicateKey, Engine, EngineClosed, InvalidAddress, InvalidKey, InvalidTensor,
                   PoolExhausted, ShapeMismatch, TransferAborted, TransferEvicted, TransferKey, TransferState,
                   TransferTimeout)
from p2pkv.synthetic import kv_layer, same_bits

from .conftest import FAST

K = TransferKey


def test_push_recv_after_arrival(pair):
    a, b = pair
    t = torch.randn(2, 4, 16, 8, 128).to(torch.bfloat16)
    h = a.send(b.address, K("x", "l0"), t)
    h.wait(5)
    assert h.state is TransferState.DONE and h.done() and h.error is None
    assert "done" in repr(h)
    got = b.recv(K("x", "l0"))
    assert same_bits(got, t)


def test_recv_before_arrival(pair):
    a, b = pair
    t = kv_layer(1, 2, (3, 5), torch.float16)
    res = {}
    th = threading.Thread(target=lambda: res.setdefault("t", b.recv(K("x", "l"), timeout=5)))
    th.start()
    time.sleep(0.2)
    a.send(b.address, K("x", "l"), t).wait(5)
    th.join(5)
    assert same_bits(res["t"], t)


@pytest.mark.parametrize("dtype", p2pkv._tensors.supported_dtypes())
def test_every_dtype_bit_exact(pair, dtype):
    a, b = pair
    t = kv_layer(3, 4, (7, 33), dtype)
    a.send(b.address, K("d", str(dtype)), t).wait(5)
    assert same_bits(b.recv(K("d", str(dtype))), t)


def test_shapes_scalar_and_empty(pair):
    a, b = pair
    for i, t in enumerate([torch.tensor(3.5), torch.empty(0, 4), torch.arange(10).reshape(2, 5)]):
        a.send(b.address, K("s", str(i)), t).wait(5)
        got = b.recv(K("s", str(i)))
        assert got.shape == t.shape and got.dtype == t.dtype and torch.equal(got, t)


def test_recv_into_out_and_claim(pair):
    a, b = pair
    t = torch.arange(64, dtype=torch.int32).reshape(8, 8)
    a.send(b.address, K("o", "1"), t).wait(5)
    out = torch.empty(8, 8, dtype=torch.int32)
    assert b.recv(K("o", "1"), out=out) is out and torch.equal(out, t)
    a.send(b.address, K("o", "2"), t).wait(5)
    with b.claim(K("o", "2")) as view:
        assert torch.equal(view, t)
    assert b.stats()["pool"]["in_use"] == 0


def test_out_mismatch_keeps_data(pair):
    a, b = pair
    t = torch.ones(4, 4)
    a.send(b.address, K("m", "1"), t).wait(5)
    with pytest.raises(ShapeMismatch, match="shape"):
        b.recv(K("m", "1"), out=torch.empty(4, 5))
    with pytest.raises(ShapeMismatch, match="dtype"):
        b.recv(K("m", "1"), out=torch.empty(4, 4, dtype=torch.float16))
    with pytest.raises(InvalidTensor, match="contiguous"):
        b.recv(K("m", "1"), out=torch.empty(4, 8)[:, ::2])
    with pytest.raises(InvalidTensor, match=r"torch\.Tensor"):
        b.recv(K("m", "1"), out=[1, 2])  # type: ignore[arg-type]
    if torch.cuda.is_available():
        with pytest.raises(InvalidTensor, match="device"):
            b.recv(K("m", "1"), out=torch.empty(4, 4, device="cuda"))
    assert torch.equal(b.recv(K("m", "1"), out=torch.empty(4, 4)), t)  # still there


def test_bad_arguments_are_typed(pair):
    a, b = pair
    t = torch.ones(3)
    with pytest.raises(InvalidKey):
        a.send(b.address, ("x", "y"), t)  # type: ignore[arg-type]
    with pytest.raises(InvalidKey):
        a.send(b.address, "x/y", t)  # type: ignore[arg-type]
    with pytest.raises(InvalidTensor, match="contiguous"):
        a.send(b.address, K("x", "y"), torch.ones(4, 4).t())
    with pytest.raises(InvalidTensor, match=r"torch\.Tensor"):
        a.send(b.address, K("x", "y"), [1, 2, 3])  # type: ignore[arg-type]
    with pytest.raises(InvalidTensor, match="not supported"):
        a.send(b.address, K("x", "y"), torch.ones(2, dtype=torch.complex64))
    with pytest.raises(InvalidTensor, match="strided"):
        a.send(b.address, K("x", "y"), torch.eye(3).to_sparse())
    for bad in ("nohost", "host:", ":80", "a:b", "host:99999", 42, "tcp://x:1"):
        with pytest.raises(InvalidAddress):
            a.send(bad, K("x", "y"), t)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="timeout"):
        b.recv(K("x", "y"), timeout=-1)
    with pytest.raises(InvalidKey):
        a.abort("")
    with pytest.raises(InvalidKey):
        a.abort(5)  # type: ignore[arg-type]
    # the engines still work
    a.send(b.address, K("x", "ok"), t).wait(5)
    assert torch.equal(b.recv(K("x", "ok")), t)


def test_recv_timeout_is_bounded(pair):
    _, b = pair
    t0 = time.monotonic()
    with pytest.raises(TransferTimeout, match="no data arrived"):
        b.recv(K("never", "sent"), timeout=0.3)
    assert 0.25 < time.monotonic() - t0 < 10  # at its deadline: never early, and bounded


def test_duplicate_key_is_refused(pair):
    a, b = pair
    a.send(b.address, K("dup", "1"), torch.ones(2)).wait(5)
    h = a.send(b.address, K("dup", "1"), torch.zeros(2))
    with pytest.raises(DuplicateKey):
        h.wait(5)
    assert h.state is TransferState.FAILED
    assert torch.equal(b.recv(K("dup", "1")), torch.ones(2))


def test_pull_before_and_after_publish(pair):
    a, b = pair
    t = kv_layer(0, 0, (2, 2, 16, 8, 128))
    a.publish(K("p", "0"), t)
    assert same_bits(b.pull(a.address, K("p", "0")), t)
    res = {}
    th = threading.Thread(target=lambda: res.setdefault("t", b.pull(a.address, K("p", "1"), timeout=5)))
    th.start()
    time.sleep(0.2)
    a.publish(K("p", "1"), t)
    th.join(5)
    assert same_bits(res["t"], t)
    # published data is consumed by the pull
    with pytest.raises(TransferTimeout):
        b.pull(a.address, K("p", "1"), timeout=0.3)
    assert a.stats()["pool"]["in_use"] == 0


def test_pull_into_out_checked_by_publisher(pair):
    a, b = pair
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    a.publish(K("q", "0"), t)
    with pytest.raises(ShapeMismatch):
        b.pull(a.address, K("q", "0"), out=torch.empty(4, 3))
    out = torch.empty(3, 4)
    assert b.pull(a.address, K("q", "0"), out=out) is out and torch.equal(out, t)
    a.publish(K("q", "1"), t)
    with pytest.raises(DuplicateKey):
        a.publish(K("q", "1"), t)


def test_abort_reaches_both_sides(pair):
    a, b = pair
    a.send(b.address, K("ab", "0"), torch.ones(1024)).wait(5)
    a.publish(K("ab", "pub"), torch.ones(1024))
    assert b.stats()["pool"]["in_use"] > 0
    a.abort("ab")
    deadline = time.monotonic() + 30
    while b.stats()["inbox"]["held"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert b.stats()["pool"]["in_use"] == 0 and a.stats()["pool"]["in_use"] == 0
    with pytest.raises(TransferAborted):
        b.recv(K("ab", "0"), timeout=1)
    with pytest.raises(TransferAborted):
        a.send(b.address, K("ab", "1"), torch.ones(4)).wait(5)
    with pytest.raises(TransferAborted):
        b.pull(a.address, K("ab", "pub"), timeout=1)
    # other transfers are untouched
    a.send(b.address, K("other", "0"), torch.ones(4)).wait(5)
    b.recv(K("other", "0"))


def test_abort_wakes_pending_recv(pair):
    a, b = pair
    got = {}

    def waiter():
        try:
            b.recv(K("w", "0"), timeout=60)
        except TransferAborted as e:
            got["e"] = e

    th = threading.Thread(target=waiter)
    th.start()
    time.sleep(0.1)
    t0 = time.monotonic()
    a.abort("w")  # remote abort: b hears it through a's connection
    a.connect(b.address, timeout=30)
    a.abort("w")
    th.join(60)
    assert "e" in got and time.monotonic() - t0 < 20  # woken by the abort, not at the 60 s deadline


def test_ttl_evicts_unclaimed_data():
    cfg = dict(FAST, ttl_s=0.3)
    with Engine(**cfg) as a, Engine(**cfg) as b:
        a.send(b.address, K("ttl", "0"), torch.ones(1000)).wait(5)
        a.publish(K("ttl", "pub"), torch.ones(1000))
        deadline = time.monotonic() + 60
        while (b.stats()["evicted"] < 1 or a.stats()["evicted"] < 1) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert b.stats()["pool"]["in_use"] == 0 and a.stats()["pool"]["in_use"] == 0
        assert b.stats()["evicted"] >= 1 and a.stats()["evicted"] >= 1
        with pytest.raises(TransferEvicted):
            b.recv(K("ttl", "0"), timeout=1)


def test_back_pressure_never_drops():
    """A receiver with a small pool throttles the sender; every tensor arrives."""
    small = dict(FAST, pool_bytes=1 << 20)
    with Engine(**dict(FAST, timeout_s=60.0)) as a, Engine(**small) as b:
        t = [kv_layer(0, i, (64, 1024), torch.uint8) for i in range(40)]  # 40 x 64 KiB = 2.5x the pool
        hs = [a.send(b.address, K("bp", str(i)), x) for i, x in enumerate(t)]
        time.sleep(0.5)
        s = b.stats()
        assert s["pool"]["in_use"] <= b.pool.capacity and s["pool"]["overflow_allocs"] == 0
        assert any(h.state is TransferState.PENDING for h in hs)  # held back by credit, not dropped
        for i, x in enumerate(t):
            assert same_bits(b.recv(K("bp", str(i)), timeout=60), x)
        for h in hs:
            h.wait(60)
        assert b.stats()["pool"]["high_water"] <= b.pool.capacity


def test_full_receiver_times_out_sender_cleanly():
    small = dict(FAST, pool_bytes=1 << 20, timeout_s=2.0, peer_timeout_s=0.8)
    with Engine(**small) as a, Engine(**small) as b:
        a.connect(b.address, timeout=30)
        hs = [a.send(b.address, K("full", str(i)), torch.zeros(128 * 1024, dtype=torch.uint8)) for i in range(12)]
        errs = []
        for h in hs:
            try:
                h.wait(30)
            except TransferTimeout as e:
                errs.append(e)
        no_credit = [e for e in errs if "credit" in str(e)]
        assert no_credit  # 1.5 MiB never fits a never-claimed 1 MiB pool
        assert b.stats()["inbox"]["held"] == 12 - len(no_credit)  # the rest arrived (even if an ack was late)


def test_tensor_larger_than_peer_pool():
    with Engine(**FAST) as a, Engine(**dict(FAST, pool_bytes=1 << 16)) as b:
        h = a.send(b.address, K("big", "0"), torch.zeros(1 << 17, dtype=torch.uint8))
        with pytest.raises(PoolExhausted, match="never fit"):
            h.wait(5)


def test_max_message_bytes_enforced_at_sender():
    with Engine(**dict(FAST, max_message_bytes=1024)) as a, pytest.raises(InvalidTensor, match="max_message_bytes"):
        a.send(a.address, K("m", "0"), torch.zeros(2048, dtype=torch.uint8))


def test_unreachable_peer_times_out():
    with Engine(**dict(FAST, timeout_s=1.0, peer_timeout_s=0.5, heartbeat_s=0.1)) as a:
        h = a.send("127.0.0.1:1", K("u", "0"), torch.ones(2))
        with pytest.raises(TransferTimeout, match="unreachable"):
            h.wait(5)
        with pytest.raises(TransferTimeout):
            a.connect("127.0.0.1:1", timeout=0.3)


def test_send_to_self(pair):
    a, _ = pair
    a.send(a.address, K("self", "0"), torch.ones(3)).wait(5)
    assert torch.equal(a.recv(K("self", "0")), torch.ones(3))


def test_closed_engine_refuses_and_wakes_waiters():
    a = Engine(**FAST)
    got = {}

    def waiter():
        try:
            a.recv(K("c", "0"), timeout=60)
        except EngineClosed as e:
            got["e"] = e

    th = threading.Thread(target=waiter)
    th.start()
    time.sleep(0.1)
    t0 = time.monotonic()
    a.close()
    a.close()  # idempotent
    th.join(60)
    assert "e" in got and time.monotonic() - t0 < 20  # woken by close, not at the 60 s deadline
    with pytest.raises(EngineClosed):
        a.send("127.0.0.1:1", K("c", "0"), torch.ones(1))
    assert "closed" in repr(a)


def test_close_fails_pending_sends():
    a = Engine(**FAST)
    h = a.send("127.0.0.1:1", K("c", "0"), torch.ones(1))
    a.close()
    with pytest.raises(EngineClosed):
        h.wait(5)


def test_config_overrides_and_errors():
    with Engine(p2pkv.EngineConfig(timeout_s=3), pool_bytes=1 << 20) as e:
        assert e.config.pool_bytes == 1 << 20 and e.config.timeout_s == 3
    with pytest.raises(ConfigError):
        Engine(device="cuda:99")
    with pytest.raises(ConfigError):
        Engine(config={"timeout_s": 1})  # type: ignore[arg-type]


def test_port_in_use_is_reported():
    with Engine(**FAST) as a, pytest.raises(p2pkv.P2pkvError, match="cannot listen"):
        Engine(**dict(FAST, port=a.port))


def test_auth_token():
    sec = dict(FAST, auth_token="s3cret")
    with Engine(**sec) as a, Engine(**sec) as b, Engine(**FAST) as intruder, \
            Engine(**dict(FAST, auth_token="wrong")) as liar:
        a.send(b.address, K("auth", "0"), torch.ones(2)).wait(5)
        for bad in (intruder, liar):
            with pytest.raises(p2pkv.AuthError):
                bad.send(b.address, K("auth", "1"), torch.ones(2)).wait(5)
            with pytest.raises(p2pkv.AuthError):
                bad.pull(a.address, K("auth", "x"), timeout=2)
        assert b.stats()["auth_failures"] >= 2
        with pytest.raises(TransferTimeout):
            b.recv(K("auth", "1"), timeout=0.2)
        assert torch.equal(b.recv(K("auth", "0")), torch.ones(2))


def test_stats_shape(pair):
    a, b = pair
    a.send(b.address, K("st", "0"), torch.ones(256)).wait(5)
    b.recv(K("st", "0"))
    s = a.stats()
    assert s["sends_done"] == 1 and s["bytes_sent"] == 1024
    assert s["latency"]["send"]["count"] == 1 and s["latency"]["send"]["p50_us"] > 0
    sb = b.stats()
    assert sb["recvs"] == 1 and sb["bytes_received"] == 1024
    assert set(sb["pool"]) >= {"capacity", "in_use", "high_water", "failed", "fragmentation"}


def test_stats_report_every_counter_from_the_start(pair):
    """A fresh engine's stats() already holds every counter (at 0) and every latency reservoir, and
    traffic of every kind adds no key the fresh engine did not have (README: stats())."""
    a, b = pair
    fresh = b.stats()
    assert fresh["recvs"] == 0 and fresh["bytes_received"] == 0 and fresh["pulls"] == 0
    assert fresh["latency"]["send"]["count"] == 0 and fresh["latency"]["send"]["p50_us"] is None
    # push, recv, publish, pull, a whole request, a refused duplicate, an abort, a timed-out recv
    a.send(b.address, K("sk", "0"), torch.ones(8)).wait(5)
    b.recv(K("sk", "0"), timeout=5)
    a.publish(K("sk", "pub"), torch.ones(8))
    b.pull(a.address, K("sk", "pub"), timeout=5)
    req = a.send_request(b.address, "sk-req", [("l0", torch.ones(4)), ("l1", torch.ones(4))])
    req.send("l0", torch.ones(4))
    req.send("l1", torch.ones(4))
    req.wait(5)
    b.recv(K("sk-req", "l0"), timeout=5)
    a.send(b.address, K("sk-req", "l1"), torch.ones(4))  # a duplicate of a key still held: refused
    a.abort("sk-req")
    with pytest.raises(TransferTimeout):
        b.recv(K("sk", "never"), timeout=0.05)
    for eng in (a, b):
        now = eng.stats()
        assert set(now) <= set(fresh), set(now) - set(fresh)
        assert set(now["latency"]) <= set(fresh["latency"]), set(now["latency"]) - set(fresh["latency"])


def test_pool_too_big_for_memory_is_a_config_error():
    with pytest.raises(ConfigError, match=r"pool_bytes=1000000000000000 .*cannot be allocated on cpu.*GB"):
        Engine(p2pkv.EngineConfig(pool_bytes=10**15))


def test_send_with_zero_timeout_never_calls_a_reachable_peer_unreachable(pair):
    """issue 23: timeout=0 gives a send no time to connect: it may fail, but must say why truthfully
    (what was still missing, and the deadline it had), for a tensor and for a whole request."""
    a, b = pair
    for h in (a.send(b.address, K("z", "0"), torch.ones(2), timeout=0),
              a.send_request(b.address, "z-req", [("x", torch.ones(2))], timeout=0)):
        with contextlib.suppress(TransferTimeout):
            h.wait(5)
        assert h.error is None or ("unreachable" not in str(h.error) and "timeout=0s" in str(h.error)), h.error
    a.send(b.address, K("z", "1"), torch.ones(2)).wait(5)  # the peer is reachable
    assert torch.equal(b.recv(K("z", "1"), timeout=5), torch.ones(2))


def test_every_counter_the_engine_counts_is_declared():
    """A counter the engine's code adds must be in p2pkv.stats.ENGINE_COUNTERS (so stats() has it
    from the start, and docs/api.md describes it)."""
    import pathlib
    import re

    from p2pkv.stats import ENGINE_COUNTERS

    root = pathlib.Path(p2pkv.__file__).parent
    names = set()
    for path in [root / "engine.py", *sorted((root / "_engine").glob("*.py"))]:
        names |= set(re.findall(r'_stats\.add\(\s*"([a-z_]+)"', path.read_text()))
    assert names, "no counters found: the pattern no longer matches the code"
    assert names <= set(ENGINE_COUNTERS), sorted(names - set(ENGINE_COUNTERS))
