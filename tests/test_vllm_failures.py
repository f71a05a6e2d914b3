"""P2pkvConnector's failure handling and policies (vLLM objects faked; real sockets)."""

import logging
import socket
import time

import pytest
import torch

from p2pkv import new_transfer_id

from . import vllm_fakes as F
from . import vllm_hetero as H
from .conftest import process_context

FAST = dict(timeout_s=10.0, peer_timeout_s=2.0, heartbeat_s=0.2, pool_bytes=16 * 2**20)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def consumer():
    made = []

    def make(mode="pull", geo=None, **extra):
        inst = H.make_instance("kv_consumer", geo or H.Geo(), dict(FAST, mode=mode, port=_free_port(), **extra))
        made.append(inst)
        return inst

    yield make
    for _, workers, _ in made:
        for w in workers:
            w.shutdown()


def _producer_params(tid, port, **over):
    p = {"transfer_id": tid, "do_remote_prefill": True, "remote_host": "127.0.0.1", "remote_port": port,
         "remote_tp_size": 1, "remote_block_size": 16, "decode_tp_size": 1, "mode": "pull"}
    p.update(over)
    return p


def test_one_transfer_per_request_retry_computes_locally(consumer):
    sched, _, _ = consumer()
    req = F.Request("cmpl-r-1", list(range(40)), _producer_params(new_transfer_id(), 1))
    assert sched.get_num_new_matched_tokens(req, 0) == (40, True)
    sched.update_state_after_alloc(req, F.KVCacheBlocks([1, 2, 3]), 40)
    assert len(sched.build_connector_meta(F.SchedulerOutput()).loads) == 1
    # vLLM asks again when computed tokens drop to 0 (recompute policy after a failure, preemption)
    for _ in range(3):
        assert sched.get_num_new_matched_tokens(req, 0) == (0, False)
        sched.update_state_after_alloc(req, F.KVCacheBlocks([1, 2, 3]), 0)
    assert sched.build_connector_meta(F.SchedulerOutput()).loads == []


@pytest.mark.timeout(60)
def test_gone_producer_fails_the_pull_at_once_per_request(consumer):
    inst = consumer("pull", load_timeout_s=30.0)
    dead = _free_port()  # nothing listens there
    t0 = time.monotonic()
    _, results = H.load(inst, "cmpl-g-1", _producer_params(new_transfer_id(), dead), 40, [1, 2, 3])
    assert time.monotonic() - t0 < 5, "a refused connection must fail the load now, not at load_timeout_s"
    assert results[0].failed_recving == {"cmpl-g-1"} and "cmpl-g-1" in results[0].finished_recving
    # vLLM 0.33's base class: failed block ids no later than the pass that reports the request finished
    assert inst[1][0].get_block_ids_with_load_errors() == {1, 2, 3}
    assert inst[1][0].get_block_ids_with_load_errors() == set()  # handed over once


@pytest.mark.timeout(60)
def test_gone_producer_fails_a_push_load_quickly(consumer):
    inst = consumer("push", load_timeout_s=30.0)
    dead = _free_port()
    t0 = time.monotonic()
    _, results = H.load(inst, "cmpl-g-2", _producer_params(new_transfer_id(), dead, mode="push"), 40, [1, 2, 3])
    assert time.monotonic() - t0 < 5
    assert results[0].failed_recving == {"cmpl-g-2"}


@pytest.mark.timeout(60)
def test_old_interface_reports_block_ids(consumer):
    sched, workers, _ = consumer("pull")
    req = F.Request("cmpl-o-1", list(range(40)), _producer_params(new_transfer_id(), _free_port()))
    sched.get_num_new_matched_tokens(req, 0)
    sched.update_state_after_alloc(req, F.KVCacheBlocks([4, 5, 6]), 40)
    workers[0].bind_connector_metadata(sched.build_connector_meta(F.SchedulerOutput()))
    workers[0].start_load_kv(None)
    deadline = time.monotonic() + 10
    while not (workers[0].get_finished(set())[1] or set()) >= {"cmpl-o-1"}:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert workers[0].get_block_ids_with_load_errors() == {4, 5, 6}


