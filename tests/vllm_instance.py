"""A vLLM instance as the real vLLM 0.33 drives a KV connector, without weights or GPUs.

Only imported by the real-vLLM tests (after ``pytest.importorskip("vllm")``). An
:class:`Instance` holds vLLM's own ``Scheduler`` (which builds its own connector,
through vLLM's ``KVConnectorFactory``: P2pkvConnector, or a ``MultiConnector``
around it) and one worker-side connector per TP rank with CPU KV caches laid out
as vLLM lays them out (a hybrid model's groups share one tensor per slot, as
vLLM's ``KVCacheTensor`` overlays them). :meth:`Instance.serve` takes an OpenAI
``/v1/completions`` body and an ``X-Request-Id`` the way vLLM's server does
(vLLM's own ``CompletionRequest`` turns the body into ``SamplingParams``; the
internal request id is ``cmpl-<X-Request-Id>-<random>``) and runs the request to
its end, a "forward pass" writing the reference KV of every computed token into
the request's blocks; the response, with its ``kv_transfer_params``, comes back
through JSON, as over HTTP. :class:`ToyProxy` routes like vLLM's example proxy
for NixlConnector deployments (``toy_proxy_server.py``).
"""

from __future__ import annotations

import copy
import json
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from p2pkv.adapters.vllm._layout import heads_of

MODEL_DIR = str(Path(__file__).parent / "data" / "tiny-llama")
LAYERS = ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"]
KV_HEADS, HEAD = 2, 16
FAST = {"timeout_s": 10.0, "peer_timeout_s": 2.0, "heartbeat_s": 0.2, "pool_bytes": 32 * 2**20}


def free_port(span: int = 2) -> int:
    """A base port with ``span`` free ports from it."""
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


def reference(layer: int, ntok: int) -> torch.Tensor:
    """What the model computes for the prompt's tokens 0..ntok in one layer: [2, ntok, KV_HEADS, HEAD]."""
    g = torch.Generator().manual_seed(4242 + layer)
    return torch.randn(2, ntok, KV_HEADS, HEAD, generator=g).to(torch.bfloat16)


def p2pkv_ktc(role: str, extra: dict[str, Any]) -> dict[str, Any]:
    return {"kv_connector": "P2pkvConnector", "kv_connector_module_path": "p2pkv.adapters.vllm", "kv_role": role,
            "kv_connector_extra_config": extra}


