"""Issue 18's latest surfaces attacked (send_all's one-launch path, the free ring read as a list,
cheaper send_request, mode 'read' loads launched inline): races with the fast path's close, partial
sends, and client-made block ids. CPU engines with ``transport="shm"`` run the same lease, channel
and flag objects as the CUDA IPC path."""

from __future__ import annotations

import threading
import time

import pytest

from p2pkv import InvalidTensor, P2pkvError, PeerLost
from p2pkv.synthetic import same_bits

from .test_fast import layers, send_all


@pytest.mark.timeout(60)
def test_send_racing_the_fast_paths_close_is_typed(shm_pair):
    """The fast path to a peer closes (the peer lost, its ring corrupt) on the I/O thread while a caller's
    send is between its 'still open?' check and its copy: the send fails with a typed error or completes
    into memory still mapped, never a raw TypeError from flags that are gone (nor a write into unmapped
    memory), and the producer goes on serving later requests the ordinary way."""
    prod, cons = shm_pair
    tx = prod._fast_ready(cons.address)
    assert tx is not None
    mover = tx.mover
    orig = mover.move

    def move_after_close(items, ready):
        t = threading.Thread(target=tx.close, args=(PeerLost("closed by the test", peer=tx.peer_addr),))
        t.start()
        t.join(0.5)  # the close runs now, unless the path holds it off until this copy is done
        return orig(items, ready)

    mover.move = move_after_close
    data = layers(3)
    req = prod.send_request(cons.address, "race-close", data)
    assert req._fast is tx
    try:
        req.send_many(data)
    except P2pkvError:
        pass  # typed: fine
    mover.move = orig
    end = time.monotonic() + 10
    while not tx.chan.closed:
        assert time.monotonic() < end, "the fast path never closed"
        time.sleep(0.01)
    with pytest.raises(P2pkvError):
        req.wait(10)  # its path closed under it: failed, never silently lost
    data = layers(4)
    send_all(prod, cons.address, "after-close", data).wait(10)
    with cons.recv_request("after-close") as h:
        got = h.wait(10)
        assert all(same_bits(got[n], t) for n, t in data)
    assert prod.stats().get("internal_errors", 0) == 0


@pytest.mark.timeout(90)
@pytest.mark.parametrize("call", ["send_all", "send_many"])
def test_send_all_after_one_send_sends_nothing(tcp_shm_pair, call):
    """send_all (and send_many) given a tensor already sent is refused whole, as documented ('nothing is
    sent when any of them is refused'): the ordinary path used to send the tensors before the one sent
    already, which could then never be sent again; the rest still goes once, by name."""
    from p2pkv import InvalidKey

    prod, cons = tcp_shm_pair
    data = layers(7)
    req = prod.send_request(cons.address, f"twice-{call}", data)
    req.send(*data[3])
    refused = (lambda: req.send_all([t for _, t in data])) if call == "send_all" else (lambda: req.send_many(data))
    with pytest.raises(InvalidKey, match="layer3"):
        refused()
    req.send_many([d for i, d in enumerate(data) if i != 3])  # none of these was sent by the refused call
    req.wait(10)
    with cons.recv_request(f"twice-{call}") as h:
        got = h.wait(10)
        assert all(same_bits(got[n], t) for n, t in data)


@pytest.mark.timeout(60)
def test_a_request_layout_cannot_be_changed_under_its_requests(shm_pair):
    """A RequestLayout is shared by its requests (its specs, name index and sizes, and its shared-memory form
    built once): changing it afterwards would make a producer copy one layout's sizes into another's room
    (past the request, into another one, or past the consumer's arena). It is read-only; a new layout is
    built instead, and requests of the old one go on unchanged."""
    import torch

    from p2pkv import RequestLayout
    from p2pkv.request import ItemSpec

    prod, cons = shm_pair
    data = layers(11)
    lay = RequestLayout(data)
    send_all(prod, cons.address, "lay-0", data).wait(10)
    cons.recv_request("lay-0").wait(10).release()
    req = prod.send_request(cons.address, "lay-1", lay)
    req.send_all([t for _, t in data])
    req.wait(10)
    cons.recv_request("lay-1").wait(10).release()
    big = ItemSpec("layer0", torch.bfloat16, (64, 2**20))
    attempts = [lambda: setattr(lay, "specs", [big]), lambda: lay.specs.__setitem__(0, big),
                lambda: lay.specs.append(big), lambda: lay.index.__setitem__("layer9", 0),
                lambda: setattr(lay, "index", {}), lambda: setattr(lay, "nbytes", 1),
                lambda: setattr(lay, "names", []), lambda: setattr(lay, "max_nbytes", 0),
                lambda: setattr(lay.specs[0], "nbytes", 2**30), lambda: setattr(lay.specs[0], "shape", (1,))]
    for change in attempts:
        with pytest.raises((AttributeError, TypeError)):
            change()
    assert [s.name for s in lay.specs] == [n for n, _ in data] and lay.nbytes == sum(t.nbytes for _, t in data)
    req = prod.send_request(cons.address, "lay-2", lay)
    req.send_all([t for _, t in data])
    req.wait(10)
    with cons.recv_request("lay-2") as h:
        got = h.wait(10)
        assert all(same_bits(got[n], t) for n, t in data)