@pytest.mark.timeout(60)
def test_fingerprint_mismatch_is_refused_naming_both_values(consumer, caplog):
    inst = consumer("pull")
    fp = inst[0].fingerprint.to_dict()
    fp.update(head_size=fp["head_size"] * 2, dtype="float16")
    caplog.set_level(logging.WARNING, logger="p2pkv.vllm")
    _, results = H.load(inst, "cmpl-f-1", _producer_params(new_transfer_id(), _free_port(), p2pkv_fingerprint=fp),
                        40, [1, 2, 3])
    assert results[0].failed_recving == {"cmpl-f-1"}
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "head_size: producer 16 vs consumer 8" in msg and "dtype: producer 'float16' vs consumer 'bfloat16'" in msg


@pytest.mark.timeout(60)
def test_decode_tp_the_producer_did_not_prepare_for_is_refused(consumer, caplog):
    inst = consumer("pull", geo=H.Geo(tp=2))
    caplog.set_level(logging.WARNING, logger="p2pkv.vllm")
    _, results = H.load(inst, "cmpl-t-1", _producer_params(new_transfer_id(), _free_port()), 40, [1, 2, 3])
    assert all(r.failed_recving == {"cmpl-t-1"} for r in results)
    assert "decode TP size 1" in caplog.text


@pytest.mark.timeout(60)
def test_reused_transfer_id_fails_loudly(consumer, caplog):
    inst = consumer("pull")
    sched = inst[0]
    tid = new_transfer_id()
    req, _ = H.load(inst, "cmpl-u-1", _producer_params(tid, _free_port()), 40, [1, 2, 3])
    req.status = "FINISHED_STOPPED"
    sched.request_finished(req, ([1, 2, 3],))
    caplog.set_level(logging.WARNING, logger="p2pkv.vllm")
    _, results = H.load(inst, "cmpl-u-2", _producer_params(tid, _free_port()), 40, [4, 5, 6])
    assert results[0].failed_recving == {"cmpl-u-2"}
    assert "already loaded by another request" in caplog.text


def test_producer_refuses_a_reused_transfer_id(caplog):
    sched, workers, _ = H.make_instance("kv_producer", H.Geo(), dict(FAST, mode="pull", port=_free_port()))
    try:
        tid = new_transfer_id()
        params = {"transfer_id": tid, "do_remote_decode": True}
        a, b = F.Request("cmpl-a", list(range(20)), params), F.Request("cmpl-b", list(range(20)), params)
        for r in (a, b):
            sched.get_num_new_matched_tokens(r, 0)
            sched.update_state_after_alloc(r, F.KVCacheBlocks([1, 2]), 0)
        so = F.SchedulerOutput(num_scheduled_tokens={"cmpl-a": 20, "cmpl-b": 20})
        so.scheduled_new_reqs += [F.NewRequestData("cmpl-a", a.prompt_token_ids, ([1, 2],), 0),
                                  F.NewRequestData("cmpl-b", b.prompt_token_ids, ([3, 4],), 0)]
        meta = sched.build_connector_meta(so)
        assert [s.req_id for s in meta.saves] == ["cmpl-a"]
        assert "reuses transfer id" in caplog.text
        assert sched.request_finished(b, ([3, 4],)) == (False, None)
    finally:
        workers[0].shutdown()


@pytest.mark.parametrize("status,aborts", [("FINISHED_ERROR", True), ("FINISHED_ABORTED", True),
                                           ("FINISHED_STOPPED", False), ("FINISHED_LENGTH_CAPPED", False)])
