"""Against the real vLLM 0.33.0 (skipped without it; CI stage 2 installs it in its own venv).

vLLM's own Scheduler drives P2pkvConnector on both sides, with one worker-side
connector (its own p2pkv engine and CPU caches) per TP rank: heterogeneous TP
and block sizes, a failed load under both ``kv_load_failure_policy`` values, a
fingerprint mismatch, and the stats object. Bit-exact checks on the decode
side's blocks, per rank.
"""

import copy
import logging
import socket
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm
vllm = pytest.importorskip("vllm")

import torch  # noqa: E402

from p2pkv import new_transfer_id  # noqa: E402
from p2pkv.adapters.vllm._layout import heads_of  # noqa: E402
from p2pkv.synthetic import same_bits  # noqa: E402

MODEL_DIR = str(Path(__file__).parent / "data" / "tiny-llama")
LAYERS = ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"]
NUM_BLOCKS, KV_HEADS, HEAD = 64, 2, 16
FAST = {"timeout_s": 10.0, "peer_timeout_s": 2.0, "heartbeat_s": 0.2, "pool_bytes": 16 * 2**20}


def _free_port(span: int = 2) -> int:
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        try:
            for i in range(1, span):
                with socket.socket() as s2:
                    s2.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
    raise RuntimeError("no free port range")


def _vllm_config(role, extra, block, policy):
    from vllm.config import CacheConfig, DeviceConfig, KVTransferConfig, ModelConfig, SchedulerConfig, VllmConfig

    mc = ModelConfig(model=MODEL_DIR, skip_tokenizer_init=True, dtype="bfloat16", max_model_len=512)
    sc = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=512, max_model_len=512, is_encoder_decoder=False)
    ktc = KVTransferConfig(kv_connector="P2pkvConnector", kv_connector_module_path="p2pkv.adapters.vllm",
                           kv_role=role, kv_connector_extra_config=extra, kv_load_failure_policy=policy)
    cc = CacheConfig(block_size=block)
    cc.num_gpu_blocks = NUM_BLOCKS
    return VllmConfig(model_config=mc, scheduler_config=sc, cache_config=cc, kv_transfer_config=ktc,
                      device_config=DeviceConfig("cpu"))


class Side:
    """One vLLM instance: the real Scheduler (with its connector) and a worker connector per TP rank."""

    def __init__(self, role, tp=1, block=16, mode="pull", policy="fail", layout="NHD"):
        from vllm.config import KVTransferConfig
        from vllm.v1.core.sched.scheduler import Scheduler
        from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec, KVCacheTensor
        from vllm.v1.structured_output import StructuredOutputManager

        from p2pkv.adapters.vllm import KVConnectorRole, P2pkvConnector

        self.tp, self.block, self.port = tp, block, _free_port(tp)
        extra = dict(FAST, port=self.port, mode=mode, tp_size=tp, load_timeout_s=20.0)
        vc = _vllm_config(role, extra, block, policy)
        spec = FullAttentionSpec(block_size=block, num_kv_heads=KV_HEADS // tp, head_size=HEAD, dtype=torch.bfloat16)
        page = spec.page_size_bytes
        kcc = KVCacheConfig(num_blocks=NUM_BLOCKS,
                            kv_cache_tensors=[KVCacheTensor(size=page * NUM_BLOCKS, layers=[n], layer_stride=0,
                                                            block_stride=page) for n in LAYERS],
                            kv_cache_groups=[KVCacheGroupSpec(LAYERS, spec)])
        self.sched = Scheduler(vc, kcc, StructuredOutputManager(vc), block_size=block)
        self.workers, self.caches = [], []
        for r in range(tp):
            vcr = copy.copy(vc)
            vcr.kv_transfer_config = KVTransferConfig(
                kv_connector="P2pkvConnector", kv_connector_module_path="p2pkv.adapters.vllm", kv_role=role,
                kv_connector_extra_config=dict(extra, rank=r), kv_load_failure_policy=policy)
            w = P2pkvConnector(vcr, KVConnectorRole.WORKER, kcc)
            h = KV_HEADS // tp
            if layout == "HND":
                c = {n: torch.zeros(2, NUM_BLOCKS, h, block, HEAD, dtype=torch.bfloat16).transpose(2, 3)
                     for n in LAYERS}
            else:
                c = {n: torch.zeros(2, NUM_BLOCKS, block, h, HEAD, dtype=torch.bfloat16) for n in LAYERS}
            w.register_kv_caches(c)
            self.workers.append(w)
            self.caches.append(c)

    def close(self):
        for w in self.workers:
            w.shutdown()

    def results(self, finished=frozenset()):
        """Union of every rank's transfer results (vLLM's aggregator does this across workers)."""
        sending, recving, failed = set(), set(), set()
        for w in self.workers:
            r = w.get_transfer_results(set(finished))
            sending |= r.finished_sending
            recving |= r.finished_recving
            failed |= r.failed_recving
        return sending, recving, failed


def _ref(li, ntok):
    g = torch.Generator().manual_seed(77 + li)
    return torch.randn(2, ntok, KV_HEADS, HEAD, generator=g).to(torch.bfloat16)


def _mro(out, finished_sending=None, finished_recving=None, failed_recving=None):
    from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput

    rids = [r.req_id for r in out.scheduled_new_reqs] + list(out.scheduled_cached_reqs.req_ids)
    return ModelRunnerOutput(req_ids=rids, req_id_to_index={r: i for i, r in enumerate(rids)},
                             sampled_token_ids=[[7] for _ in rids],
                             kv_connector_output=KVConnectorOutput(finished_sending=finished_sending,
                                                                   finished_recving=finished_recving,
                                                                   failed_recving=failed_recving or set()))


def _request(rid, prompt, params, max_tokens=1):
    from vllm.sampling_params import SamplingParams
    from vllm.v1.request import Request

    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens, extra_args={"kv_transfer_params": params}),
                   None)


