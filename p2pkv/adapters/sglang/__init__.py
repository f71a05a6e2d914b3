"""SGLang prefill/decode disaggregation transfer backend on top of :class:`p2pkv.Engine`.

Enable it (sglang 0.5.23) with :func:`install` before SGLang builds its
scheduler processes, then pass ``--disaggregation-transfer-backend p2pkv`` to
both the prefill and the decode server. SGLang starts its schedulers with the
``spawn`` method, so :func:`install` must run in every process: either launch
with ``python -m p2pkv.adapters.sglang.launch <sglang.launch_server args>``
(its top level calls :func:`install`, and spawned children import it again as
``__mp_main__``), or call :func:`install` at the *top level* (not under
``if __name__ == "__main__"``) of the script that starts ``sglang.Engine``.

What :func:`install` patches, and nothing else:

* ``sglang.srt.disaggregation.utils.TransferBackend`` gains a member
  ``P2PKV = "p2pkv"``;
* ``sglang.srt.disaggregation.utils.get_kv_class`` is wrapped: for
  ``TransferBackend.P2PKV`` it returns this module's classes, for every other
  backend it calls the original; the same name is rebound in the modules that
  imported it by name (``disaggregation.prefill``, ``disaggregation.decode``,
  ``managers.disagg_service``) if they are already imported;
* ``"p2pkv"`` is added to the ``--disaggregation-transfer-backend`` choices
  through SGLang's own extension point
  (``sglang.srt.arg_groups.choices.add_disagg_transfer_backend_choices``).

:func:`uninstall` undoes all three.

How a request moves (transfer id ``f"sglang-{bootstrap_room}"``; SGLang's
internal request ids are never used):

1. Each prefill rank's :class:`P2pkvKVManager` starts a :class:`p2pkv.Engine`
   and registers its address and KV layout with the bootstrap server
   (:class:`P2pkvBootstrapServer`, a small HTTP registry that SGLang starts on
   the prefill host at ``--disaggregation-bootstrap-port``).
2. A decode :class:`P2pkvKVReceiver` looks up the prefill ranks of its
   ``prefill_dp_rank`` (``init``), then ``send_metadata`` pushes to *every*
   prefill rank a small metadata tensor: its engine address, its page ids
   (``kv_indices``), which KV heads it wants from that rank (heads are
   sliced by ``kv_head_num`` / ``total_kv_head_num`` when the two sides use
   different attention-TP sizes; an MLA decode rank takes the whole item from
   one prefill rank) and its aux slot.
3. A prefill :class:`P2pkvKVSender` is ``Bootstrapping`` until every decode
   rank's metadata arrived, then ``WaitingForInput``. Each ``send`` (one
   chunk of a chunked prefill: prefill page ids) gathers those pages buffer by
   buffer (layer by layer, K and V), slices the heads each decode rank wants
   and pushes them; the last chunk (the page count given to ``init`` is
   reached) also carries the aux rows. ``Success`` once the decode engines
   stored everything.
4. The receiver scatters each chunk into its pages as it arrives and is
   ``Success`` after the last chunk and the aux rows.

KV buffers: SGLang hands the manager raw pointers (``KVArgs.kv_data_ptrs``
with ``kv_data_lens`` and per-page ``kv_item_lens``). They are wrapped
without a copy as ``uint8`` tensors: CUDA memory through a
``__cuda_array_interface__`` object (device ``cuda:{gpu_id}``), host memory
through ``ctypes``/numpy. Which one is chosen by ``buffer_device`` in
:class:`SglangSettings` (``auto``: CUDA when available). A manager can also be
given tensors directly (``kv_buffers=`` / ``aux_buffers=``). Each KV buffer
holds ``kv_data_lens[i] // kv_item_lens[i]`` pages laid out as
``[page_size, kv_head_num, bytes_per_head]`` (MHA) or opaque (MLA).

Deadlines (:class:`SglangSettings`, from ``P2PKV_SGLANG_*`` or SGLang's own
``SGLANG_DISAGGREGATION_*`` variables): bootstrap lookup and the wait for
the decode metadata (``bootstrap_timeout_s``), the wait for the scheduler's
first ``send`` / ``send_metadata`` and between chunks (``waiting_timeout_s``),
every push and every layer of a started chunk (``EngineConfig.timeout_s``).
A lost peer is noticed by the engine (closed connection at once, a silent one
after ``peer_timeout_s``). Every failure ends in ``KVPoll.Failed`` and
``failure_exception()`` raises the typed p2pkv error naming the cause.
``poll()`` never blocks: the waits run on one worker thread per transfer.

Not supported (a clear error, not silence): hybrid-model state buffers
(``KVArgs.state_types``), prefill pipeline parallelism, host (HiCache)
destinations, staging buffers, and SGLang's retraction re-bootstrap of a
room whose transfer was already aborted.

Importing this module needs neither sglang nor a GPU and opens no socket or
thread: with sglang installed the classes subclass its real base classes,
without it they subclass stand-ins with the same surface.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Mapping, Sequence
from urllib.parse import urlparse

import numpy as np
import torch

from ... import (ConfigError, Engine, EngineConfig, InvalidKey, P2pkvError, PeerLost, ProtocolError, SendHandle,
                 ShapeMismatch, TransferAborted, TransferKey, TransferState, TransferTimeout)
from ...kernels import BlockIds, pack, unpack

log = logging.getLogger("p2pkv.sglang")

BACKEND_NAME = "p2pkv"
_META_VERSION = 1

try:  # pragma: no cover - exercised only where sglang is installed
    from sglang.srt.disaggregation.base.conn import (BaseKVBootstrapServer, BaseKVManager, BaseKVReceiver,
                                                      BaseKVSender, KVArgs, KVPoll, KVTransferMetric)

    HAVE_SGLANG = True
except Exception:  # sglang absent (or broken): stand-ins with the same surface
    HAVE_SGLANG = False

    class KVPoll:  # type: ignore[no-redef]
        """Stand-in for ``sglang.srt.disaggregation.base.conn.KVPoll`` (same values)."""

        Failed = 0
        Bootstrapping = 1
        WaitingForInput = 2
        Transferring = 3
        Success = 4

    class KVArgs:  # type: ignore[no-redef]
        """Stand-in for SGLang's ``KVArgs``: a bag of attributes set by the scheduler."""

    @dataclass
    class KVTransferMetric:  # type: ignore[no-redef]
        """Stand-in for SGLang's ``KVTransferMetric``."""

        transfer_latency_s: float | None = None
        alloc_latency_s: float | None = None
        transfer_total_bytes: int | None = None

    class BaseKVManager:  # type: ignore[no-redef]
        """Stand-in for SGLang's ``BaseKVManager``."""

        enable_deferred_decode_kv_release: bool = False
        supports_host_destination: bool = False
        supports_role_switch: bool = False
        supports_deferred_decode_kv_release: bool = False

        def should_verify_kv_checksum(self, bootstrap_addr: str) -> bool:
            return True

    class BaseKVSender:  # type: ignore[no-redef]
        """Stand-in for SGLang's ``BaseKVSender``."""

    class BaseKVReceiver:  # type: ignore[no-redef]
        """Stand-in for SGLang's ``BaseKVReceiver``."""

    class BaseKVBootstrapServer:  # type: ignore[no-redef]
        """Stand-in for SGLang's ``BaseKVBootstrapServer``."""