def test_decode_request_ending_in_error_tells_the_producer(consumer, status, aborts):
    sched, _, _ = consumer()
    tid = new_transfer_id()
    req = F.Request("cmpl-e-1", list(range(40)), _producer_params(tid, 1))
    sched.get_num_new_matched_tokens(req, 0)
    sched.update_state_after_alloc(req, F.KVCacheBlocks([1, 2, 3]), 40)
    sched.build_connector_meta(F.SchedulerOutput())
    req.status = status
    assert sched.request_finished(req, ([1, 2, 3],)) == (False, None)
    assert sched.build_connector_meta(F.SchedulerOutput()).aborts == ([tid] if aborts else [])


@pytest.mark.timeout(120)
def test_many_loads_share_a_few_loader_threads(consumer):
    inst = consumer("pull", loader_threads=2)
    sched, workers, _ = inst
    dead = _free_port()
    rids = [f"cmpl-m-{i}" for i in range(30)]
    for i, rid in enumerate(rids):
        req = F.Request(rid, list(range(16)), _producer_params(new_transfer_id(), dead))
        sched.get_num_new_matched_tokens(req, 0)
        sched.update_state_after_alloc(req, F.KVCacheBlocks([i]), 16)
    workers[0].bind_connector_metadata(sched.build_connector_meta(F.SchedulerOutput()))
    before = sum(1 for _ in __import__("threading").enumerate())
    workers[0].start_load_kv(None)
    assert workers[0].loader_thread_count <= 2
    failed = set()
    deadline = time.monotonic() + 60
    while failed != set(rids):
        failed |= workers[0].get_transfer_results(set()).failed_recving
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert sum(1 for _ in __import__("threading").enumerate()) <= before + 2


@pytest.mark.timeout(120)
def test_stats_reach_vllms_channel():
    from p2pkv.adapters.vllm import P2pkvConnector


    cons = H.make_instance("kv_consumer", H.Geo(), dict(FAST, mode="pull", port=_free_port()))
    ctx = process_context()
    parent, child = ctx.Pipe()
    tid = new_transfer_id()
    p = ctx.Process(target=H.run_producer, args=(child, H.Geo(), dict(FAST, mode="pull", port=_free_port()),
                                                 "cmpl-s-p", tid, 40, [7, 8, 9], 1, 1), daemon=True)
    p.start()
    try:
        assert parent.poll(60)
        _, params = parent.recv()
        H.load(cons, "cmpl-s-d", params, 40, [1, 2, 3])
        st = cons[1][0].get_kv_connector_stats()
        assert st is not None and st.data["transfers_loaded"] == 1 and st.data["bytes_received"] > 0
        assert cons[1][0].get_kv_connector_stats() is None  # per interval
        rebuilt = P2pkvConnector.build_kv_connector_stats(st.to_dict())
        agg = rebuilt.aggregate(P2pkvConnector.build_kv_connector_stats(st.to_dict()))
        red = agg.reduce()
        assert red["transfers_loaded"] == 2 and red["load_p50_ms"] > 0 and red["load_failures"] == 0
        parent.recv()
        parent.send("bye")
        p.join(20)
    finally:
        cons[1][0].shutdown()
        if p.is_alive():
            p.kill()


class _DoneHandle:
    error = None

    def done(self) -> bool:
        return True


def _bound_producer(mode):
    sched, workers, caches = H.make_instance("kv_producer", H.Geo(nb=64), dict(FAST, mode=mode, port=_free_port()))
    params = {"transfer_id": new_transfer_id(), "do_remote_decode": True, "remote_host": "127.0.0.1",
              "remote_port": 1}
    req = F.Request("cmpl-b-1", list(range(64)), params)
    sched.get_num_new_matched_tokens(req, 0)
    sched.update_state_after_alloc(req, F.KVCacheBlocks([1, 2, 3, 4]), 0)
    so = F.SchedulerOutput(num_scheduled_tokens={"cmpl-b-1": 64})
    so.scheduled_new_reqs.append(F.NewRequestData("cmpl-b-1", req.prompt_token_ids, ([1, 2, 3, 4],), 0))
    return sched.build_connector_meta(so), workers[0], caches[0]


