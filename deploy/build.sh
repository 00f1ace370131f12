#!/usr/bin/env bash
# Configures and builds moepool (Release) into ./build.
set -euo pipefail
cd "$(dirname "$0")/.."
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DMOEPOOL_WERROR=ON >/dev/null
ninja -C build -j"$(nproc)"