# ----------------------------------------------------------------------------- settings and helpers
def _env_float(environ: Mapping[str, str], names: Sequence[str], default: float) -> float:
    for name in names:
        raw = environ.get(name)
        if raw not in (None, ""):
            try:
                value = float(raw)  # type: ignore[arg-type]
            except ValueError:
                raise ConfigError(f"{name}={raw!r} is not a number") from None
            if not value > 0:
                raise ConfigError(f"{name}={raw!r} must be > 0")
            return value
    return default


@dataclass(frozen=True)
class SglangSettings:
    """Deadlines and buffer placement of the SGLang backend.

    Parameters
    ----------
    bootstrap_timeout_s:
        Longest wait for the bootstrap lookup (decode) and for every decode
        rank's metadata (prefill).
    waiting_timeout_s:
        Longest wait for the scheduler's first ``send``/``send_metadata``
        after ``init`` and for the next chunk of a chunked prefill.
    http_timeout_s:
        Deadline of one HTTP call to the bootstrap server.
    buffer_device:
        ``auto`` (CUDA when available), ``cuda`` or ``cpu``: where the raw
        ``KVArgs`` pointers live.

    Raises
    ------
    ConfigError
        A value is out of range.
    """

    bootstrap_timeout_s: float = 300.0
    waiting_timeout_s: float = 300.0
    http_timeout_s: float = 2.0
    buffer_device: str = "auto"

    def __post_init__(self) -> None:
        for f in ("bootstrap_timeout_s", "waiting_timeout_s", "http_timeout_s"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ConfigError(f"SglangSettings.{f} must be a number > 0, got {v!r}")
        if self.buffer_device not in ("auto", "cuda", "cpu"):
            raise ConfigError(f"SglangSettings.buffer_device must be auto, cuda or cpu, got {self.buffer_device!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "SglangSettings":
        """Read ``P2PKV_SGLANG_BOOTSTRAP_TIMEOUT_S`` (else SGLang's
        ``SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT``), ``P2PKV_SGLANG_WAITING_TIMEOUT_S``
        (else ``SGLANG_DISAGGREGATION_WAITING_TIMEOUT``), ``P2PKV_SGLANG_HTTP_TIMEOUT_S``
        and ``P2PKV_SGLANG_BUFFER_DEVICE``.

        Raises
        ------
        ConfigError
        """
        env = os.environ if environ is None else environ
        return cls(
            bootstrap_timeout_s=_env_float(env, ("P2PKV_SGLANG_BOOTSTRAP_TIMEOUT_S",
                                                 "SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT"), 300.0),
            waiting_timeout_s=_env_float(env, ("P2PKV_SGLANG_WAITING_TIMEOUT_S",
                                               "SGLANG_DISAGGREGATION_WAITING_TIMEOUT"), 300.0),
            http_timeout_s=_env_float(env, ("P2PKV_SGLANG_HTTP_TIMEOUT_S",), 2.0),
            buffer_device=env.get("P2PKV_SGLANG_BUFFER_DEVICE", "auto") or "auto",
        )


def transfer_id_for_room(bootstrap_room: Any) -> str:
    """The p2pkv transfer id of one SGLang request: ``f"sglang-{bootstrap_room}"``.

    Raises
    ------
    InvalidKey
        ``bootstrap_room`` is not a non-negative integer.
    """
    if isinstance(bootstrap_room, bool) or not isinstance(bootstrap_room, (int, np.integer)) or bootstrap_room < 0:
        raise InvalidKey(f"bootstrap_room must be a non-negative int, got {bootstrap_room!r}")
    return f"sglang-{int(bootstrap_room)}"


class _CudaArray:
    """A ``__cuda_array_interface__`` view of raw device memory (no copy, no ownership)."""

    def __init__(self, ptr: int, nbytes: int):
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False),
                                         "version": 3, "strides": None}


def wrap_buffer(ptr: int, nbytes: int, device: torch.device) -> torch.Tensor:
    """A 1-D ``uint8`` tensor over ``nbytes`` of memory at ``ptr`` (no copy).

    The memory must outlive the tensor (SGLang's KV pool does).

    Raises
    ------
    ConfigError
        A negative size or a null pointer with a non-zero size.
    """
    ptr, nbytes = int(ptr), int(nbytes)
    if nbytes < 0 or (ptr == 0 and nbytes > 0):
        raise ConfigError(f"invalid buffer: ptr={ptr:#x} nbytes={nbytes}")
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8, device=device)
    if device.type == "cuda":
        return torch.as_tensor(_CudaArray(ptr, nbytes), device=device)
    arr = (ctypes.c_uint8 * nbytes).from_address(ptr)
    return torch.from_numpy(np.frombuffer(arr, dtype=np.uint8))


def head_start(rank: int, tp_size: int, total_heads: int) -> int:
    """First global KV head held by attention-TP ``rank`` (heads replicated when tp > heads)."""
    return rank * total_heads // tp_size


def plan_sources(*, decode_rank: int, decode_tp: int, decode_heads: int, prefill_tp: int, prefill_heads: int,
                 total_heads: int, is_mla: bool) -> dict[int, tuple[int, int] | None]:
    """Which heads decode rank ``decode_rank`` takes from each prefill rank.

    Returns ``{prefill_rank: (lo, hi)}`` in global head numbers, ``None`` for a
    prefill rank it needs nothing from; for MLA one rank gives ``(0, 0)``
    (the whole item).

    Raises
    ------
    ConfigError
        The two sides' head layouts cannot cover this rank's heads.
    """
    out: dict[int, tuple[int, int] | None] = {q: None for q in range(prefill_tp)}
    if is_mla:
        out[decode_rank % prefill_tp] = (0, 0)
        return out
    lo = head_start(decode_rank, decode_tp, total_heads)
    hi = lo + decode_heads
    cursor = lo
    for q in range(prefill_tp):
        qs = head_start(q, prefill_tp, total_heads)
        a, b = max(cursor, qs), min(hi, qs + prefill_heads)
        if a < b:
            out[q] = (a, b)
            cursor = b
    if cursor != hi:
        raise ConfigError(f"decode rank {decode_rank}/{decode_tp} holds heads [{lo}, {hi}) of {total_heads} but "
                          f"prefill (tp={prefill_tp}, {prefill_heads} heads per rank) covers only up to {cursor}")
    return out


def _http(method: str, url: str, body: dict[str, Any] | None, timeout: float) -> dict[str, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - the operator's bootstrap URL
        return json.loads(resp.read().decode() or "{}")


def _mode_name(mode: Any) -> str:
    return str(getattr(mode, "value", mode)).lower()


def _json_tensor(obj: dict[str, Any]) -> torch.Tensor:
    return torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)


def _tensor_json(t: torch.Tensor, key: TransferKey) -> dict[str, Any]:
    try:
        obj = json.loads(bytes(t.cpu().numpy().tobytes()).decode())
    except ValueError as e:
        raise ProtocolError(f"unreadable SGLang metadata: {e}", key=key) from None
    if not isinstance(obj, dict) or obj.get("v") != _META_VERSION:
        raise ProtocolError(f"SGLang metadata of unknown version: {obj!r:.200}", key=key)
    return obj


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