def _median_us(xs):
    return sorted(xs)[len(xs) // 2] * 1e6


def test_save_path_host_time_is_small():
    """Micro-benchmark on CPU of the forward thread's cost: the connector's own work beside pack itself
    (the engine's send/publish are stubbed: they are the engine's cost, measured by its own bench)."""
    from p2pkv.kernels import BlockIds, pack, pack_layers

    meta, w, caches = _bound_producer("push")
    try:
        w.engine.send = lambda peer, key, t, **kw: _DoneHandle()
        w.engine.send_request = lambda peer, tid, layout, **kw: None  # per-tensor sends (stubbed above)
        w.bind_connector_metadata(meta)
        name = H.LAYERS4[0]
        cache = w._caches[name]
        ids = BlockIds([1, 2, 3, 4], cache.shape[0])
        packs, saves = [], []
        for _ in range(300):  # interleaved, medians: the machine is shared
            t0 = time.perf_counter()
            pack(cache, ids)
            t1 = time.perf_counter()
            w.save_kv_layer(name, caches[name], None)
            t2 = time.perf_counter()
            packs.append(t1 - t0)
            saves.append(t2 - t1)
        pack_us, save_us = _median_us(packs), _median_us(saves)
        assert not w._save_plans[0].state.failed  # the hand-off really ran every time
        w.wait_for_save()
    finally:
        w.shutdown()
    meta, w, caches = _bound_producer("pull")
    try:
        w.engine.publish = lambda key, t, **kw: None
        w._publisher.submit(lambda: None)  # its thread is started
        layers = list(w._caches.values())
        packl, binds, waits = [], [], []
        for _ in range(100):
            t0 = time.perf_counter()
            pack_layers(layers, ids)
            t1 = time.perf_counter()
            w.bind_connector_metadata(meta)
            for n in H.LAYERS4:
                w.save_kv_layer(n, caches[n], None)
            t2 = time.perf_counter()
            w.wait_for_save()
            t3 = time.perf_counter()
            packl.append(t1 - t0)
            binds.append(t2 - t1)
            waits.append(t3 - t2)
            w.get_finished({"cmpl-b-1"})
    finally:
        w.shutdown()
    print(f"\npush: save_kv_layer median {save_us:.1f} us per layer (pack alone {pack_us:.1f} us; connector "
          f"{save_us - pack_us:.1f} us)\npull ({len(layers)} layers): bind + save_kv_layer x{len(layers)} "
          f"{_median_us(binds):.1f} us, wait_for_save {_median_us(waits):.1f} us "
          f"(pack_layers alone {_median_us(packl):.1f} us)")
    assert save_us - pack_us < 100, (save_us, pack_us)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["pull", "push"])
def test_kv_expired_at_the_producer_or_consumer_fails_loudly_not_stale(mode):
    """A decode request that comes after the KV's ttl_s (producer's copy or received data evicted)
    fails its load at once with TransferEvicted; it never gets stale or foreign KV."""

    extra = dict(FAST, ttl_s=1.0, load_timeout_s=20.0)
    cons = H.make_instance("kv_consumer", H.Geo(), dict(extra, mode=mode, port=_free_port()))
    ctx = process_context()
    parent, child = ctx.Pipe()
    p = ctx.Process(target=H.run_producer, args=(child, H.Geo(), dict(extra, mode=mode, port=_free_port()),
                                                 "cmpl-x-p", new_transfer_id(), 40, [7, 8, 9], cons[1][0].engine.port
                                                 if mode == "push" else 1, 1), daemon=True)
    p.start()
    try:
        assert parent.poll(60)
        _, params = parent.recv()
        assert parent.poll(30) and parent.recv()[0] == "sent"
        time.sleep(2.5)  # past ttl_s: the copy waiting for this decode request is gone
        t0 = time.monotonic()
        _, results = H.load(cons, "cmpl-x-d", params, 40, [1, 2, 3])
        assert results[0].failed_recving == {"cmpl-x-d"}
        assert time.monotonic() - t0 < 10
        assert not cons[2][0][H.LAYERS4[0]][:, 1:4].reshape(-1).view(torch.int16).any(), "blocks were written"
        parent.send("bye")
        p.join(20)
    finally:
        cons[1][0].shutdown()
        if p.is_alive():
            p.kill()


