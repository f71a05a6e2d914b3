"""The same-host fast path, one-sided reads and whole-request receives, attacked as a hostile
same-host peer holding the token would (issue 18's new surfaces).

Each adversary is a raw ZMQ socket speaking the control protocol by hand, a process writing
into the shared-memory channel it was given, or a real engine whose shared memory the test
scribbles on; bounded in count and time, on 127.0.0.1. Every test also checks that honest
traffic stays correct while (or after) it runs. CPU engines with ``transport="shm"`` run the
same lease/channel/flag objects as the CUDA IPC path.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any

import msgpack
import pytest
import torch
import zmq

from p2pkv import (Engine, InvalidKey, InvalidTensor, P2pkvError, PeerLost, ProtocolError, RequestLayout,
                   ShapeMismatch, TransferAborted, TransferKey,
                   TransferTimeout, TransportError)
from p2pkv.control.messages import REPLY_TYPES, decode, encode
from p2pkv.recv_request import RecvState
from p2pkv.synthetic import kv_layer, same_bits
from p2pkv.testing import RemoteEngine
from p2pkv.transport import shm

from .test_fast import CFG, L, SHAPE, held, layers, send_all, settle, warm_up
from .test_hostile import FakeEngine
from .conftest import process_context

MiB = 2**20


# ----------------------------------------------------------------------------- adversaries
class Hostile:
    """A same-host peer (it has the token) that speaks the control protocol by hand: a raw DEALER."""

    def __init__(self, address: str, host: str):
        self.ctx = zmq.Context()
        self.s = self.ctx.socket(zmq.DEALER)
        self.s.setsockopt(zmq.LINGER, 0)
        self.s.connect(f"tcp://{address}")
        self.host = host
        self.chan: shm.ShmChannel | None = None

    def send(self, mtype: str, **fields: Any) -> None:
        self.s.send(encode(mtype, **fields))

    def reply(self, timeout: float = 5.0) -> dict:
        end = time.monotonic() + timeout
        while True:
            assert self.s.poll(int(max(0.01, end - time.monotonic()) * 1000)), "no reply"
            msg = decode(self.s.recv_multipart()[0])
            if msg["t"] not in ("ping", "pong"):
                return msg

    def hello(self, eid: str = "hostile") -> None:
        self.send("hello", eid=eid, host=self.host, pid=os.getpid(), dev="cpu",
                  caps={"host": self.host, "transports": ["tcp", "shm"], "cuda": False})
        assert self.reply()["t"] == "hok"

    def ask(self) -> dict:
        """fq -> fo: a lease and a channel (or ``no``)."""
        self.send("fq")
        fo = self.reply()
        assert fo["t"] == "fo", fo
        return fo

    def take(self, fo: dict) -> shm.ShmChannel:
        """Accept the offer and map the channel."""
        self.send("fast", ok=True, msg="")
        self.chan = shm.ShmChannel.open(fo["chan"])
        return self.chan

    def ping(self) -> None:
        self.send("ping")
        while self.s.poll(0):
            self.s.recv_multipart()

    def close(self) -> None:
        if self.chan is not None:
            self.chan.close()
        self.s.close(0)
        self.ctx.term()


def hdr(seq: int, tid: str, lid: int, base: int, f0: int, layout: list | None = None, d: float = 5.0) -> bytes:
    m: dict[str, Any] = {"s": seq, "t": tid, "L": lid, "o": base, "f": f0, "d": d}
    if layout is not None:
        m["l"] = layout
    return msgpack.packb(m)


def tcp_roundtrips(prod: Engine, cons: Engine, tag: str, seconds: float) -> int:
    """Honest traffic from another peer for ``seconds``: every small tensor arrives, bit exact."""
    n, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        t = torch.arange(1000, dtype=torch.float32) + n
        key = TransferKey(f"{tag}{n}", "0")
        prod.send(cons.address, key, t).wait(20)
        assert torch.equal(cons.recv(key, timeout=20), t)
        n += 1
    return n


def _flood_headers(address: str, host: str, kind: str, seconds: float, q: Any) -> None:
    """A hostile same-host producer in its own process: takes the fast path, then floods its header ring."""
    h = Hostile(address, host)
    h.hello()
    fo = h.ask()
    chan = h.take(fo)
    off = fo["lease"][0]
    if kind == "layouts":  # every header defines a new layout of 2048 tiny tensors (costly to parse): a ring
        # full of them (~85) is seconds of parsing, which one read of the ring used to do in one go
        recs = [hdr(s, "t", s % 64, 1, 0, [[f"{s}.{i}", "bool", [1], 1] for i in range(2048)]) for s in range(1, 110)]
    else:  # "one-tid": thousands of valid one-tensor requests under one transfer id, disjoint names
        recs = [hdr(s, "t", s % 64, off + 256 * s, 2 * s, [[f"n{s}", "float32", [1], 4]], d=60.0)
                for s in range(1, 16001)]
    q.put("go")
    i, last, end = 0, 0.0, time.monotonic() + seconds
    while time.monotonic() < end:
        if time.monotonic() - last > 0.2:
            h.ping()
            last = time.monotonic()
        if i < len(recs) and chan.put_record(recs[i]):
            i += 1
        else:
            time.sleep(0.0005)
    q.put(i)
    h.close()


def _ring_bell(name: str, seconds: float) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for _ in range(1000):
            try:
                s.sendto(b"r", "\0" + name)
            except OSError:
                pass


# ----------------------------------------------------------------------------- leases
@pytest.mark.timeout(90)
def test_leases_never_take_more_than_half_the_pool():
    """fq from many sessions (hostile, or just several same-host producers) must not pin the whole pool:
    the ordinary path keeps the other half, so a TCP producer and a second same-host producer still send."""
    with Engine(**CFG) as cons, Engine(**dict(CFG, transport="tcp")) as tcp_prod, Engine(**CFG) as prod2:
        cap = cons.stats()["pool"]["capacity"]
        raws = [Hostile(cons.address, cons._host) for _ in range(3)]
        try:
            offers = []
            for r in raws:
                r.hello()
                offers.append(r.ask())
            assert cons.stats()["fast"]["lease_bytes"] <= cap // 2
            assert sum("lease" in fo for fo in offers) <= 1
            big = torch.arange(4 * MiB, dtype=torch.float32)  # 16 MiB over TCP
            tcp_prod.send(cons.address, TransferKey("big", "0"), big).wait(10)
            assert torch.equal(cons.recv(TransferKey("big", "0"), timeout=10), big)
            # an honest same-host producer: no lease is left for it, its requests take the ordinary path
            for i in range(3):
                data = layers(i)
                send_all(prod2, cons.address, f"p2-{i}", data).wait(10)
                with cons.recv_request(f"p2-{i}") as h:
                    assert all(same_bits(h.wait(10)[n], t) for n, t in data)
            assert cons.stats()["fast"]["lease_bytes"] <= cap // 2
        finally:
            for r in raws:
                r.close()


@pytest.mark.timeout(60)
def test_an_offer_never_taken_is_withdrawn():
    """A peer that asks for the fast path and never answers does not hold a lease forever, nor gets another."""
    with Engine(**dict(CFG, timeout_s=2.5)) as cons:
        h = Hostile(cons.address, cons._host)
        try:
            h.hello()
            assert "lease" in h.ask()
            assert cons.stats()["fast"]["leases"] == 1
            end = time.monotonic() + 10
            while cons.stats()["pool"]["in_use"] and time.monotonic() < end:
                h.ping()
                time.sleep(0.1)
            assert cons.stats()["pool"]["in_use"] == 0 and cons.stats()["fast"]["leases"] == 0
            assert "no" in h.ask()  # not offered again to that session
            h.send("fast", ok=True, msg="")  # a late answer is told the offer is gone
            assert "no" in h.reply()
        finally:
            h.close()


# ----------------------------------------------------------------------------- a hostile consumer
@pytest.mark.timeout(90)
def test_free_ring_garbage_cannot_break_the_producer(shm_pair):
    """The consumer hands room back through shared memory: duplicates, overlaps and corrupt positions
    there must neither crash the producer's send_request nor make it hand one range to two requests."""
    prod, cons = shm_pair
    tx = prod._fast_ready(cons.address)
    rx = next(iter(cons._fast.rx.values()))
    data = layers(1)
    send_all(prod, cons.address, "a", data).wait(5)
    cons.recv_request("a").wait(5).release()
    total = tx.lease_size
    for _ in range(2):  # the room of "a" handed back twice more, and ranges that overlap it
        rx.chan.put_free(tx.lease_off, L * 64 * 1024, 0, L)
    rx.chan.put_free(tx.lease_off + 4096, 65536, 3, 1)
    rx.chan.put_free(tx.lease_off + total - 256, 4096, 0, 0)
    rx.chan.put_free(tx.lease_off, total, 0, shm.NFLAGS)
    hs = []
    for i in range(8):  # held, so that overlapping room would be handed out and refused
        d = layers(10 + i)
        req = send_all(prod, cons.address, f"b{i}", d)
        req.wait(5)
        h = cons.recv_request(f"b{i}")
        assert all(same_bits(h.wait(5)[n], t) for n, t in d)
        hs.append(h)
    assert prod.stats()["requests_fast"] >= 8
    for h in hs:
        h.release()
    # corrupt ring positions: the producer stops using that channel, its requests go the ordinary way
    rx.chan._u64[shm._W_FW] = 2**40
    for i in range(3):
        d = layers(30 + i)
        send_all(prod, cons.address, f"c{i}", d).wait(10)
        with cons.recv_request(f"c{i}") as h:
            assert all(same_bits(h.wait(10)[n], t) for n, t in d)
    assert prod.stats().get("internal_errors", 0) == 0


