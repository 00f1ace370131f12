#!/usr/bin/env bash
# Builds the root file system of the CPU image (what deploy/container/Containerfile.cpu's runtime
# stage makes from debian:12-slim) without pulling an image: Debian 12 from the package mirror
# with debootstrap, the packages of runtime-packages.txt, user moepool (uid 10001), the moepool
# binary, the vocabulary and the health check. Then it shows that the binary starts and serves:
#   - where podman or docker works (a daemon or runtime that actually runs a container), the
#     root file system is imported as an image (moepool:cpu-rootfs) and `moepool demo` runs in a
#     container as uid 10001, with the health check as --health-cmd;
#   - otherwise (and with --engine chroot) `moepool demo` runs in the root file system with
#     chroot --userspec=10001:10001, /proc mounted for the run; where buildah works the root file
#     system is also committed as an image.
# Either way /health and one /v1/chat/completions are fetched with curl from outside, the health
# check script runs against the server, and the server is stopped.
#
# usage: deploy/container/build-rootfs.sh [--out DIR] [--binary PATH] [--keep]
#            [--engine auto|podman|docker|chroot] [--port N] [--mirror URL] [--base-only]
#   --out DIR      the root file system (default /var/tmp/moepool-rootfs); must not exist, be
#                  empty, or be a root file system this script made (it is then replaced)
#   --binary PATH  the moepool binary to install (default build/cli/moepool; copied first)
#   --keep         keep DIR (and the image) afterwards; default: remove both on success
#   --engine E     how to run the smoke test (default auto: podman, then docker, else chroot)
#   --port N       host port of the smoke test's HTTP API (default a free one)
#   --mirror URL   Debian mirror (default: the one in this machine's apt sources, else
#                  http://deb.debian.org/debian)
#   --base-only    stop after the Debian base, trimmed like debian:12-slim (no runtime
#                  packages, user, binary or smoke test): the stand-in base image that
#                  test-containerfiles.sh builds the Containerfiles on (implies --keep)
# Needs root (debootstrap, chroot, mount), network to the mirror, curl. Not run in CI (minutes).
# Debootstrap's downloads are cached in /var/tmp/moepool-debootstrap-cache (MOEPOOL_DEBOOTSTRAP_CACHE).
# Exit status 0 only when the completion was served.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=/var/tmp/moepool-rootfs
binary=$root/build/cli/moepool
keep=0
base_only=0
engine=auto
port=""
mirror=""
suite=bookworm
image=moepool:cpu-rootfs
cache=${MOEPOOL_DEBOOTSTRAP_CACHE:-/var/tmp/moepool-debootstrap-cache}

while [ $# -gt 0 ]; do
  case $1 in
    --out) out=$2; shift 2 ;;
    --binary) binary=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    --base-only) base_only=1; keep=1; shift ;;
    --engine) engine=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    --mirror) mirror=$2; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-rootfs.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case $engine in auto | podman | docker | chroot) ;; *)
  echo "build-rootfs.sh: --engine must be auto, podman, docker or chroot" >&2; exit 2 ;;
esac

log() { printf '[%s +%4ds] %s\n' "$(date +%H:%M:%S)" "$SECONDS" "$*"; }
die() { log "FAILED: $*"; exit 1; }
declare -A took
phase_start=0
phase() { phase_start=$SECONDS; log "== $*"; }
phase_end() { took[$1]=$((SECONDS - phase_start)); }

[ "$(id -u)" -eq 0 ] || die "needs root (debootstrap, chroot, mount)"
command -v curl >/dev/null || die "needs curl on this machine"
[ "$base_only" -eq 1 ] || [ -f "$binary" ] || die "no binary at $binary (build it with deploy/build.sh, or pass --binary)"
vocab=$root/deploy/vocab/mistral-vocab.gguf
[ -f "$vocab" ] || die "no vocabulary at $vocab"
out=$(realpath -m "$out")
case $out in / | /usr | /var | /var/tmp | /tmp | /home | "$root") die "refusing --out $out" ;; esac

