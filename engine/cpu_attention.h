// The AttentionBackend of the CPU: a layer's work up to the experts and the output head, with
// the model's weights and the quantized kernels of engine/matmul.h, K/V in the sequences' own
// KvCaches. The Transformer uses it unless it is given another backend.
//
// Each row's result depends only on that row and its own sequence's cache (batch invariance),
// and not on the thread count. Threading: one pass at a time (AttentionBackend's contract); the
// pool parallelises inside a call. Ownership: borrows the model and the pool, which must outlive
// it; a Pass holds its scratch buffers.
#ifndef MOEPOOL_ENGINE_CPU_ATTENTION_H_
#define MOEPOOL_ENGINE_CPU_ATTENTION_H_

#include <cstdint>
#include <memory>

#include "engine/attention_backend.h"
#include "engine/model.h"
#include "engine/thread_pool.h"

namespace moepool {

class CpuAttentionBackend final : public AttentionBackend {
 public:
  CpuAttentionBackend(const Model* model, ThreadPool* pool) : model_(model), pool_(pool) {}

  absl::StatusOr<std::unique_ptr<Pass>> BeginPass(absl::Span<const BatchRow> rows) override;
  // Never fails.
  absl::Status Layer(Pass* pass, int64_t il, float* x, float* h, int32_t* expert,
                     float* weight) override;
  absl::Status Head(const float* x, int64_t n, float* logits) override;
  absl::Status PreparePool(KvBlockPool*) override { return absl::OkStatus(); }

 private:
  class CpuPass;
  // Causal attention of layer `layer` for the pass's rows: out[r] = softmax(q[r] K^T) V over
  // positions [0, pos] of the row's cache, per query head (grouped-query: n_head / n_head_kv
  // query heads share a K/V head).
  void Attend(int64_t layer, const CpuPass& p, const float* q, float* out) const;

  const Model* model_;
  ThreadPool* pool_;
};

}  // namespace moepool

#endif  // MOEPOOL_ENGINE_CPU_ATTENTION_H_
