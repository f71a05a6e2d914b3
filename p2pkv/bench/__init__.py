"""``p2pkv-bench`` (``python -m p2pkv.bench``): per-layer send/recv microbenchmarks, each beside its baseline.

Suites (``--suite``, comma separated; default: every suite the machine supports):

* ``tcp``  two processes on loopback: p2pkv push and pull vs raw pyzmq, bandwidth
  and per-layer latency, plus a whole Llama-3-8B request layer-wise vs at once.
* ``pack`` paged-KV pack/unpack kernels vs ``torch.index_select`` / ``index_copy_``
  and a plain copy of the same bytes; batched (all layers, one launch). Without
  a GPU it times the torch fallback on the CPU.
* ``ipc``  two processes on one GPU over CUDA IPC vs a same-size device copy.
* ``nccl`` p2pkv's NCCL path vs raw NCCL: one-rank send-to-self on one GPU; with two
  GPUs, two processes vs raw CuPy NCCL and ``torch.distributed`` isend/irecv.

Every result records the device, driver, NCCL and torch versions. Output: a table
of the measured columns on the terminal (progress on stderr), ``bench.json`` and,
with matplotlib (``pip install 'p2pkv[bench]'``), ``bench.png`` in ``--out``.
Suites this machine cannot run are skipped and named; when all requested suites
are skipped nothing is written. Suites are registered in :data:`p2pkv.bench.core.SUITES`.
"""

from __future__ import annotations

from .core import SUITES, main, run

__all__ = ["SUITES", "main", "run"]
