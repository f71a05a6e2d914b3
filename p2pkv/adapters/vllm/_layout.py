"""KV cache geometry for the vLLM connector: where the token and head dims are,
which producer rank serves which heads to which consumer rank, the compatibility
fingerprint, and re-blocking on the token axis.

All functions are pure (no engine, no threads) so they are tested without sockets.
Tensors are handled in vLLM's *logical* order (``[2, num_blocks, block_size,
heads, head_size]`` for FlashAttention-style backends, ``[num_blocks,
block_size, head_size]`` for MLA) whatever the physical stride order (NHD or
HND): ``pack`` gathers through the strides, so a packed block is always in
logical order and a layout difference between the two sides is converted by the
pack/unpack pair itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...errors import ConfigError, ShapeMismatch

__all__ = ["LayerGeom", "layer_geom", "heads_of", "pieces_for_consumer", "pieces_from_producer", "piece_name",
           "Fingerprint", "fingerprint_from_config", "incompatibilities", "to_tokens", "from_tokens",
           "assemble", "KVGroup", "groups_from_config", "NULL_BLOCK", "leading_nulls"]


# ----------------------------------------------------------------------------- one layer's geometry
@dataclass(frozen=True)
class LayerGeom:
    """Where the token and head dims sit in a blocks-first cache view.

    ``rest`` is the view's shape after the block dim; ``tok`` and ``head`` index
    into ``rest`` (``head`` is None for MLA's single latent; both are None for
    layouts p2pkv cannot re-block, e.g. kernel blocks smaller than scheduler blocks).
    """

    rest: tuple[int, ...]
    tok: int | None
    head: int | None
    layout: str

    @property
    def convertible(self) -> bool:
        return self.tok is not None

    @property
    def block_size(self) -> int | None:
        return self.rest[self.tok] if self.tok is not None else None

    @property
    def heads(self) -> int:
        return self.rest[self.head] if self.head is not None else 1


def layer_geom(view: torch.Tensor, block_size: int | None) -> LayerGeom:
    """Geometry of a blocks-first view of one layer's cache (vLLM's logical dim order)."""
    rest = tuple(int(s) for s in view.shape[1:])
    if len(rest) == 4:  # [2, bs, H, D]
        tok, head = 1, 2
    elif len(rest) == 3:  # [bs, H, D]
        tok, head = 0, 1
    elif len(rest) == 2:  # MLA [bs, D]
        tok, head = 0, None
    else:
        return LayerGeom(rest, None, None, "?")
    if block_size is not None and rest[tok] != block_size:
        return LayerGeom(rest, None, None, "?")  # e.g. kernel blocks: moved as opaque blocks
    layout = "NHD"
    if head is not None and view.stride(1 + head) > view.stride(1 + tok):
        layout = "HND"
    return LayerGeom(rest, tok, head, layout)


# ----------------------------------------------------------------------------- KV-cache groups (hybrid models)
NULL_BLOCK = 0
"""vLLM's null block id: a windowed group's entries for blocks it no longer (or never) holds."""

_WINDOWED = ("sliding_window", "chunked_local")
# KV-cache spec classes whose content p2pkv cannot move as token-indexed blocks (checked by class name,
# so the check needs no vLLM import): recurrent state, ring buffers, sparse host tiers, cross attention.
_REFUSED_SPECS = ("MambaSpec", "CircularBufferSpec", "HiSparseHotSpec", "HiSparseResidentSpec",
                  "CrossAttentionSpec", "EncoderOnlyAttentionSpec", "RSWASpec")


@dataclass(frozen=True)
class KVGroup:
    """One KV-cache group of a model: its layers share one block table (vLLM's ``KVCacheGroupSpec``).

    ``kind`` is ``"full"`` (every prompt block is kept), ``"sliding_window"`` or
    ``"chunked_local"`` (``window`` tokens: vLLM frees the blocks a decode step no
    longer reads and puts :data:`NULL_BLOCK` in their place). ``transfer`` is False
    for groups vLLM rebuilds itself after a load (``enable_kv_transfer=False``).
    """

    index: int
    kind: str
    block_size: int
    window: int
    layers: tuple[str, ...]
    transfer: bool = True

    @property
    def windowed(self) -> bool:
        return self.kind in _WINDOWED

    def first_needed_token(self, num_tokens: int) -> int:
        """The first of ``num_tokens`` prompt tokens whose KV a decode engine still reads
        (it recomputes the last prompt token, then generates): 0 for full attention."""
        if num_tokens <= 0:
            return 0
        if self.kind == "sliding_window":
            return max(0, num_tokens - self.window)
        if self.kind == "chunked_local":
            return (num_tokens - 1) // self.window * self.window
        return 0

    def describe(self) -> str:
        w = f" {self.window}" if self.windowed else ""
        return f"group {self.index} ({self.kind}{w}, block {self.block_size}, {len(self.layers)} layers)"


def leading_nulls(ids: list[int]) -> int:
    """How many entries at the start of a windowed group's block list are :data:`NULL_BLOCK`."""
    n = 0
    for b in ids:
        if b != NULL_BLOCK:
            break
        n += 1
    return n


def _spec_kind(spec: Any, where: str) -> tuple[str, int]:
    names = [c.__name__ for c in type(spec).__mro__]
    if "UniformTypeKVCacheSpecs" in names:  # one group whose layers differ only in size: classify its layers
        inner = list((getattr(spec, "kv_cache_specs", None) or {}).values())
        kinds = {_spec_kind(s, where) for s in inner}
        if len(kinds) != 1:
            raise ConfigError(f"{where}: layers of different kinds ({sorted(kinds)}) in one KV-cache group")
        return kinds.pop()
    refused = next((n for n in names if n in _REFUSED_SPECS), None)
    if refused is not None:
        raise ConfigError(f"{where}: p2pkv cannot move a {refused} KV cache (only full, sliding-window and "
                          f"chunked-local attention); use another connector for this model")
    tps = getattr(spec, "tokens_per_state", 1)
    if tps != 1:
        raise ConfigError(f"{where}: p2pkv cannot move a KV cache that stores {tps} tokens per state")
    if "SlidingWindowSpec" in names:
        return "sliding_window", int(spec.sliding_window)
    if "ChunkedLocalAttentionSpec" in names:
        return "chunked_local", int(spec.attention_chunk_size)
    # FullAttentionSpec (MLA included; a sliding_window it records is computed, not allocated, as such),
    # or a stand-in without vLLM
    return "full", 0


def groups_from_config(kv_cache_config: Any, block_size: int) -> list[KVGroup]:
    """The KV-cache groups of ``kv_cache_config`` (one full-attention group where it names none).

    Raises
    ------
    ConfigError
        A transferable group holds a kind of cache p2pkv cannot move (Mamba state, ...).
    """
    out = []
    for i, g in enumerate(getattr(kv_cache_config, "kv_cache_groups", None) or []):
        spec = getattr(g, "kv_cache_spec", None)
        layers = tuple(getattr(g, "layer_names", None) or ())
        transfer = bool(getattr(g, "enable_kv_transfer", True))
        where = f"KV-cache group {i} ({type(spec).__name__}, layers {', '.join(layers[:3])}" \
                f"{', ...' if len(layers) > 3 else ''})"
        kind, window = _spec_kind(spec, where) if transfer else ("full", 0)
        if kind in _WINDOWED and window <= 0:
            raise ConfigError(f"{where}: window of {window} tokens")
        bs = int(getattr(spec, "block_size", 0) or block_size)
        out.append(KVGroup(i, kind, bs, window, layers, transfer))
    return out or [KVGroup(0, "full", block_size, 0, ())]


# ----------------------------------------------------------------------------- heads across TP ranks
def heads_of(rank: int, size: int, total: int) -> tuple[int, int]:
    """Global KV-head range ``[lo, hi)`` that TP rank ``rank`` of ``size`` holds.

    With fewer heads than ranks (GQA, MLA) each head is replicated on
    ``size // total`` consecutive ranks, as vLLM shards them.

    Raises
    ------
    ConfigError
        ``total`` and ``size`` do not divide one another.
    """
    if total <= 0 or size <= 0 or not 0 <= rank < size:
        raise ConfigError(f"bad TP geometry: rank {rank} of {size}, {total} KV heads")
    if total >= size:
        if total % size:
            raise ConfigError(f"{total} KV heads cannot be split over TP size {size}")
        per = total // size
        return rank * per, (rank + 1) * per
    if size % total:
        raise ConfigError(f"{total} KV heads cannot be replicated over TP size {size}")
    h = rank * total // size
    return h, h + 1


def pieces_for_consumer(total: int, src_tp: int, dst_tp: int, dst_rank: int) -> list[tuple[int, int, int]]:
    """``[(src_rank, lo, hi), ...]``: which producer rank serves each run of the heads
    consumer rank ``dst_rank`` needs, in head order. A replicated head is fetched once,
    from the holder ``dst_rank % holders`` (spreading consumers over replicas)."""
    lo, hi = heads_of(dst_rank, dst_tp, total)
    out: list[list[int]] = []
    for h in range(lo, hi):
        holders = [r for r in range(src_tp) if heads_of(r, src_tp, total)[0] <= h < heads_of(r, src_tp, total)[1]]
        r = holders[dst_rank % len(holders)]
        if out and out[-1][0] == r and out[-1][2] == h:
            out[-1][2] = h + 1
        else:
            out.append([r, h, h + 1])
    return [(a, b, c) for a, b, c in out]


def pieces_from_producer(total: int, src_tp: int, dst_tp: int, src_rank: int) -> list[tuple[int, int, int]]:
    """``[(dst_rank, lo, hi), ...]``: what producer rank ``src_rank`` must hand to each consumer rank."""
    return [(c, lo, hi) for c in range(dst_tp) for r, lo, hi in pieces_for_consumer(total, src_tp, dst_tp, c)
            if r == src_rank]


def piece_name(layer: str, src_rank: int, src_tp: int, dst_rank: int, dst_tp: int, lo: int, hi: int,
               total: int) -> str:
    """Key name of one piece: ``"<layer>|tp<r>/<P>"`` when rank r hands its whole shard
    to the same rank of an equal-TP consumer (the common case), else
    ``"<layer>|tp<r>/<P>|h<lo>-<hi>>tp<c>/<C>"``."""
    if src_tp == dst_tp and src_rank == dst_rank and (lo, hi) == heads_of(src_rank, src_tp, total):
        return f"{layer}|tp{src_rank}/{src_tp}"
    return f"{layer}|tp{src_rank}/{src_tp}|h{lo}-{hi}>tp{dst_rank}/{dst_tp}"


# ----------------------------------------------------------------------------- fingerprint
@dataclass(frozen=True)
class Fingerprint:
    """What must agree (or be converted) between a producer and a consumer engine."""

    model: str
    layers: int
    dtype: str
    kv_heads: int  # total over all TP ranks
    head_size: int
    block_size: int
    layout: str
    tp_size: int
    mla: bool

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: Any) -> Fingerprint:
        if not isinstance(d, dict):
            raise ConfigError(f"kv_transfer_params p2pkv_fingerprint must be a dict, got {type(d).__name__}")
        try:
            return cls(model=str(d["model"]), layers=int(d["layers"]), dtype=str(d["dtype"]),
                       kv_heads=int(d["kv_heads"]), head_size=int(d["head_size"]),
                       block_size=int(d["block_size"]), layout=str(d.get("layout", "?")),
                       tp_size=int(d["tp_size"]), mla=bool(d.get("mla", False)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"malformed p2pkv_fingerprint {d!r:.200}: {exc}") from None


_MUST_MATCH = ("model", "layers", "dtype", "kv_heads", "head_size", "mla")


def incompatibilities(producer: Fingerprint, consumer: Fingerprint) -> list[str]:
    """Differences p2pkv cannot convert, each naming both values (empty: compatible).
    TP size, block size and layout differences are converted, not listed."""
    out = []
    for f in _MUST_MATCH:
        a, b = getattr(producer, f), getattr(consumer, f)
        unknown = f != "mla" and any(v in ("?", 0) for v in (a, b))  # a side that could not tell
        if a != b and not unknown:
            out.append(f"{f}: producer {a!r} vs consumer {b!r}")
    return out


def _dtype_str(dt: Any) -> str:
    return str(dt).replace("torch.", "")


def fingerprint_from_config(vllm_config: Any, kv_cache_config: Any, extra: dict[str, Any], tp_size: int,
                            block_size: int) -> Fingerprint:
    """This engine's fingerprint, from the configs every vLLM process has (scheduler and workers agree).

    ``kv_connector_extra_config`` may override any field (``fingerprint: {...}``).
    """
    mc = getattr(vllm_config, "model_config", None)
    model = str(getattr(mc, "served_model_name", None) or getattr(mc, "model", None) or "?")
    served = getattr(mc, "served_model_name", None)
    if isinstance(served, (list, tuple)) and served:
        model = str(served[0])
    spec, layers = None, 0
    groups = getattr(kv_cache_config, "kv_cache_groups", None) or []
    if groups:
        spec = getattr(groups[0], "kv_cache_spec", None)
        layers = sum(len(getattr(g, "layer_names", []) or []) for g in groups)
    mla = bool(getattr(mc, "use_mla", False)) or type(spec).__name__.startswith("MLA")
    heads_local = int(getattr(spec, "num_kv_heads", 0) or 0)
    total = 0
    if mc is not None and hasattr(mc, "get_total_num_kv_heads"):
        try:
            total = int(mc.get_total_num_kv_heads())
        except Exception:
            total = 0
    if not total:
        total = heads_local * tp_size if heads_local else 0
    if mla:
        total = 1
    fp = dict(model=model, layers=layers, dtype=_dtype_str(getattr(spec, "dtype", "?")), kv_heads=total,
              head_size=int(getattr(spec, "head_size", 0) or 0), block_size=block_size,
              layout=str(extra.get("kv_layout", "?")), tp_size=tp_size, mla=mla)
    over = extra.get("fingerprint") or {}
    if not isinstance(over, dict):
        raise ConfigError("kv_connector_extra_config.fingerprint must be a dict")
    fp.update(over)
    return Fingerprint.from_dict(fp)


# ----------------------------------------------------------------------------- re-blocking on the token axis
def to_tokens(x: torch.Tensor, geom_tok: int) -> torch.Tensor:
    """``[n, *rest]`` (token dim at ``rest[geom_tok]``) -> ``[n * bs, *rest_without_tok]``."""
    y = x.movedim(1 + geom_tok, 1)
    return y.reshape((y.shape[0] * y.shape[1],) + tuple(y.shape[2:]))


def from_tokens(t: torch.Tensor, geom_tok: int, block_size: int) -> torch.Tensor:
    """Inverse of :func:`to_tokens`: ``[T, ...]`` (T a multiple of block_size) -> contiguous ``[n, *rest]``."""
    n = t.shape[0] // block_size
    y = t.reshape((n, block_size) + tuple(t.shape[1:]))
    return y.movedim(1, 1 + geom_tok).contiguous()


def assemble(pieces: list[torch.Tensor], geom: LayerGeom, src_block: int, first_token: int, end_token: int,
             num_tokens: int, src_first_token: int = 0) -> torch.Tensor:
    """Join head pieces and re-block them to this side's blocks.

    Parameters
    ----------
    pieces:
        Packed producer tensors ``[n_src, *rest_src]`` in head order, each holding a run of heads.
    geom:
        This (consumer) side's geometry.
    src_block:
        The producer's block size.
    first_token, end_token:
        The token range to return (multiples of this side's block size).
    num_tokens:
        Tokens that must be present in the pieces (the prompt).
    src_first_token:
        The token the pieces start at (a windowed group is sent from the window on).

    Returns
    -------
    torch.Tensor
        Contiguous ``[(end_token - first_token) // bs, *geom.rest]``; token slots past
        what the producer sent (beyond the prompt in the last block) are zero.

    Raises
    ------
    ShapeMismatch
        The pieces do not have this side's shape (but for heads and block size), hold too few tokens,
        or start after ``first_token``.
    """
    assert geom.tok is not None
    bs = geom.rest[geom.tok]
    toks = []
    for p in pieces:
        want = list(geom.rest)
        want[geom.tok] = src_block
        if geom.head is not None:
            want[geom.head] = p.shape[1 + geom.head] if p.dim() == len(want) + 1 else -1
        if p.dim() != len(want) + 1 or list(p.shape[1:]) != want:
            raise ShapeMismatch(f"received KV piece of shape {tuple(p.shape)}; this engine expects "
                                f"[n, {', '.join(map(str, want))}] (block size {src_block})")
        toks.append(to_tokens(p, geom.tok))
    head_at = 0 if geom.head is None else (geom.head if geom.head > geom.tok else geom.head + 1)
    t = toks[0] if len(toks) == 1 else torch.cat(toks, dim=head_at)
    if geom.head is not None and t.shape[head_at] != geom.heads:
        raise ShapeMismatch(f"received {t.shape[head_at]} KV heads in all; this rank holds {geom.heads}")
    if src_first_token + t.shape[0] < num_tokens:
        raise ShapeMismatch(f"the producer sent token slots {src_first_token}..{src_first_token + t.shape[0]}; "
                            f"the prompt has {num_tokens}")
    if first_token < src_first_token:
        raise ShapeMismatch(f"the producer sent the KV from token {src_first_token} on; this engine needs it "
                            f"from token {first_token}")
    avail = min(end_token, src_first_token + t.shape[0])
    out = t[first_token - src_first_token:avail - src_first_token]
    if avail < end_token:
        pad = torch.zeros((end_token - avail,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
        out = torch.cat([out, pad], dim=0)
    return from_tokens(out, geom.tok, bs)
