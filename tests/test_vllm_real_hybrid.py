"""Against the real vLLM 0.33.0 (skipped without it; CI stage 2 installs it in its own venv): hybrid models.

A model with a full-attention KV-cache group and a sliding-window (Gemma 3, gpt-oss) or chunked-local
attention group, on two real vLLM Schedulers with vLLM's hybrid KV-cache manager on (P2pkvConnector
declares SupportsHMA): every group moves with its own block ids, the windowed group only the blocks a
decode step still reads, into exactly the blocks vLLM allocated for it on the decode side, bit-exact.
"""

import pytest

pytestmark = pytest.mark.vllm
vllm = pytest.importorskip("vllm")

import torch  # noqa: E402

from p2pkv import ConfigError, new_transfer_id  # noqa: E402
from p2pkv.adapters.vllm._layout import KVGroup  # noqa: E402

from .vllm_instance import FAST, HEAD, LAYERS, Instance, free_port, p2pkv_ktc  # noqa: E402


def _route(pre: Instance, dec: Instance, prompt, mode):
    """p2pkv's own routing (the router names the transfer; push mode: the decode engine's address)."""
    params = {"transfer_id": new_transfer_id(), "do_remote_decode": True}
    if mode == "push":
        params.update(remote_host="127.0.0.1", remote_port=dec.workers[0].engine.port, decode_tp_size=dec.tp)
    else:
        params.update(decode_tp_size=dec.tp)
    resp = pre.serve({"model": "tiny", "prompt": prompt, "max_tokens": 1, "kv_transfer_params": params}, "hy-p")
    assert resp["kv_transfer_params"]["transfer_id"] == params["transfer_id"]
    return dec.serve({"model": "tiny", "prompt": prompt, "max_tokens": 3,
                      "kv_transfer_params": resp["kv_transfer_params"]}, "hy-d")


CASES = [
    # mode, window kind, window, producer max batched tokens (chunked prefill), producer TP, decode TP
    ("push", "sliding_window", 32, 512, 1, 1),
    ("pull", "sliding_window", 32, 512, 1, 1),
    ("pull", "sliding_window", 40, 48, 1, 1),  # chunked prefill: the producer frees window blocks as it goes
    ("push", "chunked_local", 32, 512, 1, 1),
    ("pull", "chunked_local", 48, 32, 1, 1),
    ("pull", "sliding_window", 32, 512, 2, 1),  # heterogeneous TP
    ("push", "sliding_window", 32, 512, 1, 2),
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode,kind,window,batched,ptp,dtp", CASES,
                         ids=[f"{m}-{k}{w}-chunk{b}-tp{p}to{d}" for m, k, w, b, p, d in CASES])
def test_every_kv_cache_group_moves_bit_exact(mode, kind, window, batched, ptp, dtp):
    pre = Instance(p2pkv_ktc("kv_producer", dict(FAST, port=free_port(ptp), mode=mode)), tp=ptp, window=window,
                   window_kind=kind, max_batched=batched)
    dec = Instance(p2pkv_ktc("kv_consumer", dict(FAST, port=free_port(dtp), mode=mode)), tp=dtp, window=window,
                   window_kind=kind)
    try:
        assert [g.kind for g in dec.workers[0].groups] == ["full", kind]
        prompt = list(range(1, 101))  # 100 tokens: 7 blocks of 16
        resp = _route(pre, dec, prompt, mode)
        assert resp["finish_reason"] == "length"
        rid = dec.last_request.request_id
        full, win = dec.loaded[rid]
        need = KVGroup(1, kind, 16, window, ()).first_needed_token(len(prompt)) // 16
        assert 0 not in full[:7] and win[:need] == [0] * need and 0 not in win[need:7]  # vLLM's own allocation
        (save,) = pre.saves
        assert len(save.block_ids[0]) == 7 and len(save.block_ids[1]) == 7 - need  # only the window moved
        assert dec.check_loaded(rid, len(prompt)) == dtp * (7 + 7 - need)
        assert dec.computed[rid] <= 1 + 3  # the decode side recomputed nothing but the last prompt token
        pre.drain()
    finally:
        pre.close()
        dec.close()


@pytest.mark.timeout(300)
def test_hybrid_prefill_to_a_decode_engine_without_the_window_fails_loudly():
    """The decode engine keeps every block of every layer (hybrid allocator off: one group); the producer
    sent the windowed layer's window only: the load fails (kv_load_failure_policy "fail": an error), never
    stale or missing KV."""
    pre = Instance(p2pkv_ktc("kv_producer", dict(FAST, port=free_port(), mode="pull")), window=32)
    dec = Instance(p2pkv_ktc("kv_consumer", dict(FAST, port=free_port(), mode="pull")), policy="fail")
    try:
        resp = _route(pre, dec, list(range(1, 101)), "pull")
        assert resp["finish_reason"] == "error" and not dec.loaded
    finally:
        pre.close()
        dec.close()


def test_mamba_state_is_refused_at_start():
    from vllm.config import KVTransferConfig
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec, MambaSpec

    from p2pkv.adapters.vllm import KVConnectorRole, P2pkvConnector

    inst = Instance(p2pkv_ktc("kv_consumer", dict(FAST, port=free_port(), mode="pull")))
    try:
        vc = inst.vllm_config
        vc.kv_transfer_config = KVTransferConfig(**p2pkv_ktc("kv_consumer", dict(FAST, port=free_port())))
        full = FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=HEAD, dtype=torch.bfloat16)
        mamba = MambaSpec(block_size=16, shapes=((4, 8),), dtypes=(torch.bfloat16,))
        kcc = KVCacheConfig(num_blocks=8, kv_cache_tensors=[],
                            kv_cache_groups=[KVCacheGroupSpec([LAYERS[0]], full), KVCacheGroupSpec([LAYERS[1]], mamba)])
        with pytest.raises(ConfigError, match="cannot move a MambaSpec KV cache"):
            P2pkvConnector(vc, KVConnectorRole.SCHEDULER, kcc)
    finally:
        inst.close()
