#!/usr/bin/env bash
# ctest entry netns_cluster: the cluster across real network stacks. Creates three network
# namespaces (coordinator, w1, w2); a bridge inside the coordinator's namespace joins veth links
# to w1 and w2 on 10.77.0.0/24 (coordinator 10.77.0.1, w1 10.77.0.2, w2 10.77.0.3). Runs
# `moepool worker` in w1 (experts 0-3) and w2 (experts 4-7) and `moepool eval --workers` in the
# coordinator's namespace; its logits must equal a local `moepool eval` byte for byte. Then the
# same with a split that has replicas: w1 holds experts 0-5 and w2 experts 2-7 (2-5 on both).
# Then the elastic cluster: `serve --cluster-listen` in the coordinator's namespace and two
# `worker --join` with empty caches, one per worker namespace; the same completion as alone.
# Only the namespaces and links it creates are touched; all are removed on exit, even on failure.
# Not root, or `ip netns add` fails: skipped (exit 77), except as root under CI=true (failure).
# Needs MOEPOOL_BINARY and MOEPOOL_SOURCE_DIR (set by tests/CMakeLists.txt).
set -euo pipefail
: "${MOEPOOL_BINARY:?}" "${MOEPOOL_SOURCE_DIR:?}"
export MOEPOOL_CLUSTER_TOKEN=netns-test

skip() {
  if [ "${CI:-}" = "true" ] && [ "$(id -u)" = 0 ]; then
    echo "netns_cluster: $* (a failure under CI=true as root)" >&2
    exit 1
  fi
  echo "netns_cluster: skipped, $*"
  exit 77
}
[ "$(id -u)" = 0 ] || skip "needs root for ip netns"
command -v ip >/dev/null 2>&1 || skip "no ip command (iproute2)"

suffix="$$"
ns_coord="mp-coord-$suffix"
ns_w1="mp-w1-$suffix"
ns_w2="mp-w2-$suffix"
created=()
pids=()
tmp="$(mktemp -d)"
cleanup() {
  local p ns
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  for ns in "${created[@]}"; do
    # Anything still running inside a namespace this script created is this script's.
    for p in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || true
  done
  rm -rf "$tmp"
}
trap cleanup EXIT

