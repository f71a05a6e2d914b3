"""Mode 'read' through the vLLM connector (the decode side copies the prompt's blocks straight out of the
producer's registered caches): failures are reported per request, never raised into vLLM; on a GPU the
blocks land exactly and the producer hears it may free them."""

import socket
import time

import pytest
import torch

from tests import vllm_fakes as F

NB = 40


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _connectors(role, extra, device, fill):
    from p2pkv.adapters.vllm import KVConnectorRole, P2pkvConnector

    cfg = F.VllmConfig(F.KVTransferConfig(role, extra))
    sched = P2pkvConnector(cfg, KVConnectorRole.SCHEDULER, F.KVCacheConfig(num_blocks=NB))
    worker = P2pkvConnector(cfg, KVConnectorRole.WORKER, F.KVCacheConfig(num_blocks=NB))
    caches = {}
    if device is not None:
        caches = {n: (torch.randn(2, NB, F.BLOCK, F.HEADS, F.HEAD, device=device).to(torch.bfloat16) if fill
                      else torch.zeros(2, NB, F.BLOCK, F.HEADS, F.HEAD, dtype=torch.bfloat16, device=device))
                  for n in F.LAYERS}
        worker.register_kv_caches(caches)
    return sched, worker, caches


def _produce(sched, worker, rid, tid, ntok, ids, c_port, with_worker=True):
    """The producer's side of one request; returns the decode request's kv_transfer_params."""
    req = F.Request(rid, list(range(ntok)), {"transfer_id": tid, "do_remote_decode": True,
                                             "remote_host": "127.0.0.1", "remote_port": c_port})
    sched.get_num_new_matched_tokens(req, 0)
    sched.update_state_after_alloc(req, F.KVCacheBlocks(ids), 0)
    so = F.SchedulerOutput(num_scheduled_tokens={rid: ntok})
    so.scheduled_new_reqs.append(F.NewRequestData(rid, req.prompt_token_ids, (list(ids),), 0))
    meta = sched.build_connector_meta(so)
    if with_worker:
        worker.bind_connector_metadata(meta)
        worker.wait_for_save()
        worker.clear_connector_metadata()
    done, out = sched.request_finished(req, (list(ids),))
    assert done and out is not None and out["mode"] == "read"
    return out


def _consume(sched, worker, rid, ntok, ids, params, timeout=30.0):
    """The consumer's side: schedule the load, run it, wait for get_finished; (finished, block errors)."""
    req = F.Request(rid, list(range(ntok)), params)
    n, _ = sched.get_num_new_matched_tokens(req, 0)
    sched.update_state_after_alloc(req, F.KVCacheBlocks(ids), n)
    worker.bind_connector_metadata(sched.build_connector_meta(F.SchedulerOutput()))
    worker.start_load_kv(None)
    worker.clear_connector_metadata()
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        _, recving = worker.get_finished(set())
        if recving and rid in recving:
            return True, worker.get_block_ids_with_load_errors()
        time.sleep(0.005)
    return False, set()


@pytest.mark.timeout(120)
def test_read_load_into_cpu_caches_fails_per_request():
    """A decode engine with CPU caches cannot read a producer's GPU memory: its load fails, reported through
    get_finished and the failed block ids (vLLM then recomputes), and nothing is raised into vLLM."""
    p_port, c_port = _port(), _port()
    p_sched, p_worker, _ = _connectors("kv_producer", {"mode": "read", "port": p_port}, None, True)
    c_sched, c_worker, _ = _connectors("kv_consumer", {"mode": "read", "port": c_port, "timeout_s": 5.0}, "cpu", False)
    try:
        params = _produce(p_sched, p_worker, "p-1", "xfer-read-cpu-1", 40, [5, 9, 1], c_port, with_worker=False)
        finished, errors = _consume(c_sched, c_worker, "d-1", 40, [7, 8, 2], params)
        assert finished
        assert errors == {7, 8, 2}
    finally:
        c_worker.shutdown()
        p_worker.shutdown()