# ----------------------------------------------------------------------------- a hostile producer
@pytest.mark.timeout(60)
def test_corrupt_header_ring_ends_that_channel_once(shm_pair):
    """Ring positions that make no sense end that channel (one refusal), not a refusal per poll."""
    prod, cons = shm_pair
    tx = prod._fast_ready(cons.address)
    tx.chan._u64[shm._W_HW] = 2**40
    tx._doorbell()
    time.sleep(1.0)
    assert cons.stats().get("fast_refused", 0) == 1
    with Engine(**dict(CFG, transport="tcp")) as other:
        assert tcp_roundtrips(other, cons, "after", 0.5) > 0
    assert cons.stats().get("fast_refused", 0) == 1
    assert cons.stats().get("internal_errors", 0) == 0


@pytest.mark.timeout(60)
def test_refused_layout_definition_is_forgotten():
    """A header that (re)defines a layout id with a definition the consumer refuses must not leave the
    id's previous layout in place: a later header naming that id would be read with the wrong layout."""
    cfg = dict(CFG, credit_bytes=16 * MiB)  # leases of 16 MiB: an honest producer's and the hostile one's
    with Engine(**cfg) as prod, Engine(**cfg) as cons:
        warm_up(prod, cons)
        h = Hostile(cons.address, cons._host)
        try:
            h.hello()
            fo = h.ask()
            chan = h.take(fo)
            off = fo["lease"][0]
            time.sleep(0.2)
            good = [["k", "float32", [16], 64]]
            bad = [["k", "float32", [16], 65]]  # the size lies
            assert chan.put_record(hdr(1, "t1", 0, off, 0, good))
            assert chan.put_record(hdr(2, "t2", 0, off + 4096, 8, bad))
            assert chan.put_record(hdr(3, "t3", 0, off + 8192, 16))  # names id 0, whose redefinition was refused
            h.ping()
            settle(lambda: cons.stats().get("fast_refused", 0) + cons.stats().get("requests_received_fast", 0) == 3)
            assert cons.stats().get("requests_received_fast", 0) == 1  # t3 is refused, not read with t1's layout
            with pytest.raises(P2pkvError):
                cons.recv_request("t3", timeout=0.5).wait()
            data = layers(4)  # honest traffic meanwhile
            send_all(prod, cons.address, "honest", data).wait(5)
            with cons.recv_request("honest") as r:
                assert all(same_bits(r.wait(5)[n], t) for n, t in data)
        finally:
            h.close()


