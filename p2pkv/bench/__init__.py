"""``p2pkv-bench`` (``python -m p2pkv.bench``): per-layer send/recv microbenchmarks, each beside its baseline.

Suites (``--suite``, comma separated; default: every suite the machine supports):

* ``tcp``  two processes on loopback: p2pkv push and pull vs raw pyzmq, bandwidth
  and per-layer latency, plus a whole Llama-3-8B request layer-wise vs at once.
* ``pack`` paged-KV pack/unpack kernels vs ``torch.index_select`` / ``index_copy_``
  and a plain copy of the same bytes; batched (all layers, one launch). Without
  a GPU it times the torch fallback on one CPU thread, with each timing's spread;
  a timing whose spread exceeds its median is marked as noise and nothing is
  derived from it.
* ``ipc``  two processes on one GPU over CUDA IPC vs a same-size device copy.
* ``nccl`` p2pkv's NCCL path vs raw NCCL: one-rank send-to-self on one GPU; with two
  GPUs, two processes vs raw CuPy NCCL and ``torch.distributed`` isend/irecv.
* ``request`` a whole Llama-3-8B request (``send_request`` and per-tensor ``send``, all
  at once and layer-wise) beside raw batched NCCL: NCCL and IPC on two GPUs, IPC
  on one, TCP on a CPU (also ``python -m p2pkv.bench.request``).

``--sizes`` (tcp, ipc, nccl) and ``--out`` are checked before any suite runs: a size
a chosen suite does not measure, or a folder that cannot be written, is an error
(exit status 2), never silently dropped.

Every result records the device, driver, NCCL and torch versions. Output: a table
of the measured columns on the terminal (progress on stderr), ``bench.json`` and,
with matplotlib (``pip install 'p2pkv[bench]'``), ``bench.png`` in ``--out``.
Suites this machine cannot run are skipped and named; when all requested suites
are skipped nothing is written. Suites are registered in :data:`p2pkv.bench.core.SUITES`.
"""

from __future__ import annotations

from .core import SUITES, main, run

__all__ = ["SUITES", "main", "run"]
