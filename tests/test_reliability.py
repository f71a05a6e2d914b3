"""Reliability as a tested promise: soak, peer faults, slow and stuck peers, fuzzing, security.

The default run does a shorter version of each soak (CI's main stage); the full-length ones are
marked ``soak`` (CI's soak stage: ``python -m pytest -m soak``). Deadlines are generous: these run
on a loaded 2-core machine.
"""

import random
import threading
import time

import msgpack
import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pkv import AuthError, Engine, PeerLost, TransferAborted, TransferKey, TransferState, TransferTimeout
from p2pkv.control.messages import PROTOCOL_VERSION, decode, encode
from p2pkv.testing import RemoteEngine

from .conftest import FAST

K = TransferKey
SOAK = dict(timeout_s=60.0, peer_timeout_s=5.0, heartbeat_s=0.25, ttl_s=900.0, pool_bytes=256 * 2**20)


def _soak(n_tids: int, layers: int, nbytes: int, seed: int) -> None:
    rng = random.Random(seed)
    modes = ["push"] * 7 + ["pull"] * 2 + ["abort"]
    plan = [(f"soak-{seed}-{i}", rng.choice(modes)) for i in range(n_tids)]
    prod, cons = RemoteEngine(**SOAK), RemoteEngine(**SOAK)
    try:
        prod.call("connect", cons.address)  # steady state: both connections open before the baseline
        cons.call("connect", prod.address)
        time.sleep(0.2)
        base = {r: (r.call("fds"), r.call("threads")) for r in (prod, cons)}
        cons.start("soak_consume", plan, layers, nbytes, seed + 1, prod.address, threads=4, timeout=60.0)
        out = prod.call("soak_produce", plan, layers, nbytes, seed, cons.address, timeout=600)
        res = cons.result(timeout=600)
        n_abort = sum(1 for _, m in plan if m == "abort")
        n_ok = sum(1 for _, m in plan if m != "abort") * layers
        assert res["bad"] == 0 and res["other"] == 0, res
        assert res["ok"] >= n_ok and res["ok"] + res["aborted"] == n_tids * layers, res
        assert set(out) <= {"done", "TransferAborted"}, out
        deadline = time.monotonic() + 60
        for r in (prod, cons):
            while True:  # buffers, sockets and threads return to their starting values
                st_ = r.call("stats")
                fds, threads = r.call("fds"), r.call("threads")
                if (st_["pool"]["in_use"] == 0 and st_["inbox"]["held"] == 0 and st_["outbox"]["held"] == 0
                        and fds <= base[r][0] and threads == base[r][1]) or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert st_["pool"]["in_use"] == 0 and st_["inbox"]["held"] == 0 and st_["outbox"]["held"] == 0, st_
            assert fds <= base[r][0] and threads == base[r][1], (fds, threads, base[r])
        assert n_abort == 0 or res["aborted"] > 0
    finally:
        prod.close()
        cons.close()


@pytest.mark.timeout(600)
def test_soak_200_transfers_x_32_layers():
    _soak(200, 32, 256, seed=1)


@pytest.mark.soak
@pytest.mark.timeout(1200)
def test_soak_1000_transfers_x_32_layers():
    _soak(1000, 32, 256, seed=1)


@pytest.mark.soak
@pytest.mark.timeout(3600)
def test_soak_long():
    # 4 x 1,000 transfers x 32 layers of 4 KiB (128 MiB per run). The consumer takes keys in an
    # order of its own, so everything may have to wait in a pool at once: the data must fit the
    # 256 MiB pools (with 64 KiB layers, 2 GiB, the producer's publish rightly times out with
    # PoolExhausted while the consumer waits for keys that come after it).
    for seed in range(2, 6):
        _soak(1000, 32, 4 * 1024, seed=seed)


# ----------------------------------------------------------------------------- peer faults
FAULT = dict(timeout_s=10.0, peer_timeout_s=1.0, heartbeat_s=0.1, pool_bytes=64 * 2**20)


