// The CPU side of moepool_expert_bench's Mixtral part: Mixtral-8x7B-shaped MoE layers of random
// blocks in host memory, run through the engine's expert kernels (ExpertFfnCpu), for the GPU /
// CPU ratio on one host.
#ifndef MOEPOOL_BENCH_MIXTRAL_MOE_CPU_H_
#define MOEPOOL_BENCH_MIXTRAL_MOE_CPU_H_

#include <cstdint>

#include "absl/status/statusor.h"
#include "engine/quant/types.h"

namespace moepool {

// Median milliseconds of one decode token (one row, two distinct random experts per layer)
// through `layers` MoE layers of `n_experts` experts (n_embd x n_ff, `type`), each expert with
// weights of its own (4 Mixtral layers at Q4_K: 3.2 GB), so they stream from memory as a real
// model's do. threads <= 0: one per hardware thread. One untimed warm-up token first.
absl::StatusOr<double> MixtralMoeCpuMs(int layers, int64_t n_embd, int64_t n_ff, int64_t n_experts,
                                       TensorType type, int threads, int iterations);

}  // namespace moepool

#endif  // MOEPOOL_BENCH_MIXTRAL_MOE_CPU_H_