def test_producer_preempted_before_its_hand_off_uses_the_reallocated_blocks():
    """requires_kv_delivery is on for producers (vLLM recomputes a request preempted with a pending
    hand-off); a resumed request's blocks replace the freed ones instead of being appended to them."""
    sched, workers, _ = H.make_instance("kv_producer", H.Geo(), dict(FAST, mode="pull", port=_free_port()))
    try:
        assert sched.requires_kv_delivery is True
        tid = new_transfer_id()
        req = F.Request("cmpl-pre-1", list(range(64)), {"transfer_id": tid, "do_remote_decode": True})
        sched.get_num_new_matched_tokens(req, 0)
        sched.update_state_after_alloc(req, F.KVCacheBlocks([1, 2]), 0)
        so = F.SchedulerOutput(num_scheduled_tokens={"cmpl-pre-1": 32})  # first chunk only
        so.scheduled_new_reqs.append(F.NewRequestData("cmpl-pre-1", req.prompt_token_ids, ([1, 2],), 0))
        assert sched.build_connector_meta(so).saves == []
        # preempted (blocks 1, 2 freed), then resumed from scratch with new blocks, whole prompt in one step
        cached = F.CachedRequestData(["cmpl-pre-1"], [([9, 10, 11, 12],)], [0])
        cached.resumed_req_ids = {"cmpl-pre-1"}
        meta = sched.build_connector_meta(F.SchedulerOutput(scheduled_cached_reqs=cached,
                                                            num_scheduled_tokens={"cmpl-pre-1": 64}))
        assert [s.block_ids for s in meta.saves] == [[[9, 10, 11, 12]]]
    finally:
        workers[0].shutdown()


def test_n_siblings_asked_in_the_same_step_load_once(consumer):
    sched, _, _ = consumer()
    params = _producer_params(new_transfer_id(), 1)
    a, b = F.Request("0_cmpl-s-1", list(range(40)), params), F.Request("1_cmpl-s-1", list(range(40)), params)
    assert sched.get_num_new_matched_tokens(a, 0) == (40, True)
    assert sched.get_num_new_matched_tokens(b, 0) == (0, False)  # before a's blocks are even allocated
    sched.update_state_after_alloc(a, F.KVCacheBlocks([1, 2, 3]), 40)
    sched.update_state_after_alloc(b, F.KVCacheBlocks([4, 5, 6]), 0)
    loads = sched.build_connector_meta(F.SchedulerOutput()).loads
    assert [(ld.req_id, ld.refuse) for ld in loads] == [("0_cmpl-s-1", None)]


@pytest.mark.timeout(120)
def test_producer_killed_after_prefill_fails_the_pull_at_once():
    """The producer process dies after handing off (pull mode: its copy dies with it): the decode
    side's load fails within seconds, not at load_timeout_s."""

    cons = H.make_instance("kv_consumer", H.Geo(), dict(FAST, mode="pull", port=_free_port(), load_timeout_s=60.0))
    ctx = process_context()
    parent, child = ctx.Pipe()
    p = ctx.Process(target=H.run_producer, args=(child, H.Geo(), dict(FAST, mode="pull", port=_free_port()),
                                                 "cmpl-k-p", new_transfer_id(), 40, [7, 8, 9], 1, 1), daemon=True)
    p.start()
    try:
        assert parent.poll(60)
        _, params = parent.recv()
        assert parent.poll(30) and parent.recv()[0] == "sent"
        p.kill()
        p.join(10)
        t0 = time.monotonic()
        _, results = H.load(cons, "cmpl-k-d", params, 40, [1, 2, 3])
        assert results[0].failed_recving == {"cmpl-k-d"}
        assert time.monotonic() - t0 < 10
    finally:
        cons[1][0].shutdown()
        if p.is_alive():
            p.kill()