@pytest.mark.timeout(600)
def test_kill_peer_6_times_and_restart_on_same_address():
    _kill_and_restart(6)


@pytest.mark.soak
@pytest.mark.timeout(1800)
def test_kill_peer_50_times_and_restart_on_same_address():
    _kill_and_restart(50)


def _kill_and_restart(rounds: int) -> None:
    rng = random.Random(7)
    shape = (16 * 1024,)
    with Engine(**FAULT) as survivor:
        victim = RemoteEngine(method="forkserver", **FAULT)
        port = int(victim.address.rsplit(":", 1)[1])
        # A session first, as every later round has one (from its reconnect check): a peer killed
        # before it answered our handshake fails sends at their deadline, not with PeerLost.
        survivor.connect(victim.address, timeout=60)
        try:
            for round_ in range(rounds):
                tid = f"fault-{round_}"
                as_sender = round_ % 2 == 0  # alternate: the survivor sends, or receives
                if as_sender:
                    hs = [survivor.send(victim.address, K(tid, str(i)), torch.full(shape, i % 256, dtype=torch.uint8))
                          for i in range(rng.randint(1, 40))]
                    time.sleep(rng.random() * 0.05)
                    t0 = time.monotonic()
                    victim.kill()
                    for h in hs:
                        try:
                            h.wait(FAULT["timeout_s"] + 2)
                        except PeerLost:
                            pass
                        assert h.done() and h.state in (TransferState.DONE, TransferState.FAILED)
                        assert h.state is TransferState.DONE or isinstance(h.error, PeerLost), h
                    assert time.monotonic() - t0 <= FAULT["timeout_s"]  # the closed connection fails them
                else:
                    victim.start("send_many", survivor.address, [tid], rng.randint(1, 8), [1024], wait=False)
                    time.sleep(rng.random() * 0.05)
                    t0 = time.monotonic()
                    victim.kill()
                    # PeerLost at once, or (when the victim died before it connected) the recv's deadline
                    with pytest.raises((PeerLost, TransferTimeout)):  # noqa: PT012 - any layer may be the one
                        for layer in range(64):
                            survivor.recv(K(tid, f"model.layers.{layer}.self_attn"), timeout=3.0)
                    assert time.monotonic() - t0 <= FAULT["timeout_s"] + 15
                    survivor.abort(tid)
                victim.close()
                victim = RemoteEngine(method="forkserver", port=port, **FAULT)
                # the surviving engine talks to the restarted peer without being restarted itself
                deadline = time.monotonic() + 60
                while True:
                    h = survivor.send(victim.address, K(tid + "-after", "0"), torch.ones(8), timeout=5)
                    try:
                        h.wait(10)
                        break
                    except (PeerLost, TransferTimeout):
                        assert time.monotonic() < deadline
            assert survivor.stats()["pool"]["in_use"] == 0
        finally:
            victim.close()


# ----------------------------------------------------------------------------- slow and stuck peers
def test_producer_stalls_mid_request_receiver_times_out_and_frees():
    cfg = dict(FAST, ttl_s=3.0)
    with Engine(**cfg) as prod, Engine(**cfg) as cons:
        for i in range(3):
            prod.send(cons.address, K("stall", str(i)), torch.ones(1024)).wait(30)
        assert cons.stats()["pool"]["in_use"] > 0  # held until claimed or until ttl_s
        t0 = time.monotonic()
        with pytest.raises(TransferTimeout):
            cons.recv(K("stall", "3"), timeout=0.5)  # the producer is alive but never sends it
        assert time.monotonic() - t0 < 10
        deadline = time.monotonic() + 60
        while cons.stats()["pool"]["in_use"] and time.monotonic() < deadline:
            time.sleep(0.1)  # unclaimed layers of the stalled request expire
        assert cons.stats()["pool"]["in_use"] == 0 and cons.stats()["evicted"] == 3