# ----------------------------------------------------------------------------- bootstrap server
class P2pkvBootstrapServer(BaseKVBootstrapServer):  # type: ignore[misc]
    """HTTP registry of the prefill ranks' p2pkv addresses (SGLang starts it on
    the prefill host at ``--disaggregation-bootstrap-port``).

    ``PUT /register`` (JSON with ``dp_rank``, ``tp_rank``, ``dp_size``,
    ``tp_size``, ``address``, layout fields) and ``GET /route`` (every
    registration) / ``GET /health``. Serving starts in the constructor (as
    SGLang expects) on a daemon thread; :meth:`close` stops it.

    Raises
    ------
    P2pkvError
        The port cannot be bound.
    """

    def __init__(self, host: str, port: int):
        self.host, self.port = host, int(port)
        self._lock = threading.Lock()
        self._ranks: dict[int, dict[int, dict[str, Any]]] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, fmt: str, *args: Any) -> None:  # quiet
                log.debug("bootstrap %s: " + fmt, self.address_string(), *args)

            def _reply(self, code: int, obj: dict[str, Any]) -> None:
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802
                path = urlparse(self.path).path
                if path == "/health":
                    self._reply(200, {"ok": True})
                elif path == "/route":
                    with server._lock:
                        ranks = {str(d): {str(t): i for t, i in r.items()} for d, r in server._ranks.items()}
                    self._reply(200, {"ranks": ranks})
                else:
                    self._reply(404, {"error": f"no route {path}"})

            def do_PUT(self) -> None:  # noqa: N802
                if urlparse(self.path).path != "/register":
                    self._reply(404, {"error": "no such route"})
                    return
                try:
                    n = int(self.headers.get("content-length", "0"))
                    if not 0 < n <= 1 << 20:
                        raise ValueError(f"body of {n} bytes")
                    info = json.loads(self.rfile.read(n).decode())
                    d, t = int(info["dp_rank"]), int(info["tp_rank"])
                    for f in ("dp_size", "tp_size", "address", "page_size", "item_lens"):
                        if f not in info:
                            raise ValueError(f"missing {f}")
                except (ValueError, KeyError, TypeError) as e:
                    self._reply(400, {"error": f"bad registration: {e}"})
                    return
                with server._lock:
                    server._ranks.setdefault(d, {})[t] = info
                self._reply(200, {"ok": True})

            do_POST = do_PUT

        try:
            self._httpd = ThreadingHTTPServer((host, self.port), Handler)
        except OSError as e:
            raise P2pkvError(f"bootstrap server cannot listen on {host}:{port}: {e}") from None
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="p2pkv-sglang-bootstrap",
                                        daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        """``host:port`` the server listens on."""
        return f"{self.host}:{self.port}"

    def close(self) -> None:
        """Stop serving and close the socket. Idempotent."""
        httpd, self._httpd = getattr(self, "_httpd", None), None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()

    def __enter__(self) -> "P2pkvBootstrapServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------- manager
