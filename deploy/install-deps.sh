#!/usr/bin/env bash
# Installs the Debian 12 packages moepool builds with (see docs/dependencies.md), and the
# official OpenAI Node.js client that tests/node drives `moepool serve` with.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
PKGS=(build-essential cmake ninja-build pkg-config
      libabsl-dev libgtest-dev libgmock-dev libbenchmark-dev nlohmann-json3-dev
      libgrpc++-dev libprotobuf-dev protobuf-compiler protobuf-compiler-grpc libcpp-httplib-dev
      libxxhash-dev libssl-dev libsystemd-dev
      systemd prometheus  # systemd-analyze and promtool check deploy/ in the tests
      python3-yaml        # tests/deploy reads the Kubernetes manifests
      chromium)           # tests/browser drives the web console headless
# Node.js (>= 18) for the OpenAI client test; Debian's nodejs/npm unless a node is installed.
if ! command -v node >/dev/null 2>&1; then PKGS+=(nodejs npm); fi
missing=()
for p in "${PKGS[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "moepool: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi
# npm packages (versions pinned by each package-lock.json): the console's uPlot, embedded in the
# binary at build time; the OpenAI client and ajv for tests/node; playwright-core for
# tests/browser.
for dir in console tests/node tests/browser; do
  if [ -f "$dir/package-lock.json" ] && ! npm ls --prefix "$dir" --all >/dev/null 2>&1; then
    echo "moepool: installing the npm packages of $dir"
    npm ci --prefix "$dir" --no-audit --no-fund --loglevel=error
  fi
done
