#!/usr/bin/env bash
# Builds Containerfile.cpu and Containerfile.cuda with podman where no base image can be pulled,
# and runs what the README tells operators to run. Not in CI (minutes, root, podman).
#
#   base      build-rootfs.sh --base-only (Debian 12 from the mirror, trimmed like
#             debian:12-slim), imported as localhost/moepool-test/debian:12-slim and passed as
#             RUNTIME_IMAGE
#   cpu       Containerfile.cpu --target prebuilt (the `base` stage verbatim + build/cli/moepool;
#             the `build` stage, which compiles, is skipped): image config (user, health check,
#             ports), `moepool synth` finding the vocabulary, then a coordinator (serve
#             --cluster-listen, API key and cluster token as podman secrets) and a joining worker
#             (--read-only, the token in a mounted directory, shard cache on a named volume) in
#             two containers; /health, /v1/cluster, a chat
#             completion with and without the key, `podman healthcheck run` on both, SIGTERM.
#   cuda      Containerfile.cuda --target prebuilt with CUDA_IMAGE = a stand-in made here with
#             the nvidia/cuda image's layout (/usr/local/cuda -> /etc/alternatives/cuda ->
#             /usr/local/cuda-13.0, NCCL in /usr/lib/x86_64-linux-gnu, nccl.h in /usr/include)
#             from this machine's toolkit: NCCL found by ldconfig in the image, the NVIDIA_*
#             variables, --device cuda:0 reaching the CUDA runtime (no driver here), the demo
#             serving on the CPU; and the build stage's `COPY --from=cuda /usr/local/cuda/`
#             through those links. Skipped when there is no toolkit with NCCL here.
#   configure (with --configure) Containerfile.cpu's `build` stage on the stand-in base as
#             debian:12, up to CMake: deploy/install-deps.sh (Debian and npm packages) and the
#             configure step, with `ninja moepool` replaced by a check that the target exists
#             (the compile itself is not run: it takes long on a small machine). ~3 min, ~500 MB
#             of packages, a 2 GB build image (removed afterwards).
#
# usage: deploy/container/test-containerfiles.sh [--binary PATH] [--toolkit DIR] [--keep]
#            [--configure [--ca-file FILE]]
#   --binary PATH   the prebuilt binary (default build/cli/moepool; copied first); a CUDA build
#                   for the cuda part (a CPU-only build runs the cpu part only)
#   --toolkit DIR   CUDA toolkit with lib/libnccl.so.2 and include/nccl.h (default /usr/local/cuda)
#   --keep          keep the images, the base root file system and the work directory
#   --configure     also run the build stage up to CMake (see above)
#   --ca-file FILE  a CA bundle for npm in the build stage (NODE_EXTRA_CA_CERTS), for a network
#                   whose HTTPS goes through an intercepting proxy (e.g.
#                   /etc/ssl/certs/ca-certificates.crt of a host that trusts it); not baked in
# Exit status 0 when every check passed.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
binary=$root/build/cli/moepool
toolkit=/usr/local/cuda
keep=0
configure=0
ca_file=""
while [ $# -gt 0 ]; do
  case $1 in
    --binary) binary=$2; shift 2 ;;
    --toolkit) toolkit=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    --configure) configure=1; shift ;;
    --ca-file) ca_file=$(realpath "$2"); shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "test-containerfiles.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

log() { printf '[%s +%4ds] %s\n' "$(date +%H:%M:%S)" "$SECONDS" "$*"; }
die() { log "FAILED: $*"; exit 1; }
checks=0
ok() { checks=$((checks + 1)); log "ok: $*"; }

[ "$(id -u)" -eq 0 ] || die "needs root"
command -v podman >/dev/null || die "needs podman"
[ -f "$binary" ] || die "no binary at $binary"

