"""The demo and the benchmark as a user runs them: bad input -> one error line and exit 2, short runs.

Bad-input cases call each command's ``main()`` in this process (argparse exits there as it does
in a subprocess); one case per command runs the real ``python -m ...`` subprocess, as do the runs.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import p2pkv
import p2pkv.bench.core
import p2pkv.bench.request
import p2pkv.demo
from p2pkv.bench.core import format_table, parse_size
from p2pkv.demo import memory_needed


def _run(module: str, *args: str, cwd: Path | None = None, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd, env=env)


def _in_process(main: Callable[[list[str]], int], *args: str) -> subprocess.CompletedProcess[str]:
    """Run a command's ``main(argv)`` here, with its exit status and output as a subprocess's."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def _assert_usage_error(out: subprocess.CompletedProcess[str], prog: str, *words: str, usage_lines: int = 2) -> None:
    """argparse's form: exit 2, no traceback, the last stderr line is ``prog: error: ...``."""
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{prog}: error: "), out.stderr
    for w in words:
        assert w in last, (w, last)
    assert len(out.stderr.strip().splitlines()) <= usage_lines + 1, out.stderr  # usage + the error


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
    (["--timeout", "1e300"], ["--timeout", "at most 1e6 seconds"]),
    (["--timeout", "1000001"], ["--timeout", "at most 1e6 seconds"]),
    (["--requests", "0"], ["--requests", "at least 1"]),
    (["--tokens", "abc"], ["--tokens", "whole number"]),
    (["--tokens", "10000000"], ["--tokens 10000000", "2 GiB"]),
    (["--mode", "sideways"], ["--mode"]),
]


@pytest.mark.parametrize(("args", "words"), DEMO_BAD)
def test_demo_bad_input_is_one_error_line(args: list[str], words: list[str]) -> None:
    _assert_usage_error(_in_process(p2pkv.demo.main, *args), "p2pkv-demo", *words)


@pytest.mark.timeout(120)
def test_demo_bad_input_as_a_user_runs_it() -> None:
    _assert_usage_error(_run("p2pkv.demo", "--timeout", "1e300", timeout=100), "p2pkv-demo", "--timeout",
                        "at most 1e6 seconds")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_demo_cuda_without_cuda() -> None:
    _assert_usage_error(_in_process(p2pkv.demo.main, "--device", "cuda:0"), "p2pkv-demo", "CUDA is not available",
                        "--device cpu")


@pytest.mark.skipif(memory_needed(100_000) <= 0.9 * _available_memory(), reason="this machine has the memory")
def test_demo_pool_too_big_is_refused_before_allocating() -> None:
    out = _in_process(p2pkv.demo.main, "--tokens", "100000")
    _assert_usage_error(out, "p2pkv-demo", "--tokens 100000", "GB", "use --tokens")


def test_demo_help_and_version() -> None:
    out = _in_process(p2pkv.demo.main, "--help")
    assert out.returncode == 0 and out.stdout.startswith("usage: p2pkv-demo")
    for words in ("seconds", "tokens", "32 layers", "cuda:N"):
        assert words in out.stdout
    out = _in_process(p2pkv.demo.main, "--version")
    assert out.returncode == 0 and out.stdout.strip() == f"p2pkv-demo {p2pkv.__version__}"


def test_demo_own_waits_never_overflow() -> None:
    """The demo's hand-offs wait 4 x --timeout; multiprocessing's waits overflow past 2**31 ms."""
    assert p2pkv.demo._orchestration_s(60) == 240
    assert p2pkv.demo._orchestration_s(p2pkv.demo.MAX_TIMEOUT_S) * 1000 < 2**31


@pytest.mark.timeout(180)
def test_demo_pull_run() -> None:
    # the longest timeout the demo accepts (its own waits are 4 x timeout: they must not overflow)
    out = _run("p2pkv.demo", "--requests", "2", "--tokens", "32", "--mode", "pull", "--timeout", "999999", timeout=170)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "mode=pull" in out.stdout and "(push)" not in out.stdout
    rows = [ln.split() for ln in out.stdout.splitlines() if ln.startswith("pull ")]
    assert len(rows) == 1 and float(rows[0][5]) > 0  # GB/s
    assert "verification (regenerate and bit-compare every layer, timed apart)" in out.stdout
    assert "all tensors bit-exact" in out.stdout
    assert "Traceback" not in out.stderr


