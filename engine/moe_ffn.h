// Mixture-of-experts FFN: routing (device-neutral) and the local CPU expert backend.
//
// The MoE step of a layer reads Route -> Dispatch -> ExpertCompute -> Combine:
//   RouteTopK picks each row's experts and weights from the router logits;
//   an ExpertBackend dispatches rows to the experts (locally: grouped by expert), computes each
//   expert's SwiGLU FFN and combines the weighted outputs in ascending expert id.
#ifndef MOEPOOL_ENGINE_MOE_FFN_H_
#define MOEPOOL_ENGINE_MOE_FFN_H_

#include <cstdint>
#include <deque>
#include <mutex>
#include <vector>

#include "engine/expert_backend.h"
#include "engine/matmul.h"
#include "engine/model.h"
#include "engine/moe_dispatch.h"
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

// Runs the experts bound in `model` on this process's CPU. Borrows the model and the pool.
// Thread-safe: concurrent Compute calls run one at a time (they share scratch buffers and the
// pool). All experts of a layer run together: one parallel pass computes every expert's gate, up
// and SwiGLU, a second every expert's down projection (two synchronisations per layer, and the
// threads balance across experts). Each output element is still one dot product of one row, so
// results equal ExpertFfnCpu row by row.
class LocalExpertBackend : public ExpertBackend {
 public:
  LocalExpertBackend(const Model* model, ThreadPool* pool) : model_(model), pool_(pool) {}
  absl::Status Compute(const ExpertRoutes& routes, float* out) override;

 private:
  struct Group {  // one expert's run of slots
    const ExpertWeights* expert;
    int64_t first;  // first slot
    int64_t m;      // slots
  };
  struct Task {  // weight rows [r0, r1) of one group's matrices
    size_t group;
    int64_t r0, r1;
    RowsView a, b;  // converted activations of the group (gate and up; down uses a)
  };
  struct Scratch {
    std::vector<int> destination_of;         // [n_expert], all 0: every expert is computed here
    DispatchPlan plan;                       // the layer's pairs, grouped by expert
    std::vector<DispatchPartial> partials;   // one per pair, for Combine
    std::vector<Group> groups;               // plan.runs[0] with the experts' weights
    std::vector<float> xg;                   // [slots x n_embd] gathered input rows
    std::vector<float> h, u;                 // [slots x n_ff] SwiGLU output, up projection
    std::vector<float> y;                    // [slots x n_embd] expert outputs
    std::deque<ConvertedRows> converted[2];  // per pass, one per activation type (stable refs)
    std::vector<Task> tasks;
  };

  // Activations of pass `pass` converted for `weight_type` (cached per vec_dot type).
  const ConvertedRows& Converted(TensorType weight_type, const float* x, int64_t rows, int64_t cols,
                                 int pass);
  // Appends tasks covering weight rows [0, rows) of group `group`'s matrices.
  void AddTasks(size_t group, int64_t rows, RowsView a, RowsView b);
  void SwiGluPass(const float* xg, int64_t slots);
  void DownPass(int64_t slots);

  const Model* model_;
  ThreadPool* pool_;
  std::mutex mu_;    // serialises Compute
  Scratch scratch_;  // guarded by mu_
};

}  // namespace moepool

#endif  // MOEPOOL_ENGINE_MOE_FFN_H_