class Instance:
    """One vLLM instance: the real Scheduler and a worker connector per TP rank.

    ``ktc`` is the ``--kv-transfer-config`` JSON object; ``window`` > 0 makes the model hybrid
    (layer 0 full attention, layer 1 sliding-window or chunked-local attention of ``window`` tokens).
    """

    def __init__(self, ktc: dict[str, Any], *, tp: int = 1, block: int = 16, num_blocks: int = 96,
                 window: int = 0, window_kind: str = "sliding_window", max_batched: int = 512,
                 policy: str | None = None):
        from vllm.config import (CacheConfig, DeviceConfig, KVTransferConfig, ModelConfig, SchedulerConfig,
                                 VllmConfig)
        from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
        from vllm.distributed.kv_transfer.kv_connector.v1 import KVConnectorRole
        from vllm.v1.core.sched.scheduler import Scheduler
        from vllm.v1.kv_cache_interface import (ChunkedLocalAttentionSpec, FullAttentionSpec, KVCacheConfig,
                                                KVCacheGroupSpec, KVCacheTensor, SlidingWindowSpec)
        from vllm.v1.structured_output import StructuredOutputManager

        self.tp, self.block, self.window, self.window_kind = tp, block, window, window_kind
        ktc = copy.deepcopy(ktc)
        if policy is not None:
            ktc["kv_load_failure_policy"] = policy
        for child in self._p2pkv_configs(ktc):  # vLLM's parallel_config would say so; here TP is simulated
            child["kv_connector_extra_config"] = dict(child.get("kv_connector_extra_config") or {}, tp_size=tp)
        mc = ModelConfig(model=MODEL_DIR, skip_tokenizer_init=True, dtype="bfloat16", max_model_len=512)
        sc = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=max_batched, max_model_len=512,
                             is_encoder_decoder=False, enable_chunked_prefill=True)
        cc = CacheConfig(block_size=block)
        cc.num_gpu_blocks = num_blocks  # what the engine would have profiled
        self.vllm_config = vc = VllmConfig(model_config=mc, scheduler_config=sc, cache_config=cc,
                                           kv_transfer_config=KVTransferConfig(**ktc),
                                           device_config=DeviceConfig("cpu"))
        heads = KV_HEADS // tp
        full = FullAttentionSpec(block_size=block, num_kv_heads=heads, head_size=HEAD, dtype=torch.bfloat16)
        page = full.page_size_bytes
        if window:
            # vLLM's CPU platform turns the hybrid allocator off; a GPU engine keeps it on for a connector
            # that supports it (SupportsHMA), which is what this instance stands for
            vc.scheduler_config.disable_hybrid_kv_cache_manager = False
            kw = dict(block_size=block, num_kv_heads=heads, head_size=HEAD, dtype=torch.bfloat16)
            wspec = (SlidingWindowSpec(sliding_window=window, **kw) if window_kind == "sliding_window"
                     else ChunkedLocalAttentionSpec(attention_chunk_size=window, **kw))
            self.kcc = KVCacheConfig(num_blocks=num_blocks,
                                     kv_cache_tensors=[KVCacheTensor(size=page * num_blocks, layers=list(LAYERS),
                                                                     layer_stride=0, block_stride=page)],
                                     kv_cache_groups=[KVCacheGroupSpec([LAYERS[0]], full),
                                                      KVCacheGroupSpec([LAYERS[1]], wspec)])
        else:
            self.kcc = KVCacheConfig(num_blocks=num_blocks,
                                     kv_cache_tensors=[KVCacheTensor(size=page * num_blocks, layers=[n],
                                                                     layer_stride=0, block_stride=page)
                                                       for n in LAYERS],
                                     kv_cache_groups=[KVCacheGroupSpec(list(LAYERS), full)])
        self.sched = Scheduler(vc, self.kcc, StructuredOutputManager(vc), block_size=block)
        self.workers, self.caches = [], []
        for r in range(tp):
            vcr = copy.copy(vc)
            rk = copy.deepcopy(ktc)
            for child in self._p2pkv_configs(rk):
                child["kv_connector_extra_config"] = dict(child["kv_connector_extra_config"], rank=r)
            vcr.kv_transfer_config = KVTransferConfig(**rk)
            w = KVConnectorFactory.create_connector(vcr, KVConnectorRole.WORKER, self.kcc)
            if window:  # one tensor per slot, shared by a layer of each group (block ids never collide)
                t = torch.zeros(2, num_blocks, block, heads, HEAD, dtype=torch.bfloat16)
                c = dict.fromkeys(LAYERS, t)
            else:
                c = {n: torch.zeros(2, num_blocks, block, heads, HEAD, dtype=torch.bfloat16) for n in LAYERS}
            w.register_kv_caches(c)
            self.workers.append(w)
            self.caches.append(c)
        self.stats: list[Any] = []  # KVConnectorStats the workers handed over, per step
        self.loaded: dict[str, list[list[int]]] = {}  # request -> its blocks per group when its load finished
        self.computed: dict[str, int] = {}  # request -> tokens this instance's forward passes computed
        self.saves: list[Any] = []  # every hand-off the scheduler side scheduled (SaveSpec)
        from vllm.distributed.kv_transfer.kv_connector.utils import KVOutputAggregator

        self.aggregator = KVOutputAggregator(tp)

    @staticmethod
    def _p2pkv_configs(ktc: dict[str, Any]) -> list[dict[str, Any]]:
        """The P2pkvConnector entries of a --kv-transfer-config (itself, or MultiConnector's children)."""
        return [c for c in [ktc] + list((ktc.get("kv_connector_extra_config") or {}).get("connectors", []))
                if c.get("kv_connector") == "P2pkvConnector"]

    # ------------------------------------------------------------------ vLLM's engine loop, one step
    def _groups_of(self, rid: str) -> tuple[list[int], ...]:
        return self.sched.kv_cache_manager.get_block_ids(rid)

    def _forward(self, out: Any) -> None:
        """The model writes the KV of every token computed so far into the request's blocks."""
        for rid in [r.req_id for r in out.scheduled_new_reqs] + list(out.scheduled_cached_reqs.req_ids):
            req = self.sched.requests[rid]
            ntok = min(req.num_computed_tokens, req.num_prompt_tokens)
            groups = self._groups_of(rid)
            for r, c in enumerate(self.caches):
                lo, hi = heads_of(r, self.tp, KV_HEADS)
                for li, name in enumerate(LAYERS):
                    ref = reference(li, ntok)
                    for i, b in enumerate(groups[li if self.window else 0]):
                        t0, t1 = i * self.block, min((i + 1) * self.block, ntok)
                        if t0 >= ntok:
                            break
                        if b != 0:  # a windowed group's null block holds nothing
                            c[name][:, b, :t1 - t0] = ref[:, t0:t1, lo:hi]

    def step(self) -> dict[str, Any]:
        """One engine step, every TP rank's output merged by vLLM's own KVOutputAggregator (a request's
        transfer is done when every rank says so); returns the EngineCoreOutputs by request id."""
        from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput

        out = self.sched.schedule()
        for rid, n in out.num_scheduled_tokens.items():
            self.computed[rid] = self.computed.get(rid, 0) + n
        meta = out.kv_connector_metadata
        self.saves += list(getattr(meta, "saves", None) or [])
        computing = [r.req_id for r in out.scheduled_new_reqs] + list(out.scheduled_cached_reqs.req_ids)
        sampled = [[7] if self.sched.requests[rid].num_computed_tokens >= self.sched.requests[rid].num_tokens
                   else [] for rid in computing]
        for w in self.workers:
            w.bind_connector_metadata(meta)
            w.start_load_kv(None)
        self._forward(out)
        outputs = []
        for r, w in enumerate(self.workers):
            for name in LAYERS:
                w.save_kv_layer(name, self.caches[r][name], None)
            w.wait_for_save()
            res = w.get_transfer_results(out.finished_req_ids)
            kvo = KVConnectorOutput(finished_sending=res.finished_sending or None,
                                    finished_recving=res.finished_recving or None,
                                    failed_recving=res.failed_recving,
                                    invalid_block_ids=w.get_block_ids_with_load_errors(),  # same pass, as vLLM
                                    kv_connector_stats=w.get_kv_connector_stats())
            w.clear_connector_metadata()
            outputs.append(ModelRunnerOutput(req_ids=list(computing),
                                             req_id_to_index={r: i for i, r in enumerate(computing)},
                                             sampled_token_ids=[list(t) for t in sampled], kv_connector_output=kvo))
        mro = self.aggregator.aggregate(outputs)
        kvo = mro.kv_connector_output
        if kvo.kv_connector_stats is not None:
            self.stats.append(kvo.kv_connector_stats)
        for rid in (kvo.finished_recving or set()) - kvo.failed_recving:
            self.loaded[rid] = [list(g) for g in self._groups_of(rid)]
        eco = self.sched.update_from_output(out, mro)
        return {o.request_id: o for e in eco.values() for o in e.outputs}

    def add(self, body: dict[str, Any], x_request_id: str) -> Any:
        """What vLLM's OpenAI server does with a /v1/completions body: vLLM's own CompletionRequest makes
        the SamplingParams (kv_transfer_params go into extra_args); the internal id gets a random suffix."""
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest
        from vllm.v1.request import Request

        creq = CompletionRequest.model_validate(body)
        sp = creq.to_sampling_params(max_tokens=creq.max_tokens or 16)
        req = Request(f"cmpl-{x_request_id}-{uuid.uuid4().hex[:8]}", list(body["prompt"]), sp, None)
        self.sched.add_request(req)
        return req

    def serve(self, body: dict[str, Any], x_request_id: str, timeout: float = 60.0) -> dict[str, Any]:
        """Run one /v1/completions request to its end; the response (with kv_transfer_params) as JSON."""
        req = self.add(body, x_request_id)
        deadline = time.monotonic() + timeout
        final = None
        while final is None:
            assert time.monotonic() < deadline, f"{req.request_id} did not finish"
            o = self.step().get(req.request_id)
            if o is not None and o.finish_reason is not None:
                final = o
            elif o is None:
                time.sleep(0.005)
        self.last_request = req
        return json.loads(json.dumps({"id": req.request_id, "finish_reason": str(final.finish_reason),
                                      "kv_transfer_params": final.kv_transfer_params}))

    def drain(self, timeout: float = 30.0) -> None:
        """Steps until nothing is pending (the producer's delayed frees, i.e. hand-offs, are done)."""
        deadline = time.monotonic() + timeout
        while self.sched.has_unfinished_requests() or self.sched.get_num_unfinished_requests() or \
                any(w._sends for w in self.workers if hasattr(w, "_sends")):
            assert time.monotonic() < deadline, "instance never drained"
            self.step()
            time.sleep(0.005)

    def check_loaded(self, rid: str, ntok: int) -> int:
        """The blocks the load filled hold the reference, bit-exact (windowed group: its non-null blocks);
        returns how many blocks were checked."""
        from p2pkv.synthetic import same_bits

        groups = self.loaded[rid]
        checked = 0
        for r, c in enumerate(self.caches):
            lo, hi = heads_of(r, self.tp, KV_HEADS)
            for li, name in enumerate(LAYERS):
                ref = reference(li, ntok)
                for i, b in enumerate(groups[li if self.window else 0]):
                    t0, t1 = i * self.block, min((i + 1) * self.block, ntok)
                    if t0 >= ntok:
                        break
                    if b == 0:
                        continue
                    assert same_bits(c[name][:, b, :t1 - t0], ref[:, t0:t1, lo:hi]), (rid, r, name, i, b)
                    checked += 1
        return checked

    def close(self) -> None:
        for w in self.workers:
            w.shutdown()


