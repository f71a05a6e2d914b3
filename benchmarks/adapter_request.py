"""One Llama-3-8B request through the vLLM adapter's worker side, producer and consumer in two processes.

Pack from a paged cache (FlashAttention layout, random block ids) on the producer's device in
``save_kv_layer`` (push mode: one whole-request send per hand-off), unpack into a paged cache on
the consumer's device in the consumer connector's loader; timed from the first ``save_kv_layer``
until the consumer connector reports the load finished (``get_finished``), median of ``--reps``;
each row also splits that time into the producer's calls, the hand-over of ``kv_transfer_params``
through this benchmark's parent process (a proxy's job in a deployment) and the consumer's calls;
``adapter_ms`` is the connector's own part (producer + consumer). With ``P2PKV_TRACE=1`` each row
also gets the per-step breakdown of both processes (p50/p90 microseconds between trace marks of the
same transfer, :mod:`p2pkv._trace`), printed as a table too. Only vLLM's own objects are stand-ins
(tests/vllm_fakes.py); run from the repository root::

    python benchmarks/adapter_request.py --tokens 512,2048,10000 --devices cuda:0,cuda:1
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

L, BLOCK, HEADS, HEAD = 32, 16, 8, 128
POLL_S = float(os.environ.get("P2PKV_BENCH_POLL_S", "2e-5"))  # set by main() for both sides
# trace marks in the order a request passes them: the producer's calls, the relay, the consumer's calls
STEPS = ["bench.p_start", "save.exposed", "save.finished", "bench.p_end", "bench.c_start", "load.queued",
         "load.begin", "read.mapped", "read.table", "pc.enter", "pc.uploaded", "pc.launched", "pc.recorded",
         "read.launched", "read.synced", "read.done_sent",
         "load.reported", "bench.c_end"]
# ... and the producer learning that the consumer read it (read_done) and reporting the hand-off done
DONE_STEPS = ["read.done_sent", "save.read_done", "save.reported"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _side(role: str, device: str, port: int, num_blocks: int, conn, mode: str = "push") -> None:
    from tests import vllm_fakes as F

    from p2pkv import _trace
    from p2pkv.adapters.vllm import KVConnectorRole, P2pkvConnector

    extra = dict(port=port, mode=mode, timeout_s=60.0, pool_bytes=2 * L * 2 * num_blocks * BLOCK * HEADS * HEAD * 2
                 + 2**28, transport=os.environ.get("P2PKV_BENCH_TRANSPORT", "auto"))
    cfg = F.VllmConfig(F.KVTransferConfig(role, extra))
    sched = P2pkvConnector(cfg, KVConnectorRole.SCHEDULER, F.KVCacheConfig(num_blocks=num_blocks))
    worker = P2pkvConnector(cfg, KVConnectorRole.WORKER, F.KVCacheConfig(num_blocks=num_blocks))
    caches = {name: torch.randn(2, num_blocks, BLOCK, HEADS, HEAD, device=device).to(torch.bfloat16)
              for name in F.LAYERS}
    worker.register_kv_caches(caches)
    prof = None
    if os.environ.get("P2PKV_BENCH_PROFILE"):  # where each side's host time goes (printed when it exits)
        import cProfile

        prof = cProfile.Profile()
    conn.send("ready")
    try:
        while True:
            cmd = conn.recv()
            if cmd is None:
                if prof is not None:
                    import pstats

                    print(f"--- {role}: cProfile of its timed calls, every request", flush=True)
                    pstats.Stats(prof).sort_stats("tottime").print_stats(22)
                return
            req_id, tid, prompt_len, block_ids, params = cmd
            req = F.Request(req_id, list(range(prompt_len)), params)
            if role == "kv_producer":
                sched.get_num_new_matched_tokens(req, 0)
                sched.update_state_after_alloc(req, F.KVCacheBlocks(block_ids), 0)
                so = F.SchedulerOutput(num_scheduled_tokens={req_id: prompt_len})
                so.scheduled_new_reqs.append(F.NewRequestData(req_id, req.prompt_token_ids, (list(block_ids),), 0))
                meta = sched.build_connector_meta(so)
                worker.bind_connector_metadata(meta)
                if device != "cpu":
                    torch.cuda.synchronize()
                if prof is not None:
                    prof.enable()
                t0 = time.monotonic()
                _trace.mark("bench.p_start", tid)
                host = []
                for name in F.LAYERS:
                    t = time.monotonic()
                    worker.save_kv_layer(name, caches[name], None)
                    host.append(time.monotonic() - t)
                worker.wait_for_save()
                worker.clear_connector_metadata()
                _, out = sched.request_finished(req, (list(block_ids),))
                _trace.mark("bench.p_end", tid)
                t_p1 = time.monotonic()
                if prof is not None:
                    prof.disable()
                conn.send((t0, out, sorted(host)[len(host) // 2], t_p1))
                end = time.monotonic() + 60
                while time.monotonic() < end:
                    sending, _ = worker.get_finished({req_id})
                    if sending and req_id in sending:
                        break
                    time.sleep(0.001)
                conn.send(_trace.take())
            else:
                if prof is not None:
                    prof.enable()
                t_c0 = time.monotonic()
                _trace.mark("bench.c_start", tid)
                n, _ = sched.get_num_new_matched_tokens(req, 0)
                sched.update_state_after_alloc(req, F.KVCacheBlocks(block_ids), n)
                meta = sched.build_connector_meta(F.SchedulerOutput())
                worker.bind_connector_metadata(meta)
                worker.start_load_kv(None)
                worker.clear_connector_metadata()
                end = time.monotonic() + 60
                while time.monotonic() < end:
                    _, recving = worker.get_finished(set())
                    if recving and req_id in recving:
                        break
                    time.sleep(POLL_S)  # vLLM's worker asks once per engine step; --poll-us
                t1 = time.monotonic()
                _trace.mark("bench.c_end", tid)
                if prof is not None:
                    prof.disable()
                conn.send((t1, sorted(worker.get_block_ids_with_load_errors()), t_c0, _trace.take()))
    finally:
        worker.shutdown()


def _print_steps(tok: int, steps: dict) -> None:
    print(f"tokens {tok}: per-step breakdown (us, between consecutive trace marks of one transfer)", flush=True)
    for name, v in steps.items():
        print(f"  {name:<40} p50 {v['p50_us']:>9.1f}  p90 {v['p90_us']:>9.1f}  (n={v['n']})", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", default="512,2048,10000")
    ap.add_argument("--devices", default="cuda:0,cuda:1")
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--mode", default="push", choices=("push", "pull", "read"),
                    help="push: layer by layer while saving; pull: the decode side fetches packed copies; read: "
                         "the decode side copies straight out of the producer's registered cache (same host, CUDA)")
    ap.add_argument("--poll-us", type=float, default=20.0,
                    help="how often the consumer asks get_finished (the engine benchmark's consumer spins on its "
                         "flags; a serving engine asks once per step)")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    os.environ["P2PKV_BENCH_POLL_S"] = str(a.poll_us * 1e-6)  # the spawned sides read it
    from p2pkv import _trace
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    dp, dc = a.devices.split(",")
    tokens = [int(t) for t in a.tokens.split(",")]
    num_blocks = 2 * (-(-max(tokens) // BLOCK)) + 8
    ctx = mp.get_context("spawn")
    pp, cp = _port(), _port()
    (p_conn, p_child), (c_conn, c_child) = ctx.Pipe(), ctx.Pipe()
    procs = [ctx.Process(target=_side, args=("kv_producer", dp, pp, num_blocks, p_child, a.mode), daemon=True),
             ctx.Process(target=_side, args=("kv_consumer", dc, cp, num_blocks, c_child, a.mode), daemon=True)]
    for p in procs:
        p.start()
    assert p_conn.recv() == "ready" and c_conn.recv() == "ready"
    rows = []
    for tok in tokens:
        nblk = -(-tok // BLOCK)
        times, hosts, prods, relays, conss, events = [], [], [], [], [], []
        for r in range(a.reps + 2):
            tid = f"xfer-adapter-{tok}-{r}"
            ids = torch.randperm(num_blocks)[:nblk].tolist()
            params = {"transfer_id": tid, "do_remote_decode": True, "remote_host": "127.0.0.1", "remote_port": cp}
            p_conn.send((f"p-{tid}-ab12", tid, tok, ids, params))
            t0, out, host, t_p1 = p_conn.recv()
            c_ids = torch.randperm(num_blocks)[:nblk].tolist()
            c_conn.send((f"d-{tid}-cd34", tid, tok, c_ids, out))
            t1, errors, t_c0, c_events = c_conn.recv()
            p_events = p_conn.recv()  # once the producer saw the hand-off done
            assert not errors, errors
            if r >= 2:
                events += p_events + c_events
                times.append(t1 - t0)
                hosts.append(host)
                prods.append(t_p1 - t0)
                relays.append(t_c0 - t_p1)
                conss.append(t1 - t_c0)
        row = {"what": f"vLLM adapter {a.mode} {dp}->{dc}", "tokens": tok,
               "bytes": 2 * L * 2 * nblk * BLOCK * HEADS * HEAD, "ms": round(statistics.median(times) * 1e3, 3),
               "save_kv_layer_host_us_p50": round(statistics.median(hosts) * 1e6, 1),
               # the split: the producer's worker and scheduler calls (first save_kv_layer .. request_finished),
               # this benchmark's own hand-over of kv_transfer_params through its parent process (two pipe
               # messages; a proxy does this in a deployment), the consumer's calls (scheduler .. get_finished)
               "producer_ms": round(statistics.median(prods) * 1e3, 3),
               "relay_ms": round(statistics.median(relays) * 1e3, 3),
               "consumer_ms": round(statistics.median(conss) * 1e3, 3)}
        # the connector's own time; the relay is the proxy's in a deployment, timed on its own
        row["adapter_ms"] = round(row["producer_ms"] + row["consumer_ms"], 3)
        if a.mode == "read":  # P2PKV_READ_COPY=segments: one segment per block run instead of the fused copy
            row["read_copy"] = os.environ.get("P2PKV_READ_COPY") or "fused"
        if events:
            row["steps"] = {**_trace.breakdown(events, STEPS), **_trace.breakdown(events, DONE_STEPS)}
            _print_steps(tok, row["steps"])
        rows.append(row)
        print(json.dumps(row), flush=True)
    p_conn.send(None)
    c_conn.send(None)
    for p in procs:
        p.join(30)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
