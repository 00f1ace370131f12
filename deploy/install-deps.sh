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
      systemd prometheus)  # systemd-analyze and promtool check deploy/ in the tests
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
if [ ! -f tests/node/node_modules/openai/package.json ] ||
   [ ! -f tests/node/node_modules/ajv/package.json ]; then
  echo "moepool: installing the npm packages of tests/node (openai, ajv)"
  npm ci --prefix tests/node --no-audit --no-fund --loglevel=error
fi
