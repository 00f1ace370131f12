#!/bin/bash
# moepool-healthcheck: the images' HEALTHCHECK (installed as /usr/local/bin/moepool-healthcheck).
# Needs only bash (its /dev/tcp) and coreutils, so the images carry no curl.
#
# What it probes is read from the command line of the moepool process (PID 1 in a container,
# or the PID given as the first argument):
#   serve, demo   GET http://HOST:PORT/health (the --listen address, default 127.0.0.1:8080)
#                 must answer 200 (503 while shutting down; docs/operations.md "Health")
#   worker        a TCP connect to the --listen port: a worker listens only once its experts are
#                 loaded (--preload on) or it has joined. gRPC's own grpc.health.v1 service
#                 (docs/protocol.md) would need a gRPC client, which the image does not carry.
#   anything else (run, bench, eval, ...): nothing to probe, healthy.
# MOEPOOL_HEALTHCHECK overrides the detection: http://HOST:PORT/PATH or tcp:HOST:PORT.
# Exit status 0: healthy; 1: not.
set -uo pipefail

probe_http() {  # host port path
  { exec 3<>"/dev/tcp/$1/$2"; } 2>/dev/null || { echo "unhealthy: nothing listens on $1:$2"; return 1; }
  printf 'GET %s HTTP/1.1\r\nHost: %s:%s\r\nConnection: close\r\n\r\n' "$3" "$1" "$2" >&3
  local status=""
  IFS= read -r -t 5 status <&3 || true
  exec 3<&- 3>&-
  status=${status%$'\r'}
  if [[ $status =~ ^HTTP/1\.[01]\ 200 ]]; then
    echo "healthy: http://$1:$2$3: $status"
    return 0
  fi
  echo "unhealthy: http://$1:$2$3: ${status:-no answer}"
  return 1
}

probe_tcp() {  # host port
  if { exec 3<>"/dev/tcp/$1/$2"; } 2>/dev/null; then
    exec 3<&- 3>&-
    echo "healthy: $1:$2 accepts connections"
    return 0
  fi
  echo "unhealthy: nothing listens on $1:$2"
  return 1
}

# "HOST:PORT" -> host and port; an unspecified or wildcard host is probed on loopback.
split_listen() {
  local a=$1
  port=${a##*:}
  host=${a%:*}
  host=${host#[}
  host=${host%]}
  case $host in
    "" | 0.0.0.0 | "::" | localhost) host=127.0.0.1 ;;
  esac
}

target=${MOEPOOL_HEALTHCHECK:-}
if [ -n "$target" ]; then
  case $target in
    http://*)
      rest=${target#http://}
      hp=${rest%%/*}
      path=/${rest#*/}
      [ "$hp" = "$rest" ] && path=/health
      split_listen "$hp"
      probe_http "$host" "$port" "$path"
      exit
      ;;
    tcp:*)
      split_listen "${target#tcp:}"
      probe_tcp "$host" "$port"
      exit
      ;;
    *) echo "MOEPOOL_HEALTHCHECK must be http://HOST:PORT/PATH or tcp:HOST:PORT" >&2; exit 1 ;;
  esac
fi

pid=${1:-1}
if [ ! -r "/proc/$pid/cmdline" ]; then
  echo "unhealthy: no process $pid"
  exit 1
fi
mapfile -d '' args <"/proc/$pid/cmdline"
# The arguments after the moepool executable (PID 1 may be an init such as catatonit or tini).
first=1
for ((i = 0; i < ${#args[@]}; i++)); do
  if [ "${args[i]##*/}" = moepool ]; then first=$((i + 1)); break; fi
done
cmd=""
listen=""
for ((i = first; i < ${#args[@]}; i++)); do
  a=${args[i]}
  if [ -z "$cmd" ]; then
    case $a in -*) ;; *) cmd=$a ;; esac
    continue
  fi
  case $a in
    --listen) listen=${args[i + 1]:-} ;;
    --listen=*) listen=${a#--listen=} ;;
  esac
done

case $cmd in
  serve | demo)
    split_listen "${listen:-127.0.0.1:8080}"
    if [ "$port" = 0 ]; then echo "healthy: --listen port 0, nothing fixed to probe"; exit 0; fi
    probe_http "$host" "$port" /health
    ;;
  worker)
    if [ -z "$listen" ]; then echo "unhealthy: worker without --listen"; exit 1; fi
    split_listen "$listen"
    if [ "$port" = 0 ]; then echo "healthy: --listen port 0, nothing fixed to probe"; exit 0; fi
    probe_tcp "$host" "$port"
    ;;
  *)
    echo "healthy: moepool ${cmd:-(no command)} serves nothing to probe"
    ;;
esac