def _wait(fn, what, timeout=30.0):
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v:
            return v
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def _prefill(prod: Side, cons_tp: int, cons_port: int, prompt, mode):
    """Run the prompt on the producer; returns the kv_transfer_params for the decode request."""
    tid = new_transfer_id()
    preq = _request(f"cmpl-p-{tid[-6:]}-1a2b", prompt, {"transfer_id": tid, "do_remote_decode": True,
                                                        "remote_host": "127.0.0.1", "remote_port": cons_port,
                                                        "decode_tp_size": cons_tp})
    prod.sched.add_request(preq)
    out = prod.sched.schedule()
    pblocks = list(out.scheduled_new_reqs[0].block_ids[0])
    ntok = len(prompt)
    for r, (w, c) in enumerate(zip(prod.workers, prod.caches, strict=True)):
        lo, hi = heads_of(r, prod.tp, KV_HEADS)
        for li, name in enumerate(LAYERS):  # the forward pass writes the prompt's KV
            ref = _ref(li, ntok)
            for i, b in enumerate(pblocks):
                t0, t1 = i * prod.block, min((i + 1) * prod.block, ntok)
                if t0 < ntok:
                    c[name][:, b, :t1 - t0] = ref[:, t0:t1, lo:hi]
        w.bind_connector_metadata(out.kv_connector_metadata)
        for name in LAYERS:
            w.save_kv_layer(name, c[name], None)
        w.wait_for_save()
        w.clear_connector_metadata()
    eco = prod.sched.update_from_output(out, _mro(out))
    params = next(o for e in eco.values() for o in e.outputs if o.request_id == preq.request_id).kv_transfer_params
    assert params["transfer_id"] == tid and params["remote_tp_size"] == prod.tp
    _wait(lambda: preq.request_id in prod.results({preq.request_id})[0], "producer hand-off")
    return params


def _decode(cons: Side, params, prompt):
    """Load on the consumer through its real Scheduler; returns (request, load results)."""
    dreq = _request(f"cmpl-d-{params['transfer_id'][-6:]}-9f8e", prompt, params, max_tokens=4)
    cons.sched.add_request(dreq)
    out = cons.sched.schedule()
    meta = out.kv_connector_metadata
    assert len(meta.loads) == 1 and meta.loads[0].transfer_id == params["transfer_id"]
    for w in cons.workers:
        w.bind_connector_metadata(meta)
        w.start_load_kv(None)
        w.clear_connector_metadata()
    got = [set(), set()]
    pending = {id(w) for w in cons.workers}

    def step():
        for w in cons.workers:
            r = w.get_transfer_results(set())
            if dreq.request_id in r.finished_recving:
                pending.discard(id(w))
            got[0] |= r.finished_recving
            got[1] |= r.failed_recving
        return not pending

    _wait(step, "consumer load")
    eco = cons.sched.update_from_output(out, _mro(out, finished_recving=got[0], failed_recving=got[1]))
    return dreq, meta.loads[0].block_ids[0], got[1], eco