class P2pkvKVManager(BaseKVManager):  # type: ignore[misc]
    """One per scheduler rank: owns the :class:`p2pkv.Engine` and the wrapped KV/aux buffers.

    Parameters
    ----------
    args:
        SGLang's ``KVArgs`` (``kv_data_ptrs/lens``, ``kv_item_lens``,
        ``aux_data_ptrs/lens``, ``aux_item_lens``, ``page_size``,
        ``kv_head_num``, ``total_kv_head_num``, ``engine_rank``, ``gpu_id``).
    disaggregation_mode:
        ``DisaggregationMode.PREFILL`` / ``DECODE`` (or ``"prefill"``/``"decode"``).
    server_args:
        SGLang's ``ServerArgs`` (``host``, ``disaggregation_bootstrap_port``,
        ``tp_size``, ``dp_size``, ``enable_dp_attention``, ``pp_size``).
    is_mla_backend:
        MLA: one item per token, no head slicing.
    config:
        The engine's :class:`EngineConfig` (default ``EngineConfig.from_env()``).
    settings:
        :class:`SglangSettings` (default ``SglangSettings.from_env()``).
    kv_buffers, aux_buffers:
        Tensors to use instead of wrapping the raw pointers.

    Raises
    ------
    ConfigError
        Unsupported layout (state buffers, PP) or inconsistent ``KVArgs``.
    P2pkvError
        The prefill rank could not register with the bootstrap server in time.
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
        self.page_size = int(args.page_size)
        if self.page_size < 1:
            raise ConfigError(f"KVArgs.page_size must be >= 1, got {self.page_size}")
        tp = int(_server_attr(server_args, "tp_size", 1))
        dp = int(_server_attr(server_args, "dp_size", 1))
        attn_dp = dp if _server_attr(server_args, "enable_dp_attention", False) else 1
        self.attn_tp_size = max(1, tp // attn_dp)
        rank = int(getattr(args, "engine_rank", 0) or 0)
        self.attn_tp_rank = rank % self.attn_tp_size
        if attn_dp > 1:  # DP attention: the DP groups share one TP world
            self.dp_size, self.dp_rank = attn_dp, rank // self.attn_tp_size
        else:  # plain DP: one worker per group, each numbered by SGLang's system_dp_rank
            self.dp_size, self.dp_rank = max(1, dp), int(getattr(args, "system_dp_rank", 0) or 0)
        if self.is_mla:
            self.kv_head_num = self.total_kv_head_num = 1
        else:
            self.kv_head_num = int(getattr(args, "kv_head_num", 0) or 0)
            self.total_kv_head_num = int(getattr(args, "total_kv_head_num", 0) or 0)
            if self.kv_head_num < 1 or self.total_kv_head_num < self.kv_head_num:
                raise ConfigError(f"KVArgs.kv_head_num={self.kv_head_num} / total_kv_head_num="
                                  f"{self.total_kv_head_num} are inconsistent")
        self.device = self._buffer_device(args)
        self.item_lens = [int(x) for x in args.kv_item_lens]
        self.kv_buffers = self._buffers(kv_buffers, args.kv_data_ptrs, args.kv_data_lens, self.item_lens, "kv")
        self.aux_item_lens = [int(x) for x in (getattr(args, "aux_item_lens", None) or [])]
        self.aux_buffers = self._buffers(aux_buffers, getattr(args, "aux_data_ptrs", None) or [],
                                         getattr(args, "aux_data_lens", None) or [], self.aux_item_lens, "aux")
        self.num_pages = [b.shape[0] for b in self.kv_buffers]
        if len(set(self.num_pages)) > 1:
            raise ConfigError(f"KV buffers hold different page counts {sorted(set(self.num_pages))}")
        if not self.kv_buffers:
            raise ConfigError("KVArgs has no KV buffers")
        # SGLang's decode loop reads these (CommonKVManager's surface).
        self.prefill_info_table: dict[str, PrefillInfo] = {}
        self.transfer_infos: dict[int, Any] = {}
        self.enable_all_cp_ranks_for_transfer = False
        self.is_dummy_cp_rank = False
        self.kv_cache_dtype_str = getattr(args, "kv_cache_dtype_str", None)
        cfg = config or EngineConfig.from_env()
        if self.device.type == "cuda" and cfg.device != str(self.device):
            cfg = cfg.replace(device=str(self.device))  # sends go from, and land in, the KV pool's GPU
        self.engine = Engine(cfg)
        self._closed = False
        if self.mode == "prefill":
            try:
                self.register_to_bootstrap()
            except BaseException:
                self.engine.close()
                raise

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
            flat = [t.contiguous().view(torch.uint8).view(-1) if t.is_contiguous() else None for t in given]
            if any(f is None for f in flat):
                raise ConfigError(f"{what}_buffers must be contiguous tensors")
            raw: list[torch.Tensor] = flat  # type: ignore[assignment]
        else:
            if len(ptrs) != len(lens):
                raise ConfigError(f"KVArgs: {len(ptrs)} {what} pointers but {len(lens)} lengths")
            raw = [wrap_buffer(p, n, self.device) for p, n in zip(ptrs, lens)]
        if len(raw) != len(item_lens):
            raise ConfigError(f"KVArgs: {len(raw)} {what} buffers but {len(item_lens)} item lengths")
        out = []
        for i, (b, item) in enumerate(zip(raw, item_lens)):
            if item < 1 or b.numel() % item:
                raise ConfigError(f"{what} buffer {i}: {b.numel()} bytes is not a multiple of item_len={item}")
            if what == "kv" and not self.is_mla and item % (self.page_size * self.kv_head_num):
                raise ConfigError(f"kv buffer {i}: item_len={item} is not page_size={self.page_size} x "
                                  f"kv_head_num={self.kv_head_num} x bytes per head")
            out.append(b.view(-1, item))
        return out

    def page_view(self, i: int) -> torch.Tensor:
        """KV buffer ``i`` as ``[pages, page_size, heads, bytes]`` (``[pages, item]`` for MLA)."""
        b = self.kv_buffers[i]
        if self.is_mla:
            return b
        return b.view(b.shape[0], self.page_size, self.kv_head_num, -1)

    def registration(self) -> dict[str, Any]:
        """What this prefill rank publishes on the bootstrap server."""
        return {"v": _META_VERSION, "dp_rank": self.dp_rank, "tp_rank": self.attn_tp_rank, "dp_size": self.dp_size,
                "tp_size": self.attn_tp_size, "address": self.engine.address, "page_size": self.page_size,
                "kv_head_num": self.kv_head_num, "total_kv_head_num": self.total_kv_head_num,
                "is_mla": self.is_mla, "item_lens": self.item_lens, "aux_item_lens": self.aux_item_lens,
                "kv_cache_dtype": self.kv_cache_dtype_str}

    def bootstrap_url(self) -> str:
        host = _server_attr(self.server_args, "host", "127.0.0.1")
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        port = int(_server_attr(self.server_args, "disaggregation_bootstrap_port", 8998))
        return f"http://{host}:{port}"

    def register_to_bootstrap(self) -> None:
        """Register this prefill rank with the bootstrap server, retrying until ``bootstrap_timeout_s``.

        Raises
        ------
        P2pkvError
            No bootstrap server accepted the registration in time.
        """
        url = self.bootstrap_url() + "/register"
        deadline = time.monotonic() + self.settings.bootstrap_timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                _http("PUT", url, self.registration(), self.settings.http_timeout_s)
                return
            except (OSError, ValueError) as e:
                last = e
                time.sleep(0.2)
        raise P2pkvError(f"could not register with the SGLang bootstrap server at {url} within "
                         f"{self.settings.bootstrap_timeout_s:g}s: {last}")

    # -- decode side lookups
    def fetch_prefill_info(self, bootstrap_addr: str) -> PrefillInfo | None:
        """One HTTP lookup of the prefill ranks behind ``bootstrap_addr``; ``None``
        while not every rank has registered.

        Raises
        ------
        OSError, ValueError
            The bootstrap server is unreachable or answered garbage.
        ConfigError
            The prefill side's page size or KV layout does not match this side.
        """
        data = _http("GET", f"http://{bootstrap_addr}/route", None, self.settings.http_timeout_s)
        ranks = {int(d): {int(t): i for t, i in r.items()} for d, r in (data.get("ranks") or {}).items()}
        if not ranks:
            return None
        any_info = next(iter(next(iter(ranks.values())).values()))
        dp_size, tp_size = int(any_info["dp_size"]), int(any_info["tp_size"])
        if len(ranks) < dp_size or any(len(ranks.get(d, {})) < tp_size for d in range(dp_size)):
            return None
        if int(any_info["page_size"]) != self.page_size:
            raise ConfigError(f"page size mismatch: prefill page_size={any_info['page_size']}, "
                              f"decode page_size={self.page_size}")
        if bool(any_info.get("is_mla")) != self.is_mla:
            raise ConfigError("one side uses an MLA KV cache and the other does not")
        info = PrefillInfo(dp_size=dp_size, attn_tp_size=tp_size, page_size=self.page_size, ranks=ranks,
                           kv_cache_dtype=any_info.get("kv_cache_dtype"))
        self.prefill_info_table[bootstrap_addr] = info
        return info

    def try_ensure_parallel_info(self, bootstrap_addr: str) -> bool:
        """SGLang's decode loop: one short attempt to learn the prefill topology.

        Raises
        ------
        ConfigError
            The two sides' layouts are incompatible.
        """
        if bootstrap_addr in self.prefill_info_table:
            return True
        try:
            return self.fetch_prefill_info(bootstrap_addr) is not None
        except (OSError, ValueError, KeyError) as e:
            if isinstance(e, ConfigError):
                raise
            log.warning("p2pkv: bootstrap lookup at %s failed: %s", bootstrap_addr, e)
            return False

    def register_to_bootstrap_if_needed(self) -> None:  # pragma: no cover - compatibility no-op
        pass

    def close(self) -> None:
        """Close the engine (transfers in flight fail with ``EngineClosed``). Idempotent."""
        if not self._closed:
            self._closed = True
            self.engine.close()

    teardown = close


# ----------------------------------------------------------------------------- transfer base
class _Transfer:
    """State shared by sender and receiver: a state, a failure and a worker thread."""

    kv_mgr: P2pkvKVManager

    def _setup(self, mgr: P2pkvKVManager, bootstrap_addr: str, bootstrap_room: Any) -> None:
        if not isinstance(mgr, P2pkvKVManager):
            raise ConfigError(f"expected a P2pkvKVManager, got {type(mgr).__name__}")
        self.kv_mgr = mgr
        self.bootstrap_addr = bootstrap_addr
        self.bootstrap_room = bootstrap_room
        self.tid = transfer_id_for_room(bootstrap_room)
        self._lock = threading.RLock()
        self._state = KVPoll.Bootstrapping
        self._error: P2pkvError | None = None
        self._thread: threading.Thread | None = None
        self._aborted = False
        self.conclude_state: int | None = None
        self._t_start: float | None = None
        self._t_end: float | None = None
        self._bytes = 0

    def _fail(self, err: BaseException) -> None:
        with self._lock:
            if self._state in (KVPoll.Failed, KVPoll.Success):
                return
            if not isinstance(err, P2pkvError):
                err = P2pkvError(f"{type(err).__name__}: {err}")
            self._error = err
            self._state = KVPoll.Failed
            self.conclude_state = KVPoll.Failed
        log.warning("p2pkv: %s room %s failed: %s", type(self).__name__, self.bootstrap_room, err)

    def _set_state(self, state: int) -> None:
        with self._lock:
            if self._state not in (KVPoll.Failed, KVPoll.Success):
                self._state = state
                if state == KVPoll.Success:
                    self.conclude_state = state
                    self._t_end = time.monotonic()

    def _start(self, target: Any, name: str) -> None:
        def run() -> None:
            try:
                if self.kv_mgr.device.type == "cuda":
                    with torch.cuda.device(self.kv_mgr.device):  # kernels and streams on the pool's GPU
                        target()
                else:
                    target()
            except BaseException as e:  # every worker failure becomes KVPoll.Failed
                if self._aborted and not isinstance(e, P2pkvError):
                    e = TransferAborted(f"aborted: {e}", key=self.tid)
                self._fail(e)

        self._thread = threading.Thread(target=run, name=f"p2pkv-sglang-{name}-{self.bootstrap_room}", daemon=True)
        self._thread.start()

    def failure_exception(self) -> None:
        """Raise the error that failed this transfer (a typed :class:`p2pkv.P2pkvError`).

        Raises
        ------
        P2pkvError
            Always: the recorded failure, or one saying there was none.
        """
        err = self._error
        if err is None:
            raise P2pkvError(f"room {self.bootstrap_room}: no failure recorded (state {self._state})")
        raise err

    def _abort(self, who: str) -> None:
        with self._lock:
            self._aborted = True
            self._fail(TransferAborted(f"aborted on the {who} side", key=self.tid))
        try:
            self.kv_mgr.engine.abort(self.tid)  # frees this side and tells connected peers
        except P2pkvError as e:
            log.debug("p2pkv: abort of %s: %s", self.tid, e)

    def abort(self) -> None:  # overridden by sender and receiver
        raise NotImplementedError

    def clear(self) -> None:
        """Drop this request's state; an unfinished transfer is aborted on both sides."""
        if self._state != KVPoll.Success and not self._aborted:
            self.abort()

    def get_transfer_metric(self) -> KVTransferMetric:
        """Latency from the first chunk to success, and the bytes moved."""
        lat = (self._t_end - self._t_start) if self._t_end is not None and self._t_start is not None else None
        return KVTransferMetric(transfer_latency_s=lat, transfer_total_bytes=self._bytes or None)


