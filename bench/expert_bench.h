// Benchmark of the CUDA expert backend (moepool_expert_bench; docs/gpu-backend.md):
//  1. decode tokens/s of a `mini`-shape model with its experts on the GPU (CudaExpertBackend),
//     and with attention, router and head on the GPU too (CreateCudaAttentionBackend), against
//     the CPU engine (LocalExpertBackend), same host, same process, same prompt (and part 3: the
//     same for a 4-layer Mixtral-8x7B-shaped model);
//  2. the MoE step of Mixtral-8x7B-shaped layers (n_embd 4096, n_ff 14336, 8 experts, top-2,
//     Q4_K) built directly in device memory from random blocks: time per decode token and the
//     expert-weight bandwidth it reaches, plus a few batch sizes.
#ifndef MOEPOOL_BENCH_EXPERT_BENCH_H_
#define MOEPOOL_BENCH_EXPERT_BENCH_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"

namespace moepool {

struct ExpertBenchOptions {
  int device = 0;
  // GGUF of the mini shape; empty: synthesize one (Q4_K_M) into $TMPDIR, which needs
  // deploy/vocab/mistral-vocab.gguf under the working directory. "-": skip part 1.
  std::string mini_model_path;
  int prompt_tokens = 16;
  int decode_tokens = 32;
  int cpu_threads = 0;  // 0: one per hardware thread
  int mixtral_layers = 4;
  int iterations = 20;      // timed decode tokens of part 2
  bool mixtral_cpu = true;  // part 2 also on this host's CPU (ExpertFfnCpu), for the ratio
  // Part 3: whole-model greedy decode (CPU engine; experts on the GPU; experts and attention on
  // the GPU) of a Mixtral-8x7B-shaped Q4_K_M model with this many layers, synthesized into
  // $TMPDIR (3.7 GB for 4 layers). 0 skips it.
  int mixtral_decode_layers = 4;
};

// Returns a JSON document. UNAVAILABLE without a CUDA device, RESOURCE_EXHAUSTED when the
// Mixtral layers do not fit.
absl::StatusOr<std::string> RunExpertBench(const ExpertBenchOptions& options);

}  // namespace moepool

#endif  // MOEPOOL_BENCH_EXPERT_BENCH_H_
