"""Real SGLang 0.5.23 servers on CPU moving their KV cache through p2pkv, behind sglang-router.

What a user runs, nothing patched in: a prefill server and a decode server started with plain
``python -m sglang.launch_server ... --disaggregation-transfer-backend p2pkv`` (p2pkv registers itself
through SGLang's ``sglang.srt.plugins`` entry point), ``sglang_router.launch_router --pd-disaggregation``
in front of them, and a single non-disaggregated server with the same weights as the reference. Greedy
outputs through the router must be token-for-token those of the reference (the KV arrived intact), also
after the prefill server was killed and restarted between requests.

The model is a tiny Llama (2 layers, 2 KV heads) whose random weights the test writes as a safetensors
checkpoint, so every server loads the same weights; ``--skip-tokenizer-init`` lets requests carry token
ids. Test-only stand-in: on CPU SGLang's rotary embedding falls back to ``vllm._custom_ops.rotary_embedding``
(not installed here); the test writes a small PyTorch version of that one function into a directory put
on the servers' PYTHONPATH. Nothing else is replaced.

Skipped without sglang or sglang-router (CI's SGLang stage installs both; see .ci/run).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.sglang
pytest.importorskip("sglang")
pytest.importorskip("sglang_router")
pytest.importorskip("safetensors")

START_S = 900.0  # one server start on a loaded 2-core machine (imports + model + warm-up): generous
PROMPTS = [[1, 17, 33, 255, 90, 4, 77, 301, 12, 45, 46, 47, 48, 200, 201, 202, 9, 8, 7, 6],
           [1, 400, 401, 402, 3, 3, 3, 99, 150, 151, 152, 153, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110,
            120, 130, 140, 150, 160, 170, 180, 190, 210, 220, 230, 240, 250, 260, 270, 280, 290],
           [1, 5, 6, 7, 8, 9, 10, 11],
           [1] + list(range(300, 347))]
MAX_NEW = 8

CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
          "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
          "vocab_size": 512, "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
          "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
          "hidden_act": "silu"}

ROTARY_STANDIN = '''
"""TEST-ONLY stand-in for vllm._custom_ops.rotary_embedding, which SGLang's rotary embedding imports on
CPU (its non-CUDA fallback). In place, like the real kernel: rotates query and key by cos_sin_cache[positions]."""
import torch


def rotary_embedding(positions, query, key, head_size, cos_sin_cache, is_neox):
    rot = cos_sin_cache.shape[-1]
    cos, sin = cos_sin_cache.index_select(0, positions.flatten()).to(query.dtype).chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    for x in (query, key):
        if x is None:
            continue
        v = x.view(positions.numel(), -1, head_size)[..., :rot]
        if is_neox:
            x1, x2 = v[..., : rot // 2], v[..., rot // 2:]
            out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        else:
            x1, x2 = v[..., 0::2], v[..., 1::2]
            out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        v.copy_(out)
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_model(d: Path) -> None:
    """A tiny Llama checkpoint with seeded random weights (large enough that greedy outputs vary)."""
    import torch
    from safetensors.torch import save_file

    c = CONFIG
    g = torch.Generator().manual_seed(22)
    h, inter, kv = c["hidden_size"], c["intermediate_size"], c["num_key_value_heads"]
    hd = h // c["num_attention_heads"]

    def w(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) / shape[-1] ** 0.5 * 2.0).contiguous()

    t = {"model.embed_tokens.weight": w(c["vocab_size"], h), "model.norm.weight": torch.ones(h),
         "lm_head.weight": w(c["vocab_size"], h)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t.update({p + "self_attn.q_proj.weight": w(h, h), p + "self_attn.k_proj.weight": w(kv * hd, h),
                  p + "self_attn.v_proj.weight": w(kv * hd, h), p + "self_attn.o_proj.weight": w(h, h),
                  p + "mlp.gate_proj.weight": w(inter, h), p + "mlp.up_proj.weight": w(inter, h),
                  p + "mlp.down_proj.weight": w(h, inter), p + "input_layernorm.weight": torch.ones(h),
                  p + "post_attention_layernorm.weight": torch.ones(h)})
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(c))
    save_file(t, str(d / "model.safetensors"))


class Proc:
    """One server process (its own process group: SGLang starts children) with its log in a file."""

    def __init__(self, name: str, args: list[str], log_dir: Path, env: dict[str, str]):
        self.name = name
        self.log = log_dir / f"{name}-{int(time.monotonic() * 1000)}.log"
        self._f = open(self.log, "w")  # noqa: SIM115 - closed in stop()
        self.p = subprocess.Popen(args, stdout=self._f, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                  stdin=subprocess.DEVNULL)

    def tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.p.poll() is None:
            try:
                os.killpg(self.p.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait(30)
        self._f.close()


def http(method: str, url: str, body: Any = None, timeout: float = 120.0) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            return r.status, json.loads(raw) if raw.strip().startswith((b"{", b"[")) else raw.decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def wait_healthy(proc: Proc, url: str, deadline_s: float = START_S) -> None:
    end = time.monotonic() + deadline_s
    while True:
        if proc.p.poll() is not None:
            raise AssertionError(f"{proc.name} exited with {proc.p.returncode}:\n{proc.tail()}")
        try:
            if http("GET", url + "/health", timeout=5)[0] == 200:
                return
        except OSError:
            pass
        if time.monotonic() > end:
            raise AssertionError(f"{proc.name} not healthy within {deadline_s:.0f}s:\n{proc.tail()}")
        time.sleep(1.0)


def generate(url: str, ids: list[int], wait_s: float = 300.0) -> list[int]:
    """Greedy generation; a router that has not (re)admitted a worker yet answers 503: asked again."""
    end = time.monotonic() + wait_s
    while True:
        code, out = http("POST", url + "/generate", {"input_ids": ids, "sampling_params": {
            "temperature": 0.0, "max_new_tokens": MAX_NEW, "ignore_eos": True}}, timeout=300)
        if code == 503 and "No available servers" in str(out) and time.monotonic() < end:
            time.sleep(1.0)
            continue
        assert code == 200, (code, out)
        return list(out["output_ids"])


class Cluster:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.model = tmp / "model"
        write_model(self.model)
        stub = tmp / "stub" / "vllm"
        stub.mkdir(parents=True)
        (stub / "__init__.py").write_text('"""TEST-ONLY: see _custom_ops.py."""\n')
        (stub / "_custom_ops.py").write_text(textwrap.dedent(ROTARY_STANDIN))
        self.env = dict(os.environ, PYTHONPATH=str(tmp / "stub"), SGLANG_DISAGGREGATION_WAITING_TIMEOUT="120",
                        SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT="120", OMP_NUM_THREADS="1")
        self.procs: list[Proc] = []
        self.bport = free_port()
        self.ports = {k: free_port() for k in ("ref", "prefill", "decode", "router", "router_metrics")}

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def server(self, name: str, *extra: str) -> Proc:
        args = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(self.model), "--device", "cpu",
                "--attention-backend", "torch_native", "--skip-tokenizer-init", "--host", "127.0.0.1",
                "--port", str(self.ports[name]), "--max-total-tokens", "2048", "--max-running-requests", "8",
                "--chunked-prefill-size", "16", "--random-seed", "7", "--log-level", "warning", *extra]
        p = Proc(name, args, self.tmp, self.env)
        self.procs.append(p)
        return p

    def prefill(self) -> Proc:
        # (--disable-overlap-schedule: with overlap, SGLang's prefill loop records a CUDA event on its forward
        # stream before an early send of a cached prefix, which fails on a CPU-only machine)
        return self.server("prefill", "--disaggregation-mode", "prefill", "--disaggregation-transfer-backend",
                           "p2pkv", "--disaggregation-bootstrap-port", str(self.bport), "--disable-overlap-schedule")

    def close(self) -> None:
        for p in self.procs:
            p.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Any:
    c = Cluster(tmp_path_factory.mktemp("sglang-e2e"))
    try:
        yield c
    finally:
        c.close()


@pytest.mark.timeout(3000)
def test_prefill_decode_through_the_router_token_exact_and_survives_a_prefill_restart(cluster: Cluster):
    c = cluster
    # all three servers start at once (the machine has 2 cores: starting one after another costs more)
    ref = c.server("ref")
    prefill = c.prefill()
    # (cpu_tensor: SGLang's default retraction backup for a decode server, host_pool, registers host memory
    # with CUDA, which a CPU-only machine has not)
    decode = c.server("decode", "--disaggregation-mode", "decode", "--disaggregation-transfer-backend", "p2pkv",
                      "--disaggregation-decode-retraction-backup", "cpu_tensor")
    for p in (ref, prefill, decode):
        wait_healthy(p, c.url(p.name))
    expected = [generate(c.url("ref"), ids) for ids in PROMPTS]
    ref.stop()
    assert len({tuple(e) for e in expected}) > 1, expected  # the weights make outputs depend on the prompt
    router = Proc("router", [sys.executable, "-m", "sglang_router.launch_router", "--pd-disaggregation",
                             "--prefill", c.url("prefill"), str(c.bport), "--decode", c.url("decode"),
                             "--host", "127.0.0.1", "--port", str(c.ports["router"]),
                             # (its metrics exporter's default port, 29000, is shared by every router on
                             # the machine: a second test run beside this one would take it)
                             "--prometheus-host", "127.0.0.1", "--prometheus-port", str(c.ports["router_metrics"]),
                             "--worker-startup-timeout-secs", "600", "--health-check-interval-secs", "2",
                             "--disable-retries"],  # a failed transfer must show, not be retried away
                  c.tmp, c.env)
    c.procs.append(router)
    wait_healthy(router, c.url("router"), 600)

    got = [generate(c.url("router"), ids) for ids in PROMPTS]
    assert got == expected, f"through p2pkv {got} != single server {expected}"

    # the prefill server is killed (no goodbye) and restarted on the same ports; the decode server keeps
    # running with the old prefill ranks' addresses cached
    prefill.stop(signal.SIGKILL)
    prefill = c.prefill()
    wait_healthy(prefill, c.url("prefill"))
    got = [generate(c.url("router"), ids) for ids in PROMPTS]
    assert got == expected, f"after the prefill restart: {got} != {expected}\n{decode.tail()}"
    assert decode.p.poll() is None, decode.tail()
    log = decode.log.read_text(errors="replace")
    assert "Decode transfer failed" not in log and "P2pkvKVReceiver room" not in log, decode.tail()
