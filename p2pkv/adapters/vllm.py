"""vLLM KV connector on top of p2pkv: ``P2pkvConnector``.

Load it with::

    --kv-transfer-config '{"kv_connector": "P2pkvConnector",
                           "kv_connector_module_path": "p2pkv.adapters.vllm",
                           "kv_role": "kv_producer",
                           "kv_connector_extra_config": {"port": 14500, "mode": "push"}}'

Every p2pkv setting goes in ``kv_connector_extra_config``: the fields of
:class:`p2pkv.EngineConfig` (``port`` is a base: TP rank ``r`` listens on
``port + r``) plus ``mode`` (``push``: the producer streams each layer to the
decode engine as it is computed; ``pull``: the producer parks the KV and the
decode engine fetches it when it has room) and ``load_timeout_s``.

Transfers are named ONLY by ``kv_transfer_params["transfer_id"]``, which the
router/proxy allocates and puts in both the prefill and the decode request.
vLLM's internal request ids (with their per-instance random suffix) are used
for nothing but vLLM's own bookkeeping (``get_finished``). A request without a
``transfer_id`` is served locally, as if no connector were configured.

kv_transfer_params understood:

* prefill (producer) request: ``transfer_id``, ``do_remote_decode: true``, and for
  push mode the decode engine's ``remote_host`` / ``remote_port`` (its p2pkv base
  port). ``request_finished`` returns the params for the decode request:
  ``transfer_id``, ``do_remote_prefill: true``, ``remote_host``, ``remote_port``
  (the producer's, for pull mode), ``remote_tp_size``, ``mode``.
* decode (consumer) request: ``transfer_id``, ``do_remote_prefill: true`` and,
  for pull mode, the producer's ``remote_host`` / ``remote_port``.

Keys are ``TransferKey(transfer_id, f"{layer_name}|tp{rank}/{size}")``: the shard
part names which slice of the heads a tensor holds, so a consumer with another
TP size can later fetch the overlapping shards by name without a protocol
change. Today rank ``i`` of the producer talks to rank ``i`` of the consumer.

Importing this module does not need vLLM (stand-ins are used without it) and
touches no GPU, socket or thread: the engine starts in the worker, at
``register_kv_caches``.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import EngineConfig
from ..errors import ConfigError, P2pkvError
from ..keys import TransferKey, validate_transfer_id

log = logging.getLogger("p2pkv.vllm")

try:  # pragma: no cover - exercised only where vLLM is installed
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1, KVConnectorMetadata,
                                                                    KVConnectorRole)

    HAVE_VLLM = True
except Exception:  # vLLM absent: minimal stand-ins with the same surface
    HAVE_VLLM = False

    class KVConnectorRole(enum.Enum):  # type: ignore[no-redef]
        SCHEDULER = 0
        WORKER = 1

    class KVConnectorMetadata:  # type: ignore[no-redef]
        pass

    class KVConnectorBase_V1:  # type: ignore[no-redef]
        def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any = None):
            if getattr(vllm_config, "kv_transfer_config", None) is None:
                raise ValueError("kv_transfer_config must be set for KVConnectorBase_V1")
            self._vllm_config = vllm_config
            self._kv_transfer_config = vllm_config.kv_transfer_config
            self._kv_cache_config = kv_cache_config
            self._role = role
            self._connector_metadata = None

        @property
        def role(self) -> Any:
            return self._role

        def bind_connector_metadata(self, connector_metadata: Any) -> None:
            self._connector_metadata = connector_metadata

        def clear_connector_metadata(self) -> None:
            self._connector_metadata = None

        def _get_connector_metadata(self) -> Any:
            assert self._connector_metadata is not None
            return self._connector_metadata

        def has_connector_metadata(self) -> bool:
            return self._connector_metadata is not None


__all__ = ["P2pkvConnector", "P2pkvConnectorMetadata", "SaveSpec", "LoadSpec", "HAVE_VLLM"]

_ADAPTER_KEYS = {"mode", "load_timeout_s", "rank", "tp_size", "num_blocks"}


# ----------------------------------------------------------------------------- metadata (pickled to workers)
@dataclass
class SaveSpec:
    req_id: str
    transfer_id: str
    block_ids: list[int]
    mode: str
    peer_host: str | None = None
    peer_port: int | None = None


@dataclass
class LoadSpec:
    req_id: str
    transfer_id: str
    block_ids: list[int]
    skip_blocks: int
    mode: str
    peer_host: str | None = None
    peer_port: int | None = None


@dataclass
class P2pkvConnectorMetadata(KVConnectorMetadata):  # type: ignore[misc]
    saves: list[SaveSpec] = field(default_factory=list)
    loads: list[LoadSpec] = field(default_factory=list)
    aborts: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- helpers
def _extra(vllm_config: Any) -> dict[str, Any]:
    ktc = vllm_config.kv_transfer_config
    extra = dict(getattr(ktc, "kv_connector_extra_config", None) or {})
    return extra


def _params(request: Any) -> dict[str, Any] | None:
    p = getattr(request, "kv_transfer_params", None)
    if not isinstance(p, dict) or "transfer_id" not in p:
        return None
    try:
        validate_transfer_id(p["transfer_id"])
    except P2pkvError as exc:
        log.warning("request %s: ignoring kv_transfer_params with a bad transfer_id: %s",
                    getattr(request, "request_id", "?"), exc)
        return None
    return p


def _block_size(vllm_config: Any) -> int:
    cc = getattr(vllm_config, "cache_config", None)
    return int(getattr(cc, "block_size", 16) or 16)


def _tp_size(vllm_config: Any, extra: dict[str, Any]) -> int:
    if "tp_size" in extra:
        return int(extra["tp_size"])
    pc = getattr(vllm_config, "parallel_config", None)
    return int(getattr(pc, "tensor_parallel_size", 1) or 1)


def _first_group(block_ids: Any) -> list[int]:
    """vLLM passes block ids per KV-cache group: ([ids...],) — p2pkv moves the first group."""
    if block_ids is None:
        return []
    if isinstance(block_ids, (tuple, list)) and block_ids and isinstance(block_ids[0], (list, tuple)):
        return list(block_ids[0])
    return list(block_ids)


def block_view(t: torch.Tensor, num_blocks: int | None) -> torch.Tensor:
    """View a layer's KV cache blocks-first, whatever vLLM's layout.

    Handles ``[num_blocks, ...]``, FlashAttention's ``[2, num_blocks, ...]``, and
    kernel blocks smaller than scheduler blocks (a first dim that is a multiple
    of the scheduler's block count).
    """
    if num_blocks is None or num_blocks <= 0:
        return t.transpose(0, 1) if t.dim() >= 2 and t.shape[0] == 2 and t.shape[1] > 2 else t
    if t.shape[0] == num_blocks:
        return t
    if t.dim() >= 2 and t.shape[1] == num_blocks:
        return t.transpose(0, 1)
    if t.shape[0] % num_blocks == 0:
        return t.unflatten(0, (num_blocks, t.shape[0] // num_blocks))
    if t.dim() >= 2 and t.shape[1] % num_blocks == 0:
        return t.transpose(0, 1).unflatten(0, (num_blocks, t.shape[1] // num_blocks))
    raise ConfigError(f"cannot find the block dimension ({num_blocks} blocks) in a KV cache of shape {tuple(t.shape)}")


# ----------------------------------------------------------------------------- the connector
class P2pkvConnector(KVConnectorBase_V1):  # type: ignore[misc]
    """vLLM ``KVConnectorBase_V1`` backed by a p2pkv :class:`~p2pkv.Engine`."""

    def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any = None):
        super().__init__(vllm_config, role, kv_cache_config)
        extra = _extra(vllm_config)
        self._extra = extra
        ktc = vllm_config.kv_transfer_config
        kv_role = getattr(ktc, "kv_role", "kv_both")
        if kv_role not in ("kv_producer", "kv_consumer", "kv_both"):
            raise ConfigError(f"kv_role must be kv_producer, kv_consumer or kv_both, got {kv_role!r}")
        self.is_producer = kv_role in ("kv_producer", "kv_both")
        self.is_consumer = kv_role in ("kv_consumer", "kv_both")
        self.mode = extra.get("mode", "push")
        if self.mode not in ("push", "pull"):
            raise ConfigError(f"kv_connector_extra_config.mode must be 'push' or 'pull', got {self.mode!r}")
        engine_fields = {k: v for k, v in extra.items() if k not in _ADAPTER_KEYS}
        self._engine_cfg = EngineConfig.from_dict(engine_fields)  # validates early, in every process
        self.load_timeout_s = float(extra.get("load_timeout_s", self._engine_cfg.timeout_s))
        self.block_size = _block_size(vllm_config)
        self.tp_size = _tp_size(vllm_config, extra)
        self.num_blocks = getattr(kv_cache_config, "num_blocks", None) or extra.get("num_blocks")
        # scheduler side
        self._params: dict[str, dict[str, Any]] = {}
        self._blocks: dict[str, list[int]] = {}
        self._computed: dict[str, int] = {}
        self._prompt_len: dict[str, int] = {}
        self._saved: set[str] = set()
        self._loading_tids: dict[str, str] = {}
        self._pending_loads: list[LoadSpec] = []
        self._pending_aborts: list[str] = []
        # worker side
        self._engine: Any = None
        self._caches: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()
        self._send_handles: dict[str, list[Any]] = {}
        self._send_buffers: dict[str, list[Any]] = {}
        self._finished_asked: set[str] = set()
        self._done_recving: set[str] = set()
        self._load_errors: set[int] = set()
        self._loaders: dict[str, threading.Thread] = {}
        self._stream: Any = None

    # ================================================================== scheduler side
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        p = _params(request)
        rid = request.request_id
        if p is None:
            return 0, False
        self._params[rid] = p
        self._prompt_len[rid] = len(request.prompt_token_ids)
        if not (self.is_consumer and p.get("do_remote_prefill")):
            return 0, False
        tid = p["transfer_id"]
        owner = self._loading_tids.get(tid)
        if owner is not None and owner != rid:
            return 0, False  # n > 1: one sibling loads, the others reuse its blocks or compute
        count = len(request.prompt_token_ids) - num_computed_tokens
        if count <= 0:
            return 0, False
        self._computed[rid] = num_computed_tokens
        return count, True

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        rid = request.request_id
        p = self._params.get(rid) or _params(request)
        if p is None:
            return
        self._params[rid] = p
        ids = _first_group(blocks.get_block_ids() if hasattr(blocks, "get_block_ids") else blocks)
        if self.is_consumer and p.get("do_remote_prefill") and num_external_tokens > 0:
            tid = p["transfer_id"]
            self._loading_tids[tid] = rid
            skip = self._computed.get(rid, 0) // self.block_size
            self._pending_loads.append(LoadSpec(rid, tid, ids, skip, p.get("mode", self.mode),
                                                p.get("remote_host"), p.get("remote_port")))
        elif self.is_producer and p.get("do_remote_decode"):
            self._blocks[rid] = ids

    def build_connector_meta(self, scheduler_output: Any) -> P2pkvConnectorMetadata:
        meta = P2pkvConnectorMetadata(loads=self._pending_loads, aborts=self._pending_aborts)
        self._pending_loads, self._pending_aborts = [], []
        if not self.is_producer:
            return meta
        nsched = getattr(scheduler_output, "num_scheduled_tokens", {}) or {}
        for nr in getattr(scheduler_output, "scheduled_new_reqs", []) or []:
            rid = nr.req_id
            if rid in self._params and self._params[rid].get("do_remote_decode"):
                self._blocks[rid] = _first_group(getattr(nr, "block_ids", None)) or self._blocks.get(rid, [])
                self._prompt_len.setdefault(rid, len(getattr(nr, "prompt_token_ids", []) or []))
                self._maybe_save(meta, rid, int(getattr(nr, "num_computed_tokens", 0)) + int(nsched.get(rid, 0)))
        cached = getattr(scheduler_output, "scheduled_cached_reqs", None)
        if cached is not None:
            rids = list(getattr(cached, "req_ids", []) or [])
            new_blocks = list(getattr(cached, "new_block_ids", []) or [])
            computed = list(getattr(cached, "num_computed_tokens", []) or [])
            for i, rid in enumerate(rids):
                if rid not in self._params or not self._params[rid].get("do_remote_decode"):
                    continue
                if i < len(new_blocks) and new_blocks[i] is not None:
                    self._blocks.setdefault(rid, []).extend(_first_group(new_blocks[i]))
                done = (computed[i] if i < len(computed) else 0) + int(nsched.get(rid, 0))
                self._maybe_save(meta, rid, done)
        return meta

    def _maybe_save(self, meta: P2pkvConnectorMetadata, rid: str, tokens_after_step: int) -> None:
        """Send once, in the step that completes the prompt (chunked prefill: the last chunk)."""
        if rid in self._saved or tokens_after_step < self._prompt_len.get(rid, 1 << 62):
            return
        p = self._params[rid]
        nblk = -(-self._prompt_len[rid] // self.block_size)
        ids = self._blocks.get(rid, [])[:nblk]
        self._saved.add(rid)
        meta.saves.append(SaveSpec(rid, p["transfer_id"], ids, p.get("mode", self.mode), p.get("remote_host"),
                                   p.get("remote_port")))

    def request_finished(self, request: Any, block_ids: Any) -> tuple[bool, dict[str, Any] | None]:
        rid = request.request_id
        p = self._params.pop(rid, None)
        self._blocks.pop(rid, None)
        self._computed.pop(rid, None)
        self._prompt_len.pop(rid, None)
        if p is None:
            return False, None
        tid = p["transfer_id"]
        if self._loading_tids.get(tid) == rid:
            del self._loading_tids[tid]
        saved = rid in self._saved
        self._saved.discard(rid)
        if self.is_producer and p.get("do_remote_decode"):
            if not saved:
                self._pending_aborts.append(tid)  # finished (or aborted) before its KV was sent
                return False, None
            cfg = self._engine_cfg
            host = cfg.advertise_host or (cfg.host if cfg.host not in ("0.0.0.0", "::") else "127.0.0.1")
            return True, {"transfer_id": tid, "do_remote_prefill": True, "do_remote_decode": False,
                          "remote_host": host, "remote_port": cfg.port, "remote_tp_size": self.tp_size,
                          "mode": p.get("mode", self.mode)}
        status = getattr(request, "status", None)
        if self.is_consumer and p.get("do_remote_prefill") and "FINISHED_ABORTED" in str(status):
            self._pending_aborts.append(tid)
        return False, None

    # ================================================================== worker side
    def _rank(self) -> int:
        if "rank" in self._extra:
            return int(self._extra["rank"])
        if HAVE_VLLM:  # pragma: no cover
            try:
                from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

                return int(get_tensor_model_parallel_rank())
            except Exception:
                return 0
        return 0

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from ..engine import Engine

        self._caches = {name: block_view(t, self.num_blocks) for name, t in kv_caches.items()}
        first = next(iter(kv_caches.values()), None)
        device = "cpu" if first is None or first.device.type != "cuda" else f"cuda:{first.device.index or 0}"
        cfg = self._engine_cfg
        self.rank = self._rank()
        port = cfg.port + self.rank if cfg.port else 0
        if self._engine is None:
            self._engine = Engine(cfg, device=device, port=port)
            log.info("p2pkv engine for TP rank %d listening on %s", self.rank, self._engine.address)
        if device != "cpu":
            self._stream = torch.cuda.Stream(first.device)

    @property
    def engine(self) -> Any:
        return self._engine

    def _key(self, tid: str, layer_name: str) -> TransferKey:
        return TransferKey(tid, f"{layer_name}|tp{self.rank}/{self.tp_size}")

    def _peer(self, host: Any, port: Any) -> str:
        if not isinstance(host, str) or not isinstance(port, int):
            raise ConfigError("kv_transfer_params need remote_host (str) and remote_port (int) for this mode")
        return f"{host}:{port + self.rank}"

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._connector_metadata
        if not isinstance(meta, P2pkvConnectorMetadata) or self._engine is None:
            return
        for tid in meta.aborts:
            try:
                self._engine.abort(tid)
            except P2pkvError as exc:
                log.warning("abort of %s failed: %s", tid, exc)
        for spec in meta.loads:
            th = threading.Thread(target=self._load, args=(spec,), name=f"p2pkv-load-{spec.req_id}", daemon=True)
            self._loaders[spec.req_id] = th
            th.start()

    def _load(self, spec: LoadSpec) -> None:
        """Receive every layer of one request and scatter it into its blocks (a loader thread)."""
        from ..kernels import BlockIds, unpack

        eng = self._engine
        ok = True
        deadline = time.monotonic() + self.load_timeout_s
        targets = spec.block_ids[spec.skip_blocks:]
        try:
            peer = self._peer(spec.peer_host, spec.peer_port) if spec.mode == "pull" else None
            ids_cache: dict[Any, Any] = {}
            ctx = torch.cuda.stream(self._stream) if self._stream is not None else _nullcontext()
            with ctx:
                for name, cache in self._caches.items():
                    key = self._key(spec.transfer_id, name)
                    remaining = max(0.0, deadline - time.monotonic())
                    data = eng.pull(peer, key, timeout=remaining) if peer else eng.recv(key, timeout=remaining)
                    rows = data.shape[0]
                    if rows < len(spec.block_ids):
                        raise ConfigError(f"{key}: {rows} blocks arrived, {len(spec.block_ids)} expected")
                    src = data[spec.skip_blocks:len(spec.block_ids)]
                    ids = ids_cache.get(cache.device)
                    if ids is None:
                        ids = ids_cache[cache.device] = BlockIds(targets, cache.shape[0], cache.device)
                    if len(targets):
                        unpack(src.contiguous(), cache, ids)
                if self._stream is not None:
                    self._stream.synchronize()
        except Exception as exc:  # a failed load must never hang or crash vLLM: report the blocks
            ok = False
            log.warning("KV load for request %s (transfer %s) failed: %s", spec.req_id, spec.transfer_id, exc)
            try:
                eng.abort(spec.transfer_id)
            except P2pkvError:
                pass
        with self._lock:
            if not ok:
                self._load_errors.update(targets)
            self._done_recving.add(spec.req_id)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are asynchronous (between steps); vLLM runs the request once get_finished reports it

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        meta = self._connector_metadata
        if not isinstance(meta, P2pkvConnectorMetadata) or not meta.saves or self._engine is None:
            return
        from ..kernels import pack

        cache = self._caches.get(layer_name)
        if cache is None:
            cache = block_view(kv_layer, self.num_blocks)
        eng = self._engine
        for spec in meta.saves:
            key = self._key(spec.transfer_id, layer_name)
            try:
                packed = pack(cache, spec.block_ids)
                if spec.mode == "pull":
                    eng.publish(key, packed)
                else:
                    h = eng.send(self._peer(spec.peer_host, spec.peer_port), key, packed)
                    with self._lock:
                        self._send_handles.setdefault(spec.req_id, []).append(h)
            except P2pkvError as exc:
                log.warning("saving %s failed: %s", key, exc)
        with self._lock:
            for spec in meta.saves:
                self._send_handles.setdefault(spec.req_id, [])

    def wait_for_save(self) -> None:
        return  # sends are asynchronous; request_finished delays freeing the blocks until get_finished

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        with self._lock:
            self._finished_asked |= set(finished_req_ids)
            done_sending = set()
            for rid in list(self._send_handles):
                if rid in self._finished_asked and all(h.done() for h in self._send_handles[rid]):
                    failed = [h for h in self._send_handles[rid] if h.error is not None]
                    if failed:
                        log.warning("request %s: %d of %d KV sends failed (%s)", rid, len(failed),
                                    len(self._send_handles[rid]), failed[0].error)
                    del self._send_handles[rid]
                    self._finished_asked.discard(rid)
                    done_sending.add(rid)
            done_recving, self._done_recving = self._done_recving, set()
            for rid in done_recving:
                self._loaders.pop(rid, None)
        return (done_sending or None), (done_recving or None)

    def get_block_ids_with_load_errors(self) -> set[int]:
        with self._lock:
            errs, self._load_errors = self._load_errors, set()
        return errs

    def shutdown(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
