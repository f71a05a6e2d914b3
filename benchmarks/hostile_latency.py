"""Honest latency during the hostile-peer attacks (issue 20: "honest traffic stays within 2x its normal
latency during each attack").

The attacks are the ones in ``tests/test_hostile2.py`` (one source of truth for what an attacker
does); the tests assert behaviour only (every honest push is delivered within its deadline). This
runs them ``--runs`` times and reports, per attack, the honest push's median latency before and
during the attack, as the tests print it::

    python benchmarks/hostile_latency.py [--runs 3] [-k "item7 or item11 or item13"]

The machine's load matters: say it (``uptime``) next to the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINE = re.compile(r"^(?P<what>[^:\n]+): honest push median (?P<base>[\d.]+) ms, (?P<att>[\d.]+) ms under attack",
                  re.M)
ITEM13 = re.compile(r"item 13: .*honest push (?P<base>[\d.]+) -> (?P<att>[\d.]+) ms")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("-k", default="item7 or item11 or item13", help="pytest -k expression (tests/test_hostile2.py)")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    if a.runs < 1:
        ap.error("--runs must be >= 1")
    seen: dict[str, list[tuple[float, float]]] = {}
    for _ in range(a.runs):
        p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "-k", a.k,
                            "tests/test_hostile2.py"], cwd=ROOT, capture_output=True, text=True, timeout=1800)
        out = p.stdout + p.stderr
        if p.returncode not in (0, 1):
            print(out[-3000:], file=sys.stderr)
            return 1
        for m in LINE.finditer(out):
            seen.setdefault(m["what"].strip().split()[-2] + " " + m["what"].strip().split()[-1], []).append(
                (float(m["base"]), float(m["att"])))
        for m in ITEM13.finditer(out):
            seen.setdefault("item 13", []).append((float(m["base"]), float(m["att"])))
    load = os.getloadavg()
    rows = []
    for what, pairs in sorted(seen.items()):
        base = statistics.median(b for b, _ in pairs)
        att = statistics.median(x for _, x in pairs)
        rows.append({"attack": what, "runs": len(pairs), "honest_ms": round(base, 2),
                     "under_attack_ms": round(att, 2), "ratio": round(att / max(base, 1e-3), 2)})
        print(json.dumps(rows[-1]))
    print(f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on {os.cpu_count()} CPUs")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"rows": rows, "loadavg": load, "cpus": os.cpu_count()}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
