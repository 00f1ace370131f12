#!/usr/bin/env bash
# The newcomer's first command: install dependencies, build, and run `moepool demo`, which
# synthesizes a small Mixtral-architecture model with RANDOM weights (real Mistral vocabulary)
# on first use, starts two worker processes (experts 0-3 and 4-7) and the OpenAI-compatible
# coordinator, and prints `moepool: serving on http://HOST:PORT` with a curl example.
# Usage: deploy/demo.sh [--model REAL.gguf] [--listen 127.0.0.1:8080] [--threads N]
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/install-deps.sh
deploy/build.sh
exec ./build/cli/moepool demo "$@"
