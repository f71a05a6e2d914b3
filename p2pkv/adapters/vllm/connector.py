"""vLLM KV connector on top of p2pkv: ``P2pkvConnector``.

Load it with::

    --kv-transfer-config '{"kv_connector": "P2pkvConnector",
                           "kv_connector_module_path": "p2pkv.adapters.vllm",
                           "kv_role": "kv_both",
                           "kv_connector_extra_config": {"port": 14500, "mode": "pull"}}'

(importing :mod:`p2pkv.adapters.vllm` also registers ``P2pkvConnector`` in vLLM's
connector registry, which ``MultiConnector`` needs). Every p2pkv setting goes in
``kv_connector_extra_config``: the fields of :class:`p2pkv.EngineConfig` (``port``
is a base: TP rank ``r`` listens on ``port + r``) plus ``mode`` (``push``: the
producer streams each layer to the decode engine as it is computed; ``pull``: the
producer parks the KV and the decode engine fetches it when it has room),
``load_timeout_s``, ``loader_threads`` (loads run on this many worker threads fed
by one queue, default 2), ``decode_tp_size`` (a producer's default for the decode
engines' TP size) and ``fingerprint`` (overrides of this engine's compatibility
fingerprint fields).

Transfers are named ONLY by ``kv_transfer_params["transfer_id"]``: a router may
allocate it and put it in both requests (p2pkv's proxy does), or leave it out of
the prefill request, as routers written for NixlConnector do; the prefill engine
then allocates a fresh one (:func:`p2pkv.new_transfer_id`) and returns it with
everything else the decode request needs. vLLM's internal request ids are used
for nothing but vLLM's own bookkeeping.

kv_transfer_params understood:

* prefill (producer) request: ``do_remote_decode: true``; optionally
  ``transfer_id``; for push mode the decode engine's ``remote_host`` /
  ``remote_port`` (its p2pkv base port; without them the request is handed off in
  pull mode, with a warning); ``decode_tp_size`` when the decode engine's TP size
  differs from the producer's (or ``decode_tp_size`` in the producer's extra
  config). ``request_finished`` returns the params for the decode request:
  ``transfer_id``, ``do_remote_prefill: true``, ``remote_host``, ``remote_port``
  (the producer's), ``remote_tp_size``, ``remote_block_size``, ``decode_tp_size``,
  ``mode`` and ``p2pkv_fingerprint`` (model, layers, dtype, KV heads, head size,
  block size, layout, TP size, MLA).
* decode (consumer) request: those params, unchanged (a router copies them
  verbatim). A decode request that asks for a remote prefill it cannot get (no
  transfer id, no producer address in pull mode, an incompatible fingerprint)
  fails its load, loudly, and vLLM's ``kv_load_failure_policy`` applies.

Keys are ``TransferKey(transfer_id, name)``; ``name`` is ``"<layer>|tp<r>/<P>"``
when producer rank ``r`` hands its whole shard to the same rank of an equal-TP
consumer, else ``"<layer>|tp<r>/<P>|h<lo>-<hi>>tp<c>/<C>"`` (global KV heads
``lo..hi`` from producer rank ``r`` of ``P`` to consumer rank ``c`` of ``C``).

Hybrid models (several KV-cache groups: full attention plus sliding-window or
chunked-local attention, as Gemma 3 and gpt-oss): every group moves, each with
its own block ids; a windowed group moves only the blocks a decode step still
reads (those from ``first_needed_token`` on), and the decode side fills only the
blocks vLLM allocated for it. Recurrent (Mamba) state is refused at start.

Importing this module does not need vLLM and touches no GPU, socket or
thread: the engine and the worker threads start in the worker.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ... import _trace
from ...config import EngineConfig
from ...errors import ConfigError, P2pkvError, PeerLost, ShapeMismatch, TransferTimeout
from ...keys import TransferKey, new_transfer_id, validate_transfer_id
from ._base import (HAVE_VLLM, KVConnectorBase_V1, KVConnectorMetadata, KVConnectorRole,
                    KVConnectorTransferResults, SupportsHMA)
from ._layout import (NULL_BLOCK, Fingerprint, KVGroup, LayerGeom, assemble, fingerprint_from_config,
                      groups_from_config, heads_of, incompatibilities, layer_geom, leading_nulls, piece_name,
                      pieces_for_consumer, pieces_from_producer)
from ._stats import P2pkvKVConnectorStats, StatsCollector

log = logging.getLogger("p2pkv.vllm")

__all__ = ["P2pkvConnector", "P2pkvConnectorMetadata", "SaveSpec", "LoadSpec", "Release", "HAVE_VLLM",
           "KVConnectorRole", "block_view"]

_ADAPTER_KEYS = {"mode", "load_timeout_s", "rank", "tp_size", "num_blocks", "loader_threads", "fingerprint",
                 "kv_layout", "decode_tp_size"}
_NORMAL_FINISH = ("FINISHED_STOPPED", "FINISHED_LENGTH_CAPPED", "FINISHED_REPETITION")
_MODES = ("push", "pull", "read")
_INT_ONLY = frozenset((int,))
_MAX_REMOTE_IDS = 1 << 20  # block ids a producer may name in its params (they come from clients)
_SEEN_TIDS = 1 << 16  # transfer ids remembered to refuse reuse
_WAIT_SLICE_S = 0.5  # push loads re-check the producer's liveness this often
_RELEASE_TIMEOUT_S = 5.0  # telling a producer to free a transfer nobody will load waits this long at most
_MAX_PENDING_RELEASES = 1024  # beyond this, a release is dropped (the producer frees the copy at its ttl_s)
_MAX_TP = 1024  # a remote TP size above this is refused (params come from clients)
_MAX_BLOCK = 1 << 16  # likewise for a remote block size
_NIXL_HOST_ENV = "VLLM_NIXL_SIDE_CHANNEL_HOST"  # this instance's address in NixlConnector deployments
_REFUSE = "_p2pkv_refuse"  # key of our own copy of a request's params: why its load is refused
_RELEASE = "_p2pkv_release"  # ... and that its load was refused: the producer is told to free the copy
_MAX_READ_PEERS = 64  # mode 'read': producers whose copy plans are kept (rebuilt when a producer's memory is re-mapped)
# mode 'read' copies one segment per block run instead of the fused paged copy (for comparisons)
_SEGMENT_READS = os.environ.get("P2PKV_READ_COPY", "") == "segments"


# ----------------------------------------------------------------------------- metadata (pickled to workers)
@dataclass
class SaveSpec:
    """One producer request whose prompt KV is handed off in this step.

    ``block_ids`` holds one list per KV-cache group (empty for a group that does not move); a
    windowed group's list holds only the blocks sent (the last ones of the prompt)."""

    req_id: str
    transfer_id: str
    block_ids: list[list[int]]
    mode: str
    peer_host: str | None = None
    peer_port: int | None = None
    dst_tp: int = 0  # the decode engine's TP size (0: the same as the producer's)


@dataclass
class LoadSpec:
    """One consumer request whose prompt KV is loaded from a producer.

    ``block_ids`` holds the request's blocks per KV-cache group, as vLLM allocated them;
    ``computed`` is how many prompt tokens this engine already had (its own prefix cache)."""

    req_id: str
    transfer_id: str
    block_ids: list[list[int]]
    computed: int
    mode: str
    peer_host: str | None = None
    peer_port: int | None = None
    num_tokens: int = 0
    src_tp: int = 0  # the producer's TP size (0: the same as ours)
    src_block: int = 0  # the producer's block size (0: the same as ours)
    refuse: str | None = None  # the scheduler refused this load (reuse, incompatibility): fail it at once
    remote_ids: list[list[int]] = field(default_factory=list)  # mode 'read': the producer's blocks per group