def test_consumer_never_claims_ttl_frees_and_sender_can_continue():
    cfg = dict(FAST, ttl_s=0.5, pool_bytes=1 << 20)
    with Engine(**dict(FAST, timeout_s=60.0)) as prod, Engine(**cfg) as cons:
        for round_ in range(3):  # 3 x 0.75 MiB through a 1 MiB pool: only eviction makes room
            hs = [prod.send(cons.address, K(f"nc{round_}", str(i)), torch.zeros(96 * 1024, dtype=torch.uint8))
                  for i in range(8)]
            for h in hs:
                h.wait(90)
            assert cons.stats()["pool"]["in_use"] <= cons.pool.capacity
            time.sleep(1.2)
        assert cons.stats()["evicted"] >= 16


def test_full_receiver_bounded_memory_over_time():
    small = dict(FAST, pool_bytes=1 << 20)
    with Engine(**dict(FAST, timeout_s=60.0)) as a, Engine(**small) as b:
        hs = [a.send(b.address, K("full", str(i)), torch.zeros(64 * 1024, dtype=torch.uint8)) for i in range(64)]
        peak = 0
        for _ in range(10):
            peak = max(peak, b.stats()["pool"]["in_use"] + b.stats()["pool"]["overflow_in_use"])
            time.sleep(0.05)
        assert peak <= b.pool.capacity
        for i in range(64):
            b.recv(K("full", str(i)), timeout=60)
        for h in hs:
            h.wait(90)
        assert b.stats()["pool"]["overflow_allocs"] == 0


# ----------------------------------------------------------------------------- fuzzing
V = PROTOCOL_VERSION
_TYPES = ["hello", "data", "creq", "cret", "pull", "pdone", "abort", "ping", "bye", "nccl", "ack", "launch", "", 7]
_scalar = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(allow_nan=True),
                    st.text(max_size=40), st.binary(max_size=40))
_value = st.recursive(_scalar, lambda c: st.one_of(st.lists(c, max_size=5), st.dictionaries(st.text(max_size=8), c,
                                                                                              max_size=5)),
                      max_leaves=12)
_fields = st.dictionaries(st.sampled_from(["seq", "key", "dt", "sh", "n", "x", "need", "want", "to", "tid", "uid",
                                           "dir", "eid", "tok", "caps", "ipc", "host", "pid", "dev"]), _value,
                          max_size=8)


@st.composite
def _frames(draw):
    kind = draw(st.integers(0, 5))
    if kind == 0:
        return [draw(st.binary(max_size=200))]
    if kind == 1:
        msg = {"v": draw(st.sampled_from([V, V, V + 1, 0, "1", None])), "t": draw(st.sampled_from(_TYPES))}
        msg.update(draw(_fields))
        return [msgpack.packb(msg, use_bin_type=True)] + draw(st.lists(st.binary(max_size=64), max_size=2))
    if kind == 2:  # a valid data header with a lying payload
        n = draw(st.integers(0, 4096))
        hdr = encode("data", seq=draw(st.integers(0, 2**63 - 1)), key=[draw(st.text(min_size=1, max_size=10)), "l"],
                     dt=draw(st.sampled_from(["uint8", "bfloat16", "float32", "nope"])), sh=[n], n=n, x="tcp")
        return [hdr, draw(st.binary(max_size=4200))]
    if kind == 3:  # truncated valid messages
        raw = encode(draw(st.sampled_from(["ping", "creq", "pull"])), need=1, want=2, seq=3, key=["a", "b"], to=1.0,
                     x="tcp")
        return [raw[: draw(st.integers(0, len(raw)))]]
    if kind == 4:  # huge claimed lengths / counts
        return [encode("creq", need=draw(st.integers(0, 2**63 - 1)), want=draw(st.integers(0, 2**63 - 1)))]
    return [encode("pull", seq=draw(st.integers(0, 2**63 - 1)), key=["fz", draw(st.text(min_size=1, max_size=5))],
                   to=draw(st.floats(0, 0.01)), x=draw(st.sampled_from(["tcp", "ipc", "nccl", "x"])))]


