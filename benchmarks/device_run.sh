#!/usr/bin/env bash
# One device run (nvidia-h200): the whole-request benchmark, then the GPU tests; logs to $OUT.
. benchmarks/device_setup.sh || exit 3
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
P2PKV_TRACE=1 timeout "${BENCH_S:-300}" python3 -m p2pkv.bench.request --tokens "${TOKENS:-512,2048,10000}" \
  --transports ipc --devices cuda:0,cuda:0 --paths "${PATHS:-request,request-recv}" --gaps 200 --reps "${REPS:-6}" \
  --out "$OUT/request.json" > "$OUT/request.log" 2>&1
echo "bench rc=$?"
grep -v '^\.\.' "$OUT/request.log" | grep -v "^    " | cut -c1-400
if [ -n "${ADAPTER:-}" ]; then
  for m in $ADAPTER; do
    timeout 150 python3 benchmarks/adapter_request.py --tokens "${TOKENS:-512,2048,10000}" --devices cuda:0,cuda:0 \
      --mode "$m" --reps "${REPS:-6}" --out "$OUT/adapter-$m.json" > "$OUT/adapter-$m.log" 2>&1
    echo "adapter $m rc=$?"; grep '"what"' "$OUT/adapter-$m.log" | cut -c1-300; tail -3 "$OUT/adapter-$m.log" | grep -i error
  done
fi
if [ -n "${RECV:-}" ]; then timeout 200 python3 -m p2pkv.bench.recv > "$OUT/recv.log" 2>&1; grep -v warn "$OUT/recv.log" | tail -4; fi
if [ -n "${TESTS:-}" ]; then
  timeout "${TEST_S:-280}" python3 -m pytest -q -m gpu -p no:cacheprovider $TESTS > "$OUT/gpu_tests.log" 2>&1
  echo "tests rc=$?"
  tail -40 "$OUT/gpu_tests.log"
fi