@pytest.mark.timeout(90)
def test_free_ring_floods_past_the_short_read(shm_pair):
    """The free ring read as a list (one entry at a time up to 8, numpy past that): a hostile consumer's
    flood of garbage entries (huge values, duplicates, ranges that were never handed out, the real one
    among them) is read either way without a crash or a range handed out twice, and room handed back
    honestly is still taken back."""
    from p2pkv.transport import shm

    prod, cons = shm_pair
    tx = prod._fast_ready(cons.address)
    rx = next(iter(cons._fast.rx.values()))
    for burst in (3, 8, 9, 40, shm.NFREE - 8):
        tid = f"flood-{burst}"
        data = layers(burst)
        req = send_all(prod, cons.address, tid, data)
        req.wait(10)
        room = req.offs[0] - tx.lease_off
        assert room in tx._out
        h = cons.recv_request(tid)
        assert all(same_bits(h.wait(10)[n], t) for n, t in data)
        for k in range(burst):
            rx.chan.put_free((2**64 - 1 - k) if k % 3 == 0 else tx.lease_off + 4096 * k, 2**63 + k, k, 2**40)
        h.release()  # the honest entry, after the garbage
        nxt = send_all(prod, cons.address, f"{tid}-next", layers(0, 1))  # its start takes the room back
        nxt.wait(10)
        cons.recv_request(f"{tid}-next").wait(10).release()
        assert room not in tx._out or nxt.offs[0] - tx.lease_off == room, "room handed back was never taken back"
        assert prod._fast_ready(cons.address) is tx and not tx.closed
    assert tx.bad_frees >= 3 + 8 + 9 + 40
    assert prod.stats().get("internal_errors", 0) == 0


@pytest.mark.timeout(60)
def test_a_lost_producer_is_not_unmapped_under_a_read_being_queued():
    """Mode 'read' queues copies from a producer's mapped memory on vLLM's thread (inline) or a loader
    thread, while the I/O thread may declare that producer lost and unmap its memory: a copy queued after
    the unmapping reads unmapped memory (an illegal address: the decode's CUDA context dies). The engine
    now unmaps only outside ``reading_memory`` blocks, after the copies queued inside them (its
    synchronize), and a block entered later sees no views. The mapping here is a stand-in recording when it
    is closed (a CPU engine maps nothing); the engine, its Regions and its locking are the real ones."""
    from types import SimpleNamespace

    from p2pkv import Engine

    order: list[str] = []

    class Mapping:
        def close(self) -> None:
            order.append("unmapped")

    eng = Engine(timeout_s=5.0, peer_timeout_s=1.5, heartbeat_s=0.2)
    try:
        reg = eng._regions
        peer = "127.0.0.1:1"
        for closing in ("peer_lost", "engine_close"):
            order.clear()
            reg._maps[peer] = {b"h": Mapping()}
            reg._remote[peer] = {"layer0": object()}
            inside = threading.Event()

            def reader(inside: threading.Event = inside) -> None:
                with eng.reading_memory(peer) as views:
                    assert views is not None
                    inside.set()
                    time.sleep(0.5)  # queuing copies from the views
                    order.append("queued")

            t = threading.Thread(target=reader)
            t.start()
            assert inside.wait(10)
            if closing == "peer_lost":
                reg.peer_lost(SimpleNamespace(addr=peer), PeerLost("lost", peer=peer))
            else:
                eng.close()
            t.join(10)
            assert order == ["queued", "unmapped"], order
            with eng.reading_memory(peer) as views:
                assert views is None  # a later read sees the producer unmapped
            assert eng.mapped_memory(peer) is None
    finally:
        eng.close()


