#!/usr/bin/env bash
# Installs moepool as systemd services on this PC (docs/deploy.md):
#   sudo deploy/systemd/install.sh coordinator [--binary build/cli/moepool] [--model PATH]
#   sudo deploy/systemd/install.sh worker --coordinator HOST:9090 [--binary ...]
# Puts the binary in /usr/local/bin, the unit in /etc/systemd/system, the settings in
# /etc/moepool/<role>.env (kept if present), makes the `moepool` system user, and creates the
# secrets the unit reads as credentials: /etc/moepool/cluster.token (coordinator: new random;
# worker: copy the coordinator's file here first, or pass --token-file) and
# /etc/moepool/api-keys (coordinator: one new random key, printed once). Then enables and
# starts the service. Idempotent; --no-start installs without starting.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
role="${1:-}"
shift || true
binary="$here/../../build/cli/moepool"
model="" coordinator="" token_file="" start=1 prefix="${MOEPOOL_INSTALL_ROOT:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary="$2"; shift 2 ;;
    --model) model="$2"; shift 2 ;;
    --coordinator) coordinator="$2"; shift 2 ;;
    --token-file) token_file="$2"; shift 2 ;;
    --no-start) start=0; shift ;;
    *) echo "install.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
if [ "$role" != coordinator ] && [ "$role" != worker ]; then
  echo "usage: install.sh coordinator|worker [--binary PATH] [--model PATH]" \
       "[--coordinator HOST:PORT] [--token-file PATH] [--no-start]" >&2
  exit 2
fi
[ -x "$binary" ] || { echo "install.sh: no executable at $binary (build first)" >&2; exit 1; }
if [ -z "$prefix" ] && [ "$(id -u)" -ne 0 ]; then
  echo "install.sh: run as root (sudo)" >&2; exit 1
fi
etc="$prefix/etc/moepool"
if [ -z "$prefix" ] && ! id moepool >/dev/null 2>&1; then
  useradd --system --home-dir /var/lib/moepool --shell /usr/sbin/nologin moepool
  # GPUs: the render/video groups own /dev/nvidia* or /dev/dri on most distributions.
  for g in video render; do getent group "$g" >/dev/null && usermod -aG "$g" moepool; done
fi
install -d -m 0755 "$prefix/usr/local/bin" "$prefix/etc/systemd/system"
install -d -m 0750 "$etc"
install -m 0755 "$binary" "$prefix/usr/local/bin/moepool"
install -m 0644 "$here/moepool-$role.service" "$prefix/etc/systemd/system/"
if [ ! -f "$etc/$role.env" ]; then install -m 0644 "$here/$role.env" "$etc/$role.env"; fi
set_env() {  # set_env FILE KEY VALUE
  sed -i "s|^$2=.*|$2=$3|" "$1"
}
if [ -n "$model" ]; then set_env "$etc/$role.env" MOEPOOL_MODEL "$model"; fi
if [ -n "$coordinator" ]; then set_env "$etc/$role.env" MOEPOOL_COORDINATOR "$coordinator"; fi
umask 077
if [ -n "$token_file" ]; then
  install -m 0600 "$token_file" "$etc/cluster.token"
elif [ ! -f "$etc/cluster.token" ]; then
  if [ "$role" = worker ]; then
    echo "install.sh: copy the coordinator's /etc/moepool/cluster.token here first" \
         "(or pass --token-file)" >&2
    exit 1
  fi
  head -c 32 /dev/urandom | base64 > "$etc/cluster.token"
  echo "moepool: made $etc/cluster.token; copy it to every worker's /etc/moepool/"
fi
if [ "$role" = coordinator ] && [ ! -f "$etc/api-keys" ]; then
  key="sk-moepool-$(head -c 24 /dev/urandom | base64 | tr -d '/+=')"
  printf '# API keys for moepool serve, one per line\n%s\n' "$key" > "$etc/api-keys"
  echo "moepool: API key (shown once; it is in $etc/api-keys): $key"
fi
chmod 0600 "$etc/cluster.token" "$etc"/api-keys 2>/dev/null || true
echo "moepool: installed moepool-$role.service; settings in $etc/$role.env"
if [ -z "$prefix" ]; then
  systemctl daemon-reload
  if [ "$start" -eq 1 ]; then
    systemctl enable --now "moepool-$role.service"
    echo "moepool: started; follow it with: journalctl -u moepool-$role -f"
  else
    echo "moepool: start it with: systemctl enable --now moepool-$role"
  fi
fi
