#!/usr/bin/env bash
# Runs on the GPU machine from the bundle made by deploy/gpu/pack.sh (gpu-pack/): the device
# listing, every CUDA suite with MOEPOOL_REQUIRE_GPU=1 (no device = failure, not a skip) and the
# kernel benchmark and the expert backend benchmark. Everything goes to $OUT (default ./gpu-out):
# nvidia-smi.txt, system.txt, tests.txt, tests.xml, bench.json, bench.txt, expert_bench.json,
# expert_bench.txt, summary.txt (the expert benchmark synthesizes a mini and a 4-layer
# Mixtral-shaped model into $TMPDIR: about 5 GB of disk). Exit status: 0 only if the tests
# passed.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${OUT:-$PWD/gpu-out}
mkdir -p "$out"
export LD_LIBRARY_PATH="$here/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export MOEPOOL_TESTDATA_DIR="$here/testdata"
export MOEPOOL_REQUIRE_GPU=1

{ nvidia-smi; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm \
    --format=csv; } >"$out/nvidia-smi.txt" 2>&1
# The binary is built on Debian 12 and needs glibc >= 2.36 (everything else is inside it).
{ uname -a; ldd --version 2>&1 | head -1; } >"$out/system.txt"

"$here/moepool_gpu_tests" --gtest_output="xml:$out/tests.xml" >"$out/tests.txt" 2>&1
tests_rc=$?
"$here/moepool_gpu_tests" --bench >"$out/bench.json" 2>"$out/bench.txt"
bench_rc=$?
# Run from the bundle so the benchmark finds deploy/vocab for its synthesized mini model.
(cd "$here" && ./moepool_expert_bench) >"$out/expert_bench.json" 2>"$out/expert_bench.txt"
expert_bench_rc=$?

{
  echo "tests exit status: $tests_rc"
  grep -E '^\[  (PASSED|FAILED|SKIPPED) ' "$out/tests.txt"
  echo "benchmark exit status: $bench_rc"
  cat "$out/bench.json"
  echo "expert benchmark exit status: $expert_bench_rc"
  cat "$out/expert_bench.json"
} >"$out/summary.txt"
cat "$out/summary.txt"
exit "$tests_rc"
