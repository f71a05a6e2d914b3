"""Against the real vLLM package (skipped where vLLM is not installed; CI installs it in its own venv).

vLLM 0.33.0's own Scheduler drives P2pkvConnector on both sides: a producer
scheduler and a consumer scheduler, each with its own connector pair and CPU KV
caches, complete a disaggregated request through p2pkv with vLLM's real
Request / SchedulerOutput / ModelRunnerOutput objects. No weights: the model
config is a local config.json and the tokenizer is skipped.
"""

import socket
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm
vllm = pytest.importorskip("vllm")

import torch  # noqa: E402

from p2pkv import new_transfer_id  # noqa: E402
from p2pkv.synthetic import kv_layer, same_bits  # noqa: E402

MODEL_DIR = str(Path(__file__).parent / "data" / "tiny-llama")
LAYERS = ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"]
NUM_BLOCKS, BLOCK, KV_HEADS, HEAD = 64, 16, 2, 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _vllm_config(role: str, port: int):
    from vllm.config import CacheConfig, DeviceConfig, KVTransferConfig, ModelConfig, SchedulerConfig, VllmConfig

    mc = ModelConfig(model=MODEL_DIR, skip_tokenizer_init=True, dtype="bfloat16", max_model_len=512)
    sc = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=512, max_model_len=512, is_encoder_decoder=False)
    ktc = KVTransferConfig(kv_connector="P2pkvConnector", kv_connector_module_path="p2pkv.adapters.vllm",
                           kv_role=role, kv_connector_extra_config={"port": port, "timeout_s": 10.0, "mode": "push"})
    cc = CacheConfig(block_size=BLOCK)
    cc.num_gpu_blocks = NUM_BLOCKS  # what the engine would have profiled
    return VllmConfig(model_config=mc, scheduler_config=sc, cache_config=cc,
                      kv_transfer_config=ktc, device_config=DeviceConfig("cpu"))


def _side(role: str):
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec, KVCacheTensor
    from vllm.v1.structured_output import StructuredOutputManager

    from p2pkv.adapters.vllm import KVConnectorRole, P2pkvConnector

    port = _free_port()
    vc = _vllm_config(role, port)
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=KV_HEADS, head_size=HEAD, dtype=torch.bfloat16)
    page = spec.page_size_bytes
    kcc = KVCacheConfig(num_blocks=NUM_BLOCKS,
                        kv_cache_tensors=[KVCacheTensor(size=page * NUM_BLOCKS, layers=[n], layer_stride=0,
                                                        block_stride=page) for n in LAYERS],
                        kv_cache_groups=[KVCacheGroupSpec(LAYERS, spec)])
    sched = Scheduler(vc, kcc, StructuredOutputManager(vc), block_size=BLOCK)
    worker = P2pkvConnector(vc, KVConnectorRole.WORKER, kcc)
    caches = {n: torch.zeros(2, NUM_BLOCKS, BLOCK, KV_HEADS, HEAD, dtype=torch.bfloat16) for n in LAYERS}
    worker.register_kv_caches(caches)
    return sched, worker, caches, port


def _mro(out, finished_sending=None, finished_recving=None):
    from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput

    rids = [r.req_id for r in out.scheduled_new_reqs] + list(out.scheduled_cached_reqs.req_ids)
    return ModelRunnerOutput(req_ids=rids, req_id_to_index={r: i for i, r in enumerate(rids)},
                             sampled_token_ids=[[7] for _ in rids],
                             kv_connector_output=KVConnectorOutput(finished_sending=finished_sending,
                                                                   finished_recving=finished_recving))


def _wait(fn, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v:
            return v
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_factory_loads_p2pkv_connector():
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1

    from p2pkv.adapters.vllm import HAVE_VLLM, P2pkvConnector

    ktc = KVTransferConfig(kv_connector="P2pkvConnector", kv_connector_module_path="p2pkv.adapters.vllm",
                           kv_role="kv_producer", kv_connector_extra_config={"mode": "push", "timeout_s": 5})
    assert KVConnectorFactory.get_connector_class(ktc) is P2pkvConnector
    assert HAVE_VLLM and issubclass(P2pkvConnector, KVConnectorBase_V1)


@pytest.mark.timeout(300)
def test_real_schedulers_disaggregated_request_end_to_end():
    from vllm.sampling_params import SamplingParams
    from vllm.v1.request import Request

    prod_s, prod_w, prod_c, _ = _side("kv_producer")
    cons_s, cons_w, cons_c, cons_port = _side("kv_consumer")
    try:
        tid = new_transfer_id()
        prompt = list(range(1, 41))  # 40 tokens: 3 blocks
        # ---- prefill instance: vLLM's internal id carries its own random suffix
        sp = SamplingParams(max_tokens=1, extra_args={"kv_transfer_params": {
            "transfer_id": tid, "do_remote_decode": True, "remote_host": "127.0.0.1", "remote_port": cons_port}})
        preq = Request("cmpl-e2e-1a2b3c4d", prompt, sp, None)
        prod_s.add_request(preq)
        out = prod_s.schedule()
        pblocks = list(out.scheduled_new_reqs[0].block_ids[0])
        for li, name in enumerate(LAYERS):  # the forward pass writes the prompt's KV
            for tb, b in enumerate(pblocks):
                prod_c[name][:, b] = kv_layer(tb, li, (2, BLOCK, KV_HEADS, HEAD), torch.bfloat16)
        prod_w.bind_connector_metadata(out.kv_connector_metadata)
        for name in LAYERS:
            prod_w.save_kv_layer(name, prod_c[name], None)
        prod_w.wait_for_save()
        prod_w.clear_connector_metadata()
        eco = prod_s.update_from_output(out, _mro(out))
        outputs = [o for e in eco.values() for o in e.outputs if o.request_id == preq.request_id]
        params = outputs[0].kv_transfer_params
        assert params["transfer_id"] == tid and params["do_remote_prefill"] is True
        sent = _wait(lambda: (prod_w.get_finished({preq.request_id})[0] or set()), "producer sends")
        assert preq.request_id in sent
        # ---- decode instance: a different internal id, the same transfer id
        dreq = Request("cmpl-e2e-9f8e7d6c", prompt, SamplingParams(max_tokens=4, extra_args={
            "kv_transfer_params": params}), None)
        cons_s.add_request(dreq)
        out = cons_s.schedule()
        meta = out.kv_connector_metadata
        assert len(meta.loads) == 1 and meta.loads[0].transfer_id == tid
        dblocks = meta.loads[0].block_ids[0]
        cons_w.bind_connector_metadata(meta)
        cons_w.start_load_kv(None)
        cons_w.clear_connector_metadata()
        recv = _wait(lambda: (cons_w.get_finished(set())[1] or set()), "consumer loads")
        assert dreq.request_id in recv and not cons_w.get_block_ids_with_load_errors()
        cons_s.update_from_output(out, _mro(out, finished_recving=recv))
        out2 = cons_s.schedule()  # the request now runs decode on the loaded KV
        scheduled = [r.req_id for r in out2.scheduled_new_reqs] + list(out2.scheduled_cached_reqs.req_ids)
        assert dreq.request_id in scheduled
        for li, name in enumerate(LAYERS):
            for tb, b in enumerate(dblocks[:3]):
                assert same_bits(cons_c[name][:, b], kv_layer(tb, li, (2, BLOCK, KV_HEADS, HEAD), torch.bfloat16))
    finally:
        prod_w.shutdown()
        cons_w.shutdown()
