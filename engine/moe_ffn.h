// Mixture-of-experts FFN: routing (device-neutral) and the local CPU expert backend.
//
// The MoE step of a layer reads Route -> Dispatch -> ExpertCompute -> Combine:
//   RouteTopK picks each row's experts and weights from the router logits;
//   an ExpertBackend dispatches rows to the experts (locally: grouped by expert), computes each
//   expert's SwiGLU FFN and combines the weighted outputs in ascending expert id.
#ifndef MOEPOOL_ENGINE_MOE_FFN_H_
#define MOEPOOL_ENGINE_MOE_FFN_H_

#include <cstdint>
#include <vector>

#include "engine/expert_backend.h"
#include "engine/model.h"
#include "engine/thread_pool.h"

namespace moepool {

// Mixtral routing: softmax over all n_expert logits, keep the k largest (ties: lower id),
// renormalise their probabilities to sum to 1, and order each row's pairs by ascending expert id.
// logits [n_rows x n_expert] -> expert, weight [n_rows x k].
void RouteTopK(const float* logits, int64_t n_rows, int n_expert, int k, int32_t* expert,
               float* weight);

// Checks what every backend requires of `routes` for `config`: layer in range, row width equal
// to the embedding length, 1 <= k <= n_expert. INVALID_ARGUMENT saying which, else OK.
absl::Status CheckRoutes(const ExpertRoutes& routes, const ModelConfig& config);

// out [n x n_embd] = down(silu(gate x) * up x) for one expert, x [n x n_embd].
void ExpertFfnCpu(const ExpertWeights& e, const float* x, int64_t n, float* out, ThreadPool* pool);

// Runs the experts bound in `model` on this process's CPU. Holds no state besides borrowed
// pointers; Compute is not reentrant (it uses the shared pool).
class LocalExpertBackend : public ExpertBackend {
 public:
  LocalExpertBackend(const Model* model, ThreadPool* pool) : model_(model), pool_(pool) {}
  absl::Status Compute(const ExpertRoutes& routes, float* out) override;

 private:
  const Model* model_;
  ThreadPool* pool_;
};

}  // namespace moepool

#endif  // MOEPOOL_ENGINE_MOE_FFN_H_