def _check(cons: Side, dblocks, ntok):
    for r, c in enumerate(cons.caches):
        lo, hi = heads_of(r, cons.tp, KV_HEADS)
        for li, name in enumerate(LAYERS):
            ref = _ref(li, ntok)
            for i, b in enumerate(dblocks):
                t0, t1 = i * cons.block, min((i + 1) * cons.block, ntok)
                if t0 < ntok:
                    assert same_bits(c[name][:, b, :t1 - t0], ref[:, t0:t1, lo:hi]), (r, name, i)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode,ptp,ctp,pblock,cblock,layout", [
    ("pull", 2, 1, 16, 16, "NHD"),  # TP 2 -> 1
    ("push", 1, 2, 16, 16, "NHD"),  # TP 1 -> 2
    ("push", 1, 1, 16, 32, "NHD"),  # block 16 -> 32
    ("pull", 1, 1, 32, 16, "HND"),  # block 32 -> 16, NHD -> HND
])
def test_real_schedulers_heterogeneous(mode, ptp, ctp, pblock, cblock, layout):
    cons = Side("kv_consumer", tp=ctp, block=cblock, mode=mode, layout=layout)
    prod = Side("kv_producer", tp=ptp, block=pblock, mode=mode)
    try:
        prompt = list(range(1, 71))  # 70 tokens
        params = _prefill(prod, ctp, cons.port, prompt, mode)
        dreq, dblocks, failed, _ = _decode(cons, params, prompt)
        assert not failed
        out2 = cons.sched.schedule()  # the request now runs decode on the loaded KV
        scheduled = [r.req_id for r in out2.scheduled_new_reqs] + list(out2.scheduled_cached_reqs.req_ids)
        assert dreq.request_id in scheduled
        _check(cons, dblocks, len(prompt))
        st = cons.workers[0].get_kv_connector_stats()
        assert st is not None and st.data["transfers_loaded"] == 1
        assert type(cons.workers[0]).build_kv_connector_stats(st.to_dict()).reduce()["load_p50_ms"] > 0
    finally:
        prod.close()
        cons.close()


def _dead_params(tid, **over):
    p = {"transfer_id": tid, "do_remote_prefill": True, "remote_host": "127.0.0.1", "remote_port": _free_port(),
         "remote_tp_size": 1, "remote_block_size": 16, "mode": "pull"}
    p.update(over)
    return p


@pytest.mark.timeout(120)
def test_failed_load_policy_fail_ends_the_request_with_an_error():
    from vllm.v1.request import RequestStatus

    cons = Side("kv_consumer", policy="fail")
    try:
        prompt = list(range(1, 41))
        t0 = time.monotonic()
        dreq, _, failed, eco = _decode(cons, _dead_params(new_transfer_id()), prompt)
        assert failed == {dreq.request_id} and time.monotonic() - t0 < 10
        assert dreq.status == RequestStatus.FINISHED_ERROR
        outs = [o for e in eco.values() for o in e.outputs if o.request_id == dreq.request_id]
        assert outs and outs[0].finish_reason is not None
        # the connector tells the producer (abort) when the decode request ends in an error
        assert dreq.kv_transfer_params["transfer_id"] in cons.sched.schedule().kv_connector_metadata.aborts
    finally:
        cons.close()


@pytest.mark.timeout(120)
def test_failed_load_policy_recompute_computes_locally_once():
    cons = Side("kv_consumer", policy="recompute")
    try:
        prompt = list(range(1, 41))
        dreq, _, failed, _ = _decode(cons, _dead_params(new_transfer_id()), prompt)
        assert failed == {dreq.request_id}
        for _ in range(3):  # no second load, ever: the request is computed here
            out = cons.sched.schedule()
            assert not out.kv_connector_metadata.loads
            scheduled = [r.req_id for r in out.scheduled_new_reqs] + list(out.scheduled_cached_reqs.req_ids)
            if dreq.request_id in scheduled:
                break
            cons.sched.update_from_output(out, _mro(out))
        assert dreq.request_id in scheduled and out.num_scheduled_tokens[dreq.request_id] == len(prompt)  # all local
    finally:
        cons.close()


