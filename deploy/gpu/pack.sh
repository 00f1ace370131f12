#!/usr/bin/env bash
# Builds the self-contained GPU test bundle into ./gpu-pack (gitignored):
#   gpu-pack/moepool_gpu_tests   CUDA suites + benchmark (Abseil, GoogleTest, cudart, libstdc++
#                                and libgcc linked statically)
#   gpu-pack/moepool_expert_bench  the CUDA expert backend benchmark (bench/expert_bench.h)
#   gpu-pack/lib/                any shared library it still needs besides glibc and the driver
#   gpu-pack/testdata/           the reference files its suites read (quant vectors, and
#                                tiny-Q4_K_M with its reference logits)
#   gpu-pack/run_gpu_checks.sh   what to run on the GPU machine (writes everything to $OUT)
# and gpu-pack.tar.gz, the same folder compressed (gitignored): what a device run carries. The
# carry limit is 64 MiB for the carried paths and the checkout together; the script fails when
# the archive and the tracked files would not fit.
# Needs the CUDA toolkit (no GPU). Build directory: ./build-gpu-pack (override: BUILD_DIR=...).
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
build=${BUILD_DIR:-build-gpu-pack}
pack=$root/gpu-pack
launcher=()
if command -v ccache >/dev/null; then
  launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_C_COMPILER_LAUNCHER=ccache
            -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache)
fi
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DMOEPOOL_WERROR=ON -DMOEPOOL_CUDA=ON \
  -DMOEPOOL_GPU_STATIC=ON -DMOEPOOL_BUILD_BENCHMARKS=OFF "${launcher[@]}" >/dev/null
ninja -C "$build" -j"${JOBS:-$(nproc)}" moepool_gpu_tests moepool_expert_bench

rm -rf "$pack"
mkdir -p "$pack/lib" "$pack/testdata/conformance" "$pack/testdata/vocab" "$pack/deploy/vocab"
cp "$build/deploy/gpu/moepool_gpu_tests" "$build/bench/moepool_expert_bench" "$pack/"
strip "$pack/moepool_gpu_tests" "$pack/moepool_expert_bench"
# The vocabulary the synthesized test and benchmark models use (found as testdata/vocab by the
# suites and as deploy/vocab under the working directory by the benchmark).
cp deploy/vocab/mistral-vocab.gguf "$pack/testdata/vocab/"
cp deploy/vocab/mistral-vocab.gguf "$pack/deploy/vocab/"
cp deploy/gpu/run_gpu_checks.sh "$pack/"
testdata=${MOEPOOL_TESTDATA:-$root/../shared/testdata}
[ -d "$testdata" ] || testdata=/work/shared/testdata
if [ -f "$testdata/conformance/quant-vectors.gguf" ]; then
  cp "$testdata/conformance/quant-vectors.gguf" "$pack/testdata/conformance/"
else
  echo "pack.sh: warning: no quant-vectors.gguf under $testdata (those tests will skip)" >&2
fi
# One reference model with its logits for the GPU engine's conformance suite (31 MB; the F16 and
# Q8_0 models would pass the 64 MiB a device run can carry).
for f in tiny-Q4_K_M.gguf tiny-Q4_K_M.p1.json tiny-Q4_K_M.p1.logits.f32 tiny-Q4_K_M.p2.json \
         tiny-Q4_K_M.p2.logits.f32; do
  if [ -f "$testdata/conformance/$f" ]; then
    cp "$testdata/conformance/$f" "$pack/testdata/conformance/"
  else
    echo "pack.sh: warning: no $f under $testdata (the device conformance test will skip)" >&2
  fi
done
# Shared libraries still needed, except glibc's and the CUDA driver's (the machine has its own).
ldd "$pack/moepool_gpu_tests" | awk '/=> \// {print $1, $3}' | while read -r name path; do
  case "$name" in
    libc.so*|libm.so*|libpthread.so*|libdl.so*|librt.so*|ld-linux*|libcuda.so*) ;;
    *) cp -L "$path" "$pack/lib/" && echo "bundled $name" ;;
  esac
done
du -sh "$pack"
rm -f "$root/gpu-pack.tar.gz"
tar -czf "$root/gpu-pack.tar.gz" -C "$root" gpu-pack
archive=$(stat -c %s "$root/gpu-pack.tar.gz")
tree=$(git ls-files -z | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
echo "gpu-pack.tar.gz: $((archive >> 20)) MiB; with the checkout: $(((archive + tree) >> 20)) MiB of 64"
if [ $((archive + tree)) -gt $((64 << 20)) ]; then
  echo "pack.sh: the archive and the checkout exceed the 64 MiB a device run can carry" >&2
  exit 1
fi
