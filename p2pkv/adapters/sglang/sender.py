"""The prefill side of one request (:class:`P2pkvKVSender`)."""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any

import numpy as np
import torch

from ...errors import (ConfigError, P2pkvError, PeerLost, ProtocolError, ShapeMismatch, TransferAborted,
                       TransferEvicted, TransferTimeout)
from ...handles import SendHandle, TransferState
from ...kernels import BlockIds, pack
from ...keys import TransferKey
from ._compat import BaseKVSender, KVPoll
from ._layout import head_start
from ._transfer import Transfer
from ._wire import DecodeMeta, decode_meta
from .manager import P2pkvKVManager

__all__ = ["P2pkvKVSender"]

log = logging.getLogger("p2pkv.sglang")

_WATCH_EVERY_S = 0.01  # how often poll() looks for the decode side's abort
_MAX_STALE_CHECK = 64  # decode ranks whose stale messages a new sender looks for (a bound on scheduler-thread work)


def _indices(kv_indices: Any) -> np.ndarray:
    if isinstance(kv_indices, torch.Tensor):
        kv_indices = kv_indices.cpu()
    return np.asarray(kv_indices, dtype=np.int64).reshape(-1)


class P2pkvKVSender(Transfer, BaseKVSender):
    """Prefill side of one request: waits for the decode ranks' metadata, then
    pushes each chunk's pages layer by layer (and the aux rows with the last).

    ``poll()`` states: ``Bootstrapping`` until every decode rank's metadata
    came (deadline ``bootstrap_timeout_s``), ``WaitingForInput`` until the
    first ``send`` (deadline ``waiting_timeout_s``), ``Transferring`` until
    every push is stored by its decode engine (deadline ``timeout_s`` per
    push), then ``Success``. The decode side giving up (its abort, or its own
    deadline) fails the sender at once, before any compute where it comes
    early enough.

    Nothing here runs on SGLang's scheduler thread for long: ``poll`` reads
    the metadata without waiting, and ``send`` queues the chunk for the
    manager's worker threads (on CUDA ordered after the work the scheduler's
    stream had queued when it called ``send``).

    Raises
    ------
    ConfigError, InvalidKey
        Wrong manager or a bad ``bootstrap_room``.
    """

    def __init__(self, mgr: P2pkvKVManager, bootstrap_addr: str, bootstrap_room: int,
                 req_has_disagg_prefill_dp_rank: bool = False):
        self._setup(mgr, bootstrap_addr, bootstrap_room)
        self._created = time.monotonic()
        self._early: dict[int, DecodeMeta] = {}  # waiting when this sender was created
        self._metas: dict[int, DecodeMeta] = {}
        self._told = False
        self._n_dst: int | None = None
        self._meta_list: list[DecodeMeta] | None = None
        self._num_pages: int | None = None
        self._aux_index: int | None = None
        self._sent_pages = 0
        self._chunk = 0
        self._last_sent = False
        self._queued_pages = 0
        self._pending: deque[tuple[np.ndarray, Any]] = deque()
        self._draining = False
        self._handles: list[SendHandle] = []
        self._waiting_since: float | None = None
        self._next_watch = 0.0
        self._early_send_wait_event: Any = None  # set by SGLang's prefill loop before an early send (CUDA)
        self._drop_stale()

    # -- bootstrap: every decode rank's metadata (read without waiting, from poll)
    def _meta_key(self, r: int) -> TransferKey:
        return TransferKey(self.control_tid, f"meta/p{self.kv_mgr.attn_tp_rank}/d{r}")

    def _take(self, r: int) -> DecodeMeta | None:
        key = self._meta_key(r)
        try:
            t = self.kv_mgr.engine.recv(key, timeout=0)
        except (TransferTimeout, PeerLost, TransferEvicted):
            # nothing yet (a lost or evicted earlier message of this room does not stop a new one coming)
            return None
        return decode_meta(t, key, int(self.bootstrap_room))

    def _attempt_aborted(self, tid: str) -> bool:
        try:
            self.kv_mgr.engine.recv(TransferKey(tid, "abort-watch"), timeout=0)
        except TransferAborted:
            return True
        except P2pkvError:
            return False
        return False  # pragma: no cover - nothing is ever sent under this key

    def _drop_stale(self) -> None:
        """Messages already waiting when this sender is created that belong to a finished attempt:
        an abort marker (the room was unknown here when it came, as Mooncake ignores it) or the
        metadata of an attempt its decode rank has aborted since. Fresh metadata is kept."""
        for r in range(max(1, min(self.kv_mgr.last_n_dst, _MAX_STALE_CHECK))):
            try:
                meta = self._take(r)
            except ProtocolError as e:
                log.warning("p2pkv: room %s: dropped an unreadable message: %s", self.bootstrap_room, e)
                continue
            except P2pkvError:  # the engine is closed: poll() reports it
                return
            if meta is None:
                continue
            if meta.kind == "abort" or self._attempt_aborted(meta.tid):
                log.info("p2pkv: room %s: dropped a %s of an earlier attempt (%s)", self.bootstrap_room,
                         meta.kind, meta.tid)
                continue
            self._early[r] = meta

    def _collect_metas(self) -> None:
        m = self.kv_mgr
        while self._n_dst is None or len(self._metas) < self._n_dst:
            r = len(self._metas)
            meta = self._early.pop(r, None) or self._take(r)
            if meta is None:
                if time.monotonic() - self._created > m.settings.bootstrap_timeout_s:
                    raise TransferTimeout(f"no KV metadata from decode rank {r} within "
                                          f"{m.settings.bootstrap_timeout_s:g}s (bootstrap timeout)",
                                          key=self._meta_key(r))
                return
            if meta.kind == "abort":
                raise TransferAborted(f"decode rank {r} gave up on this request before it sent its metadata",
                                      key=meta.tid)
            if meta.dst_rank != r or (self._n_dst is not None and meta.n_dst != self._n_dst):
                raise ProtocolError(f"bad metadata: dst_rank={meta.dst_rank} n_dst={meta.n_dst} for decode rank "
                                    f"{r} of {self._n_dst or meta.n_dst}", key=self._meta_key(r))
            self._check_heads(meta)
            self._metas[r] = meta
            self._n_dst = meta.n_dst
        metas = [self._metas[r] for r in range(self._n_dst)]
        prefixes = sorted({mt.prefix_len for mt in metas})
        if len(prefixes) != 1:
            raise ProtocolError(f"decode ranks disagree on decode_prefix_len: {prefixes}")
        m.last_n_dst = self._n_dst
        self._meta_list = metas
        self._waiting_since = time.monotonic()
        self._set_state(KVPoll.WaitingForInput)

    def _check_heads(self, meta: DecodeMeta) -> None:
        m = self.kv_mgr
        if meta.heads is None or m.is_mla:
            return
        assert m.kv_head_num is not None and m.total_kv_head_num is not None
        lo, hi = meta.heads
        qs = head_start(m.attn_tp_rank, m.attn_tp_size, m.total_kv_head_num)
        if not qs <= lo < hi <= qs + m.kv_head_num:
            raise ProtocolError(f"decode asks heads [{lo}, {hi}) but this rank holds "
                                f"[{qs}, {qs + m.kv_head_num})", key=meta.tid)
        if meta.bytes_per_head != m.bytes_per_head() or meta.n_buffers != len(m.kv_buffers):
            raise ShapeMismatch(f"KV layout mismatch: decode has {meta.n_buffers} buffers of "
                                f"{meta.bytes_per_head} bytes per head and token, prefill "
                                f"{len(m.kv_buffers)} of {m.bytes_per_head()}", key=meta.tid)

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
        metas = self._meta_list
        return metas[0].prefix_len if metas else 0

    def get_max_transfer_tokens(self) -> int | None:
        return None

    def should_send_kv_chunk(self, num_pages: int, last_chunk: bool) -> bool:
        """A zero-page last chunk is still sent: it carries the aux rows and ends the transfer."""
        return num_pages > 0 or last_chunk

    def send(self, kv_indices: Any, state_indices: Any = None, num_kv_tokens: int | None = None) -> None:
        """Queue one chunk (``kv_indices``: this side's page ids, in request order) and return.

        The manager's worker threads gather the pages and push them; failures
        surface in :meth:`poll`.
        """
        if self.finished:
            return
        if state_indices is not None and any(s is not None for s in state_indices):
            self._fail(ConfigError("p2pkv's SGLang backend does not move state buffers", key=self.control_tid))
            return
        if self._num_pages is None:
            self._fail(ProtocolError("send() before init()", key=self.control_tid))
            return
        idx = _indices(kv_indices)
        if len(idx) and (idx.min() < 0 or idx.max() >= self.kv_mgr.num_pages[0]):
            self._fail(ProtocolError(f"send(): page ids out of range [0, {self.kv_mgr.num_pages[0]})",
                                     key=self.control_tid))
            return
        if self._queued_pages + len(idx) > self._num_pages:
            self._fail(ProtocolError(f"chunks add up to {self._queued_pages + len(idx)} pages, init() said "
                                     f"{self._num_pages}", key=self.control_tid))
            return
        self._queued_pages += len(idx)
        ready = None
        if self.kv_mgr.device.type == "cuda":
            # The scheduler's streams may still be writing these pages: the worker waits for this point. An
            # early send of a cached prefix comes before the step's forward is queued, while the previous
            # forward may still write on SGLang's forward stream: SGLang then hands us that stream's event.
            ready = getattr(self, "_early_send_wait_event", None)
            self._early_send_wait_event = None
            if ready is None:
                ready = torch.cuda.Event()
                ready.record(torch.cuda.current_stream(self.kv_mgr.device))
        with self._lock:
            self._pending.append((idx, ready))
            if self._t_start is None:
                self._t_start = time.monotonic()
            self._kick()

    def _kick(self) -> None:
        """Hand the queued chunks to a worker once the metadata is in (under ``_lock``)."""
        if self._meta_list is not None and self._pending and not self._draining and not self.finished:
            self._draining = True
            try:
                self.kv_mgr.submit(self._drain)
            except RuntimeError as e:  # the manager was closed
                self._draining = False
                self._fail(P2pkvError(f"the KV manager is closed: {e}"))

    def _drain(self) -> None:
        m = self.kv_mgr
        while True:
            with self._lock:
                if not self._pending or self.finished:
                    self._draining = False
                    return
                idx, ready = self._pending.popleft()
            try:
                if m.device.type == "cuda":
                    stream = m.side_stream()
                    with torch.cuda.device(m.device), torch.cuda.stream(stream):
                        if ready is not None:
                            stream.wait_event(ready)
                        self._send_chunk(idx)
                else:
                    self._send_chunk(idx)
            except P2pkvError as e:
                self._fail(e)
            except Exception as e:  # a bug or a torch error: this request fails, the scheduler goes on
                self._fail(P2pkvError(f"chunk {self._chunk} could not be sent: {type(e).__name__}: {e}"))

    def _send_chunk(self, idx: np.ndarray) -> None:
        m = self.kv_mgr
        metas = self._meta_list
        assert metas is not None and self._num_pages is not None
        if self._last_sent:
            if len(idx):
                raise ProtocolError(f"{len(idx)} pages sent after the last chunk", key=self.control_tid)
            return
        off, n = self._sent_pages, len(idx)
        last = off + n == self._num_pages
        self._set_state(KVPoll.Transferring)
        q, c = m.attn_tp_rank, self._chunk
        ids = BlockIds(torch.from_numpy(idx), num_blocks=m.num_pages[0], device=m.device) if n else None
        packed: list[torch.Tensor] = []
        if ids is not None:
            for i in range(len(m.kv_buffers)):
                packed.append(pack(m.page_view(i), ids))  # [n, page_size, heads, bytes] or [n, item]
        for meta in metas:
            if meta.heads is None and not meta.aux:
                continue
            r, peer = meta.dst_rank, meta.addr
            if meta.n_pages != self._num_pages:
                raise ShapeMismatch(f"decode rank {r} has {meta.n_pages} pages for this request, prefill sends "
                                    f"{self._num_pages}", key=meta.tid)
            if meta.heads is None:
                if not last:
                    continue
                hdr = torch.tensor([off, 0, 1], dtype=torch.int64)
            else:
                hdr = torch.tensor([off, n, int(last)], dtype=torch.int64)
            base = f"p{q}/d{r}/c{c}"
            self._push(peer, TransferKey(meta.tid, base), hdr)
            if meta.heads is not None and n:
                lo, hi = meta.heads
                assert m.total_kv_head_num is not None and m.kv_head_num is not None
                qs = head_start(q, m.attn_tp_size, m.total_kv_head_num)
                for i, t in enumerate(packed):
                    if not m.is_mla and (lo - qs, hi - qs) != (0, m.kv_head_num):
                        t = t[:, :, lo - qs:hi - qs].contiguous()
                    self._push(peer, TransferKey(meta.tid, f"{base}/b{i}"), t)
            if last and meta.aux and m.aux_buffers:
                if self._aux_index is None:
                    raise ProtocolError("the decode side wants aux data but init() gave no aux_index",
                                        key=meta.tid)
                for j, ab in enumerate(m.aux_buffers):
                    self._push(peer, TransferKey(meta.tid, f"p{q}/d{r}/aux{j}"), ab[self._aux_index].clone())
        with self._lock:
            self._sent_pages += n
            self._chunk += 1
            self._last_sent = last

    def _push(self, peer: str, key: TransferKey, t: torch.Tensor) -> None:
        h = self.kv_mgr.engine.send(peer, key, t)
        with self._lock:
            self._handles.append(h)
        self._bytes += t.numel() * t.element_size()

    def _watch_decode(self, now: float) -> None:
        """Fail at once when a decode rank gave up on its attempt (its engine told ours)."""
        if now < self._next_watch or self._meta_list is None:
            return
        self._next_watch = now + _WATCH_EVERY_S
        for meta in self._meta_list:
            if self._attempt_aborted(meta.tid):
                raise TransferAborted(f"decode rank {meta.dst_rank} gave up on this request (its abort or its "
                                      "deadline)", key=meta.tid)

    def poll(self) -> int:
        """The transfer's ``KVPoll`` state; never blocks."""
        with self._lock:
            if self.finished:
                return self._state
            now = time.monotonic()
            try:
                if self._meta_list is None:
                    self._collect_metas()
                    if self._meta_list is None:
                        return self._state
                    self._kick()
                self._watch_decode(now)
            except P2pkvError as e:
                self._fail(e)
                self._abort_attempts()
                return self._state
            if self._chunk == 0 and not self._pending and not self._draining:
                if (self._num_pages is not None and self._waiting_since is not None
                        and now - self._waiting_since > self.kv_mgr.settings.waiting_timeout_s):
                    self._fail(TransferTimeout(f"the prefill scheduler sent no KV chunk within "
                                               f"{self.kv_mgr.settings.waiting_timeout_s:g}s after bootstrap",
                                               key=self.control_tid))
                    self._abort_attempts()
                return self._state
            done = True
            for h in self._handles:
                hs = h.state
                if hs in (TransferState.FAILED, TransferState.ABORTED):
                    self._fail(h.error or P2pkvError(f"send of {h.key} failed"))
                    self._abort_attempts()
                    return self._state
                if hs != TransferState.DONE:
                    done = False
            if done and self._last_sent and not self._pending:
                self._handles.clear()
                self._set_state(KVPoll.Success)
            return self._state

    def poll_pp_consensus(self) -> int:
        return self.poll()

    def mark_prefill_complete(self) -> None:
        pass

    def _abort_attempts(self) -> None:
        """Free every attempt of this request here and tell the decode ranks (in the background)."""
        if self._told:
            return
        self._told = True
        metas = self._meta_list or list(self._metas.values())
        eng = self.kv_mgr.engine
        for meta in metas:
            try:
                eng.abort(meta.tid)
            except P2pkvError as e:
                log.debug("p2pkv: abort of %s: %s", meta.tid, e)
        if metas and not self.kv_mgr._closed:
            def tell() -> None:  # a decode rank we never pushed to is not connected yet: connect, say it again
                for meta in metas:
                    try:
                        eng.connect(meta.addr, timeout=min(2.0, eng.config.timeout_s))
                        eng.abort(meta.tid)
                    except P2pkvError as e:
                        log.debug("p2pkv: could not tell %s about the abort: %s", meta.addr, e)

            try:
                self.kv_mgr.submit(tell)
            except RuntimeError:
                pass

    def abort(self) -> None:
        """Fail this transfer and free it on both sides (pending pushes fail, decode is told)."""
        with self._lock:
            self._aborted = True
            self._pending.clear()
            self._fail(TransferAborted("aborted on the prefill side", key=self.control_tid))
        self._abort_attempts()

    def clear(self) -> None:
        """Drop this request's state; an unfinished transfer is aborted on both sides."""
        if self._state != KVPoll.Success and not self._aborted:
            self.abort()
        with self._lock:
            self._handles.clear()
            self._pending.clear()