# ----------------------------------------------------------------------------- sender (prefill)
class P2pkvKVSender(_Transfer, BaseKVSender):  # type: ignore[misc]
    """Prefill side of one request: waits for the decode ranks' metadata, then
    pushes each chunk's pages layer by layer (and the aux rows with the last).

    ``poll()`` states: ``Bootstrapping`` until every decode rank's metadata
    came (deadline ``bootstrap_timeout_s``), ``WaitingForInput`` until the
    first ``send`` (deadline ``waiting_timeout_s`` from the first poll after
    ``init``), ``Transferring`` until every push is stored by its decode
    engine (deadline ``timeout_s`` per push), then ``Success``.

    Raises
    ------
    ConfigError, InvalidKey
        Wrong manager or a bad ``bootstrap_room``.
    """

    def __init__(self, mgr: P2pkvKVManager, bootstrap_addr: str, bootstrap_room: int,
                 req_has_disagg_prefill_dp_rank: bool = False):
        self._setup(mgr, bootstrap_addr, bootstrap_room)
        self._metas: list[dict[str, Any]] | None = None
        self._num_pages: int | None = None
        self._aux_index: int | None = None
        self._sent_pages = 0
        self._chunk = 0
        self._last_sent = False
        self._pending: list[tuple[np.ndarray, int | None]] = []
        self._handles: list[SendHandle] = []
        self._waiting_since: float | None = None
        self._start(self._await_metadata, "meta")

    # -- bootstrap: every decode rank's metadata
    def _await_metadata(self) -> None:
        eng, q = self.kv_mgr.engine, self.kv_mgr.attn_tp_rank
        deadline = time.monotonic() + self.kv_mgr.settings.bootstrap_timeout_s
        metas: list[dict[str, Any]] = []
        n_dst = 1
        r = 0
        while r < n_dst:
            key = TransferKey(self.tid, f"meta/p{q}/d{r}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise TransferTimeout(f"no KV metadata from decode rank {r} within "
                                      f"{self.kv_mgr.settings.bootstrap_timeout_s:g}s (bootstrap timeout)", key=key)
            try:
                meta = _tensor_json(eng.recv(key, timeout=left), key)
            except TransferTimeout:
                raise TransferTimeout(f"no KV metadata from decode rank {r} within "
                                      f"{self.kv_mgr.settings.bootstrap_timeout_s:g}s (bootstrap timeout)",
                                      key=key) from None
            n_dst = int(meta["n_dst"])
            if int(meta["dst_rank"]) != r or not 1 <= n_dst <= 4096:
                raise ProtocolError(f"bad metadata: dst_rank={meta.get('dst_rank')} n_dst={n_dst}", key=key)
            self._check_heads(meta, key)
            metas.append(meta)
            r += 1
        prefixes = {int(m.get("prefix_len") or 0) for m in metas}
        if len(prefixes) != 1:
            raise ProtocolError(f"decode ranks disagree on decode_prefix_len: {sorted(prefixes)}")
        with self._lock:
            self._metas = metas
            self._set_state(KVPoll.WaitingForInput)

    def _check_heads(self, meta: dict[str, Any], key: TransferKey) -> None:
        heads = meta.get("heads")
        if heads is None:
            return
        lo, hi = int(heads[0]), int(heads[1])
        m = self.kv_mgr
        if m.is_mla:
            return
        qs = head_start(m.attn_tp_rank, m.attn_tp_size, m.total_kv_head_num)
        if not qs <= lo < hi <= qs + m.kv_head_num:
            raise ProtocolError(f"decode asks heads [{lo}, {hi}) but this rank holds "
                                f"[{qs}, {qs + m.kv_head_num})", key=key)
        bph = m.item_lens[0] // (m.page_size * m.kv_head_num)
        if int(meta.get("bytes_per_head", bph)) != bph or int(meta.get("n_buffers", len(m.kv_buffers))) != len(
                m.kv_buffers):
            raise ShapeMismatch(f"KV layout mismatch: decode has {meta.get('n_buffers')} buffers of "
                                f"{meta.get('bytes_per_head')} bytes per head and token, prefill "
                                f"{len(m.kv_buffers)} of {bph}", key=key)

    # -- SGLang's sender API
    def init(self, num_kv_indices: int, aux_index: int | None = None) -> None:
        """Number of pages this request will send (over all chunks) and its aux slot.

        Raises
        ------
        ConfigError
            A negative page count.
        """
        if int(num_kv_indices) < 0:
            raise ConfigError(f"num_kv_indices must be >= 0, got {num_kv_indices}")
        self._num_pages = int(num_kv_indices)
        self._aux_index = None if aux_index is None else int(aux_index)

    def pop_decode_prefix_len(self) -> int:
        """Tokens the decode side already holds (from its metadata)."""
        metas = self._metas
        return int(metas[0].get("prefix_len") or 0) if metas else 0

    def get_max_transfer_tokens(self) -> int | None:
        return None

    def should_send_kv_chunk(self, num_pages: int, last_chunk: bool) -> bool:
        """A zero-page last chunk is still sent: it carries the aux rows and ends the transfer."""
        return num_pages > 0 or last_chunk

    def send(self, kv_indices: Any, state_indices: Any = None, num_kv_tokens: int | None = None) -> None:
        """Send one chunk: ``kv_indices`` are this side's page ids, in request order.

        Never blocks on the network (pushes return at once); failures surface
        in :meth:`poll`.
        """
        if self._state in (KVPoll.Failed, KVPoll.Success):
            return
        if state_indices is not None and any(s is not None for s in state_indices):
            self._fail(ConfigError("p2pkv's SGLang backend does not move state buffers", key=self.tid))
            return
        idx = np.asarray(kv_indices.cpu() if isinstance(kv_indices, torch.Tensor) else kv_indices,
                         dtype=np.int64).reshape(-1)
        if self._num_pages is None:
            self._fail(ProtocolError("send() before init()", key=self.tid))
            return
        with self._lock:
            self._pending.append((idx, num_kv_tokens))
            if self._t_start is None:
                self._t_start = time.monotonic()
            if self._metas is not None:
                self._flush()

    def _flush(self) -> None:
        while self._pending and self._state not in (KVPoll.Failed, KVPoll.Success):
            idx, _ = self._pending.pop(0)
            try:
                self._send_chunk(idx)
            except P2pkvError as e:
                self._fail(e)
            except (RuntimeError, IndexError, ValueError) as e:
                self._fail(P2pkvError(f"chunk {self._chunk} could not be sent: {e}"))

    def _send_chunk(self, idx: np.ndarray) -> None:
        m = self.kv_mgr
        assert self._metas is not None and self._num_pages is not None
        if self._last_sent:
            if len(idx):
                raise ProtocolError(f"{len(idx)} pages sent after the last chunk", key=self.tid)
            return
        off, n = self._sent_pages, len(idx)
        if off + n > self._num_pages:
            raise ProtocolError(f"chunks add up to {off + n} pages, init() said {self._num_pages}", key=self.tid)
        last = off + n == self._num_pages
        self._state = KVPoll.Transferring
        q, c = m.attn_tp_rank, self._chunk
        ids = BlockIds(torch.from_numpy(idx), num_blocks=m.num_pages[0], device=m.device) if n else None
        packed: list[torch.Tensor] = []
        if n:
            for i in range(len(m.kv_buffers)):
                packed.append(pack(m.page_view(i), ids))  # [n, page_size, heads, bytes] or [n, item]
        for meta in self._metas:
            heads = meta.get("heads")
            want_aux = meta.get("aux_index") is not None
            if heads is None and not want_aux:
                continue
            r, peer = int(meta["dst_rank"]), str(meta["addr"])
            if len(meta["pages"]) != self._num_pages:
                raise ShapeMismatch(f"decode rank {r} gave {len(meta['pages'])} pages, prefill sends "
                                    f"{self._num_pages}", key=self.tid)
            if heads is None:
                if not last:
                    continue
                hdr = torch.tensor([off, 0, 1], dtype=torch.int64)
            else:
                hdr = torch.tensor([off, n, int(last)], dtype=torch.int64)
            base = f"p{q}/d{r}/c{c}"
            self._push(peer, TransferKey(self.tid, base), hdr)
            if heads is not None and n:
                lo, hi = int(heads[0]), int(heads[1])
                qs = head_start(q, m.attn_tp_size, m.total_kv_head_num)
                for i, t in enumerate(packed):
                    if not m.is_mla and (lo - qs, hi - qs) != (0, m.kv_head_num):
                        t = t[:, :, lo - qs:hi - qs].contiguous()
                    self._push(peer, TransferKey(self.tid, f"{base}/b{i}"), t)
            if last and want_aux and m.aux_buffers:
                if self._aux_index is None:
                    raise ProtocolError("the decode side wants aux data but init() gave no aux_index",
                                        key=self.tid)
                for j, ab in enumerate(m.aux_buffers):
                    self._push(peer, TransferKey(self.tid, f"p{q}/d{r}/aux{j}"), ab[self._aux_index].clone())
        self._sent_pages += n
        self._chunk += 1
        self._last_sent = last

    def _push(self, peer: str, key: TransferKey, t: torch.Tensor) -> None:
        self._handles.append(self.kv_mgr.engine.send(peer, key, t))
        self._bytes += t.numel() * t.element_size()

    def poll(self) -> int:
        """The transfer's ``KVPoll`` state; never blocks."""
        with self._lock:
            st = self._state
            if st in (KVPoll.Failed, KVPoll.Success):
                return st
            if st == KVPoll.Bootstrapping:
                return st
            if self._pending:
                self._flush()
            if self._chunk == 0 and not self._pending:
                if self._num_pages is None:
                    return self._state
                now = time.monotonic()
                if self._waiting_since is None:
                    self._waiting_since = now
                elif now - self._waiting_since > self.kv_mgr.settings.waiting_timeout_s:
                    self._fail(TransferTimeout(f"the prefill scheduler sent no KV chunk within "
                                               f"{self.kv_mgr.settings.waiting_timeout_s:g}s after bootstrap",
                                               key=self.tid))
                return self._state
            done = True
            for h in self._handles:
                hs = h.state
                if hs in (TransferState.FAILED, TransferState.ABORTED):
                    self._fail(h.error or P2pkvError(f"send of {h.key} failed"))
                    return KVPoll.Failed
                if hs != TransferState.DONE:
                    done = False
            if done and self._last_sent:
                self._handles.clear()
                self._set_state(KVPoll.Success)
            return self._state

    def poll_pp_consensus(self) -> int:
        return self.poll()

    def mark_prefill_complete(self) -> None:
        pass

    def abort(self) -> None:
        """Fail this transfer and free it on both sides (pending pushes fail, decode is told)."""
        self._abort("prefill")

    def clear(self) -> None:
        super().clear()
        self._handles.clear()
        self._pending.clear()