# ----------------------------------------------------------------------------- releases, NIXL-style routers
def _prefill_here(prod, req_id, params, ntok, blocks, geo=None):
    """Run one prefill request through an in-process producer instance; returns the decode request's params
    (as a router receives them: JSON) once the hand-off is done."""
    import json

    geo = geo or H.Geo()
    sched, workers, caches = prod
    req = F.Request(req_id, list(range(ntok)), params)
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)
    sched.update_state_after_alloc(req, F.KVCacheBlocks(blocks), 0)
    so = F.SchedulerOutput(num_scheduled_tokens={req_id: ntok})
    so.scheduled_new_reqs.append(F.NewRequestData(req_id, req.prompt_token_ids, (list(blocks),), 0))
    meta = sched.build_connector_meta(so)
    assert len(meta.saves) == 1
    for rank, (w, c) in enumerate(zip(workers, caches, strict=True)):
        H.fill(geo, rank, c, blocks, ntok)
        w.bind_connector_metadata(meta)
        for name in H.LAYERS4:
            w.save_kv_layer(name, c[name], None)
        w.wait_for_save()
        w.clear_connector_metadata()
    req.status = "FINISHED_LENGTH_CAPPED"
    delay, out = sched.request_finished(req, (list(blocks),))
    assert delay is True
    deadline = time.monotonic() + 30
    for w in workers:
        while req_id not in (w.get_finished({req_id})[0] or set()):
            assert time.monotonic() < deadline, "hand-off never finished"
            time.sleep(0.01)
    return json.loads(json.dumps(out))


def _held(prod) -> int:
    return prod[1][0].engine.stats()["outbox"]["held"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["never-asked", "asked-no-blocks", "all-cached-here", "refused"])
def test_decode_request_that_never_loads_frees_the_producers_copy(consumer, how):
    """A decode request cancelled before it was ever scheduled (or whose whole prompt was cached on the
    decode side, or whose load was refused: an incompatible fingerprint) tells the producer to free its
    parked KV now, not at ttl_s (as NixlConnector does)."""
    prod = H.make_instance("kv_producer", H.Geo(), dict(FAST, mode="pull", port=_free_port(), ttl_s=300.0))
    try:
        sched, workers, _ = consumer("pull")
        params = _prefill_here(prod, "cmpl-rel-p", {"do_remote_decode": True}, 40, [7, 8, 9])
        assert _held(prod) == len(H.LAYERS4)
        req = F.Request("cmpl-rel-d", list(range(40)), params)
        if how == "asked-no-blocks":  # vLLM looked at it, found no room, then the client went away
            assert sched.get_num_new_matched_tokens(req, 0) == (40, True)
        elif how == "all-cached-here":
            assert sched.get_num_new_matched_tokens(req, 40) == (0, False)
            sched.update_state_after_alloc(req, F.KVCacheBlocks([1, 2, 3]), 0)
        elif how == "refused":
            params["p2pkv_fingerprint"]["head_size"] *= 2
            req, results = H.load((sched, workers, None), "cmpl-rel-d", params, 40, [1, 2, 3])
            assert results[0].failed_recving == {"cmpl-rel-d"}
        req.status = {"all-cached-here": "FINISHED_STOPPED", "refused": "FINISHED_ERROR"}.get(how, "FINISHED_ABORTED")
        assert sched.request_finished(req, ([],)) == (False, None)
        meta = sched.build_connector_meta(F.SchedulerOutput())
        assert [r.transfer_id for r in meta.releases] == [params["transfer_id"]] and not meta.loads
        workers[0].bind_connector_metadata(meta)
        workers[0].start_load_kv(None)
        workers[0].clear_connector_metadata()
        deadline = time.monotonic() + 20
        while _held(prod):
            assert time.monotonic() < deadline, "the producer still holds the transfer"
            time.sleep(0.02)
        # the transfer id is spent: a request that comes with it later is refused, loudly
        _, results = H.load((sched, workers, None), "cmpl-rel-d2", params, 40, [4, 5, 6])
        assert results[0].failed_recving == {"cmpl-rel-d2"}
    finally:
        prod[1][0].shutdown()


