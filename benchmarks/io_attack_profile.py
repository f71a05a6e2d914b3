"""What an honest push costs while a peer attacks the engine, and where the engine's I/O thread
spends its time meanwhile (issue 20: "honest traffic stays within 2x its normal latency").

    python benchmarks/io_attack_profile.py endless [--profile] [--seconds 6]
    python benchmarks/io_attack_profile.py offers  [--profile] [--seconds 6] [--sessions 1]
    python benchmarks/io_attack_profile.py offers --decoy   (the attack aimed at another engine)

The victim engine, the honest sender and the attacker each run in a process of their own, on
loopback (as they would in production: an attacker in the honest sender's process would take
its GIL and inflate the figure). ``endless``: two raw ZMTP connections stream 1 MiB frames of
one message that never ends, and reconnect as soon as they are cut off (item 13). ``offers``:
``--sessions`` raw sessions (1 unless told) stream offers of 2,048 tensors as fast as the engine
takes them (item 7). Prints the honest push median (and p90) before and during the attack, what
the attacker got done and, with ``--profile``, the top of a cProfile of the victim's I/O thread
during the attack. Numbers depend on the machine's load: run before and after a change on the
same box, one right after the other.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from p2pkv import Engine, TransferKey  # noqa: E402
from p2pkv.control.messages import encode  # noqa: E402

_VICTIM = r"""
import cProfile, io, pstats, sys, threading
import p2pkv.engine as pe
from p2pkv import Engine
prof = cProfile.Profile() if sys.argv[1] == "1" else None
orig = pe.io_main
def io_main(wref):
    if prof is None:
        return orig(wref)
    go.wait()
    prof.enable()
    try:
        return orig(wref)
    finally:
        prof.disable()
go = threading.Event()
pe.io_main = io_main
tok = sys.argv[2]
e = Engine(timeout_s=10.0, peer_timeout_s=3.0, heartbeat_s=0.5, ttl_s=60.0, pool_bytes=16 * 2**20,
           max_message_bytes=2**20, auth_token=tok)
go.set()
print(e.address, flush=True)
sys.stdin.readline()
st = e.stats()
e.close()
print("STATS", {k: st.get(k) for k in ("connections_overbuffered", "offers_refused", "offers_over_budget",
                                        "requests_failed_rx", "protocol_errors", "sessions_lost")}, flush=True)
if prof is not None:
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(22)
    print(s.getvalue(), flush=True)