@dataclass
class Release:
    """A transfer this decode engine will never load (its request ended before it was scheduled, or its
    whole prompt was already cached here): the producer is told to free its copy now."""

    transfer_id: str
    peer_host: str | None = None
    peer_port: int | None = None
    src_tp: int = 0


@dataclass
class P2pkvConnectorMetadata(KVConnectorMetadata):
    saves: list[SaveSpec] = field(default_factory=list)
    loads: list[LoadSpec] = field(default_factory=list)
    aborts: list[str] = field(default_factory=list)
    releases: list[Release] = field(default_factory=list)


# ----------------------------------------------------------------------------- helpers
def _extra(vllm_config: Any) -> dict[str, Any]:
    ktc = vllm_config.kv_transfer_config
    return dict(getattr(ktc, "kv_connector_extra_config", None) or {})


def _block_size(vllm_config: Any) -> int:
    cc = getattr(vllm_config, "cache_config", None)
    return int(getattr(cc, "block_size", 16) or 16)


def _tp_size(vllm_config: Any, extra: dict[str, Any]) -> int:
    if "tp_size" in extra:
        return int(extra["tp_size"])
    pc = getattr(vllm_config, "parallel_config", None)
    return int(getattr(pc, "tensor_parallel_size", 1) or 1)


def _per_group(block_ids: Any) -> list[list[int]]:
    """vLLM's block ids of a request, one list per KV-cache group (``KVCacheBlocks``, a tuple of lists,
    or one flat list for a single group)."""
    if block_ids is None:
        return []
    if hasattr(block_ids, "get_block_ids"):
        block_ids = block_ids.get_block_ids()
    if isinstance(block_ids, (tuple, list)) and block_ids and isinstance(block_ids[0], (list, tuple)):
        return [list(g) for g in block_ids]
    return [list(block_ids)]


def _remote_ids(p: dict[str, Any], groups: int) -> list[list[int]] | None:
    """The producer's block ids per KV-cache group (mode 'read'), checked; None if absent or malformed."""
    v = p.get("remote_block_ids")
    if not isinstance(v, list) or len(v) != groups:
        return None
    total = 0
    for ids in v:
        if not isinstance(ids, list):
            return None
        total += len(ids)
        if total > _MAX_REMOTE_IDS:
            return None
        # plain ints (no bools, no subclasses), none negative: checked at C speed (a long prompt names
        # thousands of blocks)
        if ids and (not set(map(type, ids)) <= _INT_ONLY or min(ids) < 0):
            return None
    return v


def _int_param(p: dict[str, Any], name: str, default: int, most: int = _MAX_TP) -> int:
    v = p.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= most:
        raise ConfigError(f"kv_transfer_params {name} must be an int in 0..{most}, got {v!r:.40}")
    return v or default


def _address(p: dict[str, Any]) -> tuple[str, int] | None:
    """``(remote_host, remote_port)`` from kv_transfer_params, or None where they are absent or null
    (routers written for NixlConnector send ``"remote_host": null``)."""
    host, port = p.get("remote_host"), p.get("remote_port")
    if host is None and port is None:
        return None
    if not isinstance(host, str) or not host or isinstance(port, bool) or not isinstance(port, int) \
            or not 0 < port < 65536:
        raise ConfigError(f"kv_transfer_params remote_host/remote_port must be a host name and a port, got "
                          f"{host!r:.60} / {port!r:.20}")
    return host, port


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


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


_Piece = tuple[str, int, int, bool, "str | None"]  # (name suffix, local head lo, n heads, whole shard?, push peer)


class _SavePlan:
    """One request's hand-off, prepared once per step (block ids uploaded once per group, pieces resolved)."""

    __slots__ = ("spec", "ids", "pieces", "state")

    def __init__(self, spec: SaveSpec, ids: list[Any], pieces: list[list[_Piece]], state: _SendState) -> None:
        self.spec = spec
        self.ids = ids  # BlockIds per KV-cache group (None: the group does not move)
        self.pieces = pieces  # per KV-cache group
        self.state = state


