"""The demo and the benchmark as a user runs them: subprocesses, bad input -> one error line and exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import p2pkv
from p2pkv.bench.core import format_table, parse_size
from p2pkv.demo import memory_needed


def _run(module: str, *args: str, cwd: Path | None = None, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd, env=env)


def _assert_usage_error(out: subprocess.CompletedProcess[str], prog: str, *words: str) -> None:
    """argparse's form: exit 2, no traceback, the last stderr line is ``prog: error: ...``."""
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{prog}: error: "), out.stderr
    for w in words:
        assert w in last, (w, last)
    assert len(out.stderr.strip().splitlines()) <= 3, out.stderr  # usage (1-2 lines) + the error


def _available_memory() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


# ----------------------------------------------------------------------------- demo
DEMO_BAD = [
    (["--device", "gpu"], ["--device", "cpu, cuda or cuda:N", "'gpu'"]),
    (["--timeout", "0"], ["--timeout", "positive"]),
    (["--timeout", "-3"], ["--timeout", "positive"]),
    (["--timeout", "soon"], ["--timeout", "seconds"]),
    (["--requests", "0"], ["--requests", "at least 1"]),
    (["--tokens", "abc"], ["--tokens", "whole number"]),
    (["--tokens", "10000000"], ["--tokens 10000000", "2 GiB"]),
    (["--mode", "sideways"], ["--mode"]),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("args", "words"), DEMO_BAD)
def test_demo_bad_input_is_one_error_line(args: list[str], words: list[str]) -> None:
    _assert_usage_error(_run("p2pkv.demo", *args, timeout=100), "p2pkv-demo", *words)


@pytest.mark.timeout(120)
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_demo_cuda_without_cuda() -> None:
    _assert_usage_error(_run("p2pkv.demo", "--device", "cuda:0", timeout=100), "p2pkv-demo", "CUDA is not available",
                        "--device cpu")


@pytest.mark.timeout(120)
@pytest.mark.skipif(memory_needed(100_000) <= 0.9 * _available_memory(), reason="this machine has the memory")
def test_demo_pool_too_big_is_refused_before_allocating() -> None:
    out = _run("p2pkv.demo", "--tokens", "100000", timeout=100)
    _assert_usage_error(out, "p2pkv-demo", "--tokens 100000", "GB", "use --tokens")


@pytest.mark.timeout(60)
def test_demo_help_and_version() -> None:
    out = _run("p2pkv.demo", "--help", timeout=50)
    assert out.returncode == 0 and out.stdout.startswith("usage: p2pkv-demo")
    for words in ("seconds", "tokens", "32 layers", "cuda:N"):
        assert words in out.stdout
    out = _run("p2pkv.demo", "--version", timeout=50)
    assert out.returncode == 0 and out.stdout.strip() == f"p2pkv-demo {p2pkv.__version__}"


@pytest.mark.timeout(180)
def test_demo_pull_run() -> None:
    out = _run("p2pkv.demo", "--requests", "2", "--tokens", "32", "--mode", "pull", "--timeout", "30", timeout=170)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "mode=pull" in out.stdout and "(push)" not in out.stdout
    rows = [ln.split() for ln in out.stdout.splitlines() if ln.startswith("pull ")]
    assert len(rows) == 1 and float(rows[0][5]) > 0  # GB/s
    assert "verification (regenerate and bit-compare every layer, timed apart)" in out.stdout
    assert "all tensors bit-exact" in out.stdout
    assert "Traceback" not in out.stderr


# ----------------------------------------------------------------------------- bench
def test_parse_size() -> None:
    assert parse_size("4096") == 4096
    assert parse_size("4K") == parse_size("4k") == parse_size("4KiB") == parse_size("4KB") == 4096
    assert parse_size("16M") == 16 * 2**20 and parse_size("1G") == 2**30
    for bad in ("abc", "", "0", "4X", "-4K", "1.5M"):
        with pytest.raises(ValueError, match="invalid size"):
            parse_size(bad)


BENCH_BAD = [
    (["--sizes", "abc"], ["--sizes", "invalid size 'abc'", "4K"]),
    (["--sizes", "4K,0"], ["--sizes", "at least 1 byte"]),
    (["--sizes", ","], ["--sizes", "at least one size"]),
    (["--suite", "rdma"], ["--suite", "unknown suite", "rdma"]),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("args", "words"), BENCH_BAD)