@pytest.mark.timeout(120)
def test_fingerprint_mismatch_is_refused_with_both_values(caplog):
    cons = Side("kv_consumer", policy="fail")
    try:
        fp = dict(cons.workers[0].fingerprint.to_dict(), model="other/model-70b", head_size=128)
        caplog.set_level(logging.WARNING, logger="p2pkv.vllm")
        dreq, _, failed, _ = _decode(cons, _dead_params(new_transfer_id(), p2pkv_fingerprint=fp), list(range(1, 41)))
        assert failed == {dreq.request_id}
        assert "head_size: producer 128 vs consumer 16" in caplog.text
        assert "model: producer 'other/model-70b' vs consumer" in caplog.text
    finally:
        cons.close()


def test_prometheus_metrics_through_vllms_hook():
    from prometheus_client import REGISTRY, Counter, Gauge, Histogram

    from p2pkv.adapters.vllm import P2pkvConnector

    vc = _vllm_config("kv_consumer", dict(FAST, port=_free_port()), 16, "fail")
    prom = P2pkvConnector.build_prom_metrics(vc, {Gauge: Gauge, Counter: Counter, Histogram: Histogram},
                                             ["model_name", "engine"], {0: ["tiny", "0"]})
    stats = P2pkvConnector.build_kv_connector_stats({"bytes_received": 4096, "transfers_loaded": 2,
                                                     "load_failures": 1, "load_latency_s": [0.004, 0.02]})
    prom.observe(stats.to_dict(), 0)
    labels = {"model_name": "tiny", "engine": "0"}
    assert REGISTRY.get_sample_value("vllm:p2pkv_bytes_received_total", labels) == 4096
    assert REGISTRY.get_sample_value("vllm:p2pkv_load_failures_total", labels) == 1
    assert REGISTRY.get_sample_value("vllm:p2pkv_load_seconds_count", labels) == 2


# ----------------------------------------------------------------------------- one process per TP rank
def _kcc(tp, block):
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec, KVCacheTensor

    spec = FullAttentionSpec(block_size=block, num_kv_heads=KV_HEADS // tp, head_size=HEAD, dtype=torch.bfloat16)
    page = spec.page_size_bytes
    return KVCacheConfig(num_blocks=NUM_BLOCKS,
                         kv_cache_tensors=[KVCacheTensor(size=page * NUM_BLOCKS, layers=[n], layer_stride=0,
                                                         block_stride=page) for n in LAYERS],
                         kv_cache_groups=[KVCacheGroupSpec(LAYERS, spec)])


def rank_main(conn, role, tp, rank, block, mode, port):
    """A vLLM worker process of one TP rank: its own connector, p2pkv engine and CPU caches."""
    from p2pkv.adapters.vllm import KVConnectorRole, P2pkvConnector

    extra = dict(FAST, port=port, mode=mode, tp_size=tp, rank=rank, load_timeout_s=20.0)
    w = P2pkvConnector(_vllm_config(role, extra, block, "fail"), KVConnectorRole.WORKER, _kcc(tp, block))
    lo, hi = heads_of(rank, tp, KV_HEADS)
    caches = {n: torch.zeros(2, NUM_BLOCKS, block, hi - lo, HEAD, dtype=torch.bfloat16) for n in LAYERS}
    w.register_kv_caches(caches)
    conn.send("ready")
    try:
        while True:
            cmd, *args = conn.recv()
            if cmd == "bye":
                return
            if cmd == "save":
                meta, blocks, ntok = args
                for li, name in enumerate(LAYERS):  # this rank's forward pass writes its heads
                    ref = _ref(li, ntok)
                    for i, b in enumerate(blocks):
                        t0, t1 = i * block, min((i + 1) * block, ntok)
                        if t0 < ntok:
                            caches[name][:, b, :t1 - t0] = ref[:, t0:t1, lo:hi]
                w.bind_connector_metadata(meta)
                for name in LAYERS:
                    w.save_kv_layer(name, caches[name], None)
                w.wait_for_save()
                w.clear_connector_metadata()
                conn.send("ok")
            elif cmd == "load":
                w.bind_connector_metadata(args[0])
                w.start_load_kv(None)
                w.clear_connector_metadata()
                conn.send("ok")
            elif cmd == "results":
                r = w.get_transfer_results(set(args[0]))
                conn.send((r.finished_sending, r.finished_recving, r.failed_recving))
            elif cmd == "check":
                blocks, ntok = args
                for li, name in enumerate(LAYERS):
                    ref = _ref(li, ntok)
                    for i, b in enumerate(blocks):
                        t0, t1 = i * block, min((i + 1) * block, ntok)
                        if t0 < ntok and not same_bits(caches[name][:, b, :t1 - t0], ref[:, t0:t1, lo:hi]):
                            conn.send(f"rank {rank} {name} block {i} differs")
                            break
                    else:
                        continue
                    break
                else:
                    conn.send("ok")
    finally:
        w.shutdown()


class ProcSide:
    """A vLLM instance whose TP ranks are worker processes; the real Scheduler runs here."""

    def __init__(self, role, tp, block, mode):
        import multiprocessing as mp

        from vllm.v1.core.sched.scheduler import Scheduler
        from vllm.v1.structured_output import StructuredOutputManager

        self.tp, self.block, self.port = tp, block, _free_port(tp)
        vc = _vllm_config(role, dict(FAST, port=self.port, mode=mode, tp_size=tp), block, "fail")
        self.sched = Scheduler(vc, _kcc(tp, block), StructuredOutputManager(vc), block_size=block)
        ctx = mp.get_context("spawn")
        self.procs, self.conns = [], []
        for r in range(tp):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=rank_main, args=(child, role, tp, r, block, mode, self.port), daemon=True)
            p.start()
            self.procs.append(p)
            self.conns.append(parent)
        for c in self.conns:
            assert c.poll(120), "a rank process did not start"
            assert c.recv() == "ready"

    def all(self, *cmd):
        for c in self.conns:
            c.send(cmd)
        out = []
        for c in self.conns:
            assert c.poll(60), f"a rank did not answer {cmd[0]}"
            out.append(c.recv())
        return out

    def wait(self, rid, which, finished=()):
        deadline = time.monotonic() + 60
        seen = [False] * self.tp
        failed = set()
        while not all(seen):
            assert time.monotonic() < deadline, f"ranks never reported {which} of {rid}"
            for i, (s, r, f) in enumerate(self.all("results", set(finished))):
                got = s if which == "sending" else r
                seen[i] = seen[i] or rid in got
                failed |= f
            time.sleep(0.02)
        return failed

    def close(self):
        for c, p in zip(self.conns, self.procs, strict=True):
            try:
                c.send(("bye",))
            except OSError:
                pass
            p.join(20)
            if p.is_alive():
                p.kill()