class ToyProxy:
    """Routes one request the way vLLM's disaggregated-serving example proxy for NixlConnector does
    (``tests/v1/kv_connector/nixl_integration/toy_proxy_server.py``): the prefill request gets
    ``kv_transfer_params`` of its own (``do_remote_decode: true``, every NIXL field null), ``max_tokens`` 1,
    no streaming; the decode request is the client's body with the prefill response's
    ``kv_transfer_params`` copied in verbatim (when there are any); both carry the same X-Request-Id."""

    def __init__(self, prefill: Instance, decode: Instance):
        self.prefill, self.decode = prefill, decode
        self.prefill_response: dict[str, Any] | None = None

    def completions(self, body: dict[str, Any]) -> dict[str, Any]:
        request_id = str(uuid.uuid4())
        req_data = dict(body)
        pre = dict(req_data)
        pre["kv_transfer_params"] = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                                     "remote_block_ids": None, "remote_host": None, "remote_port": None}
        pre["stream"] = False
        pre["max_tokens"] = 1
        if "max_completion_tokens" in pre:
            pre["max_completion_tokens"] = 1
        pre.pop("stream_options", None)
        pre.pop("min_tokens", None)
        self.prefill_response = self.prefill.serve(pre, request_id)
        kv_transfer_params = self.prefill_response.get("kv_transfer_params", {})
        if kv_transfer_params:
            req_data["kv_transfer_params"] = kv_transfer_params
        return self.decode.serve(req_data, request_id)