fail() {
  echo "netns_cluster: $*" >&2
  for f in "$tmp"/*.log; do [ -f "$f" ] && { echo "== $f" >&2; tail -20 "$f" >&2; }; done
  exit 1
}

if ! ip netns add "$ns_coord" 2>"$tmp/netns.log"; then
  skip "ip netns add failed: $(cat "$tmp/netns.log")"
fi
created+=("$ns_coord")
for ns in "$ns_w1" "$ns_w2"; do
  ip netns add "$ns" || fail "ip netns add $ns failed"
  created+=("$ns")
done

# Links are created directly inside the namespaces: nothing appears in the caller's namespace.
ip -n "$ns_coord" link add br0 type bridge
ip -n "$ns_coord" addr add 10.77.0.1/24 dev br0
ip -n "$ns_coord" link set br0 up
ip -n "$ns_coord" link set lo up
i=2
for ns in "$ns_w1" "$ns_w2"; do
  ip link add name eth0 netns "$ns" type veth peer name "to-w$((i - 1))" netns "$ns_coord"
  ip -n "$ns_coord" link set "to-w$((i - 1))" master br0
  ip -n "$ns_coord" link set "to-w$((i - 1))" up
  ip -n "$ns" addr add "10.77.0.$i/24" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$ns" link set lo up
  i=$((i + 1))
done

model="$MOEPOOL_SOURCE_DIR/../shared/testdata/conformance/tiny-F16.gguf"
if [ ! -f "$model" ]; then
  model="$tmp/tiny.gguf"
  timeout 120 "$MOEPOOL_BINARY" synth --shape tiny --type Q4_K_M --out "$model" \
    --vocab "$MOEPOOL_SOURCE_DIR/deploy/vocab/mistral-vocab.gguf" 2>"$tmp/synth.log" ||
    fail "synth failed"
fi

start_worker() {  # namespace address:port experts name
  ip netns exec "$1" timeout 300 "$MOEPOOL_BINARY" worker --model "$model" --experts "$3" \
    --listen "$2" --threads 1 >"$tmp/$4.out" 2>"$tmp/$4.log" &
  pids+=($!)
}
start_worker "$ns_w1" 10.77.0.2:7070 0-3 w1
start_worker "$ns_w2" 10.77.0.3:7070 4-7 w2
start_worker "$ns_w1" 10.77.0.2:7071 0-5 w1-replicas
start_worker "$ns_w2" 10.77.0.3:7071 2-7 w2-replicas
for w in w1:7070 w2:7070 w1-replicas:7071 w2-replicas:7071; do
  name="${w%%:*}" port="${w##*:}"
  for _ in $(seq 600); do
    grep -q ":$port\$" "$tmp/$name.out" 2>/dev/null && break
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null || fail "worker $name exited"; done
    sleep 0.1
  done
  grep -q ":$port\$" "$tmp/$name.out" || fail "worker $name did not start"
done

prompt="The quick brown fox jumps over the lazy dog"
timeout 120 "$MOEPOOL_BINARY" eval --threads 2 --model "$model" --prompt "$prompt" \
  --logits-out "$tmp/local.f32" >"$tmp/eval-local.log" 2>&1 || fail "local eval failed"
timeout 120 ip netns exec "$ns_coord" "$MOEPOOL_BINARY" eval --threads 2 --model "$model" \
  --prompt "$prompt" --logits-out "$tmp/cluster.f32" --wire-dtype f32 \
  --workers 10.77.0.2:7070,10.77.0.3:7070 >"$tmp/eval-cluster.log" 2>&1 ||
  fail "eval in $ns_coord against the namespaced workers failed"
[ -s "$tmp/local.f32" ] || fail "local eval wrote no logits"
cmp "$tmp/local.f32" "$tmp/cluster.f32" || fail "logits across namespaces differ from local"
timeout 120 ip netns exec "$ns_coord" "$MOEPOOL_BINARY" eval --threads 2 --model "$model" \
  --prompt "$prompt" --logits-out "$tmp/replicas.f32" --wire-dtype f32 \
  --workers 10.77.0.2:7071,10.77.0.3:7071 >"$tmp/eval-replicas.log" 2>&1 ||
  fail "eval against the split with replicas failed"
cmp "$tmp/local.f32" "$tmp/replicas.f32" || fail "logits with replicated experts differ from local"
echo "netns_cluster: logits across three network namespaces match local (plain split and replicas)"

# The elastic cluster across the namespaces: `serve --cluster-listen` in the coordinator's
# namespace holds the only model file; workers in w1 and w2 join with empty caches (the token
# from MOEPOOL_CLUSTER_TOKEN). Greedy completions equal the coordinator alone before and after.
complete() {  # HTTP POST /v1/completions from the coordinator's namespace; prints the text
  ip netns exec "$ns_coord" timeout 60 bash -c '
    body="{\"prompt\": \"$1\", \"max_tokens\": 8, \"temperature\": 0}"
    exec 3<>/dev/tcp/10.77.0.1/8080
    printf "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" "${#body}" "$body" >&3
    cat <&3' _ "$1" | tr -d '\r' | grep -o '"text":"[^"]*"' | head -1
}
ip netns exec "$ns_coord" timeout 300 "$MOEPOOL_BINARY" serve --model "$model" --threads 1 \
  --listen 10.77.0.1:8080 --cluster-listen 10.77.0.1:7100 >"$tmp/serve.out" 2>"$tmp/serve.log" &
pids+=($!)
for _ in $(seq 600); do grep -q "serving on" "$tmp/serve.out" 2>/dev/null && break; sleep 0.1; done
grep -q "serving on" "$tmp/serve.out" || fail "serve --cluster-listen did not start"
alone="$(complete "$prompt")"
[ -n "$alone" ] || fail "no completion from the coordinator alone"
i=1
for ns in "$ns_w1" "$ns_w2"; do
  ip netns exec "$ns" timeout 300 "$MOEPOOL_BINARY" worker --join 10.77.0.1:7100 \
    --listen "10.77.0.$((i + 1)):7072" --cache-dir "$tmp/cache-w$i" --threads 1 --memory 1GiB \
    >"$tmp/join-w$i.out" 2>"$tmp/join-w$i.log" &
  pids+=($!)
  for _ in $(seq 600); do grep -q "ready as" "$tmp/join-w$i.out" 2>/dev/null && break; sleep 0.1; done
  grep -q "ready as" "$tmp/join-w$i.out" || fail "worker in $ns did not join"
  i=$((i + 1))
done
joined="$(complete "$prompt")"
[ "$joined" = "$alone" ] || fail "completion with joined workers ($joined) differs from alone ($alone)"
ls "$tmp"/cache-w1/*.gguf "$tmp"/cache-w2/*.gguf >/dev/null || fail "no shard files in the caches"
grep -q "fetching -> ready" "$tmp/serve.log" || fail "the coordinator logged no ready worker"
echo "netns_cluster: two workers joined across namespaces with no model file; same completion"
