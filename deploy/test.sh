#!/usr/bin/env bash
# Installs dependencies, builds everything and runs the whole test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/install-deps.sh
deploy/build.sh
ctest --test-dir build --output-on-failure -j"$(nproc)" --timeout 900