@pytest.mark.timeout(600)
@pytest.mark.parametrize("mode,ptp,ctp", [("pull", 2, 1), ("push", 1, 2)])
def test_real_schedulers_tp_ranks_in_their_own_processes(mode, ptp, ctp):
    cons = ProcSide("kv_consumer", ctp, 16, mode)
    prod = ProcSide("kv_producer", ptp, 16, mode)
    try:
        prompt = list(range(1, 71))
        tid = new_transfer_id()
        preq = _request(f"cmpl-pp-{tid[-6:]}", prompt, {"transfer_id": tid, "do_remote_decode": True,
                                                        "remote_host": "127.0.0.1", "remote_port": cons.port,
                                                        "decode_tp_size": ctp})
        prod.sched.add_request(preq)
        out = prod.sched.schedule()
        pblocks = list(out.scheduled_new_reqs[0].block_ids[0])
        assert prod.all("save", out.kv_connector_metadata, pblocks, len(prompt)) == ["ok"] * ptp
        eco = prod.sched.update_from_output(out, _mro(out))
        params = next(o for e in eco.values() for o in e.outputs if o.request_id == preq.request_id
                      ).kv_transfer_params
        prod.wait(preq.request_id, "sending", {preq.request_id})
        dreq = _request(f"cmpl-dd-{tid[-6:]}", prompt, params, max_tokens=4)
        cons.sched.add_request(dreq)
        out = cons.sched.schedule()
        meta = out.kv_connector_metadata
        assert cons.all("load", meta) == ["ok"] * ctp
        assert not cons.wait(dreq.request_id, "recving")
        cons.sched.update_from_output(out, _mro(out, finished_recving={dreq.request_id}))
        out2 = cons.sched.schedule()
        assert dreq.request_id in [r.req_id for r in out2.scheduled_new_reqs] + list(
            out2.scheduled_cached_reqs.req_ids)
        assert cons.all("check", meta.loads[0].block_ids[0], len(prompt)) == ["ok"] * ctp
    finally:
        prod.close()
        cons.close()