"""

TOKEN = "bench-token"
K = TransferKey


def _push_ms(sender: Engine, address: str, tag: str, n: int) -> tuple[float, float]:
    t = torch.arange(256, dtype=torch.float32)
    sender.send(address, K(f"{tag}-warm", "0"), t, timeout=10).wait(10)
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        sender.send(address, K(f"{tag}-{i}", "0"), t, timeout=10).wait(10)
        times.append(time.perf_counter() - t0)
        time.sleep(0.02)
    times.sort()
    return 1000 * times[len(times) // 2], 1000 * times[int(len(times) * 0.9)]


def _endless(address: str, stop: threading.Event, done: dict) -> None:
    from tests.test_hostile2 import Zmtp

    frame = b"\7" * 2**20
    while not stop.is_set():
        try:
            z = Zmtp(address, token=TOKEN)
            z.hello(TOKEN)
        except (OSError, AssertionError):
            time.sleep(0.05)
            continue
        try:
            while not stop.is_set():
                z.send(frame, more=True)
                done["bytes"] = done.get("bytes", 0) + len(frame)
        except OSError:
            done["cut"] = done.get("cut", 0) + 1
        finally:
            z.close()


def _offers(address: str, stop: threading.Event, done: dict) -> None:
    import msgpack
    import zmq

    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.ROUTING_ID, os.urandom(16))
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.PLAIN_USERNAME, b"p2pkv")
    s.setsockopt(zmq.PLAIN_PASSWORD, TOKEN.encode())
    s.connect(f"tcp://{address}")
    s.send(encode("hello", eid="raw", host="h", pid=1, dev="cpu", caps={}, tok=TOKEN))
    if not s.poll(5000):
        done["refused"] = done.get("refused", 0) + 1
        return
    hok = s.recv_multipart()
    if msgpack.unpackb(hok[0]).get("t") != "hok":
        done["refused"] = done.get("refused", 0) + 1
        s.close(0)
        ctx.term()
        return
    items = [[f"t{i}", "uint8", [4], 4] for i in range(2048)]
    tag = os.urandom(4).hex()
    seq = 0
    while not stop.is_set():
        seq += 1
        try:
            s.send(encode("offer", seq=seq, tid=f"o-{tag}-{seq}", items=items, x="tcp", to=5.0), zmq.NOBLOCK)
            s.send(encode("oabort", seq=seq, msg="given up"), zmq.NOBLOCK)
            done["offers"] = done.get("offers", 0) + 1
        except zmq.Again:
            time.sleep(0.001)
        while s.poll(0):
            s.recv_multipart()
    s.close(0)
    ctx.term()


def _attacker(attack: str, address: str, n: int) -> None:
    """The attacker's own process: attack until a line comes on stdin, then print what it got done."""
    import json

    stop, done = threading.Event(), {}
    fn = _endless if attack == "endless" else _offers
    threads = [threading.Thread(target=fn, args=(address, stop, done), daemon=True) for _ in range(n)]
    for th in threads:
        th.start()
    sys.stdin.readline()
    stop.set()
    for th in threads:
        th.join(10)
    print(json.dumps(done), flush=True)


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--attacker":
        return _attacker(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    ap = argparse.ArgumentParser()
    ap.add_argument("attack", choices=("endless", "offers"))
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("-n", type=int, default=40)
    ap.add_argument("--sessions", type=int, default=0,
                    help="attacker connections (default: 2 for endless, 1 for offers)")
    ap.add_argument("--decoy", action="store_true",
                    help="the attacker attacks a second engine (in its own process) instead of the honest "
                         "sender's receiver: what the attack costs the honest push through the machine's load alone")
    args = ap.parse_args()
    victim = subprocess.Popen([sys.executable, "-c", _VICTIM, "1" if args.profile else "0", TOKEN],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    address = victim.stdout.readline().strip()
    decoy = None
    target = address
    if args.decoy:
        decoy = subprocess.Popen([sys.executable, "-c", _VICTIM, "0", TOKEN], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
        assert decoy.stdout is not None
        target = decoy.stdout.readline().strip()
    with Engine(timeout_s=10.0, auth_token=TOKEN) as honest:
        base = _push_ms(honest, address, "base", args.n)
        n = args.sessions or (2 if args.attack == "endless" else 1)
        attacker = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--attacker", args.attack, target,
                                     str(n)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                    cwd=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
        time.sleep(0.5)
        t0 = time.monotonic()
        attacked = _push_ms(honest, address, "attacked", args.n)
        while time.monotonic() - t0 < args.seconds:
            time.sleep(0.1)
        assert attacker.stdin is not None and attacker.stdout is not None
        attacker.stdin.write("\n")
        attacker.stdin.flush()
        done = attacker.stdout.read().strip()
        attacker.wait(30)
        after = _push_ms(honest, address, "after", 10)
    victim.stdin.write("\n")
    victim.stdin.flush()
    out = victim.stdout.read()
    victim.wait(30)
    if decoy is not None:
        assert decoy.stdin is not None and decoy.stdout is not None
        decoy.stdin.write("\n")
        decoy.stdin.flush()
        out += "decoy " + decoy.stdout.read()
        decoy.wait(30)
    print(f"{args.attack}: honest push median/p90 {base[0]:.2f}/{base[1]:.2f} ms before, "
          f"{attacked[0]:.2f}/{attacked[1]:.2f} ms during the attack, {after[0]:.2f} ms after; "
          f"attacker ({n} connections{', at a decoy' if args.decoy else ''}): {done}; "
          f"load {os.getloadavg()[0]:.1f}")
    print(out)


if __name__ == "__main__":
    main()