def _alive_in_group(pgid: int) -> list[str]:
    """Processes of process group ``pgid`` that are still running (zombies left out)."""
    alive = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(stat[: stat.rindex(")") + 1])
    return alive


@pytest.mark.timeout(300)
def test_demo_interrupted_exits_with_one_line_and_leaves_nothing() -> None:
    """Ctrl-C (SIGINT to the whole foreground process group, as a terminal sends it) to one demo and
    SIGTERM to another demo's main process alone (both run at once): one line on stderr, no
    traceback from any process, no leaked semaphores, and no process of either demo left running."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    procs = {how: subprocess.Popen([sys.executable, "-m", "p2pkv.demo", "--requests", "100000", "--tokens", "16"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                   start_new_session=True)
             for how in ("ctrl-c", "sigterm")}
    errs = {}
    try:
        for how, p in procs.items():
            assert p.stderr is not None
            first = p.stderr.readline()  # a progress line: both children run and a request has moved
            assert first.startswith("moving KV"), first + p.stderr.read()[-3000:]
            if how == "ctrl-c":
                os.killpg(p.pid, signal.SIGINT)
            else:
                os.kill(p.pid, signal.SIGTERM)
        for how, p in procs.items():
            errs[how] = p.communicate(timeout=120)[1]
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
    for how, p in procs.items():
        err = errs[how]
        assert p.returncode == (130 if how == "ctrl-c" else 128 + signal.SIGTERM), (how, p.returncode, err[-3000:])
        lines = [ln for ln in err.splitlines() if not ln.startswith("moving KV")]
        assert lines == [f"p2pkv-demo: {'interrupted' if how == 'ctrl-c' else 'terminated'}"], (how, err[-3000:])
    deadline = time.monotonic() + 30
    while any(_alive_in_group(p.pid) for p in procs.values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [_alive_in_group(p.pid) for p in procs.values() if _alive_in_group(p.pid)]


# ----------------------------------------------------------------------------- bench
def test_parse_size() -> None:
    assert parse_size("4096") == 4096
    assert parse_size("4K") == parse_size("4k") == parse_size("4KiB") == parse_size("4KB") == 4096
    assert parse_size("16M") == 16 * 2**20 and parse_size("1G") == 2**30
    for bad in ("abc", "", "0", "4X", "-4K", "1.5M"):
        with pytest.raises(ValueError, match="invalid size"):
            parse_size(bad)


BENCH_BAD = [
    (["--sizes", "100G"], ["--sizes 100GiB", "tcp suite", "256MiB"]),  # never dropped silently
    (["--sizes", "1K", "--suite", "pack"], ["--sizes", "pack", "do not take"]),
    (["--sizes", "abc"], ["--sizes", "invalid size 'abc'", "4K"]),
    (["--sizes", "4K,0"], ["--sizes", "at least 1 byte"]),
    (["--sizes", ","], ["--sizes", "at least one size"]),
    (["--suite", "rdma"], ["--suite", "unknown suite", "rdma"]),
]


@pytest.mark.parametrize(("args", "words"), BENCH_BAD)
def test_bench_bad_input_is_one_error_line(args: list[str], words: list[str], tmp_path: Path) -> None:
    out = _in_process(p2pkv.bench.core.main, *args, "--out", str(tmp_path / "r"))
    _assert_usage_error(out, "p2pkv-bench", *words)
    assert not (tmp_path / "r").exists()


@pytest.mark.timeout(120)
def test_bench_bad_input_as_a_user_runs_it(tmp_path: Path) -> None:
    out = _run("p2pkv.bench", "--sizes", "100G", "--out", str(tmp_path / "r"), timeout=100)
    _assert_usage_error(out, "p2pkv-bench", "--sizes 100GiB", "tcp suite")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("case", ["empty", "a file", "under a file", "cannot create", "bench.json is a folder"])
def test_bench_out_that_cannot_be_written_is_one_error_line(case: str, tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("not a folder")
    (tmp_path / "res" / "bench.json").mkdir(parents=True)
    out, words = {"empty": ("", ["--out", "empty path"]),
                  "a file": (str(a_file), [str(a_file), "not a folder"]),
                  "under a file": (str(a_file / "sub"), [str(a_file / "sub"), "cannot create"]),
                  "cannot create": ("/proc/p2pkv-bench-out", ["/proc/p2pkv-bench-out", "cannot create"]),
                  "bench.json is a folder": (str(tmp_path / "res"), ["bench.json", "is a folder"])}[case]
    res = _in_process(p2pkv.bench.core.main, "--suite", "pack", "--smoke", "--out", out)
    _assert_usage_error(res, "p2pkv-bench", *words)
    assert "bench" not in res.stdout  # failed before any suite ran


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_bench_all_suites_skipped_leaves_old_results(tmp_path: Path) -> None:
    (tmp_path / "bench.json").write_text('{"old": true}')
    (tmp_path / "bench.png").write_bytes(b"old png")
    out = _in_process(p2pkv.bench.core.main, "--suite", "nccl,ipc", "--out", str(tmp_path))
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("p2pkv-bench: error: every requested suite is unavailable here")
    assert "nccl: needs a CUDA GPU" in line and "nothing was written" in line
    assert (tmp_path / "bench.json").read_text() == '{"old": true}'
    assert (tmp_path / "bench.png").read_bytes() == b"old png"


@pytest.mark.timeout(300)
def test_bench_pack_and_tcp_smoke_on_cpu_with_size_suffixes(tmp_path: Path) -> None:
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
        assert all(r["spread_us"] >= 0 for r in pack)  # every CPU timing comes with its spread
        for r in pack:  # nothing is derived from a timing whose spread exceeds its median
            if r.get("noisy"):
                assert r["spread_us"] > r["host_us"]
                assert r.get("gbps_rw") is None and r.get("ratio_to_copy") is None, r
    assert {r["bytes"] for r in data["results"] if r["what"] == "p2pkv push"} == {4096, 65536}
    # the tcp suite: p2pkv beside raw pyzmq, and the run's machine and command recorded
    assert data["meta"]["torch"] and data["meta"]["command"].startswith("python -m p2pkv.bench")
    assert {"raw pyzmq push", "p2pkv push", "p2pkv pull"} <= {r["what"] for r in data["results"]}
    for r in data["results"]:
        if r["what"] == "p2pkv push":
            assert r["gbps"] > 0 and r["p50_us"] > 0 and r["ratio"] > 0
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
    out = _in_process(p2pkv.bench.core.main, "--help")
    assert out.returncode == 0 and out.stdout.startswith("usage: p2pkv-bench")
    assert "4K,16M,1G" in out.stdout and "bytes" in out.stdout
    out = _in_process(p2pkv.bench.core.main, "--version")
    assert out.returncode == 0 and out.stdout.strip() == f"p2pkv-bench {p2pkv.__version__}"


# ----------------------------------------------------------------------------- bench.request
REQ = "python -m p2pkv.bench.request"
REQUEST_BAD = [
    (["--transports", "bogus"], ["--transports", "choose from", "'bogus'"]),
    (["--tokens", "-1"], ["--tokens", ">= 1", "'-1'"]),
    (["--tokens", "abc"], ["--tokens", "comma-separated integers", "'abc'"]),
    (["--reps", "0"], ["--reps", ">= 1", "'0'"]),
    (["--reps", "x"], ["--reps", "'x'"]),
    (["--gaps", "0"], ["--gaps", ">= 1"]),
    (["--paths", "sideways"], ["--paths", "choose from"]),
    (["--devices", "gpu,cpu"], ["--devices", "PRODUCER,CONSUMER", "'gpu,cpu'"]),
    (["--devices", "cpu"], ["--devices", "PRODUCER,CONSUMER"]),
    (["--out", ""], ["--out ''", "not a writable file path"]),
]


@pytest.mark.parametrize(("args", "words"), REQUEST_BAD)
def test_request_bench_bad_input_is_one_error_line(args: list[str], words: list[str]) -> None:
    res = _in_process(p2pkv.bench.request.main, *args)
    _assert_usage_error(res, REQ, *words, usage_lines=4)
    assert res.stderr.strip().splitlines()[-1].count(args[0]) == 1  # the flag named once, not twice


@pytest.mark.parametrize("case", ["a folder", "under a file", "in /proc"])
def test_request_bench_unwritable_out_is_refused_before_the_run(case: str, tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    out = {"a folder": str(tmp_path), "under a file": str(a_file / "rows.json"), "in /proc": "/proc/rows.json"}[case]
    res = _in_process(p2pkv.bench.request.main, "--out", out)
    _assert_usage_error(res, REQ, "--out", "not a writable file path", usage_lines=4)
    assert res.stdout == ""  # nothing ran


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_request_bench_on_cpu_defaults_to_cpu_transports_and_refuses_gpu_ones() -> None:
    a = p2pkv.bench.request._parse_args([])  # no arguments on a machine without a GPU: it has work to do
    assert a.devices == ("cpu", "cpu") and a.transports == ["tcp", "shm"] and a.tokens == [512, 2048]
    for xs in ("ipc", "nccl", "tcp,ipc"):
        res = _in_process(p2pkv.bench.request.main, "--transports", xs)
        _assert_usage_error(res, REQ, "needs a GPU", "use tcp or shm", usage_lines=4)
    _assert_usage_error(_in_process(p2pkv.bench.request.main, "--devices", "cuda:0,cuda:0"), REQ, "not available",
                        usage_lines=4)


def test_request_bench_defaults_follow_the_gpus() -> None:
    one = p2pkv.bench.request._parse_args([], ngpu=1)
    assert one.devices == ("cuda:0", "cuda:0") and one.transports == ["ipc"] and one.tokens == [512, 2048, 10000]
    two = p2pkv.bench.request._parse_args([], ngpu=2)
    assert two.devices == ("cuda:0", "cuda:1") and two.transports == ["nccl", "ipc"]


def test_request_bench_help_is_complete() -> None:
    out = _in_process(p2pkv.bench.request.main, "--help")
    assert out.returncode == 0 and out.stdout.startswith(f"usage: {REQ}")
    desc = " ".join(out.stdout.split("\n\n")[1].split())
    assert desc.startswith("Whole-request benchmark") and desc.endswith("in the same run."), desc
    for flag in ("--tokens", "--transports", "--paths", "--reps", "--gaps", "--devices", "--out"):
        assert flag in out.stdout


@pytest.mark.timeout(240)
def test_request_bench_short_run_on_cpu(tmp_path: Path) -> None:
    """A real run, as a user starts it, cut down to one small request over TCP."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the CPU run is not its default")
    out = _run("p2pkv.bench.request", "--tokens", "16", "--reps", "1", "--transports", "tcp", "--paths", "send",
               "--out", str(tmp_path / "rows.json"), timeout=220)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert {r["what"] for r in rows} >= {"p2pkv send tcp cpu->cpu", "p2pkv send tcp cpu->cpu layer-wise 200us"}
    assert all(r["tokens"] == 16 and r["ms"] > 0 for r in rows)


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


def test_table_marks_noisy_timings() -> None:
    rows = [{"suite": "pack", "what": "copy (baseline)", "bytes": 4096, "host_us": 12000.0, "spread_us": 40000.0,
             "noisy": True, "gbps_rw": None},
            {"suite": "pack", "what": "p2pkv pack", "bytes": 4096, "host_us": 30.0, "spread_us": 2.0,
             "gbps_rw": 0.27, "ratio_to_copy": None}]
    lines = format_table(rows)
    noisy = next(ln for ln in lines if ln.startswith("copy (baseline)"))
    assert "12000*" in noisy and "40000" in noisy
    quiet = next(ln for ln in lines if ln.startswith("p2pkv pack"))
    assert "30 " in quiet + " " and "*" not in quiet
    assert any("spread exceeds the median" in ln for ln in lines)
