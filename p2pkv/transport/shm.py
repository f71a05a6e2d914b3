"""A shared-memory channel between one producer and one consumer engine on the same host.

It carries the control of CUDA IPC whole requests without a message and without a thread
hop: on the test machine a ZMQ message between two processes took 0.4-0.6 ms (three thread
wake-ups), far more than a 64 MiB request's copy.

One anonymous memory file (``memfd``), made by the consumer and opened by the producer through
``/proc/<pid>/fd/<fd>`` (so nothing is left behind when either dies), holds:

* a **header ring** (producer -> consumer): one record per request, naming its tensors,
  where in the consumer's arena each one lands (inside the producer's lease) and the flag
  that says it landed;
* a **free ring** (consumer -> producer): lease ranges and flag slots the consumer is done
  with, for the producer to reuse;
* **flags**: 64-bit words the producer's GPU writes (``cuStreamWriteValue64``) behind each
  tensor's copy. The page is registered with CUDA in both processes, so the consumer's CPU
  sees a landing by reading memory, and the consumer's stream can wait for it
  (``cuStreamWaitValue64``) with no host wake-up at all.

Records carry a length and a CRC32, so a reader never acts on a record it sees only in
part. Positions are byte (or entry) counters that only grow. Each ring has one writer
and one reader; the owner of each side serialises its own threads.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import secrets
import struct
import threading
import zlib
from typing import Any

import numpy as np

from ..errors import ProtocolError, TransportError

__all__ = ["ShmChannel", "NFLAGS", "NFREE", "HRING_BYTES", "open_memfd", "create_memfd"]

_MAGIC = 0x70326B7673686D31  # "p2kvshm1"
_VERSION = 1
NFLAGS = 32768
HRING_BYTES = 2 << 20
NFREE = 32768
_FREE_WORDS = 4  # offset, size, first flag slot, flag count
# u64 word indices of the control block (each hot counter on its own 64-byte line)
_W_MAGIC, _W_VER, _W_HW, _W_HR, _W_FW, _W_FR, _W_WAITERS = 0, 1, 8, 16, 24, 32, 40
_OFF_FLAGS = 4096
_OFF_HRING = _OFF_FLAGS + 8 * NFLAGS
_OFF_FRING = _OFF_HRING + HRING_BYTES
SIZE = _OFF_FRING + 8 * _FREE_WORDS * NFREE
_WRAP = 0xFFFFFFFF
_REC = struct.Struct("<II")  # length, crc32
MAX_RECORD = HRING_BYTES // 4


def create_memfd(prefix: str, nbytes: int) -> tuple[int, str]:
    """An anonymous memory file of ``nbytes`` (freed when its last user unmaps or closes it) and its token."""
    token = secrets.token_hex(16)
    fd = os.memfd_create(f"{prefix}-{token}", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, nbytes)
    except OSError:
        os.close(fd)
        raise
    return fd, token


def open_memfd(loc: Any, size: int, prefix: str = "p2pkv") -> int:
    """Open another process's memory file, named by ``{"pid", "fd", "tok"}`` from an authenticated peer.

    The file must be a memory file whose name carries the token (so a peer can point us only at
    a file it made itself) and have exactly ``size`` bytes.

    Raises
    ------
    ProtocolError
        A malformed locator, or a file that is not the one it names.
    TransportError
        The file cannot be opened (another host, a process that is gone, no permission).
    """
    if not isinstance(loc, dict):
        raise ProtocolError("a shared-memory locator must be a map")
    pid, fd, tok = loc.get("pid"), loc.get("fd"), loc.get("tok")
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**31 for v in (pid, fd)) or \
            not isinstance(tok, str) or not tok.isalnum() or len(tok) != 32:
        raise ProtocolError("a shared-memory locator needs an int pid and fd and a 32-character token")
    path = f"/proc/{pid}/fd/{fd}"
    try:
        target = os.readlink(path)
        nfd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise TransportError(f"cannot open the peer's shared memory ({exc.strerror})") from None
    try:
        if not target.startswith(f"/memfd:{prefix}-{tok}") or os.readlink(f"/proc/self/fd/{nfd}") != target:
            raise ProtocolError("the peer's shared-memory locator names a file that is not its memory file")
        if os.fstat(nfd).st_size != size:
            raise ProtocolError(f"the peer's shared memory has {os.fstat(nfd).st_size} bytes, expected {size}")
    except BaseException:
        os.close(nfd)
        raise
    return nfd


class ShmChannel:
    """One producer->consumer channel (see the module docstring)."""

    def __init__(self, fd: int, created: bool, token: str):
        self.created = created
        self.token = token
        self.fd = fd if created else -1
        try:
            if created:
                os.ftruncate(fd, SIZE)
            elif os.fstat(fd).st_size != SIZE:
                raise ProtocolError("shared-memory channel has the wrong size")
            self._mm: mmap.mmap | None = mmap.mmap(fd, SIZE)
        finally:
            if not created:
                os.close(fd)
        self._u64: Any = np.frombuffer(self._mm, dtype=np.uint64, count=_OFF_FLAGS // 8)
        self.flags: Any = np.frombuffer(self._mm, dtype=np.uint64, count=NFLAGS, offset=_OFF_FLAGS)
        self._free: Any = np.frombuffer(self._mm, dtype=np.uint64, count=_FREE_WORDS * NFREE,
                                   offset=_OFF_FRING).reshape(NFREE, _FREE_WORDS)
        self._ring = memoryview(self._mm)[_OFF_HRING:_OFF_HRING + HRING_BYTES]
        self._anchor: Any = ctypes.c_char.from_buffer(self._mm)
        self.host_addr = ctypes.addressof(self._anchor)
        self.dev_addr = 0  # set by register_cuda
        self.lock = threading.Lock()  # serialises this side's threads
        if created:
            self._u64[_W_VER] = _VERSION
            self._u64[_W_MAGIC] = _MAGIC
        elif int(self._u64[_W_MAGIC]) != _MAGIC or int(self._u64[_W_VER]) != _VERSION:
            self.close()
            raise ProtocolError(f"shared-memory channel is not a p2pkv channel of version {_VERSION}")

    # ------------------------------------------------------------------ life
    @classmethod
    def create(cls) -> ShmChannel:
        """A new channel (consumer side): an anonymous memory file that dies with its users."""
        token = secrets.token_hex(16)
        return cls(os.memfd_create(f"p2pkv-{token}", os.MFD_CLOEXEC), created=True, token=token)

    def locator(self) -> dict[str, Any]:
        """What the producer needs to open this channel (sent over the authenticated session)."""
        return {"pid": os.getpid(), "fd": self.fd, "tok": self.token, "size": SIZE}

    @classmethod
    def open(cls, loc: Any) -> ShmChannel:
        """Open the channel a consumer made (producer side), from its :meth:`locator`."""
        return cls(open_memfd(loc, SIZE), created=False, token=str(loc["tok"]))

    def register_cuda(self) -> int:
        """Register the mapping with CUDA (the caller made a device current); returns its device address."""
        if not self.dev_addr:
            from . import cudadrv

            self.dev_addr = cudadrv.host_register(self.host_addr, SIZE)
        return self.dev_addr

    def close(self) -> None:
        """Unregister and unmap (the caller made sure no GPU work still writes the flags)."""
        if self._mm is None:
            return
        if self.dev_addr:
            from . import cudadrv

            cudadrv.host_unregister(self.host_addr)
            self.dev_addr = 0
        # views dropped (not deleted): a thread still reading one keeps the mapping alive until it is done
        self._u64 = self.flags = self._free = self._anchor = None
        self._ring.release()
        mm, self._mm = self._mm, None
        try:
            mm.close()
        except BufferError:  # pragma: no cover - a view still exported: the GC unmaps it later
            pass
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    @property
    def closed(self) -> bool:
        return self._mm is None

    def waiters(self) -> int:
        """Producer: how many consumer threads poll this channel right now (0: ring its doorbell)."""
        u = self._u64
        return int(u[_W_WAITERS]) if u is not None else 0

    def set_waiters(self, n: int) -> None:
        """Consumer: how many of our threads poll the channel (a producer then need not wake us)."""
        u = self._u64
        if u is not None:
            u[_W_WAITERS] = max(0, n)

    def flag_dev_addr(self, slot: int) -> int:
        return self.dev_addr + _OFF_FLAGS + 8 * slot

    # ------------------------------------------------------------------ header ring
    def put_record(self, payload: bytes) -> bool:
        """Producer: append one record; False when the ring has no room (the reader is behind)."""
        n = len(payload)
        if n > MAX_RECORD:
            return False
        need = (8 + n + 7) & ~7
        u = self._u64
        w, r = int(u[_W_HW]), int(u[_W_HR])
        pos = w % HRING_BYTES
        tail = HRING_BYTES - pos
        extra = tail if tail < need else 0  # the record would cross the end: skip to the start
        if w + extra + need - r > HRING_BYTES:
            return False
        ring = self._ring
        if extra:
            _REC.pack_into(ring, pos, _WRAP, 0)
            w += extra
            pos = 0
        ring[pos + 8:pos + 8 + n] = payload
        _REC.pack_into(ring, pos, n, zlib.crc32(payload))
        u[_W_HW] = w + need
        return True

    def take_records(self, limit: int = 1024, max_bytes: int = HRING_BYTES) -> list[bytes]:
        """Consumer: the records written since the last call (at most ``limit`` records and, past the
        first, ``max_bytes`` bytes of them; the rest stay for the next call)."""
        u = self._u64
        w, r = int(u[_W_HW]), int(u[_W_HR])
        if w == r:
            return []
        if w < r or w - r > HRING_BYTES:
            raise ProtocolError("shared-memory header ring positions are corrupt")
        out: list[bytes] = []
        ring = self._ring
        taken = 0
        while r < w and len(out) < limit and (not out or taken < max_bytes):
            pos = r % HRING_BYTES
            n, crc = _REC.unpack_from(ring, pos)
            if n == _WRAP:
                r += HRING_BYTES - pos
                continue
            need = (8 + n + 7) & ~7
            if n > MAX_RECORD or r + need > w or pos + need > HRING_BYTES:
                raise ProtocolError("shared-memory header record is malformed")
            payload = bytes(ring[pos + 8:pos + 8 + n])
            if zlib.crc32(payload) != crc:
                break  # not visible whole yet (weakly ordered CPUs): read it next time
            out.append(payload)
            taken += need
            r += need
        u[_W_HR] = r
        return out

    def pending_records(self) -> bool:
        u = self._u64
        return int(u[_W_HW]) != int(u[_W_HR])

    # ------------------------------------------------------------------ free ring
    def put_free(self, offset: int, size: int, flag0: int, nflags: int) -> bool:
        """Consumer: hand a lease range and flag slots back to the producer."""
        u = self._u64
        w, r = int(u[_W_FW]), int(u[_W_FR])
        if w - r >= NFREE:
            return False
        self._free[w % NFREE] = (offset, size, flag0, nflags)
        u[_W_FW] = w + 1
        return True

    def frees_pending(self) -> bool:
        """Producer: the consumer handed something back since the last :meth:`take_frees`."""
        u = self._u64
        return u is not None and int(u[_W_FW]) != int(u[_W_FR])

    def take_frees(self) -> list[list[int]]:
        """Producer: the entries handed back since the last call, each ``[offset, size, flag0, nflags]``."""
        u = self._u64
        w, r = int(u[_W_FW]), int(u[_W_FR])
        if w == r:
            return []
        if w < r or w - r > NFREE:
            raise ProtocolError("shared-memory free ring positions are corrupt")
        free = self._free
        if w - r <= 8:  # the usual case: one or two entries; numpy's fancy indexing costs more than it saves
            out = [free[k % NFREE].tolist() for k in range(r, w)]
        else:
            out = free[np.arange(r, w, dtype=np.int64) % NFREE].tolist()
        u[_W_FR] = w
        return out