# ----------------------------------------------------------------------------- receiver (decode)
class P2pkvKVReceiver(_Transfer, BaseKVReceiver):  # type: ignore[misc]
    """Decode side of one request.

    ``poll()`` states: ``Bootstrapping`` until ``init`` resolved the prefill
    ranks (deadline ``bootstrap_timeout_s``), ``WaitingForInput`` until
    ``send_metadata`` and the first chunk header (deadline
    ``waiting_timeout_s``), ``Transferring`` while chunks arrive (deadline
    ``waiting_timeout_s`` between chunks, ``timeout_s`` per layer), then
    ``Success`` once every page and the aux rows are in place.

    Raises
    ------
    ConfigError, InvalidKey
        Wrong manager or a bad ``bootstrap_room``.
    """

    supports_host_destination = False

    def __init__(self, mgr: P2pkvKVManager, bootstrap_addr: str, bootstrap_room: int | None = None):
        self._setup(mgr, bootstrap_addr, bootstrap_room)
        self.abort_notified = False
        self.require_staging = False
        self.bootstrap_infos: list[dict[str, Any]] = []
        self._write_lock = threading.Lock()
        self._meta_ready = threading.Event()
        self._kv_pages: np.ndarray | None = None
        self._aux_index: int | None = None
        self._prefix_len = 0
        self._prefill_dp_rank = 0
        self._inited = False

    def init(self, prefill_dp_rank: int = 0) -> None:
        """Resolve the prefill ranks (on a worker thread; ``poll`` says when done)."""
        if self._inited:
            return
        self._inited = True
        self._prefill_dp_rank = int(prefill_dp_rank or 0)
        self._start(self._run, "recv")

    def send_metadata(self, kv_indices: Any, aux_index: int | None = None, state_indices: Any = None,
                      decode_prefix_len: int | None = None, destination: Any = None) -> None:
        """This side's page ids (request order) and aux slot; the prefill ranks are told at once.

        Raises
        ------
        ConfigError
            A host destination or state indices (unsupported).
        """
        if destination is not None and str(getattr(destination, "value", destination)).lower() == "host":
            raise ConfigError("p2pkv's SGLang backend has no host (HiCache) destination")
        if state_indices is not None and any(s is not None for s in state_indices):
            raise ConfigError("p2pkv's SGLang backend does not move state buffers")
        idx = np.asarray(kv_indices.cpu() if isinstance(kv_indices, torch.Tensor) else kv_indices,
                         dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= self.kv_mgr.num_pages[0]):
            raise ConfigError(f"kv_indices out of range [0, {self.kv_mgr.num_pages[0]})")
        self._kv_pages = idx
        self._aux_index = None if aux_index is None else int(aux_index)
        self._prefix_len = int(decode_prefix_len or 0)
        self._meta_ready.set()

    def _lookup(self) -> PrefillInfo:
        m = self.kv_mgr
        deadline = time.monotonic() + m.settings.bootstrap_timeout_s
        last: Exception | None = None
        while True:
            info = m.prefill_info_table.get(self.bootstrap_addr)
            if info is not None:
                return info
            try:
                info = m.fetch_prefill_info(self.bootstrap_addr)
                if info is not None:
                    return info
                last = None
            except ConfigError:
                raise
            except (OSError, ValueError, KeyError) as e:
                last = e
            if self._aborted:
                raise TransferAborted("aborted on the decode side during bootstrap", key=self.tid)
            if time.monotonic() >= deadline:
                why = f"unreachable: {last}" if last is not None else "not every prefill rank registered"
                raise TransferTimeout(f"bootstrap server {self.bootstrap_addr} {why} "
                                      f"(bootstrap timeout {m.settings.bootstrap_timeout_s:g}s)", key=self.tid)
            time.sleep(0.1)

    def _run(self) -> None:
        m, eng = self.kv_mgr, self.kv_mgr.engine
        info = self._lookup()
        ranks = info.ranks.get(self._prefill_dp_rank)
        if ranks is None:
            raise ConfigError(f"prefill dp rank {self._prefill_dp_rank} is not registered at {self.bootstrap_addr}")
        p_any = ranks[0]
        plan = plan_sources(decode_rank=m.attn_tp_rank, decode_tp=m.attn_tp_size, decode_heads=m.kv_head_num,
                            prefill_tp=info.attn_tp_size, prefill_heads=int(p_any["kv_head_num"]),
                            total_heads=m.total_kv_head_num, is_mla=m.is_mla)
        self._check_layout(p_any)
        self.bootstrap_infos = [ranks[q] for q in sorted(ranks)]
        self._set_state(KVPoll.WaitingForInput)
        if not self._meta_ready.wait(m.settings.waiting_timeout_s):
            raise TransferTimeout(f"send_metadata() not called within {m.settings.waiting_timeout_s:g}s",
                                  key=self.tid)
        if self._aborted:
            self._tell_prefill(ranks)
            return
        assert self._kv_pages is not None
        sources = [q for q, h in plan.items() if h is not None]
        aux_src = sources[0]
        bph = 0 if m.is_mla else m.item_lens[0] // (m.page_size * m.kv_head_num)
        handles = []
        for q in range(info.attn_tp_size):
            meta = {"v": _META_VERSION, "n_dst": m.attn_tp_size, "dst_rank": m.attn_tp_rank,
                    "addr": eng.address, "pages": self._kv_pages.tolist(),
                    "heads": list(plan[q]) if plan[q] is not None else None,
                    "aux_index": self._aux_index if q == aux_src and m.aux_buffers else None,
                    "prefix_len": self._prefix_len, "bytes_per_head": bph, "n_buffers": len(m.kv_buffers)}
            key = TransferKey(self.tid, f"meta/p{q}/d{m.attn_tp_rank}")
            handles.append(eng.send(str(ranks[q]["address"]), key, _json_tensor(meta)))
        try:
            for h in handles:
                h.wait(timeout=eng.config.timeout_s + 1.0)
        except P2pkvError:
            # the prefill server may have restarted elsewhere: look it up again next time
            m.prefill_info_table.pop(self.bootstrap_addr, None)
            raise
        for q in sources:
            self._receive_from(q, str(ranks[q]["address"]), plan[q],
                               want_aux=(q == aux_src and bool(m.aux_buffers)))
        self._set_state(KVPoll.Success)

    def _check_layout(self, p: dict[str, Any]) -> None:
        m = self.kv_mgr
        if len(p["item_lens"]) != len(m.item_lens):
            raise ShapeMismatch(f"prefill has {len(p['item_lens'])} KV buffers, decode {len(m.item_lens)}",
                                key=self.tid)
        if not m.is_mla:
            pb = [int(x) // (m.page_size * int(p["kv_head_num"])) for x in p["item_lens"]]
            db = [x // (m.page_size * m.kv_head_num) for x in m.item_lens]
            if pb != db:
                raise ShapeMismatch(f"bytes per head and token differ: prefill {pb[:2]}..., decode {db[:2]}...",
                                    key=self.tid)
            if int(p["total_kv_head_num"]) != m.total_kv_head_num:
                raise ShapeMismatch(f"total KV heads differ: prefill {p['total_kv_head_num']}, decode "
                                    f"{m.total_kv_head_num}", key=self.tid)
        elif [int(x) for x in p["item_lens"]] != m.item_lens:
            raise ShapeMismatch("MLA item lengths differ between prefill and decode", key=self.tid)
        if [int(x) for x in p.get("aux_item_lens", [])] != m.aux_item_lens:
            raise ShapeMismatch("aux item lengths differ between prefill and decode", key=self.tid)

    def _tell_prefill(self, ranks: dict[int, dict[str, Any]]) -> None:
        """After an abort before any metadata went out: connect so the abort reaches the prefill ranks."""
        eng = self.kv_mgr.engine
        for q in sorted(ranks):
            try:
                eng.connect(str(ranks[q]["address"]), timeout=min(2.0, eng.config.timeout_s))
            except P2pkvError as e:
                log.debug("p2pkv: could not tell %s about the abort: %s", ranks[q]["address"], e)
        try:
            eng.abort(self.tid)
        except P2pkvError:
            pass
        raise TransferAborted("aborted on the decode side", key=self.tid)

    def _await_header(self, key: TransferKey, peer: str, c: int, q: int) -> torch.Tensor:
        """Wait for a chunk header, checking every ``peer_timeout_s`` that the prefill rank is alive.

        The engine fails the wait at once if a prefill rank that already sent
        data of this transfer is lost; before its first byte it does not know
        the transfer, so the liveness probe (a handshake) covers that window.
        """
        m, eng = self.kv_mgr, self.kv_mgr.engine
        deadline = time.monotonic() + m.settings.waiting_timeout_s
        probe = max(0.2, eng.config.peer_timeout_s)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TransferTimeout(f"chunk {c} from prefill rank {q} did not come within "
                                      f"{m.settings.waiting_timeout_s:g}s", key=key, peer=peer)
            try:
                return eng.recv(key, timeout=min(left, probe))
            except TransferTimeout:
                pass
            if self._aborted:
                raise TransferAborted("aborted on the decode side", key=self.tid)
            try:
                eng.connect(peer, timeout=probe)
            except P2pkvError as e:
                raise PeerLost(f"prefill rank {q} stopped answering while chunk {c} was due: {e}", key=key,
                               peer=peer) from None

    def _receive_from(self, q: int, peer: str, heads: tuple[int, int] | None, want_aux: bool) -> None:
        m, eng = self.kv_mgr, self.kv_mgr.engine
        assert self._kv_pages is not None and heads is not None
        pages = self._kv_pages
        r = m.attn_tp_rank
        ds = head_start(r, m.attn_tp_size, m.total_kv_head_num)
        lo, hi = heads
        expect_off, c = 0, 0
        while True:
            key = TransferKey(self.tid, f"p{q}/d{r}/c{c}")
            hdr = self._await_header(key, peer, c, q)
            off, n, last = (int(x) for x in hdr.tolist())
            if off != expect_off or n < 0 or off + n > len(pages):
                raise ProtocolError(f"chunk {c}: pages [{off}, {off + n}) but expected offset {expect_off} "
                                    f"of {len(pages)} pages", key=key)
            if self._t_start is None:
                self._t_start = time.monotonic()
            self._set_state(KVPoll.Transferring)
            if n:
                ids = BlockIds(torch.from_numpy(pages[off:off + n].copy()), num_blocks=m.num_pages[0],
                               device=m.device)
                for i in range(len(m.kv_buffers)):
                    view = m.page_view(i)
                    if not m.is_mla:
                        view = view[:, :, lo - ds:hi - ds]
                    bkey = TransferKey(self.tid, f"p{q}/d{r}/c{c}/b{i}")
                    with eng.claim(bkey, timeout=eng.config.timeout_s) as t:
                        want = (n,) + tuple(view.shape[1:])
                        if tuple(t.shape) != want or t.dtype != torch.uint8:
                            raise ShapeMismatch(f"got {tuple(t.shape)} {t.dtype}, expected {want} uint8", key=bkey)
                        self._write(lambda: self._scatter(t, view, ids))
                        self._bytes += t.numel()
            expect_off += n
            c += 1
            if last:
                break
        if expect_off != len(pages):
            raise ProtocolError(f"prefill rank {q} sent {expect_off} pages, decode expects {len(pages)}",
                                key=self.tid)
        if want_aux:
            if self._aux_index is None:
                raise ProtocolError("no aux_index given to send_metadata()", key=self.tid)
            for j, ab in enumerate(m.aux_buffers):
                akey = TransferKey(self.tid, f"p{q}/d{r}/aux{j}")
                with eng.claim(akey, timeout=eng.config.timeout_s) as t:
                    if t.numel() != ab.shape[1]:
                        raise ShapeMismatch(f"aux row of {t.numel()} bytes, expected {ab.shape[1]}", key=akey)
                    self._write(lambda: ab[self._aux_index].copy_(t.view(-1).view(torch.uint8)))

    @staticmethod
    def _scatter(t: torch.Tensor, view: torch.Tensor, ids: BlockIds) -> None:
        if view.is_contiguous():
            unpack(t, view, ids)
        else:  # a head slice of the page view: index_copy_ handles the strides
            view.index_copy_(0, ids.host.to(view.device) if view.device.type != "cpu" else ids.host, t)
        if view.device.type == "cuda":
            torch.cuda.current_stream(view.device).synchronize()

    def _write(self, fn: Any) -> None:
        # abort() takes this lock: once it returns, no write into SGLang's pages is in progress or to come.
        with self._write_lock:
            if self._aborted:
                raise TransferAborted("aborted on the decode side", key=self.tid)
            fn()

    def poll(self) -> int:
        """The transfer's ``KVPoll`` state; never blocks."""
        return self._state

    def abort(self) -> None:
        """Fail this transfer, stop writing into the pages and free it on both sides."""
        with self._write_lock:
            self._aborted = True
        self._abort("decode")
        self._meta_ready.set()

    def is_abort_release_safe(self) -> bool:
        """True: after :meth:`abort` returns nothing more is written into this request's pages."""
        return self._aborted or self._state in (KVPoll.Failed, KVPoll.Success)

    def ensure_abort_notified(self, *, force_arm: bool = False) -> None:
        """Nothing to arm: :meth:`abort` already stopped every write."""


# ----------------------------------------------------------------------------- install into SGLang
_INSTALLED: dict[str, Any] = {}
_PATCHED_MODULES = ("sglang.srt.disaggregation.utils", "sglang.srt.disaggregation.prefill",
                    "sglang.srt.disaggregation.decode", "sglang.srt.managers.disagg_service")


def _add_enum_member(enum_cls: Any, name: str, value: str) -> Any:
    if value in enum_cls._value2member_map_:
        return enum_cls._value2member_map_[value]
    member = object.__new__(enum_cls)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = enum_cls
    member._sort_order_ = len(enum_cls._member_names_)
    type.__setattr__(enum_cls, name, member)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    enum_cls._member_names_.append(name)
    return member


def install() -> None:
    """Register ``p2pkv`` as an SGLang transfer backend (see the module docstring for
    exactly what is patched). Idempotent; call it in every SGLang process.

    Raises
    ------
    ImportError
        sglang is not installed.
    """
    if _INSTALLED:
        return
    import importlib

    utils = importlib.import_module("sglang.srt.disaggregation.utils")
    tb = utils.TransferBackend
    member = _add_enum_member(tb, "P2PKV", BACKEND_NAME)
    kct = utils.KVClassType
    original = utils.get_kv_class
    mapping = {kct.MANAGER: P2pkvKVManager, kct.SENDER: P2pkvKVSender, kct.RECEIVER: P2pkvKVReceiver,
               kct.BOOTSTRAP_SERVER: P2pkvBootstrapServer}

    def get_kv_class(transfer_backend: Any, class_type: Any) -> Any:
        if transfer_backend is member or getattr(transfer_backend, "value", transfer_backend) == BACKEND_NAME:
            if class_type == kct.KVARGS:
                return original(transfer_backend, class_type)
            return mapping.get(class_type)
        return original(transfer_backend, class_type)

    get_kv_class.__wrapped__ = original  # type: ignore[attr-defined]
    get_kv_class.__doc__ = original.__doc__
    patched = []
    for name in _PATCHED_MODULES:
        mod = sys.modules.get(name) if name != _PATCHED_MODULES[0] else utils
        if mod is not None and getattr(mod, "get_kv_class", None) is original:
            mod.get_kv_class = get_kv_class
            patched.append(name)
    choices_added = False
    try:
        choices = importlib.import_module("sglang.srt.arg_groups.choices")
        if BACKEND_NAME not in choices.DISAGG_TRANSFER_BACKEND_CHOICES:
            choices.add_disagg_transfer_backend_choices([BACKEND_NAME])
            choices_added = True
    except ImportError:  # older layouts: server_args holds the list
        sa = importlib.import_module("sglang.srt.server_args")
        lst = getattr(sa, "DISAGG_TRANSFER_BACKEND_CHOICES", None)
        if isinstance(lst, list) and BACKEND_NAME not in lst:
            lst.append(BACKEND_NAME)
            choices_added = True
    _INSTALLED.update(original=original, wrapper=get_kv_class, modules=patched, member=member,
                      choices_added=choices_added)
    log.info("p2pkv registered as SGLang transfer backend %r (patched %s)", BACKEND_NAME, ", ".join(patched))


def uninstall() -> None:
    """Undo :func:`install` (the enum member, the ``get_kv_class`` bindings, the CLI choice)."""
    if not _INSTALLED:
        return
    import importlib

    original, wrapper = _INSTALLED["original"], _INSTALLED["wrapper"]
    for name in _PATCHED_MODULES:
        mod = sys.modules.get(name)
        if mod is not None and getattr(mod, "get_kv_class", None) is wrapper:
            mod.get_kv_class = original
    utils = importlib.import_module("sglang.srt.disaggregation.utils")
    tb = utils.TransferBackend
    if "P2PKV" in tb._member_map_:
        del tb._member_map_["P2PKV"]
        del tb._value2member_map_[BACKEND_NAME]
        tb._member_names_.remove("P2PKV")
        type.__delattr__(tb, "P2PKV")
    if _INSTALLED.get("choices_added"):
        try:
            choices = importlib.import_module("sglang.srt.arg_groups.choices")
            lst = choices.DISAGG_TRANSFER_BACKEND_CHOICES
        except ImportError:
            lst = importlib.import_module("sglang.srt.server_args").DISAGG_TRANSFER_BACKEND_CHOICES
        if BACKEND_NAME in lst:
            lst.remove(BACKEND_NAME)
    _INSTALLED.clear()


def installed() -> bool:
    """Whether :func:`install` has run in this process."""
    return bool(_INSTALLED)


__all__ = ["HAVE_SGLANG", "BACKEND_NAME", "KVPoll", "KVArgs", "SglangSettings", "PrefillInfo",
           "P2pkvBootstrapServer", "P2pkvKVManager", "P2pkvKVSender", "P2pkvKVReceiver", "install", "uninstall",
           "installed", "transfer_id_for_room", "wrap_buffer", "plan_sources", "head_start"]

