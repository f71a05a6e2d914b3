"""One :class:`P2pkvKVManager` per SGLang scheduler rank: the engine, the KV buffers, the prefill topology."""

from __future__ import annotations

import itertools
import logging
import threading
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from ...config import EngineConfig
from ...engine import Engine
from ...errors import ConfigError, P2pkvError, ShapeMismatch
from ._compat import BaseKVManager
from ._layout import heads_per_rank, wrap_buffer
from ._settings import SglangSettings
from ._wire import META_VERSION
from .bootstrap import Registrar, check_registration, http_json

__all__ = ["P2pkvKVManager", "PrefillInfo"]

log = logging.getLogger("p2pkv.sglang")


def _mode_name(mode: Any) -> str:
    return str(getattr(mode, "value", mode)).lower()


def _server_attr(server_args: Any, name: str, default: Any) -> Any:
    value = getattr(server_args, name, default) if server_args is not None else default
    return default if value is None else value


@dataclass
class PrefillInfo:
    """What the decode side knows about a prefill server (SGLang reads ``dp_size``,
    ``follow_bootstrap_room`` and ``page_size`` of it)."""

    dp_size: int
    attn_tp_size: int
    page_size: int
    ranks: dict[int, dict[int, dict[str, Any]]]  # dp_rank -> tp_rank -> registration
    pp_size: int = 1
    attn_cp_size: int = 1
    follow_bootstrap_room: bool = True
    kv_cache_dtype: str | None = None
    enable_dsa_cache_layer_split: bool = False
    decode_allocation_policy: str = "early"
    instances: frozenset[str] = field(default_factory=frozenset)


