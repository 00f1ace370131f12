#!/usr/bin/env bash
# Fuzzes the GGUF reader, model binder and tokenizer with libFuzzer over an instrumented engine
# (clang; the whole engine library built with -fsanitize=fuzzer-no-link,address, MOEPOOL_FUZZ=ON)
# starting from the committed seed corpus. Not in CI (it runs for minutes); ctest replays the
# corpus with the gcc build instead (GgufReaderFuzzerReplay).
#
#   tests/fuzz/run_fuzz.sh [SECONDS=300] [WORKERS=2] [TARGET=gguf|forward|control|shard|data|schema]
#
# TARGET schema fuzzes structured output's schema compiler and grammar matcher
# (json_schema_fuzzer, corpus tests/fuzz/corpus/schema).
#
# TARGET forward fuzzes the worker's request framing and the coordinator's response assembly
# (forward_chunks_fuzzer, seeds from its own writer, corpus tests/fuzz/corpus/forward).
# TARGET control fuzzes the coordinator's control-service handlers (cluster_control_fuzzer:
# join, fetch, ready, watch, drain, view under hostile workers; corpus tests/fuzz/corpus/control)
# and TARGET shard the worker's shard cache (shard_cache_fuzzer: a hostile file in the cache
# directory must be repaired by Materialize; corpus tests/fuzz/corpus/shard); TARGET data the
# worker's data channel (data_channel_fuzzer: a hostile peer on a loopback connection to a real
# DataServer; corpus tests/fuzz/corpus/data, seeded with --write-seeds). All three build
# coordinator/ and worker/ instrumented, synthesize a small model at startup (seconds) in $TMPDIR
# (default /dev/shm when writable, else /tmp), keep the code under test quiet on stderr
# (MOEPOOL_FUZZ_VERBOSE=1 traces every call instead), and use build-fuzz/TARGET-corpus.
#
# New inputs go to build-fuzz/corpus (the committed seeds are never modified); crashes, leaks,
# out-of-memory and slow inputs to build-fuzz/artifacts. -malloc_limit_mb is far below what the
# 684-byte file of issue 16 made the reader allocate (316 MB), and -rss_limit_mb bounds the
# process: a small input that allocates out of proportion is reported as a finding.
set -euo pipefail
cd "$(dirname "$0")/../.."
seconds=${1:-300}
workers=${2:-2}
target=${3:-gguf}
CC=${CC:-clang} CXX=${CXX:-clang++} cmake -S . -B build-fuzz -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DMOEPOOL_FUZZ=ON -DMOEPOOL_BUILD_TESTS=OFF -DMOEPOOL_BUILD_BENCHMARKS=OFF >/dev/null
case "$target" in
  control | shard | data | schema)
    case "$target" in
      control) binary=cluster_control_fuzzer ;;
      shard) binary=shard_cache_fuzzer ;;
      schema) binary=json_schema_fuzzer ;;
      *) binary=data_channel_fuzzer ;;
    esac
    ninja -C build-fuzz "$binary"
    mkdir -p "build-fuzz/$target-corpus" build-fuzz/artifacts
    # crash-* seeds reproduce findings not fixed yet (ctest replays them): fuzzing starts without.
    for seed in "tests/fuzz/corpus/$target"/*; do
      [ -e "$seed" ] || continue
      case "$(basename "$seed")" in crash-*) continue ;; esac
      cp -n "$seed" "build-fuzz/$target-corpus/"
    done
    if [ -z "${TMPDIR:-}" ] && [ -w /dev/shm ]; then export TMPDIR=/dev/shm; fi
    cd build-fuzz
    exec "tests/fuzz/$binary" "$target-corpus" \
      -max_total_time="$seconds" -jobs="$workers" -workers="$workers" \
      -max_len=32768 -malloc_limit_mb=256 -rss_limit_mb=2048 -timeout=20 \
      -artifact_prefix="artifacts/$target-" -print_final_stats=1
    ;;
esac
if [ "$target" = forward ]; then
  ninja -C build-fuzz forward_chunks_fuzzer
  mkdir -p build-fuzz/forward-corpus build-fuzz/artifacts
  cp -n tests/fuzz/corpus/forward/* build-fuzz/forward-corpus/ 2>/dev/null || true
  cd build-fuzz
  exec tests/fuzz/forward_chunks_fuzzer forward-corpus \
    -max_total_time="$seconds" -jobs="$workers" -workers="$workers" \
    -max_len=16384 -malloc_limit_mb=64 -rss_limit_mb=1024 -timeout=10 \
    -artifact_prefix=artifacts/ -print_final_stats=1
fi
ninja -C build-fuzz gguf_reader_fuzzer
mkdir -p build-fuzz/corpus build-fuzz/artifacts
cp -n tests/fuzz/corpus/gguf/*.gguf build-fuzz/corpus/ 2>/dev/null || true
cd build-fuzz  # libFuzzer writes one fuzz-N.log per job here
exec tests/fuzz/gguf_reader_fuzzer corpus \
  -max_total_time="$seconds" -jobs="$workers" -workers="$workers" \
  -max_len=65536 -malloc_limit_mb=64 -rss_limit_mb=1024 -timeout=10 \
  -artifact_prefix=artifacts/ -print_final_stats=1
