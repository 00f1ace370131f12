#!/usr/bin/env bash
# ctest entry slow_link: two real `moepool worker` processes, each behind a moepool_slowlink proxy
# (100 us one-way delay, 1000 Mbit/s). `moepool eval --workers PROXY1,PROXY2` must write logits
# byte-identical to a local `moepool eval` (f32 wire), and a greedy `moepool run` through the
# proxies must give the local tokens. Nothing here measures time.
# Needs MOEPOOL_BINARY, MOEPOOL_SLOWLINK and MOEPOOL_SOURCE_DIR (set by tests/CMakeLists.txt).
set -euo pipefail
: "${MOEPOOL_BINARY:?}" "${MOEPOOL_SLOWLINK:?}" "${MOEPOOL_SOURCE_DIR:?}"
export MOEPOOL_CLUSTER_TOKEN=slowlink-test
tmp="$(mktemp -d)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT

fail() {
  echo "slow_link: $*" >&2
  for f in "$tmp"/*.log; do [ -f "$f" ] && { echo "== $f" >&2; tail -20 "$f" >&2; }; done
  exit 1
}

# Waits (at most 60 s) for a complete first line of $1 ending in HOST:PORT; prints the port.
wait_port() {
  local line
  for _ in $(seq 600); do
    line=""
    [ "$(wc -l <"$1" 2>/dev/null || echo 0)" -ge 1 ] && line="$(head -n1 "$1")"
    if [[ "$line" =~ :([0-9]+)$ ]]; then
      echo "${BASH_REMATCH[1]}"
      return 0
    fi
    sleep 0.1
  done
  fail "no address line in $1"
}

model="$tmp/tiny.gguf"
timeout 120 "$MOEPOOL_BINARY" synth --shape tiny --type Q4_K_M --out "$model" \
  --vocab "$MOEPOOL_SOURCE_DIR/deploy/vocab/mistral-vocab.gguf" 2>"$tmp/synth.log" ||
  fail "synth failed"

start_worker() {  # name experts
  "$MOEPOOL_BINARY" worker --model "$model" --experts "$2" --listen 127.0.0.1:0 --threads 1 \
    >"$tmp/$1.out" 2>"$tmp/$1.log" &
  pids+=($!)
}
start_proxy() {  # name target_port
  "$MOEPOOL_SLOWLINK" --listen 127.0.0.1:0 --target "127.0.0.1:$2" --delay-us 100 \
    --rate-mbit 1000 >"$tmp/$1.out" 2>"$tmp/$1.log" &
  pids+=($!)
}
start_worker w1 0-3
start_worker w2 4-7
p1="$(wait_port "$tmp/w1.out")"
p2="$(wait_port "$tmp/w2.out")"
start_proxy s1 "$p1"
start_proxy s2 "$p2"
s1="$(wait_port "$tmp/s1.out")"
s2="$(wait_port "$tmp/s2.out")"
workers="127.0.0.1:$s1,127.0.0.1:$s2"

prompt="The quick brown fox jumps over the lazy dog"
timeout 120 "$MOEPOOL_BINARY" eval --threads 2 --model "$model" --prompt "$prompt" \
  --logits-out "$tmp/local.f32" >"$tmp/eval-local.log" 2>&1 || fail "local eval failed"
timeout 120 "$MOEPOOL_BINARY" eval --threads 2 --model "$model" --prompt "$prompt" \
  --logits-out "$tmp/cluster.f32" --wire-dtype f32 --workers "$workers" \
  >"$tmp/eval-cluster.log" 2>&1 || fail "eval through the proxies failed"
[ -s "$tmp/local.f32" ] || fail "local eval wrote no logits"
cmp "$tmp/local.f32" "$tmp/cluster.f32" || fail "logits through the proxies differ from local"

run_args=(run --threads 2 --model "$model" --prompt "Once upon a time" --n 16 --temperature 0
  --ignore-eos --json)
timeout 120 "$MOEPOOL_BINARY" "${run_args[@]}" >"$tmp/run-local.json" 2>"$tmp/run-local.log" ||
  fail "local run failed"
timeout 120 "$MOEPOOL_BINARY" "${run_args[@]}" --workers "$workers" >"$tmp/run-cluster.json" \
  2>"$tmp/run-cluster.log" || fail "decode through the proxies failed"
grep -q '"tokens":\[' "$tmp/run-local.json" || fail "local run printed no tokens"
cmp "$tmp/run-local.json" "$tmp/run-cluster.json" || fail "decoded tokens differ from local"
echo "slow_link: logits and decoded tokens through the proxies match local"
