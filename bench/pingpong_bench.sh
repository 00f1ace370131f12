#!/usr/bin/env bash
# Ping-pong micro-batches through the slow-link proxy: two `moepool worker` processes (experts
# 0-3 and 4-7), each behind a moepool_slowlink proxy, and `moepool bench --sequences N` decoding
# N sequences at once with 1 and then 2 micro-batches, alternating, ROUNDS times. Prints one line
# per run: micro-batches, decode tokens/s (all sequences) and the coordinator idle ratio (time the
# forward thread was blocked waiting for the workers / decode wall time).
#
#   bench/pingpong_bench.sh MODEL [DELAY_US] [RATE_MBIT] [SEQUENCES] [ROUNDS]
#
# Needs MOEPOOL_BINARY and MOEPOOL_SLOWLINK (default: build/cli/moepool,
# build/bench/moepool_slowlink). THREADS (coordinator, default 1), DECODE (tokens per sequence,
# default 32) and WORKER_THREADS (default 1) may be set in the environment. With SERVE=1 each run
# is instead bench/serve_bench.py against `moepool serve --micro-batches 1|2` with SEQUENCES
# concurrent streams of DECODE tokens (aggregate tokens/s and the idle ratio from /metrics).
# With PIN=1 (Linux, taskset) the coordinator runs on CPU 0 and the workers and proxies on CPU
# 1, so that on a 2-core machine the coordinator does not compete with them for a core.
set -euo pipefail
model="${1:?usage: pingpong_bench.sh MODEL [DELAY_US] [RATE_MBIT] [SEQUENCES] [ROUNDS]}"
delay="${2:-100}"
rate="${3:-1000}"
seqs="${4:-8}"
rounds="${5:-3}"
bin="${MOEPOOL_BINARY:-build/cli/moepool}"
slowlink="${MOEPOOL_SLOWLINK:-build/bench/moepool_slowlink}"
threads="${THREADS:-1}"
decode="${DECODE:-32}"
worker_threads="${WORKER_THREADS:-1}"
export MOEPOOL_CLUSTER_TOKEN=pingpong-bench
tmp="$(mktemp -d)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT

# Waits (at most 120 s) for a first line of $1 ending in HOST:PORT; prints the port.
wait_port() {
  local line
  for _ in $(seq 1200); do
    line=""
    [ "$(wc -l <"$1" 2>/dev/null || echo 0)" -ge 1 ] && line="$(head -n1 "$1")"
    if [[ "$line" =~ :([0-9]+)$ ]]; then
      echo "${BASH_REMATCH[1]}"
      return 0
    fi
    sleep 0.1
  done
  echo "no address line in $1" >&2
  exit 1
}

coord=()
side=()
if [ "${PIN:-0}" = 1 ]; then
  coord=(taskset -c 0)
  side=(taskset -c 1)
fi
ports=()
for experts in 0-3 4-7; do
  "${side[@]}" "$bin" worker --model "$model" --experts "$experts" --listen 127.0.0.1:0 \
    --threads "$worker_threads" >"$tmp/w$experts.out" 2>"$tmp/w$experts.log" &
  pids+=($!)
  wport="$(wait_port "$tmp/w$experts.out")"
  "${side[@]}" "$slowlink" --listen 127.0.0.1:0 --target "127.0.0.1:$wport" --delay-us "$delay" \
    --rate-mbit "$rate" >"$tmp/p$experts.out" 2>"$tmp/p$experts.log" &
  pids+=($!)
  ports+=("$(wait_port "$tmp/p$experts.out")")
done
workers="127.0.0.1:${ports[0]},127.0.0.1:${ports[1]}"
echo "model $model, proxies ${delay} us one-way, ${rate} Mbit/s, ${seqs} sequences x ${decode} tokens"
here="$(cd "$(dirname "$0")" && pwd)"
for r in $(seq "$rounds"); do
  for mb in 1 2; do
    if [ "${SERVE:-0}" = 1 ]; then
      "${coord[@]}" python3 "$here/serve_bench.py" --binary "$bin" --model "$model" --workers "$workers" \
        --streams "$seqs" --max-tokens "$decode" --threads "$threads" --micro-batches "$mb" |
        python3 -c 'import json,sys; j=json.load(sys.stdin); l=list(j["levels"].values())[0]; print("round %s serve micro-batches %s: %.1f tokens/s, idle %.2f, ttft p50 %.0f ms" % (sys.argv[1], j["micro_batches"], l["aggregate_tokens_per_s"], l["coordinator_idle_ratio"], l["ttft_ms_p50"]))' "$r"
      continue
    fi
    "${coord[@]}" "$bin" bench --model "$model" --threads "$threads" --workers "$workers" --json \
      --prompt-tokens 8 --decode-tokens "$decode" --sequences "$seqs" --micro-batches "$mb" \
      --pings 10 2>"$tmp/bench.log" |
      python3 -c 'import json,sys; j=json.load(sys.stdin); print("round %s micro-batches %d: %.1f tokens/s, idle %.2f" % (sys.argv[1], j["decode_micro_batches"], j["decode_tokens_per_s"], j["decode_coordinator_idle_ratio"]))' "$r"
  done
done