def test_a_loading_sibling_is_not_released(consumer):
    sched, _, _ = consumer()
    params = _producer_params(new_transfer_id(), 1)
    a, b = F.Request("0_cmpl-sr-1", list(range(40)), params), F.Request("1_cmpl-sr-1", list(range(40)), params)
    sched.get_num_new_matched_tokens(a, 0)
    sched.get_num_new_matched_tokens(b, 0)
    b.status = "FINISHED_ABORTED"
    sched.request_finished(b, ([],))  # the sibling goes; the one that loads stays
    assert sched.build_connector_meta(F.SchedulerOutput()).releases == []


@pytest.mark.timeout(120)
@pytest.mark.parametrize("prod_mode", ["pull", "push"])
def test_nixl_style_router_producer_allocates_the_transfer_id(caplog, prod_mode):
    """A router written for NixlConnector sends the prefill request {"do_remote_decode": true, "remote_host":
    null, ...} (no transfer id, no decode address) and copies the prefill response's kv_transfer_params into
    the decode request verbatim: the producer names the transfer itself and returns everything the decode
    side needs (a push-mode producer hands such a request off in pull mode, warning once)."""
    caplog.set_level(logging.WARNING, logger="p2pkv.vllm")
    geo = H.Geo()
    prod = H.make_instance("kv_both", geo, dict(FAST, mode=prod_mode, port=_free_port()))
    cons = H.make_instance("kv_both", geo, dict(FAST, mode="pull", port=_free_port()))
    nixl = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
            "remote_block_ids": None, "remote_host": None, "remote_port": None}
    try:
        tids = set()
        for i in range(2):
            rid = f"cmpl-{i}wxyz-0123"  # a router sends the same X-Request-Id to both instances
            params = _prefill_here(prod, rid, dict(nixl), 40, [7, 8, 9])
            tid = params["transfer_id"]
            # allocated, not derived from the request id (a transfer id is hex: "wxyz" can only come from rid)
            assert tid.startswith("xfer-") and "wxyz" not in tid and tid not in tids
            tids.add(tid)
            assert params["do_remote_prefill"] is True and params["mode"] == "pull"
            assert params["remote_port"] == prod[1][0].engine.port
            _, results = H.load(cons, rid, params, 40, [20, 21, 22])
            assert not results[0].failed_recving
            H.check(geo, 0, cons[2][0], [20, 21, 22], 40)
        warned = [r for r in caplog.records if "without the decode engine's address" in r.getMessage()]
        assert len(warned) == (1 if prod_mode == "push" else 0)  # once per cause, not per request
    finally:
        prod[1][0].shutdown()
        cons[1][0].shutdown()


def test_producer_with_no_way_to_hand_off_says_so(caplog):
    """Push mode, no decode address in the request and no fixed port to be pulled from: an error once per
    cause, no hand-off; a pull-mode producer without a fixed port is refused at start."""
    from p2pkv import ConfigError

    with pytest.raises(ConfigError, match="needs a fixed port"):
        H.make_instance("kv_producer", H.Geo(), dict(FAST, mode="pull"))
    sched, workers, _ = H.make_instance("kv_producer", H.Geo(), dict(FAST, mode="push"))
    try:
        for i in range(3):
            rid = f"cmpl-np-{i}"
            req = F.Request(rid, list(range(20)), {"do_remote_decode": True})
            sched.get_num_new_matched_tokens(req, 0)
            sched.update_state_after_alloc(req, F.KVCacheBlocks([1, 2]), 0)
            so = F.SchedulerOutput(num_scheduled_tokens={rid: 20})
            so.scheduled_new_reqs.append(F.NewRequestData(rid, req.prompt_token_ids, ([1, 2],), 0))
            assert sched.build_connector_meta(so).saves == []
            assert sched.request_finished(req, ([1, 2],)) == (False, None)
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR and "NOT handed off" in r.getMessage()]
        assert len(errors) == 1
    finally:
        workers[0].shutdown()


