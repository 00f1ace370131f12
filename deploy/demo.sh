#!/usr/bin/env bash
# The newcomer's first command: install dependencies, build, synthesize a small Mixtral-shaped
# model with RANDOM weights (real Mistral vocabulary), and generate text with it.
# Usage: deploy/demo.sh [PROMPT]
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/install-deps.sh
deploy/build.sh
MODEL=models/demo-tiny-Q4_K_M.gguf
if [ ! -f "$MODEL" ]; then
  mkdir -p models
  ./build/cli/moepool synth --out "$MODEL" --shape tiny --type Q4_K_M --seed 1
fi
echo "moepool: the demo model has random weights, so its text is gibberish by design."
./build/cli/moepool inspect "$MODEL"
./build/cli/moepool run --model "$MODEL" --prompt "${1:-The quick brown fox}" -n 48 --seed 1