def test_bench_bad_input_is_one_error_line(args: list[str], words: list[str], tmp_path: Path) -> None:
    out = _run("p2pkv.bench", *args, "--out", str(tmp_path / "r"), timeout=100)
    _assert_usage_error(out, "p2pkv-bench", *words)
    assert not (tmp_path / "r").exists()


@pytest.mark.timeout(120)
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_bench_all_suites_skipped_leaves_old_results(tmp_path: Path) -> None:
    (tmp_path / "bench.json").write_text('{"old": true}')
    (tmp_path / "bench.png").write_bytes(b"old png")
    out = _run("p2pkv.bench", "--suite", "nccl,ipc", "--out", str(tmp_path), timeout=100)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("p2pkv-bench: error: every requested suite is unavailable here")
    assert "nccl: needs a CUDA GPU" in line and "nothing was written" in line
    assert (tmp_path / "bench.json").read_text() == '{"old": true}'
    assert (tmp_path / "bench.png").read_bytes() == b"old png"


@pytest.mark.timeout(300)
def test_bench_pack_on_cpu_and_sizes_with_suffixes(tmp_path: Path) -> None:
    (tmp_path / "bench.png").write_bytes(b"an older run's plot")
    out = _run("p2pkv.bench", "--suite", "pack,tcp", "--smoke", "--sizes", "4K,64K", "--out", str(tmp_path),
               timeout=290)
    assert out.returncode == 0, out.stderr[-3000:]
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["skipped_suites"] == {}
    pack = [r for r in data["results"] if r["suite"] == "pack"]
    assert {"p2pkv pack", "p2pkv unpack", "torch index_select"} <= {r["what"] for r in pack}
    if not torch.cuda.is_available():
        assert all(r["backend"] == "torch" and r["host_us"] > 0 and "gpu_us" not in r for r in pack)
    assert {r["bytes"] for r in data["results"] if r["what"] == "p2pkv push"} == {4096, 65536}
    lines = out.stdout.splitlines()
    assert "== pack ==" in lines and "== tcp ==" in lines
    assert max(len(ln) for ln in lines) <= 100, max(lines, key=len)
    assert "{" not in out.stdout  # no raw JSON
    header = lines[lines.index("== tcp ==") + 1]
    assert "gpu us" not in header and "host us" not in header  # never measured by the tcp suite
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "no bench.png: matplotlib is not installed (pip install 'p2pkv[bench]')" in out.stdout
        assert not (tmp_path / "bench.png").exists()  # the older plot is gone with the older numbers
    else:
        assert (tmp_path / "bench.png").read_bytes() != b"an older run's plot"


def test_bench_help_and_version() -> None:
    out = _run("p2pkv.bench", "--help", timeout=50)
    assert out.returncode == 0 and out.stdout.startswith("usage: p2pkv-bench")
    assert "4K,16M,1G" in out.stdout and "bytes" in out.stdout
    out = _run("p2pkv.bench", "--version", timeout=50)
    assert out.returncode == 0 and out.stdout.strip() == f"p2pkv-bench {p2pkv.__version__}"


def test_table_shows_only_measured_columns() -> None:
    rows = [{"suite": "x", "what": "a", "bytes": 4096, "gbps": 1.5, "p50_us": 10.0},
            {"suite": "x", "what": "b", "bytes": 8192, "gbps": 2.0, "ratio": 1.3, "baseline": "a"}]
    lines = format_table(rows)
    header = lines[2]
    assert header.split() == ["what", "size", "GB/s", "p50", "us", "ratio"]
    assert "  ratio of 'b': vs 'a'" in lines
    # the widest real section: pack on a GPU, and a long name
    wide = [{"suite": "pack", "what": "w" * 200, "bytes": 3 * 2**30, "gbps_rw": 2345.678, "gpu_us": 123456.7,
             "host_us": 12.345, "ratio_to_copy": 0.987, "speedup_vs_index_select": 12.5, "preset": "llama3-70b-tp8",
             "tokens": 131072, "baseline": "b" * 200}]
    assert max(len(ln) for ln in format_table(wide)) <= 100