@pytest.mark.timeout(120)
def test_releases_to_silent_producers_never_delay_a_load(consumer):
    """Releases dial the producer named in a request's params (clients choose them): many to an address
    that accepts connections and never answers must not hold up a real load (their own thread, bounded)."""
    import threading

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    accepted = []
    stop = threading.Event()

    def accept():
        silent.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(silent.accept()[0])
            except OSError:
                pass

    th = threading.Thread(target=accept, daemon=True)
    th.start()
    prod = H.make_instance("kv_producer", H.Geo(), dict(FAST, mode="pull", port=_free_port()))
    try:
        inst = consumer("pull")
        sched, workers, _ = inst
        params = _prefill_here(prod, "cmpl-sil-p", {"do_remote_decode": True}, 40, [7, 8, 9])
        for i in range(20):
            req = F.Request(f"cmpl-sil-{i}", list(range(40)), _producer_params(new_transfer_id(),
                                                                               silent.getsockname()[1]))
            req.status = "FINISHED_ABORTED"
            sched.request_finished(req, ([],))
        meta = sched.build_connector_meta(F.SchedulerOutput())
        assert len(meta.releases) == 20
        workers[0].bind_connector_metadata(meta)
        workers[0].start_load_kv(None)
        workers[0].clear_connector_metadata()
        t0 = time.monotonic()
        _, results = H.load(inst, "cmpl-sil-d", params, 40, [1, 2, 3])
        assert not results[0].failed_recving and time.monotonic() - t0 < 15
        H.check(H.Geo(), 0, inst[2][0], [1, 2, 3], 40)
    finally:
        stop.set()
        prod[1][0].shutdown()
        th.join(5)
        for c in accepted:
            c.close()
        silent.close()


def test_an_instance_keeps_the_address_its_nixl_deployment_gave_it(monkeypatch):
    """Switched from NixlConnector: VLLM_NIXL_SIDE_CHANNEL_HOST (the address a NIXL deployment gives each
    instance) is where p2pkv listens and what decode engines are told, unless the extra config says."""
    monkeypatch.setenv("VLLM_NIXL_SIDE_CHANNEL_HOST", "127.0.0.1")
    sched, workers, _ = H.make_instance("kv_both", H.Geo(), dict(FAST, mode="pull", port=_free_port()))
    try:
        assert workers[0].engine.address.startswith("127.0.0.1:")
        params = _prefill_here((sched, workers, _), "cmpl-nh-1", {"do_remote_decode": True}, 20, [1, 2])
        assert params["remote_host"] == "127.0.0.1"
    finally:
        workers[0].shutdown()
    monkeypatch.setenv("VLLM_NIXL_SIDE_CHANNEL_HOST", "10.1.2.3")
    from p2pkv.adapters.vllm import KVConnectorRole, P2pkvConnector

    cfg = F.VllmConfig(F.KVTransferConfig("kv_both", dict(FAST, mode="pull", port=14579)))
    assert P2pkvConnector(cfg, KVConnectorRole.SCHEDULER, F.KVCacheConfig())._engine_cfg.host == "10.1.2.3"
    cfg = F.VllmConfig(F.KVTransferConfig("kv_both", dict(FAST, mode="pull", port=14579, host="0.0.0.0",
                                                          advertise_host="node-7")))
    c = P2pkvConnector(cfg, KVConnectorRole.SCHEDULER, F.KVCacheConfig())
    assert (c._engine_cfg.host, c._engine_cfg.advertise_host) == ("0.0.0.0", "node-7")  # the config wins