class _Fuzzer:
    def __init__(self, address):
        self.ctx = zmq.Context()
        self.s = self.ctx.socket(zmq.DEALER)
        self.s.setsockopt(zmq.LINGER, 0)
        self.s.connect(f"tcp://{address}")
        self.s.send(encode("hello", eid="fuzzer", host="h", pid=1, dev="cpu", caps={}))
        assert self.s.poll(60_000)
        self.s.recv_multipart()
        self.sent = 0

    def close(self):
        self.s.close(0)
        self.ctx.term()


@pytest.fixture(scope="module")
def fuzz_target():
    eng = Engine(**dict(FAST, pool_bytes=16 * 2**20, timeout_s=2.0, peer_timeout_s=2.0))
    peer = Engine(**FAST)
    fz = _Fuzzer(eng.address)
    yield eng, peer, fz
    fz.close()
    peer.close()
    eng.close()


def _fuzz_one(fuzz_target, frames) -> None:
    eng, peer, fz = fuzz_target
    fz.s.send_multipart(frames)
    fz.sent += 1
    while fz.s.poll(0):  # drain replies; every one must itself be well-formed
        for f in fz.s.recv_multipart()[:1]:
            decode(f)
    if fz.sent % 500 == 0:  # valid traffic keeps flowing, memory stays bounded
        k = K(f"valid-{fz.sent}", "0")
        peer.send(eng.address, k, torch.arange(16), timeout=60).wait(60)
        assert torch.equal(eng.recv(k, timeout=60), torch.arange(16))
        s = eng.stats()
        assert s["pool"]["in_use"] <= 4 * 2**20 and s["sessions"] <= 3 and s["internal_errors"] == 0, s


@settings(max_examples=1_000, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(frames=_frames())
def test_fuzz_control_plane_1000(fuzz_target, frames):
    _fuzz_one(fuzz_target, frames)


@pytest.mark.soak
@settings(max_examples=10_000, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(frames=_frames())
def test_fuzz_control_plane_10000(fuzz_target, frames):
    _fuzz_one(fuzz_target, frames)


def test_fuzz_target_survived(fuzz_target):
    eng, peer, _ = fuzz_target
    peer.send(eng.address, K("after-fuzz", "0"), torch.ones(4), timeout=60).wait(60)
    assert torch.equal(eng.recv(K("after-fuzz", "0")), torch.ones(4))
    assert eng.stats().get("internal_errors", 0) == 0


# ----------------------------------------------------------------------------- security
def test_unauthenticated_peer_cannot_send_pull_abort_or_read():
    sec = dict(FAST, auth_token="s3cret")
    with Engine(**sec) as a, Engine(**sec) as friend, Engine(**FAST) as stranger:
        a.publish(K("sec", "pub"), torch.ones(4))
        friend.send(a.address, K("sec", "pushed"), torch.ones(4)).wait(5)
        with pytest.raises(AuthError):
            stranger.send(a.address, K("sec", "x"), torch.ones(4)).wait(5)
        with pytest.raises(AuthError):
            stranger.pull(a.address, K("sec", "pub"), timeout=2)
        stranger.abort("sec")  # goes nowhere: the stranger has no session with a
        time.sleep(0.3)
        assert a.stats()["outbox"]["held"] == 1 and a.stats()["inbox"]["held"] == 1
        assert torch.equal(friend.pull(a.address, K("sec", "pub"), timeout=5), torch.ones(4))
        assert torch.equal(a.recv(K("sec", "pushed")), torch.ones(4))


def test_other_peer_cannot_overwrite_a_key_in_flight(pair):
    a, b = pair
    with Engine(**FAST) as mallory:
        a.send(b.address, K("own", "0"), torch.ones(4)).wait(5)
        h = mallory.send(b.address, K("own", "0"), torch.zeros(4))
        with pytest.raises(Exception, match="already waiting"):
            h.wait(5)
        assert torch.equal(b.recv(K("own", "0")), torch.ones(4))


def test_abort_is_idempotent_and_concurrent(pair):
    a, _ = pair
    ts = [threading.Thread(target=a.abort, args=("same",)) for _ in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    with pytest.raises(TransferAborted):
        a.recv(K("same", "0"), timeout=2)
