// Bandwidth benchmark of the CUDA decode kernel (QuantMatVec), run by `moepool_gpu_tests --bench`.
#ifndef MOEPOOL_BENCH_GPU_BENCH_H_
#define MOEPOOL_BENCH_GPU_BENCH_H_

#include <cstdint>
#include <functional>
#include <string>

#include "absl/status/statusor.h"

namespace moepool {

struct GpuBenchOptions {
  int device = 0;
  int64_t cols = 4096;  // row length of the benchmark matrices (Mixtral's hidden size)
  int l2_multiple = 4;  // working set >= this many times the device's L2 cache
  int iterations = 20;  // timed launches per measurement (median reported)
};

// Measures, on one device: device-to-device cudaMemcpy bandwidth (bytes read + written per
// second) and, for Q4_K and Q8_0, QuantMatVec's weight bandwidth (weight bytes per second) with a
// weight matrix of >= l2_multiple x L2 bytes, plus QuantMatMul throughput for a few batch sizes.
// Returns a JSON document. UNAVAILABLE without a device.
// Adds "attention": the tiled attention kernel (LaunchAttentionTiles) on Mixtral's shape for
// decode batches and 512-row prompt chunks, K/V bytes read per second and as a share of the copy
// bandwidth.
absl::StatusOr<std::string> RunGpuBench(const GpuBenchOptions& options);

// Median milliseconds of `iterations` timed calls of a launch (after warm-up).
using AttentionTimer = std::function<absl::StatusOr<double>(
    int iterations, const std::function<absl::Status()>& launch)>;
// The attention cases of RunGpuBench as JSON objects (gpu_attention_bench.cu).
absl::StatusOr<std::string> RunAttentionBench(double copy_gbs, int iterations,
                                              const AttentionTimer& time);

}  // namespace moepool

#endif  // MOEPOOL_BENCH_GPU_BENCH_H_