tag=moepool-test-$$
work=$(mktemp -d /var/tmp/moepool-containerfiles.XXXXXX)
base_image=localhost/moepool-test/debian:12-slim
cuda_standin=localhost/moepool-test/cuda-standin:13.0
cpu_image=localhost/moepool:cpu-test
cuda_image=localhost/moepool:cuda-test
containers=()
secrets=()
volumes=()
eng=(podman)
opts=()
cleanup() {
  local rc=$?
  for c in "${containers[@]}"; do "${eng[@]}" rm -f -t 5 "$c" >/dev/null 2>&1 || true; done
  for s in "${secrets[@]}"; do podman secret rm "$s" >/dev/null 2>&1 || true; done
  for v in "${volumes[@]}"; do podman volume rm -f "$v" >/dev/null 2>&1 || true; done
  if [ "$keep" -eq 0 ]; then
    podman rmi -f "$cpu_image" "$cuda_image" "$cuda_standin" "$base_image" \
      localhost/moepool-test/copy-check localhost/moepool-test/debian:12 >/dev/null 2>&1 || true
    rm -rf --one-file-system "$work"
  else
    log "kept: $work, images $base_image $cpu_image $cuda_image"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

cp "$binary" "$work/moepool"
cuda_build=0
if "$work/moepool" worker --model /nonexistent.gguf --experts 0 --listen 127.0.0.1:0 --device cuda:0 2>&1 |
  grep -q "built without CUDA"; then
  log "binary: a CPU-only build (the cuda part is skipped)"
else
  cuda_build=1
  log "binary: a CUDA build"
fi

# --- a podman that runs containers here -------------------------------------------------------
log "== podman"
base_rootfs=$work/base-rootfs
if ! "$here/build-rootfs.sh" --base-only --out "$base_rootfs" >"$work/base.log" 2>&1; then
  tail -20 "$work/base.log"
  die "build-rootfs.sh --base-only"
fi
sed 's/^/    /' "$work/base.log"
tar --numeric-owner -C "$base_rootfs" --exclude=./dev/* --exclude=./proc/* --exclude=./sys/* \
  --exclude=./etc/moepool-rootfs -cf - . |
  podman import --change 'CMD ["bash"]' - "$base_image" >/dev/null
rm -rf --one-file-system "$base_rootfs"
log "base image $base_image: $(podman image inspect --format '{{.Size}}' "$base_image") bytes"
if ! podman run --rm "$base_image" true >"$work/probe.log" 2>&1; then
  log "podman run: $(grep -m1 -i error "$work/probe.log")"
  command -v runc >/dev/null || die "podman cannot run containers here (and no runc to try)"
  n=$(ulimit -Hn)
  eng=(podman --runtime runc)
  opts=(--ulimit "nofile=$n:$n" --ulimit nproc=4096:4096)
  "${eng[@]}" run --rm --no-healthcheck "${opts[@]}" "$base_image" true >"$work/probe.log" 2>&1 ||
    die "podman --runtime runc cannot run containers here: $(grep -m1 -i error "$work/probe.log")"
fi
log "containers run with: ${eng[*]} ${opts[*]}"

# --- the build context: what the Containerfiles copy, with the binary fixed -------------------
ctx=$work/context
mkdir -p "$ctx/build/cli" "$ctx/deploy"
(cd "$root" && git ls-files -z deploy | xargs -0 cp --parents -t "$ctx")
cp -r "$here" "$ctx/deploy/"
cp "$work/moepool" "$ctx/build/cli/moepool"
mkdir -p "$ctx/build/junk" && head -c 1M /dev/zero >"$ctx/build/junk/big" # the ignore file drops it

build() {  # containerfile image build-args...
  local file=$1 image=$2
  shift 2
  local t0=$SECONDS
  "${eng[@]}" build --format docker "${opts[@]}" --ignorefile "$ctx/deploy/container/containerignore" \
    -f "$ctx/deploy/container/$file" --target prebuilt "$@" -t "$image" "$ctx" >"$work/build-$file.log" 2>&1 ||
    { tail -30 "$work/build-$file.log"; die "podman build $file"; }
  grep -E 'STEP [0-9]|COMMIT' "$work/build-$file.log" | cut -c1-140 | sed 's/^/    /'
  ok "podman build -f $file --target prebuilt: $image, $(podman image inspect --format '{{.Size}}' "$image") bytes, $((SECONDS - t0)) s"
}

expect_config() {  # image
  local cfg
  cfg=$(podman image inspect --format '{{.Config.User}}|{{json .Config.Entrypoint}}|{{json .Config.ExposedPorts}}|{{json .Config.Healthcheck}}' "$1")
  log "config: $cfg"
  [[ $cfg == 10001:10001\|'["/usr/local/bin/moepool"]'\|* ]] || die "user or entrypoint"
  for p in 8080 9090 7070 7071; do [[ $cfg == *"\"$p/tcp\""* ]] || die "port $p not exposed"; done
  [[ $cfg == *moepool-healthcheck* ]] || die "no HEALTHCHECK in the image (built without --format docker?)"
  ok "image config: USER 10001:10001, ENTRYPOINT, EXPOSE 8080 9090 7070 7071, HEALTHCHECK"
  local missing
  missing=$("${eng[@]}" run --rm --no-healthcheck "${opts[@]}" --entrypoint ldd "$1" /usr/local/bin/moepool | grep "not found" || true)
  [ -z "$missing" ] || die "missing libraries: $missing"
  ok "ldd /usr/local/bin/moepool in the image: nothing missing"
}

wait_log() {  # container pattern seconds
  for _ in $(seq "$3"); do
    "${eng[@]}" logs "$1" 2>&1 | grep -q "$2" && return 0
    [ "$("${eng[@]}" inspect --format '{{.State.Running}}' "$1")" = true ] || break
    sleep 1
  done
  "${eng[@]}" logs "$1" 2>&1 | tail -20 | sed 's/^/    | /'
  die "$1 did not print '$2'"
}

free_port() {
  local p
  for _ in $(seq 50); do
    p=$((20000 + RANDOM % 20000))
    ss -ltnH "sport = :$p" | grep -q . || { echo "$p"; return; }
  done
  die "no free port"
}

# --- cpu ---------------------------------------------------------------------------------------
log "== Containerfile.cpu"
build Containerfile.cpu "$cpu_image" --build-arg "RUNTIME_IMAGE=$base_image"
expect_config "$cpu_image"

models=$work/models
mkdir -p "$models"
chown 10001:10001 "$models"
"${eng[@]}" run --rm --no-healthcheck "${opts[@]}" -v "$models:/models" "$cpu_image" synth --out /models/tiny.gguf \
  --shape tiny --type Q4_K_M 2>&1 | tail -1 | sed 's/^/    | /'
[ -f "$models/tiny.gguf" ] || die "moepool synth in the image"
ok "moepool synth (no --vocab) in the image found the vocabulary: $(stat -c %s "$models/tiny.gguf") bytes"

# Secrets as files: podman secrets, mounted read-only for uid 10001 under /run/secrets.
head -c 32 /dev/urandom | base64 >"$work/cluster-token"
key=sk-test-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
printf '# API keys, one per line\n%s\n' "$key" >"$work/api-keys"
podman secret create "$tag-cluster-token" "$work/cluster-token" >/dev/null && secrets+=("$tag-cluster-token")
podman secret create "$tag-api-keys" "$work/api-keys" >/dev/null && secrets+=("$tag-api-keys")
volumes+=("$tag-cache")
port=$(free_port)
coord=$tag-coordinator
worker=$tag-worker
containers+=("$coord" "$worker")
"${eng[@]}" run -d --name "$coord" "${opts[@]}" -p "127.0.0.1:$port:8080" \
  -v "$models:/models:ro" \
  --secret "$tag-cluster-token,target=cluster-token,uid=10001,gid=10001,mode=0400" \
  --secret "$tag-api-keys,target=api-keys,uid=10001,gid=10001,mode=0400" \
  "$cpu_image" serve --model /models/tiny.gguf --listen 0.0.0.0:8080 \
  --cluster-listen 0.0.0.0:9090 --cluster-token-file /run/secrets/cluster-token \
  --api-key-file /run/secrets/api-keys --threads 1 >/dev/null 2>>"$work/podman.log" ||
  { tail -5 "$work/podman.log"; die "podman run (coordinator)"; }
wait_log "$coord" "moepool: serving on" 120
# The worker: a read-only root file system, the token in a directory mounted on
# /etc/moepool/secrets (as the Kubernetes manifests do; a podman secret's mount point under /run
# cannot be made on a read-only root), the shard cache on a named volume. It shares the
# coordinator's network namespace (no DNS plugin here); across machines it is
# `--join COORDINATOR:9090` with --advertise.
mkdir -p "$work/secrets"
install -o 10001 -g 10001 -m 0400 "$work/cluster-token" "$work/secrets/cluster.token"
chown 10001:10001 "$work/secrets"
chmod 0500 "$work/secrets"
"${eng[@]}" run -d --name "$worker" "${opts[@]}" --read-only --network "container:$coord" \
  -v "$tag-cache:/var/cache/moepool" -v "$work/secrets:/etc/moepool/secrets:ro" \
  "$cpu_image" worker --join 127.0.0.1:9090 --listen 0.0.0.0:7070 --advertise 127.0.0.1:7070 --data-port 7071 \
  --cache-dir /var/cache/moepool --cluster-token-file /etc/moepool/secrets/cluster.token \
  --memory 1GiB --threads 1 >/dev/null 2>>"$work/podman.log" ||
  { tail -5 "$work/podman.log"; die "podman run (worker)"; }
wait_log "$worker" "serving" 120
"${eng[@]}" logs "$coord" 2>&1 | sed 's/^/    coordinator | /'
"${eng[@]}" logs "$worker" 2>&1 | sed 's/^/    worker      | /'
url=http://127.0.0.1:$port
ready=""
for _ in $(seq 60); do
  cluster=$(curl -fsS --max-time 5 -H "Authorization: Bearer $key" "$url/v1/cluster" || true)
  if [[ $cluster == *'"ready"'* ]]; then ready=1; break; fi
  sleep 1
done
log "GET /v1/cluster: ${cluster:0:400}"
[ -n "$ready" ] || die "the worker is not ready in /v1/cluster"
ok "the worker joined (token: the coordinator's from a podman secret, the worker's from a mounted directory) and is ready"
code=$(curl -s -o /dev/null -w '%{http_code}' "$url/v1/models")
[ "$code" = 401 ] || die "GET /v1/models without the key: $code, expected 401"
ok "GET /v1/models without the API key: 401"
body='{"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 16, "temperature": 0}'
reply=$(curl -fsS --max-time 120 "$url/v1/chat/completions" -H "Authorization: Bearer $key" \
  -H 'Content-Type: application/json' -d "$body") || die "POST /v1/chat/completions"
log "completion: ${reply:0:300}"
[[ $reply == *'"choices"'* ]] || die "no choices in the reply"
ok "POST /v1/chat/completions with the API key from /run/secrets/api-keys"
health=$(curl -fsS --max-time 5 "$url/health")
log "GET /health: ${health:0:300}"
[[ $health == *'"worker_id":"127.0.0.1:7070"'* ]] || die "the worker's id in /health is not its --advertise address"
ok "/health: the worker's id is its --advertise address"
ok "the worker ran with --read-only (read-only root file system, podman's tmpfs on /tmp)"
for c in "$coord" "$worker"; do
  "${eng[@]}" healthcheck run "$c" >/dev/null 2>&1 || die "podman healthcheck run $c"
  ok "podman healthcheck run ${c#"$tag"-}: $(podman inspect --format '{{.State.Health.Status}}' "$c") ($("${eng[@]}" exec "$c" /usr/local/bin/moepool-healthcheck))"
done
owner=$("${eng[@]}" exec "$worker" stat -c '%u:%g %a' /var/cache/moepool)
[[ $owner == 10001:10001* ]] || die "/var/cache/moepool on the named volume is $owner"
ok "named volume /var/cache/moepool owned by 10001:10001 ($owner), $("${eng[@]}" exec "$worker" du -sh /var/cache/moepool | cut -f1) of shards"
"${eng[@]}" exec "$coord" sh -c 'ls -l /run/secrets/' | sed 's/^/    /'
"${eng[@]}" stop -t 30 "$worker" >/dev/null 2>>"$work/podman.log"
"${eng[@]}" logs "$worker" 2>&1 | tail -2 | sed 's/^/    worker      | /'
[ "$("${eng[@]}" inspect --format '{{.State.ExitCode}}' "$worker")" = 0 ] || die "worker exit code"
ok "worker stopped by SIGTERM, exit 0"
reply=$(curl -fsS --max-time 120 "$url/v1/chat/completions" -H "Authorization: Bearer $key" \
  -H 'Content-Type: application/json' -d "$body") || die "completion after the worker left"
ok "a completion after the worker left (the coordinator computes its experts)"
"${eng[@]}" stop -t 30 "$coord" >/dev/null 2>>"$work/podman.log"
"${eng[@]}" logs "$coord" 2>&1 | tail -3 | sed 's/^/    coordinator | /'
[ "$("${eng[@]}" inspect --format '{{.State.ExitCode}}' "$coord")" = 0 ] || die "coordinator exit code"
ok "coordinator stopped by SIGTERM, exit 0"

# --- cuda --------------------------------------------------------------------------------------
nccl=$(readlink -f "$toolkit/lib/libnccl.so.2" 2>/dev/null || readlink -f "$toolkit/lib64/libnccl.so.2" 2>/dev/null || true)
if [ "$cuda_build" -eq 0 ] || [ -z "$nccl" ] || [ ! -f "$toolkit/include/nccl.h" ]; then
  log "== Containerfile.cuda: skipped (needs a CUDA build and $toolkit with libnccl.so.2 and nccl.h)"
else
  log "== Containerfile.cuda (CUDA_IMAGE: a stand-in with the nvidia/cuda layout, from $toolkit)"
  s=$work/cuda-standin
  mkdir -p "$s/usr/lib/x86_64-linux-gnu" "$s/usr/include" "$s/usr/local/cuda-13.0/bin" \
    "$s/usr/local/cuda-13.0/include" "$s/etc/alternatives"
  # libnccl.so.2 -> libnccl.so.2.MINOR.PATCH, as the libnccl2 package installs it
  nccl_version=$(awk '/define NCCL_(MINOR|PATCH) /{printf ".%s", $3}' "$toolkit/include/nccl.h")
  cp "$nccl" "$s/usr/lib/x86_64-linux-gnu/libnccl.so.2$nccl_version"
  ln -s "libnccl.so.2$nccl_version" "$s/usr/lib/x86_64-linux-gnu/libnccl.so.2"
  cp "$toolkit/include/nccl.h" "$s/usr/include/"
  cp "$toolkit/bin/nvcc" "$s/usr/local/cuda-13.0/bin/"
  cp "$toolkit/include/cuda_runtime.h" "$s/usr/local/cuda-13.0/include/"
  ln -s /usr/local/cuda-13.0 "$s/etc/alternatives/cuda"
  ln -s /etc/alternatives/cuda "$s/usr/local/cuda"
  tar --numeric-owner -C "$s" -cf - . | podman import - "$cuda_standin" >/dev/null
  rm -rf "$s"
  build Containerfile.cuda "$cuda_image" --build-arg "RUNTIME_IMAGE=$base_image" \
    --build-arg "CUDA_IMAGE=$cuda_standin"
  expect_config "$cuda_image"
  env_cfg=$(podman image inspect --format '{{json .Config.Env}}' "$cuda_image")
  for v in NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility 'NVIDIA_REQUIRE_CUDA=cuda>=13.0'; do
    [[ $env_cfg == *"$v"* ]] || die "no $v in the image's environment"
  done
  ok "NVIDIA_VISIBLE_DEVICES, NVIDIA_DRIVER_CAPABILITIES, NVIDIA_REQUIRE_CUDA set"
  "${eng[@]}" run --rm --no-healthcheck "${opts[@]}" --entrypoint bash "$cuda_image" -c \
    'ldconfig -p | grep libnccl; ls -l /usr/local/lib/libnccl*' | sed 's/^/    /'
  "${eng[@]}" run --rm --no-healthcheck "${opts[@]}" --entrypoint bash "$cuda_image" -c 'ldconfig -p | grep -q "libnccl.so.2 "' ||
    die "libnccl.so.2 not in the image's ld.so.cache"
  n=$("${eng[@]}" run --rm --no-healthcheck "${opts[@]}" --entrypoint bash "$cuda_image" -c 'ls /usr/local/lib/libnccl* | wc -l')
  [ "$n" = 1 ] || die "$n NCCL files in /usr/local/lib, expected 1"
  ok "libnccl.so.2 in /usr/local/lib once, found by ldconfig (what dlopen(\"libnccl.so.2\") uses)"
  if "${eng[@]}" run --rm --no-healthcheck "${opts[@]}" --entrypoint bash "$cuda_image" -c 'ls /usr/lib/x86_64-linux-gnu/libcuda.so* /usr/local/lib/libcudart* 2>/dev/null' | grep -q .; then
    die "a CUDA driver or runtime library in the image"
  fi
  ok "no libcuda (the host's, through the NVIDIA Container Toolkit) and no libcudart (static) in the image"
  msg=$("${eng[@]}" run --rm --no-healthcheck "${opts[@]}" -v "$models:/models:ro" "$cuda_image" worker \
    --model /models/tiny.gguf --experts 0-3 --listen 127.0.0.1:7070 --device cuda:0 2>&1 || true)
  log "worker --device cuda:0 without a GPU: $msg"
  [[ $msg == *"no usable CUDA device"* ]] || die "expected the CUDA runtime to report no usable device"
  ok "--device cuda:0 reaches the static CUDA runtime, which finds no driver here (no GPU)"
  port=$(free_port)
  c=$tag-cuda-demo
  containers+=("$c")
  "${eng[@]}" run -d --name "$c" "${opts[@]}" -p "127.0.0.1:$port:8080" "$cuda_image" demo \
    --listen 0.0.0.0:8080 --threads 1 >/dev/null 2>>"$work/podman.log" ||
    { tail -5 "$work/podman.log"; die "podman run (cuda demo)"; }
  wait_log "$c" "moepool: serving on" 120
  reply=$(curl -fsS --max-time 120 "http://127.0.0.1:$port/v1/chat/completions" \
    -H 'Content-Type: application/json' -d "$body") || die "completion from the CUDA image"
  [[ $reply == *'"choices"'* ]] || die "no choices in the CUDA image's reply"
  "${eng[@]}" healthcheck run "$c" >/dev/null 2>&1 || die "podman healthcheck run (cuda demo)"
  ok "the CUDA image serves the demo on the CPU and is healthy"
  "${eng[@]}" stop -t 20 "$c" >/dev/null 2>>"$work/podman.log"

  # The build stage's COPY --from=cuda /usr/local/cuda/ through the image's two links.
  printf 'FROM %s AS cuda\nFROM %s\nCOPY --from=cuda /usr/local/cuda/ /usr/local/cuda/\nCOPY --from=cuda /usr/include/nccl.h /usr/local/cuda/include/nccl.h\nRUN test -x /usr/local/cuda/bin/nvcc && test -f /usr/local/cuda/include/cuda_runtime.h && test -f /usr/local/cuda/include/nccl.h && /usr/local/cuda/bin/nvcc --version | tail -1\n' \
    "$cuda_standin" "$base_image" >"$work/Containerfile.copy-check"
  "${eng[@]}" build "${opts[@]}" -f "$work/Containerfile.copy-check" -t localhost/moepool-test/copy-check \
    "$work" >"$work/copy-check.log" 2>&1 || { tail -20 "$work/copy-check.log"; die "COPY --from=cuda /usr/local/cuda/"; }
  ok "COPY --from=cuda /usr/local/cuda/ follows /usr/local/cuda -> /etc/alternatives/cuda -> cuda-13.0; nvcc runs on Debian 12: $(grep -m1 'Build cuda' "$work/copy-check.log")"
fi

# --- configure ---------------------------------------------------------------------------------
if [ "$configure" -eq 1 ]; then
  log "== Containerfile.cpu build stage, up to CMake (BUILD_IMAGE: the stand-in base)"
  podman tag "$base_image" localhost/moepool-test/debian:12
  sed -e 's|^ && ninja -C /build moepool \\| \&\& ninja -C /build -t targets all \| grep "^cli/moepool:" \\|' \
    -e 's|^ && install -D -m 0755 -s /build/cli/moepool /out/moepool \\| \&\& echo configure-ok \\|' \
    -e 's|^ && /out/moepool --help >/dev/null$| \&\& true|' \
    "$here/Containerfile.cpu" >"$work/Containerfile.cpu.configure"
  grep -q "configure-ok" "$work/Containerfile.cpu.configure" || die "could not derive the configure check"
  ca=()
  [ -z "$ca_file" ] || ca=(-v "$ca_file:/run/build-ca.crt:ro" --env NODE_EXTRA_CA_CERTS=/run/build-ca.crt)
  t0=$SECONDS
  # The context is the checkout itself (read only), filtered by the ignore file.
  "${eng[@]}" build "${opts[@]}" "${ca[@]}" --ignorefile "$here/containerignore" \
    -f "$work/Containerfile.cpu.configure" --target build \
    --build-arg BUILD_IMAGE=localhost/moepool-test/debian:12 -t localhost/moepool-test/build-configure \
    "$root" >"$work/configure.log" 2>&1 || { tail -30 "$work/configure.log"; die "the build stage"; }
  podman rmi -f localhost/moepool-test/build-configure >/dev/null 2>&1 || true
  grep -q "^configure-ok" "$work/configure.log" || { tail -30 "$work/configure.log"; die "no configure-ok"; }
  grep -E "newly installed|^moepool: installing|added [0-9]+ package|^cli/moepool:" "$work/configure.log" |
    cut -c1-160 | sed 's/^/    /'
  ok "build stage: install-deps.sh and CMake configure pass, target cli/moepool exists ($((SECONDS - t0)) s; not compiled)"
fi

log "== done: $checks checks passed in $SECONDS s"
