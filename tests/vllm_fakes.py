"""Stand-ins for the vLLM objects a KV connector sees (only vLLM objects are faked)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from p2pkv.synthetic import kv_layer

LAYERS = [f"model.layers.{i}.self_attn.attn" for i in range(32)]
NUM_BLOCKS, BLOCK, HEADS, HEAD = 64, 16, 2, 8


@dataclass
class KVTransferConfig:
    kv_role: str
    kv_connector_extra_config: dict[str, Any]
    kv_connector: str = "P2pkvConnector"
    kv_connector_module_path: str = "p2pkv.adapters.vllm"


@dataclass
class CacheConfig:
    block_size: int = BLOCK


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1


@dataclass
class VllmConfig:
    kv_transfer_config: KVTransferConfig
    cache_config: CacheConfig = field(default_factory=CacheConfig)
    parallel_config: ParallelConfig = field(default_factory=ParallelConfig)


@dataclass
class KVCacheConfig:
    num_blocks: int = NUM_BLOCKS


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    kv_transfer_params: dict[str, Any] | None
    status: str = "RUNNING"


class KVCacheBlocks:
    """A request's blocks: one list (one KV-cache group) or a tuple of lists (one per group)."""

    def __init__(self, ids: Any):
        self._ids = ids

    def get_block_ids(self) -> tuple[list[int], ...]:
        if isinstance(self._ids, tuple):
            return tuple(list(g) for g in self._ids)
        return (list(self._ids),)


@dataclass
class NewRequestData:
    req_id: str
    prompt_token_ids: list[int]
    block_ids: tuple[list[int], ...]
    num_computed_tokens: int


@dataclass
class CachedRequestData:
    req_ids: list[str] = field(default_factory=list)
    new_block_ids: list[Any] = field(default_factory=list)
    num_computed_tokens: list[int] = field(default_factory=list)


@dataclass
class SchedulerOutput:
    scheduled_new_reqs: list[NewRequestData] = field(default_factory=list)
    scheduled_cached_reqs: CachedRequestData = field(default_factory=CachedRequestData)
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)


def make_connectors(role: str, extra: dict[str, Any]):
    from p2pkv.adapters.vllm import KVConnectorRole, P2pkvConnector

    cfg = VllmConfig(KVTransferConfig(role, extra))
    sched = P2pkvConnector(cfg, KVConnectorRole.SCHEDULER, KVCacheConfig())
    worker = P2pkvConnector(cfg, KVConnectorRole.WORKER, KVCacheConfig())
    # FlashAttention layout: [2, num_blocks, block_size, heads, head]
    caches = {name: torch.zeros(2, NUM_BLOCKS, BLOCK, HEADS, HEAD, dtype=torch.bfloat16) for name in LAYERS}
    worker.register_kv_caches(caches)
    return sched, worker, caches


def expected_block(seed: int, layer: int, token_block: int) -> torch.Tensor:
    """What the prefill computed for one token block of one layer: [2, BLOCK, HEADS, HEAD]."""
    return kv_layer(seed * 1000 + token_block, layer, (2, BLOCK, HEADS, HEAD), torch.bfloat16)


# ----------------------------------------------------------------------------- richer configs (fingerprint, TP)
@dataclass
class AttnSpec:
    block_size: int
    num_kv_heads: int
    head_size: int
    dtype: Any = torch.bfloat16


@dataclass
class SlidingWindowSpec(AttnSpec):
    sliding_window: int = 0


@dataclass
class ChunkedLocalAttentionSpec(AttnSpec):
    attention_chunk_size: int = 0


@dataclass
class MambaSpec:
    block_size: int = 16


@dataclass
class GroupSpec:
    layer_names: list[str]
    kv_cache_spec: AttnSpec


@dataclass
class FullKVCacheConfig:
    num_blocks: int
    kv_cache_groups: list[GroupSpec]


@dataclass
class ModelConfig:
    model: str
    total_kv_heads: int
    use_mla: bool = False

    def get_total_num_kv_heads(self) -> int:
        return self.total_kv_heads


@dataclass
class FullVllmConfig:
    kv_transfer_config: KVTransferConfig
    cache_config: CacheConfig
    parallel_config: ParallelConfig
    model_config: ModelConfig