# --- state the EXIT trap cleans up -------------------------------------------------------------
work=$(mktemp -d /tmp/moepool-rootfs.XXXXXX)
server_pid=""
container=""
container_engine=""
import_engine=""
imported=""
eng=()
run_opts=()
mounted=()
cleanup() {
  local rc=$?
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    kill -TERM "$server_pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$server_pid" 2>/dev/null || true
  fi
  if [ -n "$container" ]; then "${eng[@]}" rm -f "$container" >/dev/null 2>&1 || true; fi
  for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do umount "${mounted[i]}" 2>/dev/null || umount -l "${mounted[i]}" || true; done
  if [ "$keep" -eq 0 ] && [ "$rc" -eq 0 ]; then
    rm -rf --one-file-system "$out"
    if [ -n "$imported" ]; then "$import_engine" rmi "$image" >/dev/null 2>&1 || true; fi
  fi
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A private copy of the binary: build/cli/moepool may be replaced by a rebuild while we run.
binary_src=$binary
if [ "$base_only" -eq 0 ]; then
  cp "$binary" "$work/moepool"
  binary=$work/moepool
fi

# --- the mirror: the same as this machine's apt sources ----------------------------------------
if [ -z "$mirror" ]; then
  mirror=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null |
    awk '/^URIs:/ {u=$2} /^Suites:/ && $0 ~ / '"$suite"'( |$)/ {print u; exit}')
fi
if [ -z "$mirror" ] && [ -f /etc/apt/sources.list ]; then
  mirror=$(awk '$1 == "deb" && $3 == "'"$suite"'" {print $2; exit}' /etc/apt/sources.list)
fi
mirror=${mirror:-http://deb.debian.org/debian}
security=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null |
  awk '/^URIs:/ {u=$2} /^Suites:/ && / '"$suite"'-security/ {print u; exit}')
security=${security:-${mirror%/debian}/debian-security}
mapfile -t packages < <(sed 's/#.*//' "$here/runtime-packages.txt" | tr -s ' \t' '\n' | sed '/^$/d')
log "rootfs $out from $mirror ($suite, minbase); security updates from $security"
if [ "$base_only" -eq 1 ]; then
  packages=()
  log "--base-only: the Debian base alone"
else
  log "runtime packages (runtime-packages.txt): ${packages[*]}"
  log "binary $binary_src ($(stat -c %s "$binary") bytes), vocabulary $vocab"
fi

# --- 1. debootstrap ----------------------------------------------------------------------------
phase "debootstrap"
if ! command -v debootstrap >/dev/null; then
  log "installing debootstrap with apt-get"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
fi
if [ -e "$out" ]; then
  if grep -q " ${out}[/ ]" /proc/mounts; then die "something is mounted under $out"; fi
  if [ -n "$(ls -A "$out")" ] && [ ! -f "$out/etc/moepool-rootfs" ]; then
    die "$out exists and is not a root file system made by this script; choose another --out"
  fi
  log "removing the previous $out"
  rm -rf --one-file-system "$out"
fi
mkdir -p "$out" "$cache"
debootstrap --variant=minbase --cache-dir="$cache" "$suite" "$out" "$mirror" >"$work/debootstrap.log" 2>&1 ||
  { tail -20 "$work/debootstrap.log"; die "debootstrap"; }
echo "made by deploy/container/build-rootfs.sh $(date -u +%FT%TZ)" >"$out/etc/moepool-rootfs"
log "debootstrap: $(du -sxm "$out" | cut -f1) MiB"
phase_end debootstrap