@pytest.mark.timeout(120)
def test_read_load_into_cpu_caches_says_why_before_asking_the_producer(caplog):
    """With a producer that is up, a CPU decode instance's 'read' load fails at once with the reason (mode
    'read' needs CUDA KV caches on the decode side), not with whatever asking a CPU producer for its memory
    says, and its blocks are reported failed."""
    import logging

    from p2pkv import Engine, EngineConfig

    p_port, c_port = _port(), _port()
    producer = Engine(EngineConfig(host="127.0.0.1", port=p_port, device="cpu"))  # answers, serves no memory
    p_sched, p_worker, _ = _connectors("kv_producer", {"mode": "read", "port": p_port}, None, True)
    c_sched, c_worker, _ = _connectors("kv_consumer", {"mode": "read", "port": c_port, "timeout_s": 5.0}, "cpu", False)
    try:
        params = _produce(p_sched, p_worker, "p-2", "xfer-read-cpu-2", 40, [5, 9, 1], c_port, with_worker=False)
        with caplog.at_level(logging.WARNING, logger="p2pkv.vllm"):
            finished, errors = _consume(c_sched, c_worker, "d-2", 40, [7, 8, 2], params)
        assert finished and errors == {7, 8, 2}
        assert "mode 'read' needs CUDA KV caches on the decode side" in caplog.text
        assert producer.stats()["sessions"] == 0  # never asked
    finally:
        c_worker.shutdown()
        p_worker.shutdown()
        producer.close()


def _cuda_pair():
    p_port, c_port = _port(), _port()
    p = _connectors("kv_producer", {"mode": "read", "port": p_port, "timeout_s": 20.0}, "cuda", True)
    c = _connectors("kv_consumer", {"mode": "read", "port": c_port, "timeout_s": 20.0}, "cuda", False)
    return p, c, c_port


