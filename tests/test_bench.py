"""The benchmark tool's CPU smoke run (tiny sizes), as CI runs it."""

import json
import subprocess
import sys


def test_bench_tcp_smoke(tmp_path):
    out = subprocess.run([sys.executable, "-m", "p2pkv.bench", "--suite", "tcp", "--smoke", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["meta"]["torch"] and data["meta"]["command"].startswith("python -m p2pkv.bench")
    whats = {r["what"] for r in data["results"]}
    assert {"raw pyzmq push", "p2pkv push", "p2pkv pull"} <= whats
    for r in data["results"]:
        if r["what"] == "p2pkv push":
            assert r["gbps"] > 0 and r["p50_us"] > 0 and r["ratio"] > 0
    assert "== tcp ==" in out.stdout


def test_bench_rejects_unknown_suite():
    out = subprocess.run([sys.executable, "-m", "p2pkv.bench", "--suite", "rdma"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2 and "unknown suite" in out.stderr