# --- 2. the runtime packages, trimmed like debian:12-slim ------------------------------------
phase "apt-get install (in the chroot)"
rm -f "$out/etc/apt/sources.list"
cat >"$out/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $mirror
Suites: $suite $suite-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $security
Suites: $suite-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
# What the official slim images leave out (their /etc/dpkg/dpkg.cfg.d/docker).
cat >"$out/etc/dpkg/dpkg.cfg.d/slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
EOF
cat >"$out/etc/apt/apt.conf.d/docker-clean" <<'EOF'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
EOF
cp /etc/resolv.conf "$out/etc/resolv.conf" 2>/dev/null || true
before=$(chroot "$out" dpkg-query -W -f '${Package}\n' | sort)
chroot "$out" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
  sh -c 'apt-get update -qq && apt-get upgrade -y -qq && apt-get install -y -qq --no-install-recommends "$@" &&
         apt-get clean && rm -rf /var/lib/apt/lists/*' sh "${packages[@]}" >"$work/apt.log" 2>&1 ||
  { tail -30 "$work/apt.log"; die "apt-get install in the chroot"; }
added=$(comm -13 <(echo "$before") <(chroot "$out" dpkg-query -W -f '${Package}\n' | sort) | tr '\n' ' ')
log "apt-get added $(wc -w <<<"$added") packages: $added"
# Trim what the slim images do not carry (docs, man pages, locales, caches, logs).
find "$out/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete 2>/dev/null || true
find "$out/usr/share/doc" -mindepth 1 -type d -empty -delete 2>/dev/null || true
rm -rf "$out"/usr/share/{man,info,groff,lintian,linda}/* "$out"/usr/share/locale/* \
  "$out"/var/cache/debconf/*-old "$out"/var/lib/dpkg/*-old "$out"/var/log/*.log \
  "$out"/var/cache/apt/*.bin
: >"$out/etc/resolv.conf"
phase_end apt
if [ "$base_only" -eq 1 ]; then
  log "== done: Debian base at $out, $(du -sxm "$out" | cut -f1) MiB; times: debootstrap ${took[debootstrap]} s, apt-get ${took[apt]} s"
  exit 0
fi

# --- 3. user, binary, vocabulary, health check ----------------------------------------------
phase "user moepool, binary, vocabulary"
chroot "$out" groupadd --gid 10001 moepool
chroot "$out" useradd --uid 10001 --gid 10001 --home-dir /var/lib/moepool --create-home \
  --shell /usr/sbin/nologin --comment "moepool" moepool
# As in the Containerfiles: the worker's shard cache, the model and the secrets mount points.
install -d -o 10001 -g 10001 -m 0750 "$out/var/cache/moepool"
install -d -m 0755 "$out/models" "$out/etc/moepool/secrets"
install -m 0755 "$binary" "$out/usr/local/bin/moepool"
install -m 0755 "$here/healthcheck.sh" "$out/usr/local/bin/moepool-healthcheck"
# The vocabulary: `moepool demo` and `moepool synth` (without --vocab) look for
# deploy/vocab/mistral-vocab.gguf under the working directory and under every directory above the
# binary (cli/cmd_model.cc FindDefaultVocab), so /usr/local/deploy/vocab/ is where a binary in
# /usr/local/bin finds it. The file lives in /usr/local/share/moepool; the link is what is found.
install -D -m 0644 "$vocab" "$out/usr/local/share/moepool/mistral-vocab.gguf"
mkdir -p "$out/usr/local/deploy/vocab"
ln -sf ../../share/moepool/mistral-vocab.gguf "$out/usr/local/deploy/vocab/mistral-vocab.gguf"
chroot "$out" ldd /usr/local/bin/moepool >"$work/ldd.txt" 2>&1 || { cat "$work/ldd.txt"; die "ldd in the chroot"; }
if grep -q "not found" "$work/ldd.txt"; then grep "not found" "$work/ldd.txt"; die "missing shared libraries in the root file system"; fi
log "ldd in the chroot: $(grep -c '=>' "$work/ldd.txt") libraries, none missing"
chroot --userspec=10001:10001 "$out" /usr/local/bin/moepool --help >/dev/null 2>&1 ||
  die "moepool --help as uid 10001 in the chroot"
size_mib=$(du -sxm "$out" | cut -f1)
log "root file system: $size_mib MiB ($(du -sxm "$out/usr/local" | cut -f1) MiB of it /usr/local)"
phase_end install

# --- 4. a container engine? -------------------------------------------------------------------
phase "container engine"
engine_works() {  # engine: exit 0 when it can run a container here (not just answer `info`)
  command -v "$1" >/dev/null || { log "$1: not installed"; return 1; }
  if ! timeout 60 "$1" info >"$work/$1-info.log" 2>&1; then
    log "$1: installed, but '$1 info' fails: $(tail -1 "$work/$1-info.log")"
    return 1
  fi
  log "$1: '$1 info' works"
}
if [ "$engine" = auto ] || [ "$engine" = podman ]; then
  engine_works podman && container_engine=podman
fi
if [ -z "$container_engine" ] && { [ "$engine" = auto ] || [ "$engine" = docker ]; }; then
  engine_works docker && container_engine=docker
fi
if [ "$engine" != chroot ] && [ "$engine" != auto ] && [ -z "$container_engine" ]; then
  die "--engine $engine does not work here"
fi
import_tar() {  # the root file system as a tar on stdout, without the chroot's /dev, /proc, /sys
  tar --numeric-owner --xattrs -C "$out" --exclude=./dev/* --exclude=./proc/* --exclude=./sys/* \
    --exclude=./etc/moepool-rootfs -cf - .
}
changes=(--change 'USER 10001:10001' --change 'WORKDIR /var/lib/moepool'
  --change 'ENV HOME=/var/lib/moepool' --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
  --change 'EXPOSE 8080' --change 'EXPOSE 9090' --change 'EXPOSE 7070' --change 'EXPOSE 7071' --change 'ENTRYPOINT ["/usr/local/bin/moepool"]'
  --change 'CMD ["--help"]')
if [ -n "$container_engine" ]; then
  import_tar | "$container_engine" import "${changes[@]}" - "$image" >"$work/import.log" 2>&1 ||
    { cat "$work/import.log"; die "$container_engine import"; }
  import_engine=$container_engine
  imported=1
  log "$container_engine import: $image, $("$container_engine" image inspect --format '{{.Size}}' "$image") bytes"
  eng=("$container_engine")
  # Can it run a container? (`info` working is not enough: the runtime may refuse this kernel's
  # cgroup layout or the rlimits it is allowed to set.)
  if ! timeout 120 "${eng[@]}" run --rm "$image" --help >"$work/probe.log" 2>&1; then
    log "$container_engine run fails: $(grep -m1 -i error "$work/probe.log")"
    eng=()
    if [ "$container_engine" = podman ] && command -v runc >/dev/null; then
      # crun refuses a hybrid cgroup v1/v2 host, and both runtimes fail to set rlimits above
      # what this sandbox allows: runc, with the host's open-file limit and a modest nproc.
      n=$(ulimit -Hn)
      run_opts=(--ulimit "nofile=$n:$n" --ulimit nproc=4096:4096)
      if timeout 120 podman --runtime runc run --rm "${run_opts[@]}" "$image" --help >"$work/probe.log" 2>&1; then
        eng=(podman --runtime runc)
        log "podman --runtime runc with ${run_opts[*]} runs it"
      else
        log "podman --runtime runc fails too: $(grep -m1 -i error "$work/probe.log")"
      fi
    fi
    if [ ${#eng[@]} -eq 0 ]; then
      [ "$engine" = auto ] || die "--engine $engine cannot run a container here"
      log "the smoke test uses chroot"
      container_engine=""
    fi
  fi
elif [ "$engine" = auto ] && command -v buildah >/dev/null && timeout 60 buildah info >/dev/null 2>&1; then
  import_tar >"$work/rootfs.tar"
  ctr=$(buildah from scratch)
  mnt=$(buildah mount "$ctr")
  tar -C "$mnt" --numeric-owner -xf "$work/rootfs.tar"
  buildah umount "$ctr" >/dev/null
  buildah config --user 10001:10001 --workingdir /var/lib/moepool --env HOME=/var/lib/moepool \
    --port 8080 --port 9090 --port 7070 --port 7071 --entrypoint '["/usr/local/bin/moepool"]' \
    --cmd '["--help"]' --healthcheck 'CMD /usr/local/bin/moepool-healthcheck' "$ctr"
  buildah commit --format docker "$ctr" "$image" >/dev/null
  buildah rm "$ctr" >/dev/null
  import_engine=buildah
  imported=1
  log "buildah commit: $image (buildah runs no server here: the smoke test uses chroot)"
elif [ "$engine" = chroot ]; then
  log "--engine chroot: no container engine tried"
else
  log "no container engine runs here: the smoke test uses chroot"
fi
phase_end engine

# --- 5. smoke test ----------------------------------------------------------------------------
phase "smoke test: moepool demo as uid 10001 ($([ -n "$container_engine" ] && echo "$container_engine run" || echo chroot))"
port_taken() { ss -ltnH "sport = :$1" | grep -q .; }
if [ -z "$port" ]; then
  for _ in $(seq 50); do
    port=$((20000 + RANDOM % 20000))
    port_taken "$port" || break
  done
fi
if port_taken "$port"; then die "port $port is taken; pass --port"; fi
server_log=$work/server.log
if [ -n "$container_engine" ]; then
  container=moepool-smoke-$$
  # The image has no HEALTHCHECK (an import cannot set one): give it the same as the
  # Containerfiles. Without systemd podman cannot schedule it; `healthcheck run` below runs it.
  "${eng[@]}" run -d --name "$container" "${run_opts[@]}" -p "127.0.0.1:$port:8080" \
    --health-cmd /usr/local/bin/moepool-healthcheck --health-interval 30s \
    "$image" demo --listen 0.0.0.0:8080 --threads 1 >"$work/run.log" 2>&1 ||
    { cat "$work/run.log"; die "$container_engine run"; }
else
  mkdir -p "$out/proc"
  mount -t proc proc "$out/proc" && mounted+=("$out/proc")
  # debootstrap made the device nodes the process needs (null, zero, urandom, ...).
  for d in null zero urandom random; do [ -c "$out/dev/$d" ] || die "no /dev/$d in the root file system"; done
  setsid chroot --userspec=10001:10001 "$out" /usr/bin/env -i HOME=/var/lib/moepool \
    PATH=/usr/local/bin:/usr/bin:/bin /usr/local/bin/moepool demo --listen "127.0.0.1:$port" \
    --threads 1 >"$server_log" 2>&1 </dev/null &
  server_pid=$!
fi
ready=0
for _ in $(seq 300); do
  if [ -n "$container_engine" ]; then "${eng[@]}" logs "$container" >"$server_log" 2>&1 || true; fi
  if grep -q "^moepool: serving on" "$server_log"; then ready=1; break; fi
  if [ -n "$server_pid" ] && ! kill -0 "$server_pid" 2>/dev/null; then break; fi
  if [ -n "$container" ] && [ "$("${eng[@]}" inspect --format '{{.State.Running}}' "$container" 2>/dev/null)" != true ]; then break; fi
  sleep 1
done
sed 's/^/    | /' "$server_log"
[ "$ready" -eq 1 ] || die "the server did not say it was serving"
log "serving after $((SECONDS - phase_start)) s"
if [ -n "$server_pid" ]; then
  # The demo and the three processes it starts (two workers, the coordinator).
  mapfile -t pids < <(ps -o pid= -p "$server_pid" --ppid "$server_pid" | tr -d ' ')
  log "processes (${#pids[@]}):"
  ps -o uid,user:10,pid,ppid,args -p "$(IFS=,; echo "${pids[*]}")" | sed 's/^/    /'
  [ "${#pids[@]}" -eq 4 ] || die "expected the demo and 3 children, found ${#pids[@]} processes"
  if ps -o uid= -p "$(IFS=,; echo "${pids[*]}")" | grep -vqw 10001; then
    die "a moepool process does not run as uid 10001"
  fi
fi
url=http://127.0.0.1:$port
health=$(curl -fsS --max-time 10 "$url/health") || die "GET /health"
log "GET /health: $health"
body='{"model": "moepool", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 16, "temperature": 0}'
t0=$(date +%s.%N)
reply=$(curl -fsS --max-time 120 "$url/v1/chat/completions" -H 'Content-Type: application/json' -d "$body") ||
  die "POST /v1/chat/completions"
t1=$(date +%s.%N)
log "POST /v1/chat/completions ($(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.2f", b - a}') s): ${reply:0:400}"
case $reply in *'"choices"'*'"message"'*) ;; *) die "the reply has no choices[].message" ;; esac
if [ -n "$container_engine" ]; then
  hc=$("${eng[@]}" exec "$container" /usr/local/bin/moepool-healthcheck) || die "health check: $hc"
  "${eng[@]}" exec "$container" id | sed 's/^/    exec id: /'
  "${eng[@]}" top "$container" user pid args 2>/dev/null | sed 's/^/    /'
  if [ "$container_engine" = podman ]; then
    "${eng[@]}" healthcheck run "$container" >/dev/null 2>&1 || die "podman healthcheck run"
    log "podman healthcheck run: $(podman inspect --format '{{.State.Health.Status}}' "$container")"
  fi
else
  hc=$(chroot --userspec=10001:10001 "$out" /usr/local/bin/moepool-healthcheck "$server_pid") ||
    die "health check: $hc"
fi
log "health check script (as uid 10001): $hc"
log "stopping the server (SIGTERM)"
if [ -n "$container_engine" ]; then
  "${eng[@]}" stop -t 20 "$container" >/dev/null 2>>"$work/run.log"
  "${eng[@]}" logs "$container" 2>&1 | tail -3 | sed 's/^/    | /'
  log "container exit code: $("${eng[@]}" inspect --format '{{.State.ExitCode}}' "$container")"
else
  kill -TERM "$server_pid"
  for _ in $(seq 100); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.2; done
  kill -0 "$server_pid" 2>/dev/null && die "the server did not stop within 20 s of SIGTERM"
  wait "$server_pid" && rc=0 || rc=$?
  server_pid=""
  tail -2 "$server_log" | sed 's/^/    | /'
  log "demo exited with status $rc"
  rm -rf "$out/var/lib/moepool/.cache"  # the demo model the smoke test made
  for p in "${pids[@]}"; do
    kill -0 "$p" 2>/dev/null && die "process $p is left behind"
  done
  log "all ${#pids[@]} processes gone"
fi
phase_end smoke

log "== done: the binary starts and serves in the root file system as uid 10001"
log "times: debootstrap ${took[debootstrap]} s, apt-get ${took[apt]} s, install ${took[install]} s, engine ${took[engine]} s, smoke test ${took[smoke]} s; total $SECONDS s"
log "root file system: $size_mib MiB at $out$([ "$keep" -eq 1 ] && echo " (kept)" || echo " (removed; --keep keeps it)")"