def _wait_sent(worker, rid, timeout=20.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        sending, _ = worker.get_finished({rid})
        if sending and rid in sending:
            return True
        time.sleep(0.005)
    return False


@pytest.mark.gpu
@pytest.mark.timeout(180)
def test_read_mode_copies_exact_blocks_and_frees_the_producer():
    """Two requests (the second reuses the copy plans): every layer's blocks land in the decode engine's
    blocks, others stay untouched, and the producer reports each hand-off done (read_done)."""
    (p_sched, p_worker, p_caches), (c_sched, c_worker, c_caches), c_port = _cuda_pair()
    try:
        for r, (ntok, p_ids, c_ids) in enumerate([(40, [5, 9, 1], [7, 8, 2]),
                                                  (16 * 20, list(range(39, 19, -1)), list(range(20)))]):
            tid = f"xfer-read-gpu-{r}"
            params = _produce(p_sched, p_worker, f"p-{r}", tid, ntok, p_ids, c_port)
            finished, errors = _consume(c_sched, c_worker, f"d-{r}", ntok, c_ids, params)
            assert finished and not errors
            assert _wait_sent(p_worker, f"p-{r}")
            torch.cuda.synchronize()
            for name in F.LAYERS:
                src, dst = p_caches[name], c_caches[name]
                assert torch.equal(dst[:, c_ids], src[:, p_ids]), name
            untouched = [b for b in range(NB) if b not in set().union(*[[7, 8, 2], list(range(20))][:r + 1])]
            assert not c_caches[F.LAYERS[0]][:, untouched].any()
        assert len(c_worker._read_cache) == 1  # one producer: its plans built once
    finally:
        c_worker.shutdown()
        p_worker.shutdown()


@pytest.mark.gpu
@pytest.mark.timeout(180)
def test_read_mode_refuses_producer_block_ids_outside_its_cache():
    """kv_transfer_params come from clients: block ids past the producer's cache fail that load (typed,
    reported per request) without a copy, and the next request still loads."""
    (p_sched, p_worker, p_caches), (c_sched, c_worker, c_caches), c_port = _cuda_pair()
    try:
        params = _produce(p_sched, p_worker, "p-bad", "xfer-read-bad", 40, [5, 9, 1], c_port)
        params = {**params, "remote_block_ids": [[5, NB + 100, 1]]}
        finished, errors = _consume(c_sched, c_worker, "d-bad", 40, [7, 8, 2], params)
        assert finished and errors == {7, 8, 2}
        torch.cuda.synchronize()
        assert not any(c.any() for c in c_caches.values())
        params = _produce(p_sched, p_worker, "p-ok", "xfer-read-ok", 40, [3, 4, 6], c_port)
        finished, errors = _consume(c_sched, c_worker, "d-ok", 40, [10, 11, 12], params)
        assert finished and not errors
        torch.cuda.synchronize()
        assert torch.equal(c_caches[F.LAYERS[5]][:, [10, 11, 12]], p_caches[F.LAYERS[5]][:, [3, 4, 6]])
        # the producer is mapped now: later loads launch inline in start_load_kv; a bad one fails alone there too
        params = _produce(p_sched, p_worker, "p-bad2", "xfer-read-bad2", 40, [5, 9, 1], c_port)
        params = {**params, "remote_block_ids": [[5, 9, NB]]}
        finished, errors = _consume(c_sched, c_worker, "d-bad2", 40, [13, 14, 15], params)
        assert finished and errors == {13, 14, 15}
        params = _produce(p_sched, p_worker, "p-ok2", "xfer-read-ok2", 40, [0, 2, 9], c_port)
        finished, errors = _consume(c_sched, c_worker, "d-ok2", 40, [16, 17, 18], params)
        assert finished and not errors
        torch.cuda.synchronize()
        assert torch.equal(c_caches[F.LAYERS[7]][:, [16, 17, 18]], p_caches[F.LAYERS[7]][:, [0, 2, 9]])
        assert not c_worker._reads  # every inline read reported
    finally:
        c_worker.shutdown()
        p_worker.shutdown()


@pytest.mark.parametrize("bad", [[[5, True, 1]], [[5, -1, 1]], [[5, 2.0, 1]], [[5, "1", 1]], [5, 9, 1], [[5], [9]],
                                 None])
def test_read_params_with_malformed_block_ids_are_refused(bad):
    """The producer's remote_block_ids come through clients: anything but one list of non-negative ints per
    KV-cache group refuses that load at scheduling (reported as failed), before any worker runs it."""
    from p2pkv.adapters.vllm.connector import _remote_ids

    assert _remote_ids({"remote_block_ids": bad}, 1) is None
    assert _remote_ids({"remote_block_ids": [[5, 9, 1]]}, 1) == [[5, 9, 1]]
    p_port, c_port = _port(), _port()
    p_sched, p_worker, _ = _connectors("kv_producer", {"mode": "read", "port": p_port}, None, True)
    c_sched, c_worker, _ = _connectors("kv_consumer", {"mode": "read", "port": c_port, "timeout_s": 5.0}, "cpu",
                                       False)
    try:
        params = _produce(p_sched, p_worker, "p-1", "xfer-read-bad-ids", 40, [5, 9, 1], c_port, with_worker=False)
        req = F.Request("d-1", list(range(40)), {**params, "remote_block_ids": bad})
        n, _ = c_sched.get_num_new_matched_tokens(req, 0)
        c_sched.update_state_after_alloc(req, F.KVCacheBlocks([7, 8, 2]), n)
        meta = c_sched.build_connector_meta(F.SchedulerOutput())
        assert [spec.refuse is not None for spec in meta.loads] == [True]
        assert "remote_block_ids" in meta.loads[0].refuse and meta.loads[0].remote_ids == []
    finally:
        c_worker.shutdown()
        p_worker.shutdown()