@pytest.mark.timeout(120)
def test_layout_over_the_consumers_message_limit_is_never_misread():
    """Honest engines with different max_message_bytes: a layout the consumer refuses must fail (as on the
    ordinary path), never be read as the layout that held its id before (silent wrong data)."""
    with Engine(**CFG) as prod, Engine(**dict(CFG, max_message_bytes=MiB)) as cons:
        warm_up(prod, cons)
        for i in range(64):  # every layout id in use
            t = torch.full((16 + i,), float(i))
            req = prod.send_request(cons.address, f"s{i}", [("k", t)])
            req.send("k", t)
            req.wait(5)
            cons.recv_request(f"s{i}").wait(5).release()
        big = torch.arange(MiB // 2, dtype=torch.float32)  # 2 MiB: over the consumer's limit
        for j in range(3):
            # refused before it is offered (InvalidTensor: send_request knows the consumer's limit); never DONE
            # (an eager one used to go out, and ZMQ dropped the connection for it: PeerLost)
            with pytest.raises(InvalidTensor, match="max_message_bytes"):
                prod.send_request(cons.address, f"big{j}", [("k", big)])
            h = cons.recv_request(f"big{j}", timeout=1.0)
            with pytest.raises(P2pkvError):
                h.wait()
            h.release()
        data = layers(3)  # the path still serves
        send_all(prod, cons.address, "after", data).wait(5)
        with cons.recv_request("after") as h:
            assert all(same_bits(h.wait(5)[n], t) for n, t in data)


@pytest.mark.soak  # two 6-second floods: a stress run (CI's soak stage)
@pytest.mark.timeout(120)
def test_header_floods_do_not_starve_the_io_thread():
    """Headers that are costly for the consumer (thousands of requests under one transfer id; a new
    2048-tensor layout in every header) must not stall its I/O thread: honest peers stay connected."""
    cfg = dict(CFG, peer_timeout_s=1.5, heartbeat_s=0.2)
    ctx = process_context()
    for kind in ("one-tid", "layouts"):
        with Engine(**cfg) as cons, Engine(**dict(cfg, transport="tcp")) as honest:
            honest.connect(cons.address, timeout=10)
            q = ctx.Queue()
            p = ctx.Process(target=_flood_headers, args=(cons.address, cons._host, kind, 6.0, q))
            p.start()
            try:
                assert q.get(timeout=60) == "go"
                time.sleep(0.5)
                assert tcp_roundtrips(honest, cons, kind, 4.0) > 0
                assert honest.stats().get("peers_lost", 0) == 0
            finally:
                p.join(20)
                if p.is_alive():
                    p.kill()
            assert cons.stats().get("internal_errors", 0) == 0


@pytest.mark.timeout(90)
def test_doorbell_rung_in_a_tight_loop():
    """Held: a peer ringing our doorbell as fast as it can costs CPU, not service. (The ringer takes a
    whole core; on a loaded 2-core machine the engines' heartbeats then come late, so this pair allows
    peers 10 s of silence: the test is about the doorbell, not about heartbeat deadlines.)"""
    cfg = dict(CFG, peer_timeout_s=10.0, heartbeat_s=0.5)
    with Engine(**cfg) as prod, Engine(**cfg) as cons:
        warm_up(prod, cons)
        ctx = process_context()
        p = ctx.Process(target=_ring_bell, args=(cons._fast._bell_name, 3.0))
        p.start()
        try:
            time.sleep(1.0)
            for i in range(5):
                data = layers(40 + i)
                send_all(prod, cons.address, f"bell{i}", data).wait(20)
                with cons.recv_request(f"bell{i}") as h:
                    assert all(same_bits(h.wait(20)[n], t) for n, t in data)
        finally:
            p.join(20)
        assert cons.stats().get("peers_lost", 0) == 0 and prod.stats().get("peers_lost", 0) == 0


@pytest.mark.timeout(60)
def test_flags_never_written():
    """Held: a producer announces requests and never writes them: the waiting consumer fails at the
    producer's deadline, unclaimed ones are evicted at the TTL, and every byte of room comes back."""
    with Engine(**dict(CFG, ttl_s=1.5)) as cons:
        h = Hostile(cons.address, cons._host)
        try:
            h.hello()
            fo = h.ask()
            chan = h.take(fo)
            off = fo["lease"][0]
            time.sleep(0.2)
            lay = [["k", "float32", [16], 64]]
            assert chan.put_record(hdr(1, "w1", 0, off, 0, lay, d=0.5))
            assert chan.put_record(hdr(2, "w2", 0, off + 256, 2, None, d=0.5))
            h.ping()
            settle(lambda: cons.stats().get("requests_received_fast", 0) == 2)
            r = cons.recv_request("w1", timeout=10)
            t0 = time.monotonic()
            with pytest.raises(TransferTimeout):
                r.wait()
            assert time.monotonic() - t0 < 5
            r.release()
            end = time.monotonic() + 10
            while held(cons) and time.monotonic() < end:
                h.ping()
                time.sleep(0.1)
            assert held(cons) == 0
            assert cons.stats()["evicted"] == 1
            assert len(chan.take_frees()) == 2  # both rooms handed back to the producer
        finally:
            h.close()


@pytest.mark.timeout(180)
def test_retry_after_a_killed_producer_is_taken():
    """A producer dies mid-request (fast path); the waiting consumer fails at once, and the same transfer
    id sent again by a new producer is taken, not refused as a duplicate of the dead request."""
    cfg = dict(CFG, credit_bytes=16 * MiB)  # leases of 16 MiB: a second one fits beside the dead one's
    names = [f"model.layers.{i}.self_attn" for i in range(L)]
    with Engine(**cfg) as cons:
        with RemoteEngine(**cfg) as prod:
            prod.call("send_requests", cons.address, ["w0"], L, list(SHAPE))
            cons.recv_request("w0").wait(10).release()
            settle(lambda: cons.stats()["fast"]["leases"] == 1)
            time.sleep(0.3)
            h = cons.recv_request("k0", timeout=30)
            prod.call("send_requests", cons.address, ["k0", "k1"], L, list(SHAPE), only=3, wait=False,
                      req_timeout=30)
            settle(lambda: cons.stats().get("requests_received_fast", 0) == 2)
            settle(lambda: h._progress() or h.state is RecvState.ARRIVING)
            prod.kill()
            t0 = time.monotonic()
            with pytest.raises(PeerLost):
                h.wait()
            assert time.monotonic() - t0 < cfg["peer_timeout_s"] + 5
            h.release()
        with Engine(**cfg) as again:
            warm_up_any(again, cons)
            data = [(n, kv_layer(77, i, SHAPE)) for i, n in enumerate(names)]
            req = send_all(again, cons.address, "k1", data)
            assert req._fast is not None
            req.wait(10)
            with cons.recv_request("k1", timeout=10) as r:
                assert all(same_bits(r.wait()[n], t) for n, t in data)


def warm_up_any(prod: Engine, cons: Engine) -> None:
    """Like test_fast.warm_up, for a consumer that may hold other leases too."""
    prod.connect(cons.address, timeout=10)
    send_all(prod, cons.address, "warm-up-any", [("w", torch.zeros(4))]).wait(10)
    cons.recv_request("warm-up-any").wait(10).release()
    settle(lambda: prod._fast_ready(cons.address) is not None)


# ----------------------------------------------------------------------------- one-sided reads
@pytest.mark.timeout(60)
def test_read_done_from_a_peer_that_cannot_have_read_is_ignored():
    """rdone completes an expose() handle; a peer that could never have mapped our memory (not a CUDA
    engine of this host) must not complete it."""
    with Engine(**CFG) as prod, Engine(**CFG) as other:
        h = prod.expose("t1", timeout=1.5)
        other.read_done(prod.address, "t1")
        time.sleep(0.5)
        assert not h.done()
        with pytest.raises(TransferTimeout):
            h.wait(5)
        assert prod.stats().get("reads_refused", 0) == 1


def _serve_regions(fake: FakeEngine, regions: Any, timeout: float = 10.0) -> None:
    ident = fake.handshake()
    fake.expect("mq", timeout)
    fake.s.send_multipart([ident, encode("mr", r=regions)])


@pytest.mark.timeout(60)
def test_many_memory_regions_fit_one_description():
    """A model with more than 64 layers registers more than 64 regions: their description must reach the
    reader (it was dropped by the header decoder's map limit), and describe what was registered."""
    from p2pkv._engine.regions import Regions, _Region

    class _Eng:
        _cuda = False

    regs = Regions(_Eng())  # type: ignore[arg-type]
    t = torch.empty((2, 16, 8, 128), dtype=torch.bfloat16)
    for i in range(200):
        regs._mine[f"model.layers.{i}.self_attn.kv_cache"] = _Region(t, bytes([i % 7]) * 64, 256 * i, 2**30)
    desc = regs.describe()
    msg = decode(encode("mr", r=desc), REPLY_TYPES)
    parsed = Regions.parse(msg["r"])
    assert len(parsed) == 200
    name, (h, off, size, dtype, shape, stride) = next(iter(parsed.items()))  # as registered
    assert name == "model.layers.0.self_attn.kv_cache" and h == bytes(64) and off == 0 and size == 2**30
    assert dtype == torch.bfloat16 and shape == (2, 16, 8, 128) and stride == (16384, 1024, 128, 1)
    # and over the wire, to a CPU reader: the description arrives and is refused for what it is
    with Engine(**CFG) as cons:
        fake = FakeEngine()
        try:
            th = threading.Thread(target=_serve_regions, args=(fake, desc))
            th.start()
            t0 = time.monotonic()
            with pytest.raises(TransportError):
                cons.remote_memory(fake.address, timeout=10)
            assert time.monotonic() - t0 < 5
            th.join(10)
        finally:
            fake.close()


@pytest.mark.timeout(60)
def test_forged_region_descriptions_are_refused():
    """Forged mr replies: handles out of range, views past their allocation, bad strides, garbage."""
    from p2pkv._engine.regions import Regions

    def one(name: Any = "r", off: Any = 0, size: Any = 4096, dt: Any = "bfloat16", sh: Any = (16, 128),
            st: Any = (128, 1), h: Any = bytes(64)) -> list:
        return [[name, h, off, size, dt, list(sh), list(st)]]

    assert len(Regions.parse(one())) == 1
    assert len(Regions.parse(one(st=(1, 1)))) == 1  # overlapping strides: a valid view to read from
    assert len(Regions.parse(one(sh=(0, 128), off=4096))) == 1  # empty: nothing to read
    for bad in (one(off=1), one(off=256), one(off=-2), one(off=2**64), one(off=True), one(size=-1),
                one(st=(256, 1)), one(st=(128,)), one(st=(-128, 1)), one(h=bytes(63)), one(h="x" * 64), one(h=None),
                one(name="r\x00"), one(name=5), one(dt="complex"), one(sh=(16, -1)),
                one() + one(),  # a name twice
                [one()[0][:6]], [[1, 2]], ["x"], [one()[0]] * 300, {"r": one()}, "x", None):
        with pytest.raises(ProtocolError):
            Regions.parse(bad)


@pytest.mark.timeout(60)
def test_unsolicited_region_description_is_ignored():
    """An mr nobody asked for must not be mapped or cached (each could map more peer memory here)."""
    with Engine(**CFG) as cons:
        fake = FakeEngine()
        try:
            th = threading.Thread(target=lambda: cons.connect(fake.address, timeout=5))
            th.start()
            ident = fake.handshake()
            th.join(10)
            fake.s.send_multipart([ident, encode("mr", r=[])])  # as if it had no memory to read
            time.sleep(0.3)
            got: dict[str, Any] = {}
            t = threading.Thread(target=lambda: got.setdefault("v", _try(lambda: cons.remote_memory(
                fake.address, timeout=5))))
            t.start()
            fake.expect("mq", timeout=5)  # asked for, not answered from the forged one
            fake.s.send_multipart([ident, encode("mr", no="not today")])
            t.join(10)
            assert isinstance(got["v"], TransportError)
        finally:
            fake.close()


def _try(f: Any) -> Any:
    try:
        return f()
    except P2pkvError as exc:
        return exc


# ----------------------------------------------------------------------------- API misuse
@pytest.mark.timeout(60)
def test_release_from_another_thread_while_waiting(shm_pair):
    prod, cons = shm_pair
    data = layers(5)
    for tid, fast in (("rel-fast", True), ("rel-wait", False)):
        h = cons.recv_request(tid, timeout=10)
        if fast:
            req = prod.send_request(cons.address, tid, data)
            req.send(*data[0])  # bound to the request, the rest never comes
        threading.Timer(0.5, h.release).start()
        t0 = time.monotonic()
        with pytest.raises(P2pkvError, match="release"):
            h.wait()
        assert time.monotonic() - t0 < 5
        assert h.state is RecvState.RELEASED
    prod.abort("rel-fast")
    settle(lambda: held(cons) == 0)


def test_send_many_of_a_non_iterable_is_a_typed_error(shm_pair):
    prod, cons = shm_pair
    req = prod.send_request(cons.address, "nm", layers(1, 2))
    for bad in (None, 5, object()):
        with pytest.raises(InvalidTensor):
            req.send_many(bad)
    lay = RequestLayout(layers(1, 2))
    req2 = prod.send_request(cons.address, "nm2", lay)
    with pytest.raises(InvalidTensor):
        req2.send_all(None)  # type: ignore[arg-type]
    prod.abort("nm")
    prod.abort("nm2")


def _ipc_holder(q: Any, done: Any) -> None:
    """Another process's CUDA allocation (1 MiB asked; the allocator's segment may be larger) and its
    IPC handle, kept alive until ``done``."""
    import cupy

    from p2pkv.transport import cudadrv

    dev = torch.device("cuda:0")
    cudadrv.use_device(dev)
    t = torch.zeros(MiB, dtype=torch.uint8, device=dev)
    base, size = cudadrv.address_range(t.data_ptr())
    q.put((bytes(cupy.cuda.runtime.ipcGetMemHandle(base)), size, t.data_ptr() - base))
    done.wait(120)


@pytest.mark.gpu
@pytest.mark.timeout(180)
def test_forged_region_size_past_the_allocation_is_refused():
    """A producer that claims its allocation is larger than it is would have the reader make views past
    the mapping (reading them faults and kills the reader's CUDA context): the driver's size decides."""
    ctx = process_context()
    q, done = ctx.Queue(), ctx.Event()
    p = ctx.Process(target=_ipc_holder, args=(q, done))
    p.start()
    try:
        handle, size, off = q.get(timeout=120)
        cfg = dict(timeout_s=30.0, peer_timeout_s=15.0, heartbeat_s=0.5, pool_bytes=64 * MiB, device="cuda:0")
        with Engine(**cfg) as cons:
            fake = FakeEngine()
            try:
                lie = [["r", handle, off, 4 * size, "uint8", [4 * size - off], [1]]]
                th = threading.Thread(target=_serve_regions, args=(fake, lie))
                th.start()
                with pytest.raises(ProtocolError, match="allocation"):
                    cons.remote_memory(fake.address, timeout=20)
                th.join(20)
                # the session stays: its next mq gets the truth
                honest = [["r", handle, off, size, "uint8", [MiB], [1]]]
                res: dict[str, Any] = {}
                t = threading.Thread(target=lambda: res.setdefault("v", _try(lambda: cons.remote_memory(
                    fake.address, timeout=20))))
                t.start()
                sender, _, _ = fake.expect("mq", timeout=20)
                fake.s.send_multipart([sender, encode("mr", r=honest)])
                t.join(30)
                views = res["v"]
                assert isinstance(views, dict), views
                assert views["r"].shape == (MiB,) and int(views["r"].sum()) == 0
            finally:
                fake.close()
    finally:
        done.set()
        p.join(30)


@pytest.mark.timeout(60)
def test_outs_that_do_not_match_the_request_fail_the_wait(shm_pair):
    """outs checked once the layout is known: a wrong shape or a name the request does not hold fails the
    handle, and wait() says so (it returned as if all was well, or raised torch's RuntimeError)."""
    prod, cons = shm_pair
    data = layers(6, 3)
    for i, (outs, err) in enumerate((({"layer0": torch.empty(3)}, ShapeMismatch),
                                      ({"nope": torch.empty(3)}, InvalidKey))):
        for early in (False, True):
            tid = f"outs{i}{early}"
            h = cons.recv_request(tid, outs=outs, timeout=5) if early else None
            send_all(prod, cons.address, tid, data).wait(5)
            h = h or cons.recv_request(tid, outs=outs, timeout=5)
            with pytest.raises(err):
                h.wait()
            assert h.state is RecvState.FAILED
            h.release()
            # the failed handle gave the request back (nothing delivered is lost): a retry gets it whole
            with cons.recv_request(tid, timeout=5) as again:
                got = again.wait().tensors()
                assert all(same_bits(got[n], t) for n, t in data)
    settle(lambda: held(cons) == 0)


@pytest.mark.timeout(60)
def test_producer_stops_using_a_withdrawn_path():
    """A consumer that withdraws its offer after the producer took it (fo/no, as the consumer now answers a
    late "fast ok") must not leave the producer writing headers nobody reads."""
    pool = 64 * MiB
    fd, tok = shm.create_memfd("p2pkv-arena", pool)
    chan = shm.ShmChannel.create()
    try:
        with Engine(**dict(CFG, peer_timeout_s=8.0)) as prod:  # the fake answers no pings
            fake = FakeEngine()
            try:
                th = threading.Thread(target=lambda: prod.send_request(fake.address, "x", [("a", torch.ones(4))]))
                th.start()
                ident, _, _ = fake.recv()
                fake.s.send_multipart([ident, encode(
                    "hok", eid="fake", align=256, window=pool // 2, maxmsg=2**31, pool=pool,
                    caps={"host": prod._host, "transports": ["tcp", "shm"], "cuda": False,
                          "shm": {"pid": os.getpid(), "fd": fd, "tok": tok, "size": pool}})])
                th.join(10)
                fake.expect("fq")
                fake.s.send_multipart([ident, encode("fo", chan=chan.locator(), lease=[0, 16 * MiB],
                                                     bell="p2pkv-bell-nobody")])
                _, ans, _ = fake.expect("fast")
                assert ans["ok"] is True
                settle(lambda: prod._fast_ready(fake.address) is not None)
                fake.s.send_multipart([ident, encode("fo", no="the fast-path offer was withdrawn")])
                settle(lambda: prod._fast_ready(fake.address) is None, timeout=1.5)  # not by losing the peer
                req = prod.send_request(fake.address, "y", [("a", torch.ones(4))])
                assert req._fast is None  # the ordinary path
                fake.expect("offer")
            finally:
                fake.close()
    finally:
        chan.close()
        os.close(fd)


@pytest.mark.timeout(60)
def test_abort_then_recv_request_never_takes_the_aborted_request(shm_pair):
    """abort() returns before the I/O thread drops the transfer's same-host requests: a recv_request made
    in between must not take (and return) the aborted data. Seen under load in test_fast's abort test; a
    slow I/O thread makes it certain here."""
    prod, cons = shm_pair
    plane = cons._fast
    orig = plane.forget

    def slow_forget(tid: str) -> None:
        time.sleep(0.5)
        orig(tid)

    plane.forget = slow_forget
    try:
        data = layers(8)
        for i, per_key in enumerate((False, True)):
            send_all(prod, cons.address, f"ab{i}", data).wait(5)
            cons.abort(f"ab{i}")
            take = (lambda i=i: cons.recv(TransferKey(f"ab{i}", "layer0"), timeout=2)) if per_key else \
                (lambda i=i: cons.recv_request(f"ab{i}", timeout=2).wait())
            with pytest.raises(TransferAborted):
                take()
    finally:
        plane.forget = orig
    settle(lambda: held(cons) == 0)
