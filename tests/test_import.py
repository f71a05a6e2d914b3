"""Importing p2pkv must start no thread, open no socket and touch no GPU."""

import json
import subprocess
import sys

CHECK = r"""
import json, os, sys, threading
before_threads = threading.active_count()
import p2pkv, p2pkv.engine, p2pkv.control, p2pkv.pool, p2pkv.mailbox, p2pkv.transport.tcp, p2pkv.demo
import p2pkv.testing, p2pkv.synthetic, p2pkv.proxy
for mod in ("p2pkv.adapters.vllm", "p2pkv.transport.ipc", "p2pkv.transport.nccl", "p2pkv.kernels", "p2pkv.bench"):
    try:
        __import__(mod)
    except ModuleNotFoundError as e:
        if not e.name.startswith("p2pkv"):
            raise
import torch
def _link(f):
    try:
        return os.readlink(f"/proc/self/fd/{f}")
    except OSError:
        return ""
socks = [f for f in os.listdir("/proc/self/fd") if _link(f).startswith("socket:")]
print(json.dumps({"threads": threading.active_count() - before_threads,
                  "sockets": len(socks),
                  "cuda_init": torch.cuda.is_initialized(),
                  "cupy": "cupy" in sys.modules, "nccl": "nccl" in sys.modules,
                  "aiohttp": "aiohttp" in sys.modules}))
"""


def test_import_is_side_effect_free():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res == {"threads": 0, "sockets": 0, "cuda_init": False, "cupy": False, "nccl": False,
                   "aiohttp": False}


def test_the_proxy_and_the_errors_load_without_torch():
    """``python -m p2pkv.proxy`` needs no torch: importing the package loads the engine (and torch) only on
    first use of one of its names (a newcomer's ``p2pkv-proxy --help`` took 4.5-15 s on a loaded box)."""
    code = ("import sys, p2pkv, p2pkv.proxy\n"
            "from p2pkv import P2pkvError, TransferKey, new_transfer_id\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
            "from p2pkv import Engine, EngineConfig, RecvState\n"
            "assert 'torch' in sys.modules and Engine.__name__ == 'Engine'\n"
            "assert 'Engine' in dir(p2pkv) and p2pkv.RequestLayout.__module__ == 'p2pkv.request'\n"
            "try:\n    p2pkv.nope\nexcept AttributeError:\n    pass\nelse:\n    raise SystemExit('no error')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_submodules_are_attributes_of_the_package_as_before_the_lazy_import():
    """``import p2pkv`` used to load the engine, which made ``p2pkv.engine``, ``p2pkv.config``, ... attributes
    of the package; with the lazy import they raised AttributeError (``p2pkv.config.EngineConfig()`` after a
    plain ``import p2pkv`` broke). They load on first use now, torch with them; unknown names still raise."""
    code = ("import sys, p2pkv\n"
            "assert 'torch' not in sys.modules\n"
            "assert p2pkv.config.EngineConfig is p2pkv.EngineConfig\n"
            "assert p2pkv.engine.Engine is p2pkv.Engine and p2pkv.recv_request.RecvState is p2pkv.RecvState\n"
            "assert p2pkv.request.RequestHandle is p2pkv.RequestHandle and p2pkv.pool.Buffer is p2pkv.Buffer\n"
            "assert p2pkv.handles.SendHandle is p2pkv.SendHandle and p2pkv.mailbox.Mailbox\n"
            "for bad in ('nope', 'engines', '__wrapped__'):\n"
            "    try:\n        getattr(p2pkv, bad)\n    except AttributeError:\n        pass\n"
            "    else:\n        raise SystemExit(bad)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_first_use_from_two_threads_and_pickles_across_processes():
    """Two threads touching the lazy names first at once both get the real classes; an EngineConfig and a
    TransferKey pickled in one process load in a fresh one that only did ``import p2pkv`` (or nothing)."""
    code = ("import pickle, sys, threading, p2pkv\n"
            "got, barrier = [], threading.Barrier(4)\n"
            "def use(name):\n"
            "    barrier.wait()\n"
            "    got.append(getattr(p2pkv, name))\n"
            "names = ('Engine', 'EngineConfig', 'Engine', 'RecvState')\n"
            "ts = [threading.Thread(target=use, args=(n,)) for n in names]\n"
            "[t.start() for t in ts]; [t.join(100) for t in ts]\n"
            "assert len(got) == 4 and all(g.__module__.startswith('p2pkv.') for g in got), got\n"
            "from p2pkv import *\n"
            "sys.stdout.buffer.write(pickle.dumps((EngineConfig(ttl_s=12.0), TransferKey('t', 'n'))))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr.decode()
    load = ("import pickle, sys\n"
            "cfg, key = pickle.loads(sys.stdin.buffer.read())\n"
            "assert cfg.ttl_s == 12.0 and key.transfer_id == 't' and key.name == 'n', (cfg, key)\n")
    back = subprocess.run([sys.executable, "-c", load], input=out.stdout, capture_output=True, timeout=120)
    assert back.returncode == 0, back.stderr.decode()