def _read_reply(ids):
    """What a mode 'read' prefill instance returns (P2pkvConnector.request_finished's params), with
    ``remote_block_ids`` replaced by ``ids``."""
    return {"transfer_id": "spoofed", "do_remote_prefill": True, "do_remote_decode": False,
            "remote_host": "10.0.0.9", "remote_port": 14500, "remote_tp_size": 1, "remote_block_size": 16,
            "decode_tp_size": 1, "mode": "read", "remote_block_ids": ids}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("ids, ok", [
    ([[5, 9, 1]], True), ([[5, 9, 1], [0, 2]], True), ([[]], True),
    ([[5, True, 1]], False), ([[5, -1]], False), ([[5, 2.0]], False), ([["5"]], False), ([5, 9], False),
    ([[2**64]], False), ("5,9", False), ([[0] * 40000] * 30, False),
])
def test_the_proxy_passes_a_read_prefills_block_ids_and_refuses_malformed_ones(ids, ok):
    """Mode 'read' through p2pkv's own proxy: the decode request's kv_transfer_params are built from the
    prefill's reply (not from the client), so the producer's mode and block ids must pass through it; the
    proxy refused mode 'read' with a 502 and dropped remote_block_ids, so no read load could ever be
    scheduled behind it. Malformed block ids (or more than the connector takes) are a 502 naming them,
    and a client's own remote_block_ids never reach the decode instance."""
    pytest.importorskip("aiohttp")
    from aiohttp import web

    from .test_proxy_hardening import COMPLETION, Env, post, run

    def reply(body):
        return web.json_response({"choices": [{"text": "P"}], "kv_transfer_params": _read_reply(ids)})

    async def scenario():
        env = await Env().start(reply=reply)
        import aiohttp

        async with aiohttp.ClientSession() as s:
            body = dict(COMPLETION, kv_transfer_params={"remote_block_ids": [[1, 2, 3]], "mode": "read"})
            st, js = await post(s, env.url + "/v1/completions", json=body)
        await env.close()
        dec = [b for n, _, b, *_ in env.seen if n == "D"]
        if ok:
            assert st == 200, js
            p = dec[0]["kv_transfer_params"]
            assert p["mode"] == "read" and p["remote_block_ids"] == ids and p["remote_block_size"] == 16
            assert p["transfer_id"] != "spoofed" and p["do_remote_prefill"] is True
        else:
            assert st == 502, (st, js)
            assert "remote_block_ids" in js["error"]["message"]
            assert not dec

    run(scenario)


@pytest.mark.gpu
@pytest.mark.timeout(180)
def test_send_all_on_a_gpu_odd_tensors_and_a_racing_close():
    """send_all's one-launch CUDA path given a non-contiguous view, a tensor that requires grad, a 0-dim
    tensor and the same tensor twice: every one lands bit-exact. Then the path closes (on another thread)
    while a send_all is between its 'still open?' check and its launch: the close waits for the launch to
    be queued before it unregisters the flags and unmaps (a launch after that is an illegal address that
    kills the context), the request fails typed, and later requests still land."""
    import torch

    from p2pkv import Engine, RequestLayout

    base = dict(timeout_s=30.0, peer_timeout_s=3.0, heartbeat_s=0.25, pool_bytes=256 * 2**20, device="cuda:0")
    with Engine(**base) as prod, Engine(**base) as cons:
        dev = prod.device
        req = prod.send_request(cons.address, "warm", [("w", torch.zeros(64, device=dev))])
        req.send("w", torch.zeros(64, device=dev))
        req.wait(20)
        cons.recv_request("warm").wait(20).release()
        end = time.monotonic() + 20
        while prod._fast_ready(cons.address) is None:
            assert time.monotonic() < end, "no fast path"
            time.sleep(0.02)
        tx = prod._fast_ready(cons.address)
        lay = RequestLayout([("view", torch.float32, (64, 32)), ("grad", torch.float32, (100,)),
                             ("scalar", torch.float64, ()), ("a", torch.bfloat16, (256,)),
                             ("b", torch.bfloat16, (256,))])
        wide = torch.randn(32, 64, device=dev)
        same = torch.randn(256, device=dev).to(torch.bfloat16)
        data = [wide.t(), torch.randn(100, device=dev, requires_grad=True), torch.tensor(3.5, dtype=torch.float64,
                                                                                          device=dev), same, same]
        req = prod.send_request(cons.address, "odd", lay)
        with pytest.raises(InvalidTensor, match="contiguous"):  # refused whole, nothing sent
            req.send_all(data)
        data[0] = data[0].contiguous()
        req.send_all(data)
        req.wait(30)
        with cons.recv_request("odd") as h:
            h.wait(30)
            torch.cuda.current_stream(cons.device).synchronize()
            for spec, t in zip(lay.specs, data, strict=True):
                assert same_bits(h.tensor(spec.name), t.detach().contiguous()), spec.name

        mover = tx.mover
        orig = mover.move_all

        def move_all_after_close(r, tensors, ptrs):
            t = threading.Thread(target=tx.close, args=(PeerLost("closed by the test", peer=tx.peer_addr),))
            t.start()
            t.join(0.5)  # the close runs now, unless the path holds it off until this launch is queued
            return orig(r, tensors, ptrs)

        mover.move_all = move_all_after_close
        req = prod.send_request(cons.address, "race", lay)
        assert req._fast is tx
        try:
            req.send_all(data)
        except P2pkvError:
            pass
        mover.move_all = orig
        with pytest.raises(P2pkvError):
            req.wait(30)
        torch.cuda.synchronize()  # an illegal address in the launch would raise here
        req = prod.send_request(cons.address, "after", lay)
        req.send_all(data)
        req.wait(30)
        with cons.recv_request("after") as h:
            h.wait(30)
            torch.cuda.current_stream(cons.device).synchronize()
            assert same_bits(h.tensor("a"), same)
