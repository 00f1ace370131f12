// The seam between the forward pass and wherever experts run (this process's CPU, a GPU, or a
// remote worker). The forward pass routes rows to experts and hands them to an ExpertBackend;
// it never knows where an expert lives.
#ifndef MOEPOOL_ENGINE_EXPERT_BACKEND_H_
#define MOEPOOL_ENGINE_EXPERT_BACKEND_H_

#include <cstdint>

#include "absl/status/status.h"

namespace moepool {

// The rows of one layer's MoE step and their routing. Borrowed pointers, valid for the call.
struct ExpertRoutes {
  int layer = 0;
  int64_t n_rows = 0;
  int64_t n_embd = 0;
  int k = 0;                        // (expert, weight) pairs per row
  const float* x = nullptr;         // [n_rows x n_embd] normalised FFN input
  const int32_t* expert = nullptr;  // [n_rows x k] ascending within a row; -1 = no expert
  const float* weight = nullptr;    // [n_rows x k] routing weights
};

class ExpertBackend {
 public:
  virtual ~ExpertBackend() = default;

  // out [n_rows x n_embd] = for each row, the sum over its (expert, weight) pairs, added in
  // ascending expert id starting from 0.0f, of weight * SwiGLU-FFN_expert(x_row).
  // For each pair the product is rounded to f32 before it is added, so partial sums computed
  // elsewhere (on several workers) combine to the same bits for k <= 2.
  // Errors: INVALID_ARGUMENT for an expert or layer this backend does not hold, UNAVAILABLE /
  // DEADLINE_EXCEEDED for a backend that cannot be reached. Thread-safety: per implementation;
  // the forward pass calls one Compute at a time.
  virtual absl::Status Compute(const ExpertRoutes& routes, float* out) = 0;
};

}  // namespace moepool

#endif  // MOEPOOL_ENGINE_EXPERT_BACKEND_H_
