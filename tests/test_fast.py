"""The same-host fast path of whole requests on CPU engines (``transport="shm"``): the same
protocol objects the CUDA IPC path runs (lease, shared-memory channel, flags), with the
consumer's pool in shared memory and CPU copies instead of GPU ones. Also recv_request over
TCP, and a producer that writes hostile headers into the channel it was given."""

import os
import time

import msgpack
import pytest
import torch

from p2pkv import (DuplicateKey, Engine, InvalidKey, InvalidTensor, P2pkvError, PeerLost, TransferAborted, TransferKey,
                   TransferTimeout)
from p2pkv.recv_request import RecvState
from p2pkv.synthetic import kv_layer, same_bits
from p2pkv.testing import RemoteEngine

SHAPE = (2, 4, 16, 8, 64)  # 64 KiB per layer in bf16
L = 8
CFG = dict(timeout_s=10.0, peer_timeout_s=2.0, heartbeat_s=0.2, ttl_s=30.0, pool_bytes=64 * 2**20,
           transport="shm")


def layers(seed: int, n: int = L) -> list[tuple[str, torch.Tensor]]:
    return [(f"layer{i}", kv_layer(seed, i, SHAPE)) for i in range(n)]


def settle(cond, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "state did not settle"
        time.sleep(0.02)


def warm_up(prod: Engine, cons: Engine) -> None:
    """The first request to a same-host peer asks for the fast path and goes the ordinary way itself."""
    prod.connect(cons.address, timeout=10)
    data = [("w", torch.zeros(4))]
    send_all(prod, cons.address, "warm-up", data).wait(10)
    cons.recv_request("warm-up").wait(10).release()
    settle(lambda: prod._fast_ready(cons.address) is not None and cons.stats()["fast"]["leases"] == 1)


def send_and_wait(req, data) -> None:
    req.send_many(data)
    req.wait(5)


def held(eng: Engine) -> int:
    """Pool bytes holding data (the fast-path lease itself is room, not data)."""
    s = eng.stats()
    return s["pool"]["in_use"] - s["fast"]["lease_bytes"] + s["fast"]["held"]


def send_all(prod: Engine, peer: str, tid: str, data, many: bool = True):
    req = prod.send_request(peer, tid, data)
    if many:
        req.send_many(data)
    else:
        for n, t in data:
            req.send(n, t)
    return req


@pytest.mark.timeout(60)
def test_whole_request_either_order_bit_exact(shm_pair):
    prod, cons = shm_pair
    for i in range(20):
        data = layers(i)
        early = i % 2 == 0
        h = cons.recv_request(f"t{i}") if early else None
        req = send_all(prod, cons.address, f"t{i}", data, many=i % 3 != 0)
        assert req._fast is not None, "a same-host request takes the fast path"
        req.wait(10)
        h = h or cons.recv_request(f"t{i}")
        with h:
            h.wait(10)
            assert h.state is RecvState.LANDED and h.names == [n for n, _ in data]
            for n, t in data:
                assert same_bits(h.tensor(n), t)
        assert h.state is RecvState.RELEASED
    s, ps = cons.stats(), prod.stats()
    assert s["requests_received_fast"] == 20 and ps["requests_fast"] == 20
    assert held(cons) == 0


@pytest.mark.timeout(60)
def test_per_key_recv_claim_and_outs(shm_pair):
    prod, cons = shm_pair
    data = layers(7)
    send_all(prod, cons.address, "k", data).wait(10)
    out = torch.empty(SHAPE, dtype=torch.bfloat16)
    assert cons.recv(TransferKey("k", "layer0"), out=out) is out and same_bits(out, data[0][1])
    with cons.claim(TransferKey("k", "layer1")) as v:
        assert same_bits(v, data[1][1])
    # the rest through recv_request with names (the request's own layout no longer applies whole)
    with cons.recv_request("k", names=[n for n, _ in data[2:]]) as h:
        h.wait(5)
        assert all(same_bits(h[n], t) for n, t in data[2:])
    outs = {n: torch.empty(SHAPE, dtype=torch.bfloat16) for n, _ in data}
    h = cons.recv_request("o", outs=outs)
    send_all(prod, cons.address, "o", data).wait(10)
    h.wait(5)
    assert all(same_bits(outs[n], t) and h.tensor(n) is outs[n] for n, t in data)
    h.release()
    settle(lambda: held(cons) == 0)


@pytest.mark.timeout(60)
def test_wait_layer_and_layer_wise(shm_pair):
    prod, cons = shm_pair
    data = layers(3)
    h = cons.recv_request("lw")
    req = prod.send_request(cons.address, "lw", data)
    for n, t in data:
        req.send(n, t)
        got = h.wait_layer(n)  # a CPU engine: the host waits for that layer
        assert same_bits(got, t)
    h.wait(5)
    h.release()


@pytest.mark.timeout(120)
def test_lease_is_reused_and_full_lease_falls_back(shm_pair):
    prod, cons = shm_pair
    lease = cons.stats()["fast"]["lease_bytes"]
    big = (2, 16, 16, 8, 128)  # 1 MiB per layer
    n_layers = 8
    per_req = n_layers * 2**20
    n = 4 * lease // per_req  # four leases' worth, one request at a time
    for i in range(n):
        data = [(f"l{j}", kv_layer(i, j, big)) for j in range(n_layers)]
        send_all(prod, cons.address, f"r{i}", data).wait(10)
        with cons.recv_request(f"r{i}") as h:
            h.wait(10)
            assert same_bits(h["l3"], data[3][1])
    assert prod.stats()["requests_fast"] == n
    # the consumer holds requests without releasing: once the lease is full, the next goes the ordinary way
    held_h = []
    fast_before = prod.stats()["requests_fast"]
    k = lease // per_req + 2
    for i in range(k):
        data = [(f"l{j}", kv_layer(100 + i, j, big)) for j in range(n_layers)]
        send_all(prod, cons.address, f"h{i}", data).wait(10)
        h = cons.recv_request(f"h{i}")
        h.wait(10)
        assert same_bits(h["l0"], data[0][1])
        held_h.append(h)
    assert prod.stats()["requests_fast"] - fast_before < k  # some went by TCP, and arrived all the same
    for h in held_h:
        h.release()
    settle(lambda: held(cons) == 0)


@pytest.mark.timeout(60)
def test_abort_and_deadline(shm_pair):
    prod, cons = shm_pair
    data = layers(5)
    # the producer gives up half-way: both sides end clean
    req = prod.send_request(cons.address, "ab", data)
    req.send_many(data[:3])
    h = cons.recv_request("ab", timeout=5)
    prod.abort("ab")
    with pytest.raises(TransferAborted):
        req.wait(5)
    with pytest.raises(TransferAborted):
        h.wait()
    h.release()
    # layers that never come: the producer's request times out, the consumer's wait too
    req = prod.send_request(cons.address, "dl", data, timeout=1.0)
    req.send_many(data[:2])
    h = cons.recv_request("dl", timeout=8)
    with pytest.raises(TransferTimeout):
        req.wait(5)
    with pytest.raises(TransferTimeout):
        h.wait()
    assert h.state is RecvState.FAILED and isinstance(h.error, TransferTimeout)
    h.release()
    # the consumer aborts a request that landed: its room goes back
    send_all(prod, cons.address, "ca", data).wait(5)
    cons.abort("ca")
    with pytest.raises(TransferAborted):
        cons.recv_request("ca", timeout=2).wait()
    settle(lambda: held(cons) == 0)
    # and the path still works
    send_all(prod, cons.address, "after", data).wait(5)
    with cons.recv_request("after") as h:
        assert same_bits(h.wait()["layer7"], data[7][1])


@pytest.mark.timeout(60)
def test_duplicate_keys_refused_whole(shm_pair):
    prod, cons = shm_pair
    data = layers(1)
    send_all(prod, cons.address, "dup", data).wait(5)
    req = prod.send_request(cons.address, "dup", data)  # same keys, still unclaimed at the consumer
    with pytest.raises(DuplicateKey):  # the consumer refuses it whole: the producer learns why (at once, or at wait)
        send_and_wait(req, data)
    with cons.recv_request("dup") as h:  # the first request is intact
        assert all(same_bits(h.wait()[n], t) for n, t in data)
    settle(lambda: held(cons) == 0)


@pytest.mark.timeout(60)
def test_unclaimed_data_evicted_after_ttl():
    cfg = dict(CFG, ttl_s=1.0)
    with Engine(**cfg) as prod, Engine(**cfg) as cons:
        warm_up(prod, cons)
        send_all(prod, cons.address, "ttl", layers(2)).wait(5)
        assert held(cons) > 0
        settle(lambda: held(cons) == 0, timeout=10)
        assert cons.stats()["evicted"] == L


def _hostile_records(lease_off: int, lease_size: int):
    """Headers a broken or hostile producer could write into its channel (each refused for its own reason:
    every one carries the next sequence number)."""
    seq = iter(range(1000, 1100))  # never the honest producer's own sequence numbers (its refusals would fail them)
    item = ["x", "bfloat16", [4], 8, lease_off]

    def hdr(**kw):
        return msgpack.packb({"s": next(seq), "t": "tid", "i": [item], "f": 0, "d": 5.0, **kw})

    yield b"\x00\xff garbage"
    yield msgpack.packb([1, 2, 3])
    yield hdr(extra=1)
    yield hdr(s=-1)
    yield hdr(t="bad\x00id")
    yield hdr(i=[])
    yield hdr(i=[["x", "bfloat16", [4], 8, lease_off + lease_size]])  # past the lease
    yield hdr(i=[["x", "bfloat16", [4], 8, lease_off + 1]])  # misaligned
    yield hdr(i=[["x", "bfloat16", [4], 9, lease_off]])  # the size lies
    yield hdr(i=[["x", "nope", [4], 8, lease_off]])
    yield hdr(f=10**9)
    yield hdr(d=float("nan"))
    yield hdr(i=[item, ["y", "bfloat16", [4], 8, lease_off]])  # overlapping ranges
    yield hdr(i=[["z" * 100, "bfloat16", [2**40], 2**41, lease_off]])
    yield hdr(s=0)  # not after what came before


@pytest.mark.timeout(60)
def test_hostile_headers_are_refused_and_the_engine_serves_on(shm_pair):
    prod, cons = shm_pair
    tx = prod._fast_ready(cons.address)
    bad = list(_hostile_records(tx.lease_off, tx.lease_size))
    for rec in bad:
        assert tx.chan.put_record(rec)
    tx._doorbell()
    settle(lambda: cons.stats().get("fast_refused", 0) == len(bad))
    assert cons.stats().get("internal_errors", 0) == 0
    # the honest path still works; then its header, replayed once its room is free again, is refused
    # (it would otherwise pass off whatever the room holds now, with the old flags, as that request)
    data = layers(9)
    orig, seen = tx.chan.put_record, []
    tx.chan.put_record = lambda rec: (seen.append(rec), orig(rec))[1]
    send_all(prod, cons.address, "honest", data).wait(5)
    tx.chan.put_record = orig
    with cons.recv_request("honest") as h:
        assert all(same_bits(h.wait()[n], t) for n, t in data)
    settle(lambda: held(cons) == 0)
    assert orig(seen[-1])
    tx._doorbell()
    settle(lambda: cons.stats().get("fast_refused", 0) == len(bad) + 1)
    with pytest.raises(TransferTimeout):
        cons.recv_request("honest", timeout=0.5).wait()
    settle(lambda: held(cons) == 0)


@pytest.mark.timeout(120)
def test_killed_producer_fails_the_wait_and_frees():
    with Engine(**CFG) as cons, RemoteEngine(**CFG) as prod:
        h = cons.recv_request("k0", timeout=20)
        prod.start("send_requests", cons.address, ["k0"], L, list(SHAPE), only=3, req_timeout=15)
        settle(lambda: h._progress() or h.state is not RecvState.WAITING, timeout=20)
        assert h._fast is None  # the first request to a peer goes the ordinary way: killed mid-way all the same
        prod.kill()
        t0 = time.monotonic()
        with pytest.raises(PeerLost):
            h.wait()
        assert time.monotonic() - t0 < CFG["peer_timeout_s"] + 3
        h.release()
        settle(lambda: cons.stats()["fast"]["leases"] == 0)


@pytest.mark.timeout(60)
def test_recv_request_over_tcp_and_per_tensor_sends(pair):
    prod, cons = pair
    data = layers(4)
    req = prod.send_request(cons.address, "tcp", data)
    h = cons.recv_request("tcp")
    for n, t in data:
        req.send(n, t)
    assert all(same_bits(h.wait(5)[n], t) for n, t in data)
    h.release()
    for n, t in data:  # per-tensor sends: the names say what to take
        prod.send(cons.address, TransferKey("plain", n), t)
    with cons.recv_request("plain", names=[n for n, _ in data]) as h:
        assert all(same_bits(h.wait(5)[n], t) for n, t in data)
    assert cons.stats()["pool"]["in_use"] == 0


@pytest.mark.timeout(60)
def test_recv_request_timeout_names_what_did_not_arrive(pair):
    """A recv_request that times out says which of its tensors never came, not just that 'every tensor'
    did not (a name the sender's request does not have is refused at once: test_recv_request_giveback)."""
    prod, cons = pair
    data = layers(5, 3)
    req = prod.send_request(cons.address, "named", data)
    req.send(*data[0])
    h = cons.recv_request("named", names=["layer0", "layer2"], timeout=0.5)
    with pytest.raises(TransferTimeout, match="not arrived: 'layer2'") as exc:
        h.wait()
    assert "layer0" not in str(exc.value)
    h.release()
    prod.abort("named")


@pytest.mark.timeout(60)
def test_recv_request_timeout_names_missing_layers_same_host(shm_pair):
    prod, cons = shm_pair
    data = layers(6, 3)
    req = prod.send_request(cons.address, "half", data)
    req.send(*data[0])
    h = cons.recv_request("half", timeout=0.5)
    with pytest.raises(TransferTimeout, match="not arrived: 'layer1', 'layer2'"):
        h.wait()
    h.release()
    prod.abort("half")


def test_recv_request_bad_input(pair):
    _, cons = pair
    with pytest.raises(InvalidKey):
        cons.recv_request("")
    with pytest.raises(InvalidKey):
        cons.recv_request("t", names="layer0")
    with pytest.raises(InvalidKey):
        cons.recv_request("t", names=["a", "a"])
    with pytest.raises(InvalidTensor):
        cons.recv_request("t", outs=[torch.empty(3)])
    with pytest.raises(InvalidTensor):
        cons.recv_request("t", outs={"a": torch.empty(3, 3).t()})
    h = cons.recv_request("never", timeout=0.3)
    with pytest.raises(TransferTimeout):
        h.wait()
    with pytest.raises(InvalidKey):
        h.tensor(5)  # type: ignore[arg-type]
    h.release()
    with pytest.raises(P2pkvError):
        h.wait()
    assert "never" in repr(h)


def test_shm_transport_refused_on_cuda_and_bad_spin():
    from p2pkv import ConfigError, EngineConfig

    with pytest.raises(ConfigError):
        EngineConfig(spin_s=-1)
    with pytest.raises(ConfigError):
        EngineConfig(spin_s=True)
    if torch.cuda.is_available():
        with pytest.raises(ConfigError):
            Engine(device="cuda:0", transport="shm")


def test_no_shared_memory_left_behind():
    with Engine(**CFG) as a, Engine(**CFG) as b:
        warm_up(a, b)
    assert not [f for f in os.listdir("/dev/shm") if f.startswith("p2pkv")]
