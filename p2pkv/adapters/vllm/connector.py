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
decode engine fetches it when it has room), ``load_timeout_s``,
``loader_threads`` (loads run on this many worker threads fed by one queue,
default 2), ``decode_tp_size`` (a producer's default for the decode engines'
TP size) and ``fingerprint`` (overrides of this engine's compatibility
fingerprint fields).

Transfers are named ONLY by ``kv_transfer_params["transfer_id"]``, which the
router/proxy allocates and puts in both the prefill and the decode request.
vLLM's internal request ids are used for nothing but vLLM's own bookkeeping.
A request without a ``transfer_id`` is served locally.

kv_transfer_params understood:

* prefill (producer) request: ``transfer_id``, ``do_remote_decode: true``; for
  push mode the decode engine's ``remote_host`` / ``remote_port`` (its p2pkv base
  port); ``decode_tp_size`` when the decode engine's TP size differs from the
  producer's (or ``decode_tp_size`` in the producer's extra config).
  ``request_finished`` returns the params for the decode request:
  ``transfer_id``, ``do_remote_prefill: true``, ``remote_host``, ``remote_port``
  (the producer's), ``remote_tp_size``, ``remote_block_size``,
  ``decode_tp_size``, ``mode`` and ``p2pkv_fingerprint`` (model, layers, dtype,
  KV heads, head size, block size, layout, TP size, MLA).
* decode (consumer) request: those params, unchanged.

Keys are ``TransferKey(transfer_id, name)``; ``name`` is
``"<layer>|tp<r>/<P>"`` when producer rank ``r`` hands its whole shard to the
same rank of an equal-TP consumer, else
``"<layer>|tp<r>/<P>|h<lo>-<hi>>tp<c>/<C>"`` (global KV heads ``lo..hi`` from
producer rank ``r`` of ``P`` to consumer rank ``c`` of ``C``).

Importing this module does not need vLLM and touches no GPU, socket or
thread: the engine and the worker threads start in the worker.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import queue
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ...config import EngineConfig
from ...errors import ConfigError, P2pkvError, PeerLost, ShapeMismatch, TransferTimeout
from ...keys import TransferKey, validate_transfer_id
from ._base import (HAVE_VLLM, KVConnectorBase_V1, KVConnectorMetadata, KVConnectorRole,
                    KVConnectorTransferResults)
from ._layout import (Fingerprint, LayerGeom, assemble, fingerprint_from_config, heads_of, incompatibilities,
                      layer_geom, piece_name, pieces_for_consumer, pieces_from_producer)
from ._stats import P2pkvKVConnectorStats, StatsCollector

log = logging.getLogger("p2pkv.vllm")

__all__ = ["P2pkvConnector", "P2pkvConnectorMetadata", "SaveSpec", "LoadSpec", "HAVE_VLLM", "KVConnectorRole",
           "block_view"]

_ADAPTER_KEYS = {"mode", "load_timeout_s", "rank", "tp_size", "num_blocks", "loader_threads", "fingerprint",
                 "kv_layout", "decode_tp_size"}
_NORMAL_FINISH = ("FINISHED_STOPPED", "FINISHED_LENGTH_CAPPED", "FINISHED_REPETITION")
_SEEN_TIDS = 1 << 16  # transfer ids remembered to refuse reuse
_WAIT_SLICE_S = 0.5  # push loads re-check the producer's liveness this often


# ----------------------------------------------------------------------------- metadata (pickled to workers)
@dataclass
class SaveSpec:
    """One producer request whose prompt KV is handed off in this step."""

    req_id: str
    transfer_id: str
    block_ids: list[int]
    mode: str
    peer_host: str | None = None
    peer_port: int | None = None
    dst_tp: int = 0  # the decode engine's TP size (0: the same as the producer's)


@dataclass
class LoadSpec:
    """One consumer request whose prompt KV is loaded from a producer."""

    req_id: str
    transfer_id: str
    block_ids: list[int]
    skip_blocks: int
    mode: str
    peer_host: str | None = None
    peer_port: int | None = None
    num_tokens: int = 0
    src_tp: int = 0  # the producer's TP size (0: the same as ours)
    src_block: int = 0  # the producer's block size (0: the same as ours)
    refuse: str | None = None  # the scheduler refused this load (reuse, incompatibility): fail it at once


@dataclass
class P2pkvConnectorMetadata(KVConnectorMetadata):  # type: ignore[misc]
    saves: list[SaveSpec] = field(default_factory=list)
    loads: list[LoadSpec] = field(default_factory=list)
    aborts: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- helpers
def _extra(vllm_config: Any) -> dict[str, Any]:
    ktc = vllm_config.kv_transfer_config
    return dict(getattr(ktc, "kv_connector_extra_config", None) or {})


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


def _int_param(p: dict[str, Any], name: str, default: int) -> int:
    v = p.get(name, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ConfigError(f"kv_transfer_params {name} must be a non-negative int, got {v!r:.40}")
    return v or default


def block_view(t: torch.Tensor, num_blocks: int | None) -> torch.Tensor:
    """View a layer's KV cache blocks-first, whatever vLLM's layout.

    Handles ``[num_blocks, ...]``, FlashAttention's ``[2, num_blocks, ...]``, and
    kernel blocks smaller than scheduler blocks (a first dim that is a multiple
    of the scheduler's block count).

    Raises
    ------
    ConfigError
        No dimension of ``t`` matches ``num_blocks``.
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


def _probe(host: str, port: int, timeout: float = 1.0) -> None:
    """Fail at once when nothing listens at ``host:port`` (a producer that is gone).

    Raises
    ------
    PeerLost
        The connection was refused.
    """
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except ConnectionRefusedError:
        raise PeerLost("the producer is gone (connection refused)", peer=f"{host}:{port}") from None
    except OSError:
        pass  # inconclusive (slow network): the transfer's own deadline decides


class _Workers:
    """A fixed set of daemon threads fed by one queue (started on first use)."""

    def __init__(self, name: str, n: int) -> None:
        self._name = name
        self._n = max(1, n)
        self._q: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def submit(self, fn: Callable[[], None]) -> None:
        if not self._threads:
            with self._lock:
                if not self._threads:
                    for i in range(self._n):
                        th = threading.Thread(target=self._run, name=f"{self._name}-{i}", daemon=True)
                        th.start()
                        self._threads.append(th)
        self._q.put(fn)

    def _run(self) -> None:
        while True:
            fn = self._q.get()
            if fn is None:
                return
            try:
                fn()
            except Exception:  # a job reports its own failure; never let a thread die
                log.exception("%s: job failed", self._name)

    @property
    def threads(self) -> int:
        return sum(th.is_alive() for th in self._threads)

    def close(self, timeout: float = 5.0) -> None:
        for _ in self._threads:
            self._q.put(None)
        deadline = time.monotonic() + timeout
        for th in self._threads:
            th.join(max(0.0, deadline - time.monotonic()))
        self._threads = []


class _SendState:
    __slots__ = ("transfer_id", "handles", "pending", "failed", "requests")

    def __init__(self, transfer_id: str) -> None:
        self.transfer_id = transfer_id
        self.handles: list[Any] = []
        self.requests: dict[tuple[str, str], Any] = {}  # (peer, piece suffix) -> RequestHandle
        self.pending = 0  # publishes queued, not yet done
        self.failed = False


class _SavePlan:
    """One request's hand-off, prepared once per step (block ids uploaded once, pieces resolved)."""

    __slots__ = ("spec", "ids", "pieces", "state")

    def __init__(self, spec: SaveSpec, ids: Any, pieces: list[tuple[str, int, int, bool, str | None]],
                 state: _SendState) -> None:
        self.spec = spec
        self.ids = ids
        self.pieces = pieces  # (name suffix, local head lo, n heads, whole shard?, push peer)
        self.state = state


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
        self.loader_threads = int(extra.get("loader_threads", 2))
        if self.loader_threads < 1:
            raise ConfigError(f"kv_connector_extra_config.loader_threads must be >= 1, got {self.loader_threads}")
        self.block_size = _block_size(vllm_config)
        self.tp_size = _tp_size(vllm_config, extra)
        self.num_blocks = getattr(kv_cache_config, "num_blocks", None) or extra.get("num_blocks")
        # the decode engines' TP size this producer prepares for (a request's decode_tp_size overrides it)
        self.decode_tp_size = int(extra.get("decode_tp_size", self.tp_size))
        if self.decode_tp_size < 1:
            raise ConfigError(f"kv_connector_extra_config.decode_tp_size must be >= 1, got {self.decode_tp_size}")
        self.fingerprint: Fingerprint = fingerprint_from_config(vllm_config, kv_cache_config, extra, self.tp_size,
                                                                self.block_size)
        # scheduler side
        self._params: dict[str, dict[str, Any]] = {}
        self._blocks: dict[str, list[int]] = {}
        self._computed: dict[str, int] = {}
        self._prompt_len: dict[str, int] = {}
        self._saved: set[str] = set()
        self._loading_tids: dict[str, str] = {}
        self._consumed: set[str] = set()  # requests whose remote prefill was loaded (or tried): never again
        self._siblings: set[str] = set()  # n > 1: requests that share a sibling's transfer, computed locally
        self._loaded_tids: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._produced_tids: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._refused_saves: set[str] = set()
        self._pending_loads: list[LoadSpec] = []
        self._pending_aborts: list[str] = []
        # worker side
        self._engine: Any = None
        self._caches: dict[str, torch.Tensor] = {}
        self._geom: LayerGeom | None = None
        self._lock = threading.Lock()
        self._sends: dict[str, _SendState] = {}
        self._save_plans: list[_SavePlan] = []
        self._to_publish: list[tuple[_SendState, TransferKey, torch.Tensor]] = []
        self._finished_asked: set[str] = set()
        self._done_recving: set[str] = set()
        self._failed_recving: dict[str, list[int]] = {}
        self._load_errors: set[int] = set()
        self._stream: Any = None
        self._loaders = _Workers("p2pkv-load", self.loader_threads)
        self._publisher = _Workers("p2pkv-publish", 1)
        self._stats = StatsCollector()
        self.rank = 0

    # ================================================================== scheduler side
    @property
    def requires_kv_delivery(self) -> bool:
        """A producer's hand-off must be delivered: vLLM recomputes a request preempted while it is pending."""
        return self.is_producer

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        """A decode request with a remote prefill: the rest of its prompt, loaded asynchronously.

        Answers 0 for a request whose remote prefill was already consumed (one transfer per
        request) and for an ``n > 1`` sibling of the request that loads it.
        """
        p = _params(request)
        rid = request.request_id
        if p is None:
            return 0, False
        self._params[rid] = p
        self._prompt_len[rid] = len(request.prompt_token_ids)
        if not (self.is_consumer and p.get("do_remote_prefill")):
            return 0, False
        if rid in self._consumed or rid in self._siblings:
            return 0, False  # one transfer per request: a retry (recompute policy, preemption) computes locally
        tid = p["transfer_id"]
        owner = self._loading_tids.get(tid)
        if owner is not None and owner != rid:
            self._siblings.add(rid)
            return 0, False  # n > 1: one sibling loads, the others reuse its blocks or compute
        count = len(request.prompt_token_ids) - num_computed_tokens
        if count <= 0:
            return 0, False
        self._computed[rid] = num_computed_tokens
        self._loading_tids[tid] = rid  # claimed now: a sibling asked next (same step) computes locally
        return count, True

    def _check_producer(self, p: dict[str, Any]) -> tuple[int, int, str | None]:
        """(producer TP size, producer block size, refusal) from the producer's params."""
        try:
            src_tp = _int_param(p, "remote_tp_size", self.tp_size)
            src_block = _int_param(p, "remote_block_size", self.block_size)
            dst_tp = _int_param(p, "decode_tp_size", src_tp)
            fp_raw = p.get("p2pkv_fingerprint")
            if fp_raw is not None:
                fp = Fingerprint.from_dict(fp_raw)
                bad = incompatibilities(fp, self.fingerprint)
                if bad:
                    return src_tp, src_block, "incompatible KV cache: " + "; ".join(bad)
                src_tp, src_block = fp.tp_size, fp.block_size
            if dst_tp != self.tp_size:
                return src_tp, src_block, (f"the producer prepared the KV for decode TP size {dst_tp}; this engine "
                                           f"is TP size {self.tp_size} (set decode_tp_size in the prefill request)")
        except P2pkvError as exc:
            return self.tp_size, self.block_size, str(exc)
        return src_tp, src_block, None

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        """Consumer: schedule the request's one load (refused at once when its transfer id was already
        loaded or the producer's fingerprint is incompatible). Producer: remember its blocks."""
        rid = request.request_id
        p = self._params.get(rid) or _params(request)
        if p is None:
            return
        self._params[rid] = p
        ids = _first_group(blocks.get_block_ids() if hasattr(blocks, "get_block_ids") else blocks)
        tid = p["transfer_id"]
        if self.is_consumer and p.get("do_remote_prefill"):
            if num_external_tokens <= 0 or rid in self._consumed:
                return
            self._consumed.add(rid)  # whatever happens to this load, it is the request's only one
            self._loading_tids[tid] = rid
            src_tp, src_block, refuse = self._check_producer(p)
            if tid in self._loaded_tids and refuse is None:
                refuse = (f"transfer id {tid} was already loaded by another request; a reused transfer id is "
                          f"refused rather than risk stale KV")
            self._loaded_tids[tid] = None
            while len(self._loaded_tids) > _SEEN_TIDS:
                self._loaded_tids.popitem(last=False)
            skip = self._computed.get(rid, 0) // self.block_size
            self._pending_loads.append(LoadSpec(rid, tid, ids, skip, p.get("mode", self.mode), p.get("remote_host"),
                                                p.get("remote_port"), len(request.prompt_token_ids), src_tp,
                                                src_block, refuse))
        elif self.is_producer and p.get("do_remote_decode"):
            prev = self._produced_tids.get(tid)
            if prev is not None and prev != rid:
                if rid not in self._refused_saves:
                    log.error("request %s reuses transfer id %s of request %s: its KV is NOT handed off "
                              "(a transfer id names one transfer)", rid, tid, prev)
                self._refused_saves.add(rid)
                return
            self._produced_tids[tid] = rid
            while len(self._produced_tids) > _SEEN_TIDS:
                self._produced_tids.popitem(last=False)
            if ids:
                self._blocks[rid] = ids

    def build_connector_meta(self, scheduler_output: Any) -> P2pkvConnectorMetadata:
        """This step's loads, aborts and (producer) hand-offs of prompts completed in this step."""
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
            resumed = set(getattr(cached, "resumed_req_ids", None) or ())
            for i, rid in enumerate(rids):
                if rid not in self._params or not self._params[rid].get("do_remote_decode"):
                    continue
                if i < len(new_blocks) and new_blocks[i] is not None:
                    if rid in resumed:  # preempted and resumed: its blocks were freed and reallocated
                        self._blocks[rid] = _first_group(new_blocks[i])
                    else:
                        self._blocks.setdefault(rid, []).extend(_first_group(new_blocks[i]))
                done = (computed[i] if i < len(computed) else 0) + int(nsched.get(rid, 0))
                self._maybe_save(meta, rid, done)
        return meta

    def _maybe_save(self, meta: P2pkvConnectorMetadata, rid: str, tokens_after_step: int) -> None:
        """Send once, in the step that completes the prompt (chunked prefill: the last chunk)."""
        if rid in self._saved or rid in self._refused_saves or tokens_after_step < self._prompt_len.get(rid, 1 << 62):
            return
        p = self._params[rid]
        nblk = -(-self._prompt_len[rid] // self.block_size)
        ids = self._blocks.get(rid, [])[:nblk]
        try:
            dst_tp = _int_param(p, "decode_tp_size", self.decode_tp_size)
        except ConfigError as exc:
            log.error("request %s: %s; its KV is not handed off", rid, exc)
            self._refused_saves.add(rid)
            return
        self._saved.add(rid)
        meta.saves.append(SaveSpec(rid, p["transfer_id"], ids, p.get("mode", self.mode), p.get("remote_host"),
                                   p.get("remote_port"), dst_tp))

    def request_finished(self, request: Any, block_ids: Any) -> tuple[bool, dict[str, Any] | None]:
        """Producer: keep the blocks until the hand-off is done and return the decode request's params
        (with the fingerprint). Consumer: abort the transfer when the request ended in an error or abort."""
        rid = request.request_id
        p = self._params.pop(rid, None)
        self._blocks.pop(rid, None)
        self._computed.pop(rid, None)
        self._prompt_len.pop(rid, None)
        loaded = rid in self._consumed
        self._consumed.discard(rid)
        self._siblings.discard(rid)
        refused = rid in self._refused_saves
        self._refused_saves.discard(rid)
        if p is None:
            return False, None
        tid = p["transfer_id"]
        if self._loading_tids.get(tid) == rid:
            del self._loading_tids[tid]
        saved = rid in self._saved
        self._saved.discard(rid)
        if self.is_producer and p.get("do_remote_decode"):
            if refused:
                return False, None
            if not saved:
                self._pending_aborts.append(tid)  # finished (or aborted) before its KV was sent
                return False, None
            cfg = self._engine_cfg
            host = cfg.advertise_host or (cfg.host if cfg.host not in ("0.0.0.0", "::") else "127.0.0.1")
            dst_tp = p.get("decode_tp_size", self.decode_tp_size)
            return True, {"transfer_id": tid, "do_remote_prefill": True, "do_remote_decode": False,
                          "remote_host": host, "remote_port": cfg.port, "remote_tp_size": self.tp_size,
                          "remote_block_size": self.block_size, "decode_tp_size": dst_tp,
                          "mode": p.get("mode", self.mode), "p2pkv_fingerprint": self.fingerprint.to_dict()}
        status = str(getattr(request, "status", ""))
        if self.is_consumer and p.get("do_remote_prefill") and loaded and not any(s in status for s in _NORMAL_FINISH):
            self._pending_aborts.append(tid)  # aborted or failed: the producer frees its copy now, not at ttl_s
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
        """Start this rank's engine (port ``port + rank``) and learn the caches' geometry.

        Raises
        ------
        ConfigError
            A cache has no dimension matching the number of blocks, or the engine config is invalid.
        """
        from ...engine import Engine

        self._caches = {name: block_view(t, self.num_blocks) for name, t in kv_caches.items()}
        first = next(iter(self._caches.values()), None)
        if first is not None:
            self._geom = layer_geom(first, self.block_size)
            for name, v in self._caches.items():
                if tuple(v.shape[1:]) != self._geom.rest:
                    self._geom = LayerGeom(self._geom.rest, None, None, "?")  # mixed layers: opaque blocks
                    log.warning("layer %s differs in shape from the first; heterogeneous TP/block sizes are off",
                                name)
                    break
        device = "cpu" if first is None or first.device.type != "cuda" else f"cuda:{first.device.index or 0}"
        cfg = self._engine_cfg
        self.rank = self._rank()
        port = cfg.port + self.rank if cfg.port else 0
        if self._engine is None:
            self._engine = Engine(cfg, device=device, port=port)
            log.info("p2pkv engine for TP rank %d listening on %s", self.rank, self._engine.address)
        if device != "cpu" and first is not None:
            self._stream = torch.cuda.Stream(first.device)

    @property
    def engine(self) -> Any:
        return self._engine

    @property
    def loader_thread_count(self) -> int:
        """Live loader threads (at most ``loader_threads``, whatever the number of requests)."""
        return self._loaders.threads

    def _device(self) -> torch.device:
        first = next(iter(self._caches.values()), None)
        return first.device if first is not None else torch.device("cpu")

    def bind_connector_metadata(self, connector_metadata: Any) -> None:
        super().bind_connector_metadata(connector_metadata)
        if self._save_plans or self._to_publish:
            self._pack_pull_plans()  # wait_for_save was not called for the last step
            self._flush_publishes()
        self._save_plans = []
        if not isinstance(connector_metadata, P2pkvConnectorMetadata) or not connector_metadata.saves:
            return
        if self._engine is None or not self._caches:
            return
        from ...kernels import BlockIds

        first = next(iter(self._caches.values()))
        for spec in connector_metadata.saves:
            state = _SendState(spec.transfer_id)
            state.pending = 1  # held until this step's publishes are done (or its flush, for push)
            with self._lock:
                self._sends[spec.req_id] = state
            try:
                ids = BlockIds(spec.block_ids, first.shape[0], first.device)  # uploaded once for every layer
                self._save_plans.append(_SavePlan(spec, ids, self._pieces(spec), state))
                self._stats.add("transfers_saved")
            except P2pkvError as exc:
                log.error("request %s: KV hand-off of %s refused: %s", spec.req_id, spec.transfer_id, exc)
                state.failed = True
                state.pending = 0
                self._stats.add("save_failures")

    def _pieces(self, spec: SaveSpec) -> list[tuple[str, int, int, bool, str | None]]:
        """What this producer rank hands to which consumer rank: (name suffix, local lo, n, whole, peer)."""
        src_tp, dst_tp = self.tp_size, spec.dst_tp or self.tp_size
        geom = self._geom
        push = spec.mode == "push"
        if src_tp == dst_tp:
            return [(f"|tp{self.rank}/{src_tp}", 0, 0, True, self._peer(spec.peer_host, spec.peer_port, self.rank)
                     if push else None)]
        if geom is None or not geom.convertible:
            raise ConfigError(f"this cache layout ({geom.rest if geom else '?'}) cannot be re-sharded from TP "
                              f"{src_tp} to TP {dst_tp}")
        total = self.fingerprint.kv_heads or geom.heads * src_tp
        own_lo, own_hi = heads_of(self.rank, src_tp, total)
        out = []
        for c, lo, hi in pieces_from_producer(total, src_tp, dst_tp, self.rank):
            name = piece_name("", self.rank, src_tp, c, dst_tp, lo, hi, total)
            whole = (lo, hi) == (own_lo, own_hi) or geom.head is None
            out.append((name, lo - own_lo, hi - lo, whole, self._peer(spec.peer_host, spec.peer_port, c)
                        if push else None))
        return out

    def _peer(self, host: Any, port: Any, rank: int) -> str:
        if not isinstance(host, str) or isinstance(port, bool) or not isinstance(port, int):
            raise ConfigError("kv_transfer_params need remote_host (str) and remote_port (int) for this mode")
        return f"{host}:{port + rank}"

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        """Apply this step's aborts and queue its loads on the loader threads; returns at once."""
        meta = self._connector_metadata
        if not isinstance(meta, P2pkvConnectorMetadata) or self._engine is None:
            return
        for tid in meta.aborts:
            try:
                self._engine.abort(tid)
            except P2pkvError as exc:
                log.warning("abort of %s failed: %s", tid, exc)
        for spec in meta.loads:
            t0 = time.monotonic()
            self._loaders.submit(lambda spec=spec, t0=t0: self._load(spec, t0))

    # ------------------------------------------------------------------ loads (loader threads)
    def _load(self, spec: LoadSpec, t0: float) -> None:
        """Receive every layer of one request and scatter it into its blocks."""
        eng = self._engine
        nblk = min(len(spec.block_ids), -(-spec.num_tokens // self.block_size)) if spec.num_tokens else len(
            spec.block_ids)
        targets = spec.block_ids[spec.skip_blocks:nblk]
        nbytes = 0
        try:
            if spec.refuse:
                raise ConfigError(spec.refuse)
            if eng is None:
                raise ConfigError("the connector's engine is not running (register_kv_caches was not called)")
            nbytes = self._load_layers(spec, targets, nblk, time.monotonic() + self.load_timeout_s)
        except Exception as exc:  # a failed load must never hang or crash vLLM: report it
            (log.error if spec.refuse else log.warning)("KV load for request %s (transfer %s) failed: %s",
                                                        spec.req_id, spec.transfer_id, exc)
            self._stats.add("load_failures")
            if eng is not None and not eng.closed:
                try:
                    eng.abort(spec.transfer_id)  # the producer frees its copy at once
                except P2pkvError:
                    pass
            with self._lock:
                self._failed_recving[spec.req_id] = list(targets)
            return
        self._stats.add("transfers_loaded")
        self._stats.add("bytes_received", nbytes)
        self._stats.latency(time.monotonic() - t0)
        with self._lock:
            self._done_recving.add(spec.req_id)

    def _load_layers(self, spec: LoadSpec, targets: list[int], nblk: int, deadline: float) -> int:
        from ...kernels import BlockIds, unpack

        eng = self._engine
        geom = self._geom
        src_tp = spec.src_tp or self.tp_size
        src_block = spec.src_block or self.block_size
        if geom is None:
            return 0
        if (src_tp != self.tp_size or src_block != self.block_size) and not geom.convertible:
            raise ConfigError(f"this cache layout {geom.rest} cannot be converted from TP {src_tp} / block "
                              f"{src_block} to TP {self.tp_size} / block {self.block_size}")
        if src_tp == self.tp_size:
            plan = [(self.rank, f"|tp{self.rank}/{src_tp}")]
        else:
            total = self.fingerprint.kv_heads or geom.heads * self.tp_size
            plan = [(r, piece_name("", r, src_tp, self.rank, self.tp_size, lo, hi, total))
                    for r, lo, hi in pieces_for_consumer(total, src_tp, self.tp_size, self.rank)]
        peers: dict[int, str] = {}
        if spec.peer_host is not None or spec.mode == "pull":
            for r, _ in plan:
                peers[r] = self._peer(spec.peer_host, spec.peer_port, r)
        if spec.mode == "pull":
            for r in peers:  # a producer that is gone fails the load now, not at load_timeout_s
                host, port = peers[r].rsplit(":", 1)
                _probe(host, int(port))
        fast = len(plan) == 1 and src_block == self.block_size
        first = next(iter(self._caches.values()))
        ids = BlockIds(targets, first.shape[0], first.device)  # once per request, for every layer
        nbytes = 0
        ctx = torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext()
        with ctx:
            for name, cache in self._caches.items():
                with contextlib.ExitStack() as stack:
                    datas = []
                    for r, suffix in plan:
                        key = TransferKey(spec.transfer_id, name + suffix)
                        if spec.mode == "pull":
                            remaining = deadline - time.monotonic()
                            if remaining <= 0:
                                raise TransferTimeout(f"load not done within {self.load_timeout_s:.3g}s", key=key)
                            datas.append(eng.pull(peers[r], key, timeout=remaining))
                            if self._stream is not None:  # allocated on the engine's stream, read on ours
                                datas[-1].record_stream(self._stream)
                        else:
                            datas.append(self._claim(stack, key, peers.get(r), deadline))
                    for d in datas:
                        if d.dtype != cache.dtype:
                            raise ShapeMismatch(f"{spec.transfer_id}/{name}: the producer sent {d.dtype}, this "
                                                f"engine's KV cache is {cache.dtype}")
                    nbytes += sum(d.numel() * d.element_size() for d in datas)
                    if not len(targets):
                        continue
                    if fast:  # unpack straight from the received buffer: no copy, no re-blocking
                        data = datas[0]
                        if data.shape[0] < nblk or tuple(data.shape[1:]) != tuple(cache.shape[1:]):
                            raise ConfigError(f"{spec.transfer_id}/{name}: received {tuple(data.shape)}, this "
                                              f"engine needs [>= {nblk}, {', '.join(map(str, cache.shape[1:]))}]")
                        unpack(data[spec.skip_blocks:nblk], cache, ids)
                    else:
                        bs = self.block_size
                        src = assemble(datas, geom, src_block, spec.skip_blocks * bs, nblk * bs, spec.num_tokens)
                        unpack(src, cache, ids)
            if self._stream is not None:
                self._stream.synchronize()  # the loader thread waits, never the forward stream
        return nbytes

    def _claim(self, stack: contextlib.ExitStack, key: TransferKey, producer: str | None, deadline: float) -> Any:
        """Wait for a pushed piece; check between slices that the producer still listens."""
        eng = self._engine
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TransferTimeout(f"load not done within {self.load_timeout_s:.3g}s", key=key)
            try:
                return stack.enter_context(eng.claim(key, timeout=min(remaining, _WAIT_SLICE_S)))
            except TransferTimeout:
                if producer is not None:
                    host, port = producer.rsplit(":", 1)
                    _probe(host, int(port))

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are asynchronous (between steps); vLLM runs the request once get_finished reports it

    # ------------------------------------------------------------------ saves (forward thread)
    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        """Push mode: pack this layer's blocks of each hand-off and send them while the forward pass goes
        on; never waits on the GPU. Pull mode packs every layer at once in :meth:`wait_for_save`."""
        plans = self._save_plans
        if not plans:
            return
        from ...kernels import pack

        cache = self._caches.get(layer_name)
        if cache is None:
            cache = block_view(kv_layer, self.num_blocks)
        eng = self._engine
        head_dim = None if self._geom is None or self._geom.head is None else 1 + self._geom.head
        for plan in plans:
            st = plan.state
            if st.failed or plan.spec.mode == "pull":
                continue
            try:
                packed = pack(cache, plan.ids)
                for suffix, lo, n, whole, peer in plan.pieces:
                    t = packed if whole or head_dim is None else packed.narrow(head_dim, lo, n).contiguous()
                    key = TransferKey(st.transfer_id, layer_name + suffix)
                    self._stats.add("bytes_sent", t.numel() * t.element_size())
                    if peer is None:
                        self._publish_later(st, key, t)
                        continue
                    req = self._request_for(plan, peer, suffix, n, whole, head_dim)
                    if req is not None and key.name in req.index:
                        req.send(key.name, t)  # one offer per request; NCCL/IPC post on this thread
                    else:
                        st.handles.append(eng.send(peer, key, t))
            except P2pkvError as exc:
                self._save_failed(st, f"saving {layer_name} of {st.transfer_id} failed: {exc}")

    def _request_for(self, plan: _SavePlan, peer: str, suffix: str, n: int, whole: bool,
                     head_dim: int | None) -> Any:
        """The whole-request send of one hand-off piece to ``peer`` (made at its first layer): one offer
        names every layer, the receiver reserves room once, each layer then moves as it is saved."""
        st = plan.state
        req = st.requests.get((peer, suffix))
        if req is None and (peer, suffix) not in st.requests:
            layout = []
            for name, c in self._caches.items():
                shape = [len(plan.ids), *c.shape[1:]]
                if not whole and head_dim is not None:
                    shape[head_dim] = n
                layout.append((name + suffix, c.dtype, tuple(shape)))
            try:
                req = self._engine.send_request(peer, st.transfer_id, layout) if layout else None
            except P2pkvError as exc:  # fall back to per-tensor sends
                log.warning("whole-request send of %s to %s unavailable: %s", st.transfer_id, peer, exc)
                req = None
            st.requests[(peer, suffix)] = req
            if req is not None:
                st.handles.append(req)
        return req

    def _save_failed(self, st: _SendState, why: str) -> None:
        log.warning("%s", why)
        if not st.failed:
            st.failed = True
            self._stats.add("save_failures")
            try:
                self._engine.abort(st.transfer_id)  # the consumer's load fails now, not at its timeout
            except P2pkvError:
                pass

    def _publish_later(self, st: _SendState, key: TransferKey, t: torch.Tensor) -> None:
        """Queue ``t`` for publishing; :meth:`wait_for_save` hands the step's batch to the publisher thread.

        Pull-mode data is fetched only after the request finished, so nothing is gained by waking a
        thread per layer: the forward thread only appends here."""
        self._to_publish.append((st, key, t))

    def _flush_publishes(self) -> None:
        """One job per step: wait for the forward stream once, then publish every queued piece."""
        batch, self._to_publish = self._to_publish, []
        states = {id(st): st for st, _, _ in batch}
        for plan in self._save_plans:
            states.setdefault(id(plan.state), plan.state)
        if not states:
            return
        ready = None
        dev = next((t.device for _, _, t in batch if t.device.type == "cuda"), None)
        if dev is not None:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(dev))

        def job() -> None:
            try:
                if ready is not None:
                    ready.synchronize()
                for st, key, t in batch:
                    if st.failed:
                        continue
                    try:
                        self._engine.publish(key, t)
                    except P2pkvError as exc:
                        self._save_failed(st, f"publishing {key} failed: {exc}")
            finally:
                with self._lock:
                    for st in states.values():
                        st.pending -= 1  # the step's hold, taken in bind_connector_metadata

        self._publisher.submit(job)

    def _pack_pull_plans(self) -> None:
        """Pull mode: gather every layer's blocks of each hand-off in one launch (``pack_layers``), after
        the forward pass has written them (stream order), and queue the pieces for the publisher."""
        from ...kernels import pack, pack_layers

        names = list(self._caches)
        layers = [self._caches[n] for n in names]
        head_dim = None if self._geom is None or self._geom.head is None else 1 + self._geom.head
        for plan in self._save_plans:
            st = plan.state
            if st.failed or plan.spec.mode != "pull" or not layers:
                continue
            try:
                try:
                    per_layer = list(pack_layers(layers, plan.ids).unbind(0))
                except P2pkvError:  # layers of different layouts: one launch each
                    per_layer = [pack(t, plan.ids) for t in layers]
                for name, packed in zip(names, per_layer):
                    for suffix, lo, n, whole, _ in plan.pieces:
                        t = packed if whole or head_dim is None else packed.narrow(head_dim, lo, n).contiguous()
                        self._stats.add("bytes_sent", t.numel() * t.element_size())
                        self._publish_later(st, TransferKey(st.transfer_id, name + suffix), t)
            except P2pkvError as exc:
                self._save_failed(st, f"packing {st.transfer_id} failed: {exc}")

    def wait_for_save(self) -> None:
        """Pull mode: pack this step's hand-offs and give them to the publisher thread in one job; never
        waits on the GPU. Push sends are already queued. request_finished delays freeing the blocks until
        get_finished reports the hand-off done."""
        self._pack_pull_plans()
        self._flush_publishes()
        self._save_plans = []

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        """Push mode sends layer by layer from ``save_kv_layer``, which full CUDA graphs would skip."""
        return (extra_config or {}).get("mode", "push") == "push"

    # ------------------------------------------------------------------ completion reporting
    def _drain(self, finished_req_ids: set[str]) -> tuple[set[str], set[str], dict[str, list[int]]]:
        with self._lock:
            self._finished_asked |= set(finished_req_ids)
            done_sending = set()
            for rid in list(self._sends):
                st = self._sends[rid]
                if rid in self._finished_asked and st.pending == 0 and all(h.done() for h in st.handles):
                    failed = [h for h in st.handles if h.error is not None]
                    if failed:
                        log.warning("request %s: %d of %d KV sends failed (%s)", rid, len(failed), len(st.handles),
                                    failed[0].error)
                        self._stats.add("save_failures")
                    del self._sends[rid]
                    self._finished_asked.discard(rid)
                    done_sending.add(rid)
            failed_recving, self._failed_recving = self._failed_recving, {}
            done_recving, self._done_recving = self._done_recving, set()
        return done_sending, done_recving | set(failed_recving), failed_recving

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """Older interface: failed loads are reported as block ids (:meth:`get_block_ids_with_load_errors`)."""
        sending, recving, failed = self._drain(finished_req_ids)
        if failed:
            with self._lock:
                for blocks in failed.values():
                    self._load_errors.update(blocks)
        return (sending or None), (recving or None)

    def get_transfer_results(self, finished_req_ids: set[str]) -> Any:
        """vLLM 0.33: completions with per-request load failures (``failed_recving``, also in
        ``finished_recving``); vLLM applies its ``kv_load_failure_policy`` to them."""
        sending, recving, failed = self._drain(finished_req_ids)
        return KVConnectorTransferResults(finished_sending=sending, finished_recving=recving,
                                          failed_recving=set(failed))

    def get_block_ids_with_load_errors(self) -> set[int]:
        with self._lock:
            errs, self._load_errors = self._load_errors, set()
        return errs

    # ------------------------------------------------------------------ metrics
    def get_kv_connector_stats(self) -> P2pkvKVConnectorStats | None:
        """This worker's counters and load latencies since the last call (None when idle)."""
        return self._stats.take()

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> P2pkvKVConnectorStats:
        return P2pkvKVConnectorStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config: Any, metric_types: dict[Any, Any], labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]) -> Any:
        """Prometheus counters ``vllm:p2pkv_*`` and the ``vllm:p2pkv_load_seconds`` histogram on vLLM's /metrics."""
        from ._prom import make_prom_metrics

        return make_prom_metrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self) -> None:
        self._loaders.close()
        self._publisher.close()
        if self._engine is not None:
            self._engine.close()
            self._engine = None
