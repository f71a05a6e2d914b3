"""P2pkvConnector between two processes, driven like vLLM drives it (vLLM objects faked).

The two sides' internal request ids differ by vLLM's random per-instance suffix;
the transfer is named only by kv_transfer_params["transfer_id"].
"""

import socket
import time

import pytest
import torch

from p2pkv import new_transfer_id
from p2pkv.synthetic import same_bits

from . import vllm_fakes as F
from .conftest import process_context

FAST = dict(timeout_s=10.0, peer_timeout_s=2.0, heartbeat_s=0.2, pool_bytes=64 * 2**20)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_prefill(conn, req_id, tid, prompt_len, block_ids, mode, consumer_port, seed, chunks, producer_port):
    """The producer instance: schedule, 'compute' each layer into the blocks, save, finish."""
    extra = dict(FAST, mode=mode, port=producer_port)
    sched, worker, caches = F.make_connectors("kv_producer", extra)
    params = {"transfer_id": tid, "do_remote_decode": True, "remote_host": "127.0.0.1", "remote_port": consumer_port}
    req = F.Request(req_id, list(range(prompt_len)), params)
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)
    sched.update_state_after_alloc(req, F.KVCacheBlocks(block_ids), 0)
    nblk = -(-prompt_len // F.BLOCK)
    per_chunk = -(-prompt_len // chunks)
    done = 0
    for c in range(chunks):
        n = min(per_chunk, prompt_len - done)
        so = F.SchedulerOutput(num_scheduled_tokens={req_id: n})
        if c == 0:
            so.scheduled_new_reqs.append(F.NewRequestData(req_id, req.prompt_token_ids, (list(block_ids),), 0))
        else:
            so.scheduled_cached_reqs = F.CachedRequestData([req_id], [None], [done])
        meta = sched.build_connector_meta(so)
        worker.bind_connector_metadata(meta)
        for li, name in enumerate(F.LAYERS):  # the forward pass writes this chunk's KV, then saves the layer
            for tb in range(done // F.BLOCK, min(nblk, -(-(done + n) // F.BLOCK))):
                caches[name][:, block_ids[tb]] = F.expected_block(seed, li, tb)
            worker.save_kv_layer(name, caches[name], None)
        worker.wait_for_save()
        worker.clear_connector_metadata()
        done += n
    delay, out_params = sched.request_finished(req, (list(block_ids),))
    assert delay is True and out_params["transfer_id"] == tid and out_params["do_remote_prefill"] is True
    conn.send(("params", out_params))
    deadline = time.monotonic() + 30
    while True:
        sending, _ = worker.get_finished({req_id})
        if sending and req_id in sending:
            break
        assert time.monotonic() < deadline, "sends never finished"
        time.sleep(0.01)
    st = worker.engine.stats()
    conn.send(("sent", st.get("sends_done", 0) + st.get("requests_done", 0) if mode == "push" else 0))
    conn.recv()  # stay up until the consumer is done (pull mode serves from here)
    worker.shutdown()


def decode_side(req_id, params, prompt_len, block_ids, seed, consumer, num_computed=0, expect_ok=True):
    sched, worker, caches = consumer
    req = F.Request(req_id, list(range(prompt_len)), params)
    n, is_async = sched.get_num_new_matched_tokens(req, num_computed)
    assert (n, is_async) == (prompt_len - num_computed, True)
    sched.update_state_after_alloc(req, F.KVCacheBlocks(block_ids), n)
    meta = sched.build_connector_meta(F.SchedulerOutput())
    assert len(meta.loads) == 1 and meta.loads[0].transfer_id == params["transfer_id"]
    worker.bind_connector_metadata(meta)
    worker.start_load_kv(None)
    worker.clear_connector_metadata()
    deadline = time.monotonic() + 30
    while True:
        _, recving = worker.get_finished(set())
        if recving and req_id in recving:
            break
        assert time.monotonic() < deadline, "load never finished"
        time.sleep(0.01)
    errors = worker.get_block_ids_with_load_errors()
    if not expect_ok:
        return errors
    assert not errors
    skip = num_computed // F.BLOCK
    nblk = -(-prompt_len // F.BLOCK)
    for li, name in enumerate(F.LAYERS):
        for tb in range(nblk):
            got = caches[name][:, block_ids[tb]]
            if tb < skip:
                assert not got.reshape(-1).view(torch.int16).any(), "a locally cached block was overwritten"
            else:
                assert same_bits(got, F.expected_block(seed, li, tb)), (name, tb)
    return errors


@pytest.fixture
def consumer_pair():
    made = []

    def make(mode="push", **extra):
        port = _free_port()
        pair = F.make_connectors("kv_consumer", dict(FAST, mode=mode, port=port, **extra))
        made.append(pair)
        return pair, port

    yield make
    for _, worker, _ in made:
        worker.shutdown()


def _start_prefill(req_id, tid, prompt_len, block_ids, mode, consumer_port, seed, chunks=1):
    ctx = process_context()
    parent, child = ctx.Pipe()
    p = ctx.Process(target=run_prefill, args=(child, req_id, tid, prompt_len, block_ids, mode, consumer_port, seed,
                                              chunks, _free_port()), daemon=True)
    p.start()
    return p, parent


def _finish(p, conn):
    conn.send("bye")
    p.join(20)
    assert p.exitcode == 0


ID_FORMS = [("cmpl-{u}-{s1}", "cmpl-{u}-{s2}"), ("chatcmpl-{u}-{s1}", "chatcmpl-{u}-{s2}"),
            ("cmpl-{u}", "cmpl-{u}"), ("0_cmpl-{u}-{s1}", "1_cmpl-{u}-{s2}")]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("forms", ID_FORMS)
def test_push_with_vllm_request_id_forms(consumer_pair, forms):
    (consumer, port) = consumer_pair("push")
    tid = new_transfer_id()
    prod_id, dec_id = (f.format(u="abc123", s1="1a2b3c4d", s2="9f8e7d6c") for f in forms)
    prompt = 100  # 7 blocks, the last one partial
    p, conn = _start_prefill(prod_id, tid, prompt, [5, 9, 2, 40, 41, 7, 63], "push", port, seed=3)
    assert conn.poll(60)
    kind, params = conn.recv()
    assert kind == "params"
    decode_side(dec_id, params, prompt, [11, 0, 30, 31, 12, 50, 8], 3, consumer)
    assert conn.recv()[0] == "sent"
    _finish(p, conn)


@pytest.mark.timeout(120)
def test_pull_mode_and_chunked_prefill(consumer_pair):
    (consumer, port) = consumer_pair("pull")
    tid = new_transfer_id()
    p, conn = _start_prefill("cmpl-x-11111111", tid, 64, [1, 2, 3, 4], "pull", port, seed=5, chunks=3)
    assert conn.poll(60)
    _, params = conn.recv()
    assert params["mode"] == "pull" and isinstance(params["remote_port"], int)
    decode_side("cmpl-x-22222222", params, 64, [60, 61, 62, 63], 5, consumer)
    _finish(p, conn)


@pytest.mark.timeout(120)
def test_prefix_cache_hit_on_consumer_keeps_local_blocks(consumer_pair):
    (consumer, port) = consumer_pair("push")
    tid = new_transfer_id()
    p, conn = _start_prefill("cmpl-y-1", tid, 80, [10, 11, 12, 13, 14], "push", port, seed=7)
    _, params = conn.recv()
    decode_side("cmpl-y-2", params, 80, [20, 21, 22, 23, 24], 7, consumer, num_computed=32)
    _finish(p, conn)


def test_requests_without_disaggregation_are_local(consumer_pair):
    (consumer, _) = consumer_pair("push")
    sched, _, _ = consumer
    for params in (None, {}, {"transfer_id": new_transfer_id()}, {"do_remote_prefill": False}):
        req = F.Request("cmpl-local", [1, 2, 3], params)
        assert sched.get_num_new_matched_tokens(req, 0) == (0, False)
        sched.update_state_after_alloc(req, F.KVCacheBlocks([1]), 0)
        assert sched.request_finished(req, ([1],)) == (False, None)
    assert sched.build_connector_meta(F.SchedulerOutput()).loads == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("params,why", [
    ({"do_remote_prefill": True}, "name no transfer_id"),
    ({"transfer_id": "", "do_remote_prefill": True}, "transfer_id is not valid"),
    ({"transfer_id": 7, "do_remote_prefill": True, "mode": "pull"}, "transfer_id is not valid"),
    ({"transfer_id": new_transfer_id(), "do_remote_prefill": True, "mode": "pull"}, "no producer address"),
    ({"transfer_id": new_transfer_id(), "do_remote_prefill": True, "mode": "pull", "remote_host": None,
      "remote_port": None}, "no producer address"),
    # params come from clients: hostile values are refused by name, cheaply
    ({"transfer_id": new_transfer_id(), "do_remote_prefill": True, "mode": "pull", "remote_host": 5,
      "remote_port": "80"}, "remote_host/remote_port must be"),
    ({"transfer_id": new_transfer_id(), "do_remote_prefill": True, "mode": "teleport"}, "mode must be"),
    ({"transfer_id": new_transfer_id(), "do_remote_prefill": True, "remote_tp_size": 10**9}, "remote_tp_size must"),
    ({"transfer_id": new_transfer_id(), "do_remote_prefill": True, "remote_block_size": -16},
     "remote_block_size must"),
])
def test_decode_request_that_cannot_get_its_remote_prefill_fails_loudly(consumer_pair, caplog, params, why):
    """Asked for a remote prefill it cannot get: a failed load (vLLM's kv_load_failure_policy applies) with
    an error naming why, never a silent local recompute."""
    import logging

    (consumer, _) = consumer_pair("push")
    sched, worker, _ = consumer
    caplog.set_level(logging.WARNING, logger="p2pkv.vllm")
    req = F.Request("cmpl-broken-1", list(range(32)), params)
    assert sched.get_num_new_matched_tokens(req, 0) == (32, True)
    sched.update_state_after_alloc(req, F.KVCacheBlocks([1, 2]), 32)
    meta = sched.build_connector_meta(F.SchedulerOutput())
    assert len(meta.loads) == 1 and why in meta.loads[0].refuse
    worker.bind_connector_metadata(meta)
    worker.start_load_kv(None)
    deadline = time.monotonic() + 10
    failed = set()
    while "cmpl-broken-1" not in failed:
        failed |= worker.get_transfer_results(set()).failed_recving
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert worker.get_block_ids_with_load_errors() == {1, 2}
    assert any(r.levelno >= logging.ERROR and why in r.getMessage() for r in caplog.records)
    req.status = "FINISHED_ERROR"
    assert sched.request_finished(req, ([1, 2],)) == (False, None)


def test_n_greater_than_one_loads_once(consumer_pair):
    (consumer, _) = consumer_pair("push")
    sched, _, _ = consumer
    params = {"transfer_id": new_transfer_id(), "do_remote_prefill": True}
    a = F.Request("0_cmpl-z-1", list(range(40)), params)
    b = F.Request("1_cmpl-z-1", list(range(40)), params)
    assert sched.get_num_new_matched_tokens(a, 0) == (40, True)
    sched.update_state_after_alloc(a, F.KVCacheBlocks([1, 2, 3]), 40)
    assert sched.get_num_new_matched_tokens(b, 0) == (0, False)  # the sibling computes or hits the prefix cache
    assert len(sched.build_connector_meta(F.SchedulerOutput()).loads) == 1


@pytest.mark.timeout(60)
def test_lost_producer_reports_load_errors_not_a_hang(consumer_pair):
    (consumer, _) = consumer_pair("push", load_timeout_s=2.0)
    params = {"transfer_id": new_transfer_id(), "do_remote_prefill": True}
    t0 = time.monotonic()
    errors = decode_side("cmpl-q-1", params, 48, [4, 5, 6], 1, consumer, expect_ok=False)
    assert errors == {4, 5, 6} and time.monotonic() - t0 < 10


def test_aborted_decode_request_aborts_the_transfer(consumer_pair):
    (consumer, _) = consumer_pair("push")
    sched, worker, _ = consumer
    params = {"transfer_id": new_transfer_id(), "do_remote_prefill": True}
    req = F.Request("cmpl-ab-1", list(range(32)), params)
    sched.get_num_new_matched_tokens(req, 0)
    sched.update_state_after_alloc(req, F.KVCacheBlocks([1, 2]), 32)
    meta = sched.build_connector_meta(F.SchedulerOutput())
    worker.bind_connector_metadata(meta)
    worker.start_load_kv(None)
    req.status = "FINISHED_ABORTED"
    assert sched.request_finished(req, ([1, 2],)) == (False, None)
    meta2 = sched.build_connector_meta(F.SchedulerOutput())
    assert meta2.aborts == [params["transfer_id"]]
    worker.bind_connector_metadata(meta2)
    worker.start_load_kv(None)
    deadline = time.monotonic() + 5
    while True:
        _, rec = worker.get_finished(set())
        if rec and "cmpl-ab-1" in rec:
            break
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert worker.get_block_ids_with_load_errors() == {1, 2}


def test_bad_config_is_typed():
    from p2pkv import ConfigError

    with pytest.raises(ConfigError, match="mode"):
        F.make_connectors("kv_consumer", dict(FAST, mode="teleport"))
    with pytest.raises(ConfigError, match="unknown config key"):
        F.make_connectors("kv_consumer", dict(FAST, timeout=3))


def test_block_view_layouts():
    import torch

    from p2pkv.adapters.vllm import block_view

    flash = torch.zeros(2, 10, 16, 4, 8)
    assert block_view(flash, 10).shape == (10, 2, 16, 4, 8)
    assert block_view(torch.zeros(10, 4, 16, 8), 10).shape == (10, 4, 16, 8)
    assert block_view(torch.zeros(20, 4, 8, 8), 10).shape == (10, 2, 4, 8, 8)  # kernel blocks
    assert block_view(torch.zeros(2, 20, 8, 4, 8), 10).shape == (10, 2, 2, 8, 4, 8)


def test_read_mode_needs_cuda_caches_and_a_port():
    """Mode 'read' (the decode side copies straight out of the producer's registered cache) is refused
    where it cannot work: a producer without a fixed port, or with CPU caches."""
    from p2pkv.adapters.vllm import KVConnectorRole, P2pkvConnector
    from p2pkv.errors import ConfigError

    with pytest.raises(ConfigError, match="read"):
        P2pkvConnector(F.VllmConfig(F.KVTransferConfig("kv_producer", {"mode": "read"})), KVConnectorRole.WORKER,
                       F.KVCacheConfig(num_blocks=8))
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    w = P2pkvConnector(F.VllmConfig(F.KVTransferConfig("kv_producer", {"mode": "read", "port": port})),
                       KVConnectorRole.WORKER, F.KVCacheConfig(num_blocks=8))
    try:
        with pytest.raises(ConfigError, match="CUDA"):
            w.register_kv_caches({n: torch.zeros(2, 8, 16, 8, 128, dtype=torch.bfloat16) for n in F.LAYERS})
    finally:
        w.shutdown()