class P2pkvKVManager(BaseKVManager):
    """One per scheduler rank: owns the :class:`p2pkv.Engine` and the wrapped KV/aux buffers.

    Parameters
    ----------
    args:
        SGLang's ``KVArgs``, as its ``_init_kv_manager`` fills them on each
        side: ``kv_data_ptrs/lens``, ``kv_item_lens``, ``aux_data_ptrs/lens``,
        ``aux_item_lens``, ``page_size``, ``engine_rank``, ``gpu_id``,
        ``system_dp_rank``; on the prefill side also ``kv_head_num`` and
        ``total_kv_head_num`` (non-MLA). SGLang's decode side leaves those two
        unset: a decode rank learns the model's total KV heads from the prefill
        ranks' registrations and holds ``max(1, total // attn_tp_size)`` heads
        per page slot, which its item lengths must agree with.
    disaggregation_mode:
        ``DisaggregationMode.PREFILL`` / ``DECODE`` (or ``"prefill"``/``"decode"``).
    server_args:
        SGLang's ``ServerArgs`` (``host``, ``disaggregation_bootstrap_port``,
        ``tp_size``, ``dp_size``, ``enable_dp_attention``, ``pp_size``,
        ``attn_cp_size``).
    is_mla_backend:
        MLA: one item per token, no head slicing.
    config:
        The engine's :class:`EngineConfig` (default ``EngineConfig.from_env()``).
    settings:
        :class:`SglangSettings` (default ``SglangSettings.from_env()``).
    kv_buffers, aux_buffers:
        Tensors to use instead of wrapping the raw pointers.

    A prefill rank registers with the bootstrap server in the background
    (:class:`~p2pkv.adapters.sglang.bootstrap.Registrar`): a bootstrap server
    that is away is logged, never fatal.

    Raises
    ------
    ConfigError
        Unsupported layout (state buffers, PP, context parallelism) or
        inconsistent ``KVArgs``.
    """

    def __init__(self, args: Any, disaggregation_mode: Any, server_args: Any = None,
                 is_mla_backend: bool | None = False, *, config: EngineConfig | None = None,
                 settings: SglangSettings | None = None, kv_buffers: Sequence[torch.Tensor] | None = None,
                 aux_buffers: Sequence[torch.Tensor] | None = None, **_ignored: Any):
        self.kv_args = args
        self.server_args = server_args
        self.mode = _mode_name(disaggregation_mode)
        if self.mode not in ("prefill", "decode"):
            raise ConfigError(f"disaggregation_mode must be prefill or decode, got {disaggregation_mode!r}")
        self.is_mla = bool(is_mla_backend)
        self.settings = settings or SglangSettings.from_env()
        if getattr(args, "state_types", None):
            raise ConfigError(f"p2pkv's SGLang backend does not move state buffers {list(args.state_types)} "
                              "(hybrid models); use another transfer backend")
        if int(_server_attr(server_args, "pp_size", 1)) != 1:
            raise ConfigError("p2pkv's SGLang backend does not support pipeline parallelism (pp_size > 1)")
        if int(_server_attr(server_args, "attn_cp_size", 1)) != 1:
            raise ConfigError("p2pkv's SGLang backend does not support attention context parallelism "
                              "(attn_cp_size > 1)")
        self.page_size = int(args.page_size)
        if self.page_size < 1:
            raise ConfigError(f"KVArgs.page_size must be >= 1, got {self.page_size}")
        tp = int(_server_attr(server_args, "tp_size", 1))
        dp = int(_server_attr(server_args, "dp_size", 1))
        attn_dp = dp if _server_attr(server_args, "enable_dp_attention", False) else 1
        self.attn_tp_size = max(1, tp // attn_dp)
        rank = int(getattr(args, "engine_rank", 0) or 0)  # prefill: the TP rank; decode: already mod attn_tp
        self.attn_tp_rank = rank % self.attn_tp_size
        if attn_dp > 1:  # DP attention: the DP groups share one TP world
            self.dp_size, self.dp_rank = attn_dp, rank // self.attn_tp_size
        else:  # plain DP: one worker per group, each numbered by SGLang's system_dp_rank
            self.dp_size, self.dp_rank = max(1, dp), int(getattr(args, "system_dp_rank", 0) or 0)
        self._layout_lock = threading.Lock()
        self.kv_head_num: int | None
        self.total_kv_head_num: int | None
        if self.is_mla:
            self.kv_head_num = self.total_kv_head_num = 1
        else:
            heads = int(getattr(args, "kv_head_num", 0) or 0)
            total = int(getattr(args, "total_kv_head_num", 0) or 0)
            if heads and total:
                if total < heads:
                    raise ConfigError(f"KVArgs.kv_head_num={heads} > total_kv_head_num={total}")
                self.kv_head_num, self.total_kv_head_num = heads, total
            elif self.mode == "prefill":
                raise ConfigError(f"KVArgs.kv_head_num={heads} / total_kv_head_num={total}: SGLang's prefill side "
                                  "sets both for a non-MLA model")
            else:  # SGLang's decode side: learned from the prefill ranks (adopt_layout)
                self.kv_head_num = heads or None
                self.total_kv_head_num = None
        self.device = self._buffer_device(args)
        self.item_lens = [int(x) for x in args.kv_item_lens]
        self.kv_buffers = self._buffers(kv_buffers, args.kv_data_ptrs, args.kv_data_lens, self.item_lens, "kv")
        self.aux_item_lens = [int(x) for x in (getattr(args, "aux_item_lens", None) or [])]
        self.aux_buffers = self._buffers(aux_buffers, getattr(args, "aux_data_ptrs", None) or [],
                                         getattr(args, "aux_data_lens", None) or [], self.aux_item_lens, "aux")
        if not self.kv_buffers:
            raise ConfigError("KVArgs has no KV buffers")
        self.num_pages = [b.shape[0] for b in self.kv_buffers]
        if len(set(self.num_pages)) > 1:
            raise ConfigError(f"KV buffers hold different page counts {sorted(set(self.num_pages))}")
        if self.kv_head_num is not None:
            self._check_heads(self.kv_head_num)
        # SGLang's decode loop reads these (CommonKVManager's surface).
        self.prefill_info_table: dict[str, PrefillInfo] = {}
        self.transfer_infos: dict[int, Any] = {}
        self.enable_all_cp_ranks_for_transfer = False
        self.is_dummy_cp_rank = False
        self.kv_cache_dtype_str = getattr(args, "kv_cache_dtype_str", None)
        self.instance = uuid.uuid4().hex[:16]  # this rank's life: a restarted prefill registers anew
        self._attempts = itertools.count(1)
        self.last_n_dst = 1  # decode ranks per request, as last seen (prefill side)
        cfg = config or EngineConfig.from_env()
        if self.device.type == "cuda" and cfg.device != str(self.device):
            cfg = cfg.replace(device=str(self.device))  # sends go from, and land in, the KV pool's GPU
        self.engine = Engine(cfg)
        self._closed = False
        self._executor: ThreadPoolExecutor | None = None
        self._stream: Any = None
        self.registrar: Registrar | None = None
        if self.mode == "prefill":
            self.registrar = Registrar(self.bootstrap_url(), self.registration,
                                       http_timeout_s=self.settings.http_timeout_s,
                                       warn_s=self.settings.register_warn_s)
            self.registrar.start()

    # -- layout
    def _buffer_device(self, args: Any) -> torch.device:
        want = self.settings.buffer_device
        if want == "auto":
            want = "cuda" if torch.cuda.is_available() else "cpu"
        if want == "cuda":
            return torch.device("cuda", int(getattr(args, "gpu_id", 0) or 0))
        return torch.device("cpu")

    def _buffers(self, given: Sequence[torch.Tensor] | None, ptrs: Sequence[int], lens: Sequence[int],
                 item_lens: Sequence[int], what: str) -> list[torch.Tensor]:
        if given is not None:
            if not all(t.is_contiguous() for t in given):
                raise ConfigError(f"{what}_buffers must be contiguous tensors")
            raw = [t.view(torch.uint8).view(-1) for t in given]
        else:
            if len(ptrs) != len(lens):
                raise ConfigError(f"KVArgs: {len(ptrs)} {what} pointers but {len(lens)} lengths")
            raw = [wrap_buffer(p, n, self.device) for p, n in zip(ptrs, lens, strict=True)]
        if len(raw) != len(item_lens):
            raise ConfigError(f"KVArgs: {len(raw)} {what} buffers but {len(item_lens)} item lengths")
        out = []
        for i, (b, item) in enumerate(zip(raw, item_lens, strict=True)):
            if item < 1 or b.numel() % item:
                raise ConfigError(f"{what} buffer {i}: {b.numel()} bytes is not a multiple of item_len={item}")
            out.append(b.view(-1, item))
        return out

    def _check_heads(self, heads: int) -> None:
        if self.is_mla:
            return
        for i, item in enumerate(self.item_lens):
            if item % (self.page_size * heads):
                raise ShapeMismatch(f"kv buffer {i}: item_len={item} is not page_size={self.page_size} x "
                                    f"{heads} KV heads x bytes per head")

    def adopt_layout(self, reg: dict[str, Any]) -> None:
        """Decode side: learn the model's total KV heads from a prefill rank's registration.

        SGLang's decode scheduler does not put ``kv_head_num`` /
        ``total_kv_head_num`` in ``KVArgs``; this rank then holds
        ``max(1, total // attn_tp_size)`` heads, as SGLang's model config
        shards them.

        Raises
        ------
        ShapeMismatch
            The prefill side's total differs from what this rank already
            knows, or this rank's item lengths do not fit the head count.
        """
        if self.is_mla:
            return
        total = int(reg["total_kv_head_num"])
        with self._layout_lock:
            if self.total_kv_head_num is None:
                heads = self.kv_head_num or heads_per_rank(self.attn_tp_size, total)
                if heads > total:
                    raise ShapeMismatch(f"this decode rank holds {heads} KV heads but the model has {total}")
                self._check_heads(heads)
                self.kv_head_num, self.total_kv_head_num = heads, total
            elif total != self.total_kv_head_num:
                raise ShapeMismatch(f"total KV heads differ: prefill {total}, decode {self.total_kv_head_num}")

    def bytes_per_head(self) -> int:
        """Bytes of one KV head of one token (0 for MLA or before the head count is known)."""
        if self.is_mla or not self.kv_head_num:
            return 0
        return self.item_lens[0] // (self.page_size * self.kv_head_num)

    def page_view(self, i: int) -> torch.Tensor:
        """KV buffer ``i`` as ``[pages, page_size, heads, bytes]`` (``[pages, item]`` for MLA)."""
        b = self.kv_buffers[i]
        if self.is_mla:
            return b
        if self.kv_head_num is None:
            raise ConfigError("the KV head count is not known yet (no prefill rank was looked up)")
        return b.view(b.shape[0], self.page_size, self.kv_head_num, -1)

    def next_attempt(self) -> str:
        """A new attempt id, unique to this rank's life (``{instance}{n}``)."""
        return f"{self.instance[:8]}{next(self._attempts)}"

    def registration(self) -> dict[str, Any]:
        """What this prefill rank publishes on the bootstrap server."""
        return {"v": META_VERSION, "dp_rank": self.dp_rank, "tp_rank": self.attn_tp_rank, "dp_size": self.dp_size,
                "tp_size": self.attn_tp_size, "address": self.engine.address, "page_size": self.page_size,
                "kv_head_num": self.kv_head_num, "total_kv_head_num": self.total_kv_head_num,
                "is_mla": self.is_mla, "item_lens": self.item_lens, "aux_item_lens": self.aux_item_lens,
                "kv_cache_dtype": self.kv_cache_dtype_str, "instance": self.instance}

    def bootstrap_url(self) -> str:
        host = str(_server_attr(self.server_args, "host", "127.0.0.1"))
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        port = int(_server_attr(self.server_args, "disaggregation_bootstrap_port", 8998))
        return f"http://{host}:{port}"

    # -- decode side lookups
    def fetch_prefill_info(self, bootstrap_addr: str) -> PrefillInfo | None:
        """One HTTP lookup of the prefill ranks behind ``bootstrap_addr``; ``None``
        while not every rank has registered. A complete answer replaces the cached one.

        Raises
        ------
        OSError, ValueError
            The bootstrap server is unreachable or answered garbage.
        ConfigError
            The prefill side's page size or KV layout does not match this side.
        """
        data = http_json("GET", f"http://{bootstrap_addr}/route", None, self.settings.http_timeout_s)
        raw = data.get("ranks")
        if not isinstance(raw, dict):
            raise ValueError(f"bootstrap server {bootstrap_addr} answered without ranks")
        ranks: dict[int, dict[int, dict[str, Any]]] = {}
        for d, r in raw.items():
            if not isinstance(r, dict):
                raise ValueError(f"bootstrap server {bootstrap_addr}: ranks of dp {d!r:.20} is not an object")
            ranks[int(d)] = {int(t): check_registration(i) for t, i in r.items()}
        if not ranks:
            return None
        any_info = next(iter(next(iter(ranks.values())).values()))
        dp_size, tp_size = int(any_info["dp_size"]), int(any_info["tp_size"])
        if any(int(i["dp_size"]) != dp_size or int(i["tp_size"]) != tp_size for r in ranks.values()
               for i in r.values()):
            return None  # a prefill restarting with another shape: wait for it to settle
        if len(ranks) < dp_size or any(len(ranks.get(d, {})) < tp_size for d in range(dp_size)):
            return None
        if int(any_info["page_size"]) != self.page_size:
            raise ConfigError(f"page size mismatch: prefill page_size={any_info['page_size']}, "
                              f"decode page_size={self.page_size}")
        if bool(any_info.get("is_mla")) != self.is_mla:
            raise ConfigError("one side uses an MLA KV cache and the other does not")
        self.adopt_layout(any_info)
        info = PrefillInfo(dp_size=dp_size, attn_tp_size=tp_size, page_size=self.page_size, ranks=ranks,
                           kv_cache_dtype=any_info.get("kv_cache_dtype"),
                           instances=frozenset(str(i["instance"]) for r in ranks.values() for i in r.values()))
        self.prefill_info_table[bootstrap_addr] = info
        return info

    def try_ensure_parallel_info(self, bootstrap_addr: str) -> bool:
        """SGLang's decode loop: one short attempt to learn the prefill topology.

        Never raises (SGLang calls it on its scheduler thread): an
        incompatible prefill server is logged as an error and answers False.
        """
        if bootstrap_addr in self.prefill_info_table:
            return True
        try:
            return self.fetch_prefill_info(bootstrap_addr) is not None
        except P2pkvError as e:  # a layout mismatch: SGLang gives up on these requests after its retries
            log.error("p2pkv: the prefill server behind %s cannot serve this decode rank: %s", bootstrap_addr, e)
            return False
        except (OSError, ValueError, KeyError) as e:
            log.warning("p2pkv: bootstrap lookup at %s failed: %s", bootstrap_addr, e)
            return False

    # -- background work of the senders
    def submit(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on this manager's worker threads (never on SGLang's scheduler thread).

        Four threads at most: gathering pages is memory-bound (CPU) or only
        launches kernels (GPU), and the pushes themselves run on the engine.
        """
        with self._layout_lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="p2pkv-sglang-send")
            ex = self._executor
        ex.submit(fn)

    def side_stream(self) -> Any:
        """The CUDA stream the workers gather pages on (``None`` for host buffers)."""
        if self.device.type != "cuda":
            return None
        with self._layout_lock:
            if self._stream is None:
                self._stream = torch.cuda.Stream(self.device)
            return self._stream

    def register_to_bootstrap(self) -> None:
        """Prefill: one registration attempt now (the background registrar keeps trying and keeps the
        registration alive on its own); decode: nothing to register. Never raises."""
        if self.registrar is not None:
            self.registrar.register_once()

    def register_to_bootstrap_if_needed(self) -> None:
        self.register_to_bootstrap()

    def close(self) -> None:
        """Stop registering and close the engine (transfers in flight fail with ``EngineClosed``). Idempotent."""
        if not self._closed:
            self._closed = True
            if self.registrar is not None:
                self.registrar.close()
            if self._executor is not None:
                self._executor.shutdown(wait=False, cancel_futures=True)
            self.engine.close()

    teardown = close