# ----------------------------------------------------------------------------- the connector
class P2pkvConnector(KVConnectorBase_V1, SupportsHMA):
    """vLLM ``KVConnectorBase_V1`` backed by a p2pkv :class:`~p2pkv.Engine` (hybrid models included:
    ``SupportsHMA``)."""

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
        if self.mode not in _MODES:
            raise ConfigError(f"kv_connector_extra_config.mode must be 'push', 'pull' or 'read', got {self.mode!r}")
        engine_fields = {k: v for k, v in extra.items() if k not in _ADAPTER_KEYS}
        nixl_host = os.environ.get(_NIXL_HOST_ENV, "").strip()
        if nixl_host and "host" not in engine_fields and "advertise_host" not in engine_fields:
            # a deployment switched from NixlConnector keeps the address it gives each instance: listen
            # there and tell decode engines to come there
            engine_fields["host"] = nixl_host
        self._engine_cfg = EngineConfig.from_dict(engine_fields)  # validates early, in every process
        if self.is_producer and self.mode in ("pull", "read") and not self._engine_cfg.port:
            raise ConfigError(f"a {self.mode}-mode producer (kv_role {kv_role}) needs a fixed port in "
                              f"kv_connector_extra_config (e.g. \"port\": 14579): decode engines fetch from it")
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
        # every KV-cache group of the model (hybrid models have several); refuses what cannot move
        self.groups: list[KVGroup] = groups_from_config(kv_cache_config, self.block_size)
        # vLLM maps failed block ids back to requests only for a single KV-cache group
        self._block_errors_ok = len(self.groups) == 1
        self._warned: dict[str, int] = {}
        # scheduler side
        self._params: dict[str, dict[str, Any]] = {}
        self._blocks: dict[str, list[list[int]]] = {}
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
        self._pending_releases: list[Release] = []
        # worker side
        self._engine: Any = None
        self._caches: dict[str, torch.Tensor] = {}
        self._layer_group: dict[str, int] = {}  # layer name -> index of its KV-cache group
        self._group_layers: dict[int, list[str]] = {}
        self._geoms: dict[int, LayerGeom] = {}
        self._head_dims: dict[int, int | None] = {}  # per group: the packed tensors' head dim (None: MLA/opaque)
        self._lock = threading.Lock()
        self._sends: dict[str, _SendState] = {}
        self._save_plans: list[_SavePlan] = []
        self._to_publish: list[tuple[_SendState, TransferKey, torch.Tensor]] = []
        self._finished_asked: set[str] = set()
        self._done_recving: set[str] = set()
        self._failed_recving: dict[str, list[int]] = {}
        self._read_cache: dict[str, tuple[dict[str, torch.Tensor], list[tuple[int, list[Any], int, int]]]] = {}
        self._recv_tids: dict[str, str] = {}  # req id -> transfer id of loads done, for trace marks only
        # mode 'read' loads launched inline by start_load_kv: (spec, event, producer, t0, bytes) until done
        self._reads: list[tuple[Any, Any, str, float, int]] = []
        self._load_errors: set[int] = set()
        self._stream: Any = None
        self._loaders = _Workers("p2pkv-load", self.loader_threads)
        self._publisher = _Workers("p2pkv-publish", 1)
        self._releaser = _Workers("p2pkv-release", 1)  # never delays a load: its own thread
        self._releases_pending = 0
        self._stats = StatsCollector()
        self.rank = 0

    def _warn_once(self, cause: str, level: int, msg: str, *args: Any) -> None:
        """Log ``msg`` the first time ``cause`` happens (then at debug level, counted)."""
        n = self._warned.get(cause, 0)
        self._warned[cause] = n + 1
        if n == 0:
            log.log(level, msg + " (logged once; later occurrences at debug level)", *args)
        else:
            log.debug(msg, *args)

    # ================================================================== scheduler side
    @property
    def requires_kv_delivery(self) -> bool:
        """A producer's hand-off must be delivered: vLLM recomputes a request preempted while it is pending."""
        return self.is_producer

    def _request_params(self, request: Any) -> dict[str, Any] | None:
        """This connector's copy of a request's kv_transfer_params when it asks for disaggregation
        (None: the request is served locally). A prefill request without a transfer id gets a fresh one
        here, once; a decode request whose load cannot happen carries why (``_REFUSE``)."""
        rid = request.request_id
        p = self._params.get(rid)
        if p is not None:
            return p
        raw = getattr(request, "kv_transfer_params", None)
        if not isinstance(raw, dict):
            return None
        load = bool(raw.get("do_remote_prefill"))
        save = bool(raw.get("do_remote_decode")) and not load
        if not (load or save):
            return None
        p = dict(raw)
        tid = p.get("transfer_id")
        if save:
            if not self.is_producer:
                self._warn_once("decode-on-consumer", logging.WARNING,
                                "request %s asks for a remote decode (do_remote_decode) but this engine's kv_role "
                                "is kv_consumer: it is served here and its KV is not handed off", rid)
                return None
            if tid is None:
                # a router written for NixlConnector: the producer names the transfer (never after vLLM's id)
                p["transfer_id"] = new_transfer_id()
            else:
                try:
                    validate_transfer_id(tid)
                except P2pkvError as exc:
                    self._warn_once("bad-transfer-id-prefill", logging.ERROR,
                                    "request %s: kv_transfer_params transfer_id is not valid (%s): its KV is NOT "
                                    "handed off", rid, exc)
                    return None
        else:
            if not self.is_consumer:
                self._warn_once("prefill-on-producer", logging.WARNING,
                                "request %s asks for a remote prefill (do_remote_prefill) but this engine's kv_role "
                                "is kv_producer: its prompt is computed here", rid)
                return None
            if tid is None:
                p["transfer_id"] = None
                p[_REFUSE] = ("its kv_transfer_params ask for a remote prefill but name no transfer_id (was the "
                              "prefill instance running P2pkvConnector, and did the router pass on the prefill "
                              "response's kv_transfer_params?)")
            else:
                try:
                    validate_transfer_id(tid)
                except P2pkvError as exc:
                    p["transfer_id"] = None
                    p[_REFUSE] = f"its kv_transfer_params transfer_id is not valid: {exc}"
        self._params[rid] = p
        return p

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        """A decode request with a remote prefill: the rest of its prompt, loaded asynchronously.

        Answers 0 for a request whose remote prefill was already consumed (one transfer per
        request) and for an ``n > 1`` sibling of the request that loads it.
        """
        p = self._request_params(request)
        if p is None:
            return 0, False
        rid = request.request_id
        self._prompt_len[rid] = len(request.prompt_token_ids)
        if not p.get("do_remote_prefill"):
            return 0, False
        if rid in self._consumed or rid in self._siblings:
            return 0, False  # one transfer per request: a retry (recompute policy, preemption) computes locally
        tid = p["transfer_id"]
        owner = self._loading_tids.get(tid) if tid is not None else None
        if owner is not None and owner != rid:
            self._siblings.add(rid)
            return 0, False  # n > 1: one sibling loads, the others reuse its blocks or compute
        count = len(request.prompt_token_ids) - num_computed_tokens
        if count <= 0:
            return 0, False
        self._computed[rid] = num_computed_tokens
        if tid is not None:
            self._loading_tids[tid] = rid  # claimed now: a sibling asked next (same step) computes locally
        return count, True

    def _check_producer(self, p: dict[str, Any]) -> tuple[int, int, list[list[int]], str | None]:
        """(producer TP size, producer block size, the producer's block ids in mode 'read', refusal) from the
        producer's params."""
        src_tp, src_block, why = self.tp_size, self.block_size, None
        remote: list[list[int]] = []
        try:
            src_tp = _int_param(p, "remote_tp_size", self.tp_size)
            src_block = _int_param(p, "remote_block_size", self.block_size, _MAX_BLOCK)
            dst_tp = _int_param(p, "decode_tp_size", src_tp)
            mode = p.get("mode") or self.mode
            if mode not in _MODES:
                return src_tp, src_block, [], (f"kv_transfer_params mode must be 'push', 'pull' or 'read', "
                                               f"got {mode!r:.40}")
            if _address(p) is None and mode in ("pull", "read"):
                return src_tp, src_block, [], ("its kv_transfer_params name no producer address (remote_host, "
                                               "remote_port) to pull from")
            fp_raw = p.get("p2pkv_fingerprint")
            if fp_raw is not None:
                fp = Fingerprint.from_dict(fp_raw)
                bad = incompatibilities(fp, self.fingerprint)
                if bad:
                    return src_tp, src_block, [], "incompatible KV cache: " + "; ".join(bad)
                src_tp, src_block = fp.tp_size, fp.block_size
            if dst_tp != self.tp_size:
                why = (f"the producer prepared the KV for decode TP size {dst_tp}; this engine is TP size "
                       f"{self.tp_size} (set decode_tp_size in the prefill request)")
            elif mode == "read":
                if src_tp != self.tp_size or src_block != self.block_size:
                    why = (f"mode 'read' copies blocks as they are: the producer's TP {src_tp} / block {src_block} "
                           f"must equal this engine's {self.tp_size} / {self.block_size} (use mode 'pull')")
                else:
                    checked = _remote_ids(p, len(self.groups))
                    if checked is None:
                        why = "mode 'read' needs the producer's remote_block_ids in kv_transfer_params"
                    else:
                        remote = checked
        except P2pkvError as exc:
            return self.tp_size, self.block_size, [], str(exc)
        return src_tp, src_block, remote, why

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        """Consumer: schedule the request's one load (refused at once when its transfer id was already
        loaded, its params cannot name a transfer, or the producer's fingerprint is incompatible).
        Producer: remember its blocks."""
        rid = request.request_id
        p = self._request_params(request)
        if p is None:
            return
        ids = _per_group(blocks)
        tid = p["transfer_id"]
        if p.get("do_remote_prefill"):
            if num_external_tokens <= 0 or rid in self._consumed:
                return
            self._consumed.add(rid)  # whatever happens to this load, it is the request's only one
            refuse = p.get(_REFUSE)
            src_tp, src_block = self.tp_size, self.block_size
            remote: list[list[int]] = []
            if refuse is None:
                self._loading_tids[tid] = rid
                src_tp, src_block, remote, refuse = self._check_producer(p)
                if tid in self._loaded_tids and refuse is None:
                    refuse = (f"transfer id {tid} was already loaded by another request; a reused transfer id is "
                              f"refused rather than risk stale KV")
                elif refuse is not None:
                    p[_RELEASE] = True  # this engine will never take the producer's copy: free it at the end
                self._remember_loaded(tid)
            host, port = p.get("remote_host"), p.get("remote_port")
            self._pending_loads.append(LoadSpec(rid, tid or "", ids, self._computed.get(rid, 0),
                                                p.get("mode") or self.mode, host if isinstance(host, str) else None,
                                                port if isinstance(port, int) else None,
                                                len(request.prompt_token_ids), src_tp, src_block, refuse,
                                                remote if refuse is None else []))
        elif p.get("do_remote_decode"):
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
            if any(ids):
                self._blocks[rid] = ids

    def _remember_loaded(self, tid: str) -> None:
        self._loaded_tids[tid] = None
        while len(self._loaded_tids) > _SEEN_TIDS:
            self._loaded_tids.popitem(last=False)

    def build_connector_meta(self, scheduler_output: Any) -> P2pkvConnectorMetadata:
        """This step's loads, aborts, releases and (producer) hand-offs of prompts completed in this step."""
        meta = P2pkvConnectorMetadata(loads=self._pending_loads, aborts=self._pending_aborts,
                                      releases=self._pending_releases)
        self._pending_loads, self._pending_aborts, self._pending_releases = [], [], []
        if not self.is_producer:
            return meta
        nsched = getattr(scheduler_output, "num_scheduled_tokens", {}) or {}
        for nr in getattr(scheduler_output, "scheduled_new_reqs", []) or []:
            rid = nr.req_id
            if rid in self._params and self._params[rid].get("do_remote_decode"):
                self._blocks[rid] = _per_group(getattr(nr, "block_ids", None)) or self._blocks.get(rid, [])
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
                    new = _per_group(new_blocks[i])
                    if rid in resumed:  # preempted and resumed: its blocks were freed and reallocated
                        self._blocks[rid] = new
                    else:
                        cur = self._blocks.setdefault(rid, [])
                        cur.extend([] for _ in range(len(new) - len(cur)))
                        for g, more in enumerate(new):
                            cur[g].extend(more)
                done = (computed[i] if i < len(computed) else 0) + int(nsched.get(rid, 0))
                self._maybe_save(meta, rid, done)
        return meta

    def _save_blocks(self, rid: str, num_tokens: int) -> list[list[int]]:
        """The blocks to hand off, per KV-cache group: the prompt's, or for a windowed group only those a
        decode step still reads.

        Raises
        ------
        ConfigError
            A windowed group no longer holds a block the decode side needs.
        """
        blocks = self._blocks.get(rid, [])
        out: list[list[int]] = []
        for g in self.groups:
            ids = blocks[g.index] if g.index < len(blocks) else []
            if not g.transfer:
                out.append([])
                continue
            ids = ids[:_cdiv(num_tokens, g.block_size)]
            if g.windowed:
                ids = ids[g.first_needed_token(num_tokens) // g.block_size:]
                if NULL_BLOCK in ids:
                    raise ConfigError(f"{g.describe()} no longer holds every block of the window the decode "
                                      f"side needs ({ids})")
            out.append(ids)
        return out

    def _maybe_save(self, meta: P2pkvConnectorMetadata, rid: str, tokens_after_step: int) -> None:
        """Send once, in the step that completes the prompt (chunked prefill: the last chunk)."""
        if rid in self._saved or rid in self._refused_saves or tokens_after_step < self._prompt_len.get(rid, 1 << 62):
            return
        p = self._params[rid]
        try:
            dst_tp = _int_param(p, "decode_tp_size", self.decode_tp_size)
            mode = p.get("mode") or self.mode
            if mode not in _MODES:
                raise ConfigError(f"kv_transfer_params mode must be 'push', 'pull' or 'read', got {mode!r:.40}")
            addr = _address(p)
            ids = self._save_blocks(rid, self._prompt_len[rid])
            if mode == "read" and any(g.windowed for g in self.groups):
                mode = "pull"  # vLLM may free a window's older blocks before the decode side reads them
        except ConfigError as exc:
            log.error("request %s: %s; its KV is not handed off", rid, exc)
            self._refused_saves.add(rid)
            return
        if mode == "push" and addr is None:
            if not self._engine_cfg.port:
                self._warn_once("push-no-address-no-port", logging.ERROR,
                                "request %s asks for a remote decode without the decode engine's address "
                                "(remote_host, remote_port), so it cannot be pushed, and this producer has no fixed "
                                "port to be pulled from: its KV is NOT handed off (set \"port\" and \"mode\": "
                                "\"pull\" in kv_connector_extra_config)", rid)
                self._refused_saves.add(rid)
                return
            self._warn_once("push-no-address", logging.WARNING,
                            "request %s asks for a remote decode without the decode engine's address (remote_host, "
                            "remote_port), as routers written for NixlConnector do: handed off in pull mode (set "
                            "\"mode\": \"pull\" in kv_connector_extra_config to make that the default)", rid)
            mode = "pull"
        p["mode"] = mode  # what request_finished tells the decode side
        if mode == "read":
            p["_p2pkv_read_ids"] = ids  # the decode side copies straight out of these blocks
        self._saved.add(rid)
        meta.saves.append(SaveSpec(rid, p["transfer_id"], ids, mode, addr[0] if addr else None,
                                   addr[1] if addr else None, dst_tp))

    def request_finished(self, request: Any, block_ids: Any) -> tuple[bool, dict[str, Any] | None]:
        """Producer: keep the blocks until the hand-off is done and return the decode request's params
        (with the fingerprint). Consumer: abort the transfer when the request ended in an error or abort,
        and tell the producer to free a transfer this engine will never load."""
        return self._finished(request)

    def request_finished_all_groups(self, request: Any, block_ids: Any) -> tuple[bool, dict[str, Any] | None]:
        """:meth:`request_finished` for every KV-cache group (vLLM's ``SupportsHMA``)."""
        return self._finished(request)

    def _finished(self, request: Any) -> tuple[bool, dict[str, Any] | None]:
        rid = request.request_id
        p = self._params.pop(rid, None)
        seen = p is not None
        if p is None:  # a request vLLM never scheduled (nor asked about): what did it ask for?
            p = self._request_params(request)
            self._params.pop(rid, None)
        self._blocks.pop(rid, None)
        self._computed.pop(rid, None)
        self._prompt_len.pop(rid, None)
        loaded = rid in self._consumed
        self._consumed.discard(rid)
        sibling = rid in self._siblings
        self._siblings.discard(rid)
        refused = rid in self._refused_saves
        self._refused_saves.discard(rid)
        saved = rid in self._saved
        self._saved.discard(rid)
        if p is None:
            return False, None
        tid = p["transfer_id"]
        if tid is not None and self._loading_tids.get(tid) == rid:
            del self._loading_tids[tid]
        if p.get("do_remote_prefill"):
            status = str(getattr(request, "status", ""))
            if tid is None or sibling:
                return False, None
            if loaded and not p.get(_RELEASE):
                if not any(s in status for s in _NORMAL_FINISH):
                    self._pending_aborts.append(tid)  # aborted or failed: the producer frees its copy now
            elif p.get(_RELEASE) or (tid not in self._loaded_tids and tid not in self._loading_tids):
                # never loaded (cancelled before it was scheduled, its whole prompt was cached here, or its
                # load was refused): nobody will fetch this transfer, so the producer frees its copy now,
                # not at its ttl_s
                try:
                    addr = _address(p)
                    src_tp = _int_param(p, "remote_tp_size", self.tp_size)
                except ConfigError:
                    addr, src_tp = None, self.tp_size
                self._remember_loaded(tid)
                self._pending_releases.append(Release(tid, addr[0] if addr else None, addr[1] if addr else None,
                                                      src_tp))
            return False, None
        if refused or not seen:
            return False, None
        if not saved:
            self._pending_aborts.append(tid)  # finished (or aborted) before its KV was sent
            return False, None
        cfg = self._engine_cfg
        host = cfg.advertise_host or (cfg.host if cfg.host not in ("0.0.0.0", "::") else "127.0.0.1")
        dst_tp = _int_param(p, "decode_tp_size", self.decode_tp_size)
        _trace.mark("save.finished", tid)
        return True, {"transfer_id": tid, "do_remote_prefill": True, "do_remote_decode": False,
                      "remote_host": host if cfg.port else None, "remote_port": cfg.port or None,
                      "remote_tp_size": self.tp_size, "remote_block_size": self.block_size,
                      "decode_tp_size": dst_tp, "mode": p.get("mode") or self.mode,
                      "p2pkv_fingerprint": self.fingerprint.to_dict(),
                      **({"remote_block_ids": p["_p2pkv_read_ids"]} if p.get("mode") == "read" else {})}

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
        """Start this rank's engine (port ``port + rank``) and learn the caches' geometry, per KV-cache group.

        Raises
        ------
        ConfigError
            A cache has no dimension matching the number of blocks, is not one tensor, belongs to no
            KV-cache group of a hybrid model, or the engine config is invalid.
        """
        from ...engine import Engine

        group_of = {name: g.index for g in self.groups for name in g.layers}
        caches: dict[str, torch.Tensor] = {}
        layer_group: dict[str, int] = {}
        for name, t in kv_caches.items():
            if not isinstance(t, torch.Tensor):
                raise ConfigError(f"layer {name}: its KV cache is a {type(t).__name__}, not one tensor; p2pkv moves "
                                  f"attention KV caches only")
            g = group_of.get(name)
            if g is None:
                if len(self.groups) > 1:
                    raise ConfigError(f"layer {name} is in none of this model's KV-cache groups")
                g = 0
            if not self.groups[g].transfer:
                continue  # vLLM rebuilds this group after a load
            caches[name] = block_view(t, self.num_blocks)
            layer_group[name] = g
        self._caches, self._layer_group = caches, layer_group
        self._registered = False
        self._group_layers = {}
        for name, g in layer_group.items():
            self._group_layers.setdefault(g, []).append(name)
        self._geoms, self._head_dims = {}, {}
        for g, names in self._group_layers.items():
            first_view = caches[names[0]]
            geom = layer_geom(first_view, self.groups[g].block_size)
            for name in names:
                if tuple(caches[name].shape[1:]) != geom.rest:
                    geom = LayerGeom(geom.rest, None, None, "?")  # mixed layers: opaque blocks
                    log.warning("layer %s differs in shape from the first of its KV-cache group; heterogeneous "
                                "TP/block sizes are off", name)
                    break
            self._geoms[g] = geom
            self._head_dims[g] = None if geom.head is None else 1 + geom.head
        first = next(iter(caches.values()), None)
        device = "cpu" if first is None or first.device.type != "cuda" else f"cuda:{first.device.index or 0}"
        cfg = self._engine_cfg
        self.rank = self._rank()
        port = cfg.port + self.rank if cfg.port else 0
        if self._engine is None:
            self._engine = Engine(cfg, device=device, port=port)
            log.info("p2pkv engine for TP rank %d listening on %s", self.rank, self._engine.address)
        if device != "cpu" and first is not None:
            self._stream = torch.cuda.Stream(first.device)
        if self.is_producer and self.mode == "read":
            if device == "cpu":
                raise ConfigError("mode 'read' needs CUDA KV caches (a same-host decode engine copies straight out "
                                  "of them through CUDA IPC); use mode 'pull' on CPU")
            for name, c in caches.items():  # once: decode engines map them and copy their blocks themselves
                self._engine.register_memory(name, c)
            self._registered = True

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

        dev = self._device()
        nb = next(iter(self._caches.values())).shape[0]
        for spec in connector_metadata.saves:
            _trace.mark("save.bind", spec.transfer_id)
            state = _SendState(spec.transfer_id)
            state.pending = 1  # held until this step's publishes are done (or its flush, for push)
            with self._lock:
                self._sends[spec.req_id] = state
            try:
                ids = [BlockIds(spec.block_ids[g] if g < len(spec.block_ids) else [], nb, dev)
                       if g in self._group_layers and spec.mode != "read" else None  # read: blocks stay put
                       for g in range(len(self.groups))]  # once per group
                pieces = [self._pieces(spec, g) if g in self._group_layers else [] for g in range(len(self.groups))]
                self._save_plans.append(_SavePlan(spec, ids, pieces, state))
                self._stats.add("transfers_saved")
            except P2pkvError as exc:
                log.error("request %s: KV hand-off of %s refused: %s", spec.req_id, spec.transfer_id, exc)
                state.failed = True
                state.pending = 0
                self._stats.add("save_failures")

    def _pieces(self, spec: SaveSpec, g: int) -> list[_Piece]:
        """What this producer rank hands to which consumer rank for KV-cache group ``g``:
        (name suffix, local lo, n, whole, peer)."""
        src_tp, dst_tp = self.tp_size, spec.dst_tp or self.tp_size
        geom = self._geoms.get(g)
        push = spec.mode == "push"
        if src_tp == dst_tp:
            return [(f"|tp{self.rank}/{src_tp}", 0, 0, True, self._peer(spec.peer_host, spec.peer_port, self.rank)
                     if push else None)]
        if geom is None or not geom.convertible:
            raise ConfigError(f"this cache layout ({geom.rest if geom else '?'}) cannot be re-sharded from TP "
                              f"{src_tp} to TP {dst_tp}")
        total = self._total_heads(geom, src_tp)
        own_lo, own_hi = heads_of(self.rank, src_tp, total)
        if geom.head is not None and geom.heads != own_hi - own_lo:
            raise ConfigError(f"KV-cache group {g} holds {geom.heads} KV heads per rank, not {own_hi - own_lo}: "
                              f"it cannot be re-sharded from TP {src_tp} to TP {dst_tp}")
        out: list[_Piece] = []
        for c, lo, hi in pieces_from_producer(total, src_tp, dst_tp, self.rank):
            name = piece_name("", self.rank, src_tp, c, dst_tp, lo, hi, total)
            whole = (lo, hi) == (own_lo, own_hi) or geom.head is None
            out.append((name, lo - own_lo, hi - lo, whole, self._peer(spec.peer_host, spec.peer_port, c)
                        if push else None))
        return out

    def _total_heads(self, geom: LayerGeom | None, tp: int) -> int:
        """The model's KV heads over all TP ranks (1 for MLA)."""
        if geom is not None and geom.head is None:
            return 1
        return self.fingerprint.kv_heads or (geom.heads * tp if geom is not None else 0)

    def _source_plan(self, src_tp: int) -> list[tuple[int, str]]:
        """(producer rank, key name suffix) of every piece this consumer rank receives."""
        if src_tp == self.tp_size:
            return [(self.rank, f"|tp{self.rank}/{src_tp}")]
        geom = next(iter(self._geoms.values()), None)
        total = self._total_heads(geom, self.tp_size)
        return [(r, piece_name("", r, src_tp, self.rank, self.tp_size, lo, hi, total))
                for r, lo, hi in pieces_for_consumer(total, src_tp, self.tp_size, self.rank)]

    def _peer(self, host: Any, port: Any, rank: int) -> str:
        if not isinstance(host, str) or isinstance(port, bool) or not isinstance(port, int):
            raise ConfigError("kv_transfer_params need remote_host (str) and remote_port (int) for this mode")
        return f"{host}:{port + rank}"

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        """Apply this step's aborts and releases and queue its loads on the loader threads; returns at once."""
        meta = self._connector_metadata
        if not isinstance(meta, P2pkvConnectorMetadata) or self._engine is None:
            return
        for tid in meta.aborts:
            try:
                self._engine.abort(tid)
            except P2pkvError as exc:
                log.warning("abort of %s failed: %s", tid, exc)
        for rel in meta.releases:
            try:
                self._engine.abort(rel.transfer_id)  # anything pushed here already is freed now
            except P2pkvError as exc:
                log.warning("abort of %s failed: %s", rel.transfer_id, exc)
            if rel.peer_host is None:
                continue
            with self._lock:
                busy = self._releases_pending >= _MAX_PENDING_RELEASES
                if not busy:
                    self._releases_pending += 1
            if busy:
                log.debug("release of %s dropped (%d pending); the producer frees it at its ttl_s",
                          rel.transfer_id, _MAX_PENDING_RELEASES)
            else:
                self._releaser.submit(functools.partial(self._release, rel))
        for spec in meta.loads:
            t0 = time.monotonic()
            _trace.mark("load.queued", spec.transfer_id)
            if spec.mode == "read" and self._read_inline(spec, t0):
                continue
            self._loaders.submit(functools.partial(self._load, spec, t0))

    def _release(self, rel: Release) -> None:
        """Tell the producer ranks this rank would have loaded from to free ``rel``'s transfer (on the
        release thread: dialing a producer may take a round trip)."""
        try:
            self._release_now(rel)
        finally:
            with self._lock:
                self._releases_pending -= 1

    def _release_now(self, rel: Release) -> None:
        eng = self._engine
        if eng is None or eng.closed:
            return
        told = []
        try:
            for r, _ in self._source_plan(rel.src_tp or self.tp_size):
                peer = self._peer(rel.peer_host, rel.peer_port, r)
                host, port = peer.rsplit(":", 1)
                _probe(host, int(port))  # a producer that is gone: nothing to free, no wait
                eng.connect(peer, timeout=min(_RELEASE_TIMEOUT_S, self.load_timeout_s))
                told.append(peer)
            eng.abort(rel.transfer_id)  # reaches every producer dialed above
        except P2pkvError as exc:
            self._warn_once("release-failed", logging.WARNING, "could not tell the producer to free transfer %s "
                            "(%s); it frees it at its ttl_s", rel.transfer_id, exc)
            if told:
                with contextlib.suppress(P2pkvError):
                    eng.abort(rel.transfer_id)
            return
        log.debug("told %s to free transfer %s (its decode request ended before loading it)", told,
                  rel.transfer_id)

    # ------------------------------------------------------------------ loads (loader threads)
    def _targets(self, spec: LoadSpec, g: int) -> tuple[int, int, list[int]]:
        """(first, end, block ids): the prompt blocks ``[first, end)`` of KV-cache group ``g`` this load fills:
        past this engine's own prefix hit and, in a windowed group, only those vLLM allocated."""
        group = self.groups[g]
        ids = spec.block_ids[g] if g < len(spec.block_ids) else []
        bs = group.block_size
        end = min(len(ids), _cdiv(spec.num_tokens, bs)) if spec.num_tokens else len(ids)
        first = min(end, spec.computed // bs)
        if group.windowed:
            first = max(first, leading_nulls(ids[:end]))
        return first, end, ids[first:end]

    def _load(self, spec: LoadSpec, t0: float) -> None:
        """Receive every layer of one request and scatter it into its blocks."""
        eng = self._engine
        nbytes = 0
        _trace.mark("load.begin", spec.transfer_id)
        try:
            if spec.refuse:
                raise ConfigError(spec.refuse)
            if eng is None:
                raise ConfigError("the connector's engine is not running (register_kv_caches was not called)")
            nbytes = self._load_layers(spec, time.monotonic() + self.load_timeout_s)
        except Exception as exc:  # a failed load must never hang or crash vLLM: report it
            self._load_failed(spec, exc)
            return
        self._loaded(spec, t0, nbytes)

    def _load_failed(self, spec: LoadSpec, exc: Exception) -> None:
        """Report ``spec``'s load as failed (its blocks as load errors) and free the producer's copy."""
        self._free_producer(spec.transfer_id)
        with self._lock:
            self._failed_locked(spec, exc, log.error if spec.refuse else log.warning)

    def _failed_locked(self, spec: LoadSpec, why: Any, say: Callable[..., None] = log.warning) -> None:
        """Log and count ``spec``'s failed load and queue its blocks as load errors (under the lock)."""
        say("KV load for request %s (transfer %s) failed: %s", spec.req_id, spec.transfer_id or "-", why)
        self._stats.add("load_failures")
        self._failed_recving[spec.req_id] = list(self._targets(spec, 0)[2] if self.groups else [])

    def _free_producer(self, tid: str) -> None:
        """Abort ``tid`` here and at the producer, which frees its copy at once."""
        eng = self._engine
        if eng is not None and not eng.closed and tid:
            with contextlib.suppress(P2pkvError):
                eng.abort(tid)

    def _loaded(self, spec: LoadSpec, t0: float, nbytes: int, locked: bool = False) -> None:
        self._stats.add("transfers_loaded")
        self._stats.add("bytes_received", nbytes)
        self._stats.latency(time.monotonic() - t0)
        with contextlib.nullcontext() if locked else self._lock:
            self._done_recving.add(spec.req_id)
            if _trace.enabled:
                self._recv_tids[spec.req_id] = spec.transfer_id

    def _load_layers(self, spec: LoadSpec, deadline: float) -> int:
        from ...kernels import BlockIds, unpack

        eng = self._engine
        src_tp = spec.src_tp or self.tp_size
        src_block = spec.src_block or self.block_size
        if not self._caches:
            return 0
        if spec.mode == "read":
            return self._read_layers(spec, deadline)
        for g, geom in self._geoms.items():
            if (src_tp != self.tp_size or src_block != self.groups[g].block_size) and not geom.convertible:
                raise ConfigError(f"this cache layout {geom.rest} cannot be converted from TP {src_tp} / block "
                                  f"{src_block} to TP {self.tp_size} / block {self.groups[g].block_size}")
        plan = self._source_plan(src_tp)
        peers: dict[int, str] = {}
        if spec.peer_host is not None or spec.mode == "pull":
            for r, _ in plan:
                peers[r] = self._peer(spec.peer_host, spec.peer_port, r)
        if spec.mode == "pull":
            for r in peers:  # a producer that is gone fails the load now, not at load_timeout_s
                host, port = peers[r].rsplit(":", 1)
                _probe(host, int(port))
        ntok = spec.num_tokens
        dev = self._device()
        nbytes = 0
        ctx = torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext()
        with ctx:
            for g, names in self._group_layers.items():
                group, geom = self.groups[g], self._geoms[g]
                bs = group.block_size
                first, end, targets = self._targets(spec, g)
                fast = len(plan) == 1 and src_block == bs
                ids = BlockIds(targets, self._caches[names[0]].shape[0], dev)  # once per group, for every layer
                for name in names:
                    cache = self._caches[name]
                    with contextlib.ExitStack() as stack:
                        datas = []
                        for r, suffix in plan:
                            key = TransferKey(spec.transfer_id, name + suffix)
                            if spec.mode == "pull":
                                remaining = deadline - time.monotonic()
                                if remaining <= 0:
                                    raise TransferTimeout(f"load not done within {self.load_timeout_s:.3g}s",
                                                          key=key)
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
                        if not targets:
                            continue
                        # the producer sends the prompt's last blocks (a windowed group: only the window's):
                        # where do they start?
                        rows = datas[0].shape[0]
                        src_first = max(0, _cdiv(ntok, src_block) - rows) if ntok else 0
                        if fast:  # unpack straight from the received buffer: no copy, no re-blocking
                            data = datas[0]
                            if tuple(data.shape[1:]) != tuple(cache.shape[1:]):
                                raise ConfigError(f"{spec.transfer_id}/{name}: received {tuple(data.shape)}, this "
                                                  f"engine needs [n, {', '.join(map(str, cache.shape[1:]))}]")
                            if first < src_first or rows < end - src_first:
                                raise ShapeMismatch(f"{spec.transfer_id}/{name}: the producer sent blocks "
                                                    f"{src_first}..{src_first + rows} of the prompt; this engine "
                                                    f"needs blocks {first}..{end}")
                            unpack(data[first - src_first:end - src_first], cache, ids)
                        else:
                            src = assemble(datas, geom, src_block, first * bs, end * bs, ntok,
                                           src_first * src_block)
                            unpack(src, cache, ids)
            if self._stream is not None:
                self._stream.synchronize()  # the loader thread waits, never the forward stream
        return nbytes

    def _read_layers(self, spec: LoadSpec, deadline: float) -> int:
        """Mode 'read' on a loader thread (the first read from a producer maps its memory: a round trip):
        launch the copies, wait for them, tell the producer it may free its blocks."""
        eng = self._engine
        assert eng is not None
        if self._device().type != "cuda":  # said before anything is asked of the producer
            raise ConfigError("mode 'read' needs CUDA KV caches on the decode side too (the producer's blocks "
                              "are copied GPU to GPU through CUDA IPC); a CPU instance loads by 'push' or 'pull'")
        peer = self._peer(spec.peer_host, spec.peer_port, self.rank)
        eng.remote_memory(peer, timeout=max(0.1, deadline - time.monotonic()))
        _trace.mark("read.mapped", spec.transfer_id)
        with eng.reading_memory(peer) as views:  # not unmapped while the copies are queued
            if views is None:
                raise PeerLost("the producer was lost just after its memory was mapped", peer=peer)
            ev, nbytes = self._read_launch(spec, peer, views)
        if ev is not None:
            while not ev.query():  # the loader thread waits (never the forward stream), up to the load's deadline
                if time.monotonic() > deadline:  # a copy that never ends: a broken GPU (as _reads_landed_locked)
                    raise TransferTimeout(f"its copies did not finish within {self.load_timeout_s:.3g}s",
                                          key=spec.transfer_id)
                time.sleep(1e-4)
            _trace.mark("read.synced", spec.transfer_id)
        eng.read_done(peer, spec.transfer_id)
        _trace.mark("read.done_sent", spec.transfer_id)
        return nbytes

    def _read_inline(self, spec: LoadSpec, t0: float) -> bool:
        """Mode 'read' from a producer whose memory is mapped already: launch the copies here (nothing
        waits: vLLM's thread only queues GPU work) and let :meth:`_drain` report the load once they are
        done, as NixlConnector polls its transfers. False when the load needs a loader thread."""
        eng = self._engine
        if eng is None or spec.refuse or not self._caches or self._stream is None or _SEGMENT_READS:
            return False
        try:
            peer = self._peer(spec.peer_host, spec.peer_port, self.rank)
        except P2pkvError:
            return False
        failed: Exception | None = None
        with eng.reading_memory(peer) as views:  # not unmapped (the producer lost) while the copies are queued
            if views is None:
                return False
            _trace.mark("load.begin", spec.transfer_id)
            try:
                ev, nbytes = self._read_launch(spec, peer, views)
            except Exception as exc:  # a bad load is reported per request, never raised into vLLM
                failed = exc
        if failed is not None:
            self._load_failed(spec, failed)
            return True
        if ev is None:
            eng.read_done(peer, spec.transfer_id)
            self._loaded(spec, t0, nbytes)
            return True
        with self._lock:
            self._reads.append((spec, ev, peer, t0, nbytes))
        return True

    def _read_launch(self, spec: LoadSpec, peer: str, views: dict[str, torch.Tensor]) -> tuple[Any, int]:
        """Queue the copies of ``spec``'s blocks straight out of the producer's KV caches (``views``, mapped
        through CUDA IPC) into this engine's blocks: every layer of a KV-cache group in one launch of the
        fused paged copy (per request only the block id pairs go to the GPU). Returns (an event that
        completes with the copies or None when there is nothing to copy, bytes). Nothing is packed,
        staged or unpacked."""
        from ...kernels.batch import copier_for
        from ...kernels.blocks import block_pairs

        tid = spec.transfer_id
        dev = self._device()
        if dev.type != "cuda":
            raise ConfigError("mode 'read' needs CUDA KV caches on the decode side too")
        work: list[tuple[Any, Any]] = []
        for g, plans, src_blocks, dst_blocks in self._read_plans(peer, views, tid):
            first, end, targets = self._targets(spec, g)
            remote = spec.remote_ids[g] if g < len(spec.remote_ids) else []
            src_ids = remote[first:end]
            if len(src_ids) != len(targets):
                raise ShapeMismatch(f"{tid}: the producer names {len(remote)} blocks of KV-cache group "
                                    f"{g}; this engine needs blocks {first}..{end}")
            if targets:
                pairs = block_pairs(src_ids, targets, src_blocks, dst_blocks)  # once for all layers of the group
                work.extend((plan, pairs) for plan in plans)
        _trace.mark("read.table", tid)
        if not work:
            return None, 0
        nbytes = 0
        s = self._stream if self._stream is not None else torch.cuda.current_stream(dev)
        copier = copier_for(dev)
        if _SEGMENT_READS:  # the segment path (one row per block run), for comparison
            import numpy as np

            segs = np.concatenate([plan.segments(pairs) for plan, pairs in work])
            copier.copy(segs, s)
            nbytes = int(segs[:, 2].sum())
            ev = torch.cuda.Event()
            ev.record(s)
        else:
            ev = None
            for plan, pairs in work:
                n, last = copier.paged_copy_async(plan, pairs, s, tid)
                nbytes += n
                ev = last if last is not None else ev  # launches on one stream: the last one ends last
        _trace.mark("read.launched", tid)
        return ev, nbytes

    def _tell_read(self, peer: str, tid: str) -> None:
        eng = self._engine
        if eng is not None and not eng.closed:
            with contextlib.suppress(P2pkvError):
                eng.read_done(peer, tid)  # returns at once

    def _read_failed_locked(self, spec: LoadSpec, why: str) -> None:
        """An inline read failed (under the lock): reported as a loader's failure is, and the producer's
        copy freed from the release thread (as ``read_done`` is told)."""
        self._failed_locked(spec, why)
        self._releaser.submit(functools.partial(self._free_producer, spec.transfer_id))

    def _reads_landed_locked(self) -> None:
        """Report the inline reads whose copies are done (under the lock); tell their producers."""
        if not self._reads:
            return
        still = []
        for item in self._reads:
            spec, ev, peer, t0, nbytes = item
            try:
                done = ev.query()
            except Exception as exc:  # a CUDA error: the blocks cannot be trusted
                self._read_failed_locked(spec, str(exc))
                continue
            if not done:
                if time.monotonic() - t0 > self.load_timeout_s:  # a copy that never ends: a broken GPU
                    self._read_failed_locked(spec, f"its copies did not finish within {self.load_timeout_s:.3g}s")
                else:
                    still.append(item)
                continue
            _trace.mark("read.synced", spec.transfer_id)
            # the producer may free its blocks: told from the release thread, so that waking the engine's
            # I/O thread (which then takes the GIL) does not delay reporting this load to vLLM
            self._releaser.submit(functools.partial(self._tell_read, peer, spec.transfer_id))
            self._loaded(spec, t0, nbytes, locked=True)
        self._reads = still

    def _read_plans(self, peer: str, views: dict[str, torch.Tensor],
                    tid: str) -> list[tuple[int, list[Any], int, int]]:
        """Per KV-cache group: the fused-copy plans from ``peer``'s mapped caches into ours, and the block
        counts ids must stay below; built once per mapping of the peer's memory (its ``views``)."""
        from ...kernels.blocks import paged_plans

        cached = self._read_cache.get(peer)
        if cached is not None and cached[0] is views:
            return cached[1]
        out = []
        for g, names in self._group_layers.items():
            missing = [n for n in names if n not in views]
            if missing:
                raise ConfigError(f"{tid}: the producer registered no cache for {missing[0]} (is it in "
                                  "mode 'read', with the same model?)")
            plans = paged_plans([views[n] for n in names], [self._caches[n] for n in names])
            out.append((g, plans, min(p.src_blocks for p in plans), min(p.dst_blocks for p in plans)))
        with self._lock:
            if len(self._read_cache) >= _MAX_READ_PEERS:
                self._read_cache.clear()
            self._read_cache[peer] = (views, out)
        return out

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
        if not plans or not any(p.spec.mode == "push" for p in plans):
            return  # pull packs in wait_for_save; read leaves the blocks where they are
        g = self._layer_group.get(layer_name)
        if g is None:
            return  # a layer p2pkv does not move (not in a transferable KV-cache group)
        from ...kernels import pack

        cache = self._caches[layer_name]
        eng = self._engine
        head_dim = self._head_dims[g]
        for plan in plans:
            st = plan.state
            if st.failed or plan.spec.mode != "push":
                continue
            try:
                packed = pack(cache, plan.ids[g])
                for suffix, lo, n, whole, peer in plan.pieces[g]:
                    t = packed if whole or head_dim is None else packed.narrow(head_dim, lo, n).contiguous()
                    key = TransferKey(st.transfer_id, layer_name + suffix)
                    self._stats.add("bytes_sent", t.numel() * t.element_size())
                    if peer is None:
                        self._publish_later(st, key, t)
                        continue
                    req = self._request_for(plan, peer, suffix)
                    if req is not None and key.name in req.index:
                        req.send(key.name, t)  # one offer per request; NCCL/IPC post on this thread
                    else:
                        st.handles.append(eng.send(peer, key, t))
            except P2pkvError as exc:
                self._save_failed(st, f"saving {layer_name} of {st.transfer_id} failed: {exc}")

    def _request_for(self, plan: _SavePlan, peer: str, suffix: str) -> Any:
        """The whole-request send of one hand-off piece to ``peer`` (made at its first layer): one offer
        names every layer of every KV-cache group, the receiver reserves room once, each layer then moves
        as it is saved."""
        st = plan.state
        req = st.requests.get((peer, suffix))
        if req is None and (peer, suffix) not in st.requests:
            layout = []
            for name, c in self._caches.items():
                g = self._layer_group[name]
                piece = next((pc for pc in plan.pieces[g] if pc[0] == suffix and pc[4] == peer), None)
                if piece is None:
                    continue
                _, _, n, whole, _ = piece
                head_dim = self._head_dims[g]
                shape = [len(plan.ids[g]), *c.shape[1:]]
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
        """Pull mode: gather every layer's blocks of each hand-off in one launch per KV-cache group
        (``pack_layers``), after the forward pass has written them (stream order), and queue the pieces
        for the publisher."""
        from ...kernels import pack, pack_layers

        groups = [(g, names, [self._caches[n] for n in names]) for g, names in self._group_layers.items()]
        for plan in self._save_plans:
            st = plan.state
            if st.failed or plan.spec.mode != "pull" or not groups:
                continue
            try:
                for g, names, layers in groups:
                    head_dim = self._head_dims[g]
                    try:
                        per_layer = list(pack_layers(layers, plan.ids[g]).unbind(0))
                    except P2pkvError:  # layers of different layouts: one launch each
                        per_layer = [pack(t, plan.ids[g]) for t in layers]
                    for name, packed in zip(names, per_layer, strict=True):
                        for suffix, lo, n, whole, _ in plan.pieces[g]:
                            t = packed if whole or head_dim is None else packed.narrow(head_dim, lo, n).contiguous()
                            self._stats.add("bytes_sent", t.numel() * t.element_size())
                            self._publish_later(st, TransferKey(st.transfer_id, name + suffix), t)
            except P2pkvError as exc:
                self._save_failed(st, f"packing {st.transfer_id} failed: {exc}")

    def wait_for_save(self) -> None:
        """Pull mode: pack this step's hand-offs and give them to the publisher thread in one job; never
        waits on the GPU. Push sends are already queued. Read mode: the blocks stay where they are; the
        hand-off is done when the decode engine says it copied them. request_finished delays freeing the
        blocks until get_finished reports the hand-off done."""
        for plan in self._save_plans:
            st = plan.state
            if plan.spec.mode == "read" and not st.failed:
                try:
                    st.handles.append(self._engine.expose(st.transfer_id, timeout=self._engine_cfg.ttl_s))
                    _trace.mark("save.exposed", st.transfer_id)
                except P2pkvError as exc:
                    self._save_failed(st, f"exposing {st.transfer_id} failed: {exc}")
        self._pack_pull_plans()
        self._flush_publishes()
        self._save_plans = []

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        """Push mode sends layer by layer from ``save_kv_layer``, which full CUDA graphs would skip."""
        return bool((extra_config or {}).get("mode", "push") == "push")

    # ------------------------------------------------------------------ completion reporting
    def _drain(self, finished_req_ids: set[str]) -> tuple[set[str], set[str], set[str]]:
        """(done sending, done receiving with failures included, failed receiving); a failed load's block ids
        are queued for :meth:`get_block_ids_with_load_errors` in the same pass (single KV-cache group)."""
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
                    _trace.mark("save.reported", st.transfer_id)
            self._reads_landed_locked()
            failed_recving, self._failed_recving = self._failed_recving, {}
            done_recving, self._done_recving = self._done_recving, set()
            if _trace.enabled:
                for rid in done_recving:
                    _trace.mark("load.reported", self._recv_tids.pop(rid, rid))
            if self._block_errors_ok:  # vLLM cannot map block ids to requests across several groups
                for blocks in failed_recving.values():
                    self._load_errors.update(blocks)
        return done_sending, done_recving | set(failed_recving), set(failed_recving)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """Older interface: failed loads are reported as block ids (:meth:`get_block_ids_with_load_errors`)."""
        sending, recving, _ = self._drain(finished_req_ids)
        return (sending or None), (recving or None)

    def get_transfer_results(self, finished_req_ids: set[str]) -> Any:
        """vLLM 0.33: completions with per-request load failures (``failed_recving``, also in
        ``finished_recving``); vLLM applies its ``kv_load_failure_policy`` to them. A failed load's
        blocks are also reported by :meth:`get_block_ids_with_load_errors` in the same pass (as
        NixlConnector does; models with a single KV-cache group only)."""
        sending, recving, failed = self._drain(finished_req_ids)
        return KVConnectorTransferResults(finished_sending=sending, finished_recving=recving,
                                          failed_recving=failed)

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
        self._releaser.close(timeout=0.0)  # releases are best effort: a dial in progress ends with the engine
        self._loaders.close()
        self._publisher.close()
        if self._engine is not None:
            self._engine.close()
            self._engine = None
