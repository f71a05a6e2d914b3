#!/usr/bin/env bash
# Disaggregated prefill/decode with vLLM + p2pkv on one host.
#   bash examples/launch_disagg.sh 1p1d    # one prefill GPU, one decode GPU
#   bash examples/launch_disagg.sh 2p2d    # two of each (needs 4 GPUs)
# Across hosts: run each vllm command on its own host with "host" set to that
# host's reachable address, and point the proxy at http://HOST:PORT,HOST:P2PKV_PORT.
# The proxy listens on 127.0.0.1 unless PROXY_HOST says otherwise (PROXY_HOST=0.0.0.0
# exposes it); its instances are static, so no registration token is needed.
set -euo pipefail
MODEL=${MODEL:-meta-llama/Llama-3.1-8B-Instruct}
MODE=${MODE:-push}            # push (layer-wise streaming) or pull
HOST=${HOST:-127.0.0.1}
PROXY_HOST=${PROXY_HOST:-127.0.0.1}
export NCCL_NVLS_ENABLE=0
layout=${1:-1p1d}
case "$layout" in
  1p1d) NP=1; ND=1 ;;
  2p2d) NP=2; ND=2 ;;
  *) echo "usage: $0 1p1d|2p2d" >&2; exit 2 ;;
esac

kvcfg() {  # role, p2pkv base port
  printf '{"kv_connector":"P2pkvConnector","kv_connector_module_path":"p2pkv.adapters.vllm","kv_role":"%s","kv_connector_extra_config":{"host":"0.0.0.0","advertise_host":"%s","port":%d,"mode":"%s","timeout_s":30}}' \
    "$1" "$HOST" "$2" "$MODE"
}

gpu=0; pids=(); proxy_args=()
for i in $(seq 0 $((NP - 1))); do
  http=$((8100 + i)); p2p=$((14500 + 10 * i))
  CUDA_VISIBLE_DEVICES=$gpu vllm serve "$MODEL" --port $http --kv-transfer-config "$(kvcfg kv_producer $p2p)" &
  pids+=($!); proxy_args+=(--prefill "http://$HOST:$http,$HOST:$p2p"); gpu=$((gpu + 1))
done
for i in $(seq 0 $((ND - 1))); do
  http=$((8200 + i)); p2p=$((14600 + 10 * i))
  CUDA_VISIBLE_DEVICES=$gpu vllm serve "$MODEL" --port $http --kv-transfer-config "$(kvcfg kv_consumer $p2p)" &
  pids+=($!); proxy_args+=(--decode "http://$HOST:$http,$HOST:$p2p"); gpu=$((gpu + 1))
done
trap 'kill "${pids[@]}" 2>/dev/null' EXIT
python -m p2pkv.proxy --host "$PROXY_HOST" --port 8000 "${proxy_args[@]}"
