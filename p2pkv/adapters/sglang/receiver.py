"""The decode side of one request (:class:`P2pkvKVReceiver`)."""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ...errors import (ConfigError, DuplicateKey, P2pkvError, PeerLost, ProtocolError, ShapeMismatch,
                       TransferAborted, TransferTimeout)
from ...kernels import BlockIds, unpack
from ...keys import TransferKey
from ._compat import BaseKVReceiver, KVPoll
from ._layout import head_start, plan_sources
from ._transfer import Transfer
from ._wire import DecodeMeta, attempt_transfer_id, encode_meta
from .manager import P2pkvKVManager, PrefillInfo

__all__ = ["P2pkvKVReceiver"]

log = logging.getLogger("p2pkv.sglang")

_FIRST_CONNECT_S = 0.5  # a cached prefill rank that does not answer this fast: ask the bootstrap server again
_DUPLICATE_RETRY_S = 0.02  # an earlier attempt's message still waits there: try again this often


class P2pkvKVReceiver(Transfer, BaseKVReceiver):
    """Decode side of one request.

    ``poll()`` states: ``Bootstrapping`` until ``init`` resolved the prefill
    ranks (deadline ``bootstrap_timeout_s``), ``WaitingForInput`` until
    ``send_metadata`` and the first chunk header (deadline
    ``waiting_timeout_s``), ``Transferring`` while chunks arrive (deadline
    ``waiting_timeout_s`` between chunks, ``timeout_s`` per layer), then
    ``Success`` once every page and the aux rows are in place.

    Each receiver is one *attempt* at its room, with its own transfer id
    (:func:`~p2pkv.adapters.sglang.attempt_transfer_id`): a retry under the
    same ``bootstrap_room`` works, and late data of an aborted attempt is
    refused. A cached prefill rank that does not answer is looked up again
    through the bootstrap server (a restarted prefill server), and every
    failure or abort tells the prefill ranks at once.

    Raises
    ------
    ConfigError, InvalidKey
        Wrong manager or a bad ``bootstrap_room``.
    """

    supports_host_destination = False

    def __init__(self, mgr: P2pkvKVManager, bootstrap_addr: str, bootstrap_room: int | None = None):
        self._setup(mgr, bootstrap_addr, bootstrap_room)
        self.attempt = mgr.next_attempt()
        self.tid = attempt_transfer_id(bootstrap_room, self.attempt)
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
        self._ranks: dict[int, dict[str, Any]] | None = None  # the prefill ranks this attempt talks to
        self._meta_sent = False
        self._thread: threading.Thread | None = None

    def init(self, prefill_dp_rank: int = 0) -> None:
        """Resolve the prefill ranks (on a worker thread; ``poll`` says when done)."""
        if self._inited:
            return
        self._inited = True
        self._prefill_dp_rank = int(prefill_dp_rank or 0)
        self._thread = threading.Thread(target=self._main, name=f"p2pkv-sglang-recv-{self.bootstrap_room}",
                                        daemon=True)
        self._thread.start()

    def send_metadata(self, kv_indices: Any, aux_index: int | None = None, state_indices: Any = None,
                      decode_prefix_len: int | None = None, destination: Any = None) -> None:
        """This side's page ids (request order) and aux slot; the prefill ranks are told at once.

        Raises
        ------
        ConfigError
            A host destination, state indices (unsupported) or page ids out of range.
        """
        if destination is not None and str(getattr(destination, "value", destination)).lower() == "host":
            raise ConfigError("p2pkv's SGLang backend has no host (HiCache) destination")
        if state_indices is not None and any(s is not None for s in state_indices):
            raise ConfigError("p2pkv's SGLang backend does not move state buffers")
        if isinstance(kv_indices, torch.Tensor):
            kv_indices = kv_indices.cpu()
        idx = np.asarray(kv_indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= self.kv_mgr.num_pages[0]):
            raise ConfigError(f"kv_indices out of range [0, {self.kv_mgr.num_pages[0]})")
        self._kv_pages = idx
        self._aux_index = None if aux_index is None else int(aux_index)
        self._prefix_len = int(decode_prefix_len or 0)
        self._meta_ready.set()

    # -- the worker
    def _main(self) -> None:
        m = self.kv_mgr
        try:
            if m.device.type == "cuda":
                with torch.cuda.device(m.device):  # kernels and streams on the pool's GPU
                    self._run()
            else:
                self._run()
        except BaseException as e:  # every failure becomes KVPoll.Failed, and the prefill side hears of it
            if self._aborted and not isinstance(e, P2pkvError):
                e = TransferAborted(f"aborted: {e}", key=self.tid)
            self._fail(e)
            self._tell_prefill()

    def _lookup(self, *, fresh: bool = False) -> PrefillInfo:
        """The prefill ranks behind ``bootstrap_addr`` (cached unless ``fresh``), waiting for all to register."""
        m = self.kv_mgr
        deadline = time.monotonic() + m.settings.bootstrap_timeout_s
        last: Exception | None = None
        while True:
            info = None if fresh else m.prefill_info_table.get(self.bootstrap_addr)
            if info is not None:
                m.adopt_layout(next(iter(next(iter(info.ranks.values())).values())))
                return info
            try:
                info = m.fetch_prefill_info(self.bootstrap_addr)
                if info is not None:
                    return info
                last = None
            except P2pkvError:
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

    def _ranks_of(self, info: PrefillInfo) -> dict[int, dict[str, Any]]:
        ranks = info.ranks.get(self._prefill_dp_rank)
        if ranks is None:
            raise ConfigError(f"prefill dp rank {self._prefill_dp_rank} is not registered at {self.bootstrap_addr}")
        return ranks

    def _connect(self, info: PrefillInfo) -> tuple[PrefillInfo, dict[int, dict[str, Any]]]:
        """Connect to every prefill rank of this request; a cached rank that does not answer quickly
        sends us to the bootstrap server again (the prefill server may have restarted elsewhere)."""
        m, eng = self.kv_mgr, self.kv_mgr.engine
        probe = eng.config.effective_peer_timeout_s
        for fresh_tried in (False, True):
            ranks = self._ranks_of(info)
            try:
                for q in sorted(ranks):
                    addr = str(ranks[q]["address"])
                    try:
                        eng.connect(addr, timeout=min(_FIRST_CONNECT_S, probe))
                    except P2pkvError:
                        if not fresh_tried:
                            newer = self._lookup(fresh=True)
                            if newer.instances != info.instances:
                                log.info("p2pkv: the prefill server behind %s restarted; using its new ranks",
                                         self.bootstrap_addr)
                                raise _Restarted(newer) from None
                        eng.connect(addr, timeout=probe)
                return info, ranks
            except _Restarted as r:
                info = r.info
            except P2pkvError as e:
                m.prefill_info_table.pop(self.bootstrap_addr, None)  # look it up again next time
                raise PeerLost(f"prefill rank at {self.bootstrap_addr} does not answer: {e}", key=self.tid) from None
        return info, self._ranks_of(info)

    def _plan(self, info: PrefillInfo, ranks: dict[int, dict[str, Any]]) -> dict[int, tuple[int, int] | None]:
        m = self.kv_mgr
        p_any = ranks[min(ranks)]
        self._check_layout(p_any)
        assert m.kv_head_num is not None and m.total_kv_head_num is not None
        return plan_sources(decode_rank=m.attn_tp_rank, decode_tp=m.attn_tp_size, decode_heads=m.kv_head_num,
                            prefill_tp=info.attn_tp_size, prefill_heads=int(p_any["kv_head_num"]),
                            total_heads=m.total_kv_head_num, is_mla=m.is_mla)

    def _run(self) -> None:
        m = self.kv_mgr
        info = self._lookup()
        plan = self._plan(info, self._ranks_of(info))
        self._ranks = self._ranks_of(info)
        self.bootstrap_infos = [self._ranks[q] for q in sorted(self._ranks)]
        self._set_state(KVPoll.WaitingForInput)
        if not self._meta_ready.wait(m.settings.waiting_timeout_s):
            raise TransferTimeout(f"send_metadata() not called within {m.settings.waiting_timeout_s:g}s",
                                  key=self.tid)
        if self._aborted:
            raise TransferAborted("aborted on the decode side", key=self.tid)
        assert self._kv_pages is not None
        info, ranks = self._connect(info)
        if ranks is not self._ranks:  # the prefill server restarted: its new ranks
            plan = self._plan(info, ranks)
            self._ranks = ranks
            self.bootstrap_infos = [ranks[q] for q in sorted(ranks)]
        sources = [q for q, h in plan.items() if h is not None]
        aux_src = sources[0]
        self._send_metas(info, ranks, plan, aux_src)
        for q in sources:
            self._receive_from(q, str(ranks[q]["address"]), plan[q],
                               want_aux=(q == aux_src and bool(m.aux_buffers)))
        self._set_state(KVPoll.Success)

    def _meta(self, q: int, plan: dict[int, tuple[int, int] | None], aux_src: int, kind: str = "meta") -> DecodeMeta:
        m = self.kv_mgr
        assert self._kv_pages is not None or kind == "abort"
        return DecodeMeta(kind=kind, tid=self.tid, dst_rank=m.attn_tp_rank, n_dst=m.attn_tp_size,
                          addr=m.engine.address, n_pages=len(self._kv_pages) if self._kv_pages is not None else 0,
                          heads=plan.get(q), aux=q == aux_src and bool(m.aux_buffers), prefix_len=self._prefix_len,
                          bytes_per_head=m.bytes_per_head(), n_buffers=len(m.kv_buffers))

    def _push_control(self, addr: str, q: int, meta: DecodeMeta, deadline: float) -> None:
        """Push one message to prefill rank ``q``; an unclaimed message of an earlier attempt still
        waiting there (``DuplicateKey``) is dropped by the prefill side, so try again until ``deadline``."""
        eng = self.kv_mgr.engine
        key = TransferKey(self.control_tid, f"meta/p{q}/d{meta.dst_rank}")
        while True:
            h = eng.send(addr, key, encode_meta(meta), timeout=max(0.1, min(eng.config.timeout_s,
                                                                            deadline - time.monotonic())))
            try:
                h.wait(timeout=eng.config.timeout_s + 1.0)
                return
            except DuplicateKey:
                if time.monotonic() >= deadline or (self._aborted and meta.kind == "meta"):
                    raise
                time.sleep(_DUPLICATE_RETRY_S)

    def _send_metas(self, info: PrefillInfo, ranks: dict[int, dict[str, Any]],
                    plan: dict[int, tuple[int, int] | None], aux_src: int) -> None:
        m = self.kv_mgr
        deadline = time.monotonic() + m.settings.waiting_timeout_s
        try:
            for q in range(info.attn_tp_size):
                self._meta_sent = True  # (from the first push on: an abort goes through the engine too)
                self._push_control(str(ranks[q]["address"]), q, self._meta(q, plan, aux_src), deadline)
                if self._aborted:
                    raise TransferAborted("aborted on the decode side", key=self.tid)
        except P2pkvError:
            m.prefill_info_table.pop(self.bootstrap_addr, None)  # look the prefill server up again next time
            raise

    def _check_layout(self, p: dict[str, Any]) -> None:
        m = self.kv_mgr
        if len(p["item_lens"]) != len(m.item_lens):
            raise ShapeMismatch(f"prefill has {len(p['item_lens'])} KV buffers, decode {len(m.item_lens)}",
                                key=self.tid)
        if not m.is_mla:
            ph = int(p["kv_head_num"])
            if any(int(x) % (m.page_size * ph) for x in p["item_lens"]):
                raise ShapeMismatch(f"prefill item lengths {p['item_lens'][:2]}... do not split into "
                                    f"page_size={m.page_size} x {ph} heads", key=self.tid)
            pb = [int(x) // (m.page_size * ph) for x in p["item_lens"]]
            assert m.kv_head_num is not None
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

    def _tell_prefill(self) -> None:
        """After a failure or an abort: free this attempt here and make sure the prefill ranks hear of it.

        Metadata already sent: the engine's abort reaches them (we are connected). Not sent yet but the
        ranks are known: an abort message in place of the metadata, so a prefill sender waiting for it
        fails at once. May block up to 2 s (never called on SGLang's scheduler thread).
        """
        eng = self.kv_mgr.engine
        with self._lock:
            if self.abort_notified or eng.closed:
                return
            self.abort_notified = True
        ranks = self._ranks
        if ranks is not None and not self._meta_sent:
            deadline = time.monotonic() + min(2.0, eng.config.timeout_s)
            abort = DecodeMeta(kind="abort", tid=self.tid, dst_rank=self.kv_mgr.attn_tp_rank,
                               n_dst=self.kv_mgr.attn_tp_size)
            for q in sorted(ranks):
                try:
                    self._push_control(str(ranks[q]["address"]), q, abort, deadline)
                except P2pkvError as e:
                    log.debug("p2pkv: could not tell prefill rank %s about the abort: %s", q, e)
        self._abort_engine()

    def _abort_engine(self) -> None:
        """Free this attempt here and tell every connected peer (returns at once)."""
        self.abort_notified = True
        try:
            self.kv_mgr.engine.abort(self.tid)
        except P2pkvError as e:
            log.debug("p2pkv: abort of %s: %s", self.tid, e)

    def _await_header(self, key: TransferKey, peer: str, c: int, q: int) -> torch.Tensor:
        """Wait for a chunk header, checking every ``peer_timeout_s`` that the prefill rank is alive.

        The engine fails the wait at once if a prefill rank that already sent
        data of this transfer is lost; before its first byte it does not know
        the transfer, so the liveness probe (a handshake) covers that window.
        """
        m, eng = self.kv_mgr, self.kv_mgr.engine
        deadline = time.monotonic() + m.settings.waiting_timeout_s
        probe = max(0.2, eng.config.effective_peer_timeout_s)
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
                m.prefill_info_table.pop(self.bootstrap_addr, None)  # look the prefill server up again next time
                raise PeerLost(f"prefill rank {q} stopped answering while chunk {c} was due: {e}", key=key,
                               peer=peer) from None

    def _receive_from(self, q: int, peer: str, heads: tuple[int, int] | None, want_aux: bool) -> None:
        m, eng = self.kv_mgr, self.kv_mgr.engine
        assert self._kv_pages is not None and heads is not None
        pages = self._kv_pages
        r = m.attn_tp_rank
        assert m.total_kv_head_num is not None
        ds = head_start(r, m.attn_tp_size, m.total_kv_head_num)
        lo, hi = heads
        expect_off, c = 0, 0
        while True:
            key = TransferKey(self.tid, f"p{q}/d{r}/c{c}")
            hdr = self._await_header(key, peer, c, q)
            if hdr.dtype != torch.int64 or tuple(hdr.shape) != (3,):
                raise ProtocolError(f"chunk header of {tuple(hdr.shape)} {hdr.dtype}, expected (3,) int64", key=key)
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
                        want = (n, *view.shape[1:])
                        if tuple(t.shape) != want or t.dtype != torch.uint8:
                            raise ShapeMismatch(f"got {tuple(t.shape)} {t.dtype}, expected {want} uint8", key=bkey)
                        self._write(functools.partial(self._scatter, t, view, ids))
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
            slot = self._aux_index
            for j, ab in enumerate(m.aux_buffers):
                akey = TransferKey(self.tid, f"p{q}/d{r}/aux{j}")
                with eng.claim(akey, timeout=eng.config.timeout_s) as t:
                    if t.numel() * t.element_size() != ab.shape[1]:
                        raise ShapeMismatch(f"aux row of {t.numel() * t.element_size()} bytes, expected "
                                            f"{ab.shape[1]}", key=akey)
                    self._write(functools.partial(ab[slot].copy_, t.reshape(-1).view(torch.uint8)))

    @staticmethod
    def _scatter(t: torch.Tensor, view: torch.Tensor, ids: BlockIds) -> None:
        if view.is_contiguous():
            unpack(t, view, ids)
        else:  # a head slice of the page view: index_copy_ handles the strides
            view.index_copy_(0, ids.host.to(view.device) if view.device.type != "cpu" else ids.host, t)
        if view.device.type == "cuda":
            torch.cuda.current_stream(view.device).synchronize()

    def _write(self, fn: Callable[[], Any]) -> None:
        # abort() takes this lock: once it returns, no write into SGLang's pages is in progress or to come.
        with self._write_lock:
            if self._aborted:
                raise TransferAborted("aborted on the decode side", key=self.tid)
            fn()

    def poll(self) -> int:
        """The transfer's ``KVPoll`` state; never blocks."""
        return self._state

    def abort(self) -> None:
        """Fail this transfer, stop writing into the pages and free it on both sides. Returns at once."""
        with self._write_lock:
            self._aborted = True
        self._fail(TransferAborted("aborted on the decode side", key=self.tid))
        self._meta_ready.set()
        if self._meta_sent:
            self._abort_engine()  # wakes our own waits too; the prefill ranks hear of it through the engine
        elif self._thread is not None and self._thread.is_alive():
            pass  # the worker wakes (metadata wait, lookup) and tells the prefill ranks
        elif self._ranks is not None:
            threading.Thread(target=self._tell_prefill, name="p2pkv-sglang-abort", daemon=True).start()
        else:
            self._abort_engine()

    def clear(self) -> None:
        """Drop this request's state; an unfinished transfer is aborted on both sides."""
        if self._state != KVPoll.Success and not self._aborted:
            self.abort()

    def is_abort_release_safe(self) -> bool:
        """True: after :meth:`abort` returns nothing more is written into this request's pages."""
        return self._aborted or self.finished

    def ensure_abort_notified(self, *, force_arm: bool = False) -> None:
        """Nothing to arm: :meth:`abort` already stopped every write and tells the prefill ranks."""


class _Restarted(Exception):
    def __init__(self, info: PrefillInfo):
        super().__init__("prefill restarted")
        self.info = info

