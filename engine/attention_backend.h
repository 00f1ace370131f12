// The coordinator's per-layer work outside the experts, behind one seam: attention (RMSNorm,
// Q/K/V projections, RoPE, the K/V store, causal attention over each sequence's cache, the output
// projection and its residual), the FFN norm and the router; and the output head. The CPU's is
// engine/cpu_attention.h (the Transformer's default); the CUDA one is
// engine/cuda/device_attention.h. Embedding, the residual after the experts and sampling stay
// with the Transformer either way, and the experts stay behind their own ExpertBackend: the two
// seams are independent (attention on a GPU with experts on remote workers works).
#ifndef MOEPOOL_ENGINE_ATTENTION_BACKEND_H_
#define MOEPOOL_ENGINE_ATTENTION_BACKEND_H_

#include <cstdint>
#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "engine/kv_cache.h"

namespace moepool {

struct BatchRow {
  int32_t token = 0;
  int64_t pos = 0;           // position in its sequence; rows of one sequence in increasing order
  KvCache* cache = nullptr;  // the sequence's cache; positions < pos must already be filled or
                             // be earlier rows of this batch
  bool want_logits = false;
};

// Contract for implementations:
// - Results agree with the CPU forward pass within rounding (documented per backend), and each
//   row's result depends only on that row and its own sequence's cache, never on the other rows
//   of the pass (batch invariance), so serving stays deterministic.
// - A backend keeps the K/V it computes itself (a device copy of each KvBlockPool, attached to
//   the pool with KvBlockPool::set_mirror), indexed by the pool's block ids: paging, sharing of
//   prefix-cached blocks and eviction stay the pool's business.
// - Errors are returned, never thrown or CHECKed: RESOURCE_EXHAUSTED when device memory runs
//   out, INTERNAL for a device fault.
// Threading: one forward pass at a time (the Transformer's thread); not reentrant.
class AttentionBackend {
 public:
  virtual ~AttentionBackend() = default;

  // One micro-batch's rows as the backend sees them.
  class Pass {
   public:
    virtual ~Pass() = default;
  };
  // Prepares `rows` (already validated; every cache has its blocks reserved). The rows and their
  // caches' block tables must stay as they are until the returned pass is destroyed.
  virtual absl::StatusOr<std::unique_ptr<Pass>> BeginPass(absl::Span<const BatchRow> rows) = 0;

  // Layer `il` up to the experts for the pass's n rows:
  //   x      [n x n_embd]  in: the residual stream; out: plus the attention output projection
  //   h      [n x n_embd]  out: ffn_norm(x), the experts' input
  //   expert [n x k]       out: the top-k experts of each row (k = n_expert_used), ascending ids
  //   weight [n x k]       out: their renormalised weights
  // (a model without a router gets expert 0 with weight 1). Stores each row's K/V of layer il at
  // its position in its cache.
  virtual absl::Status Layer(Pass* pass, int64_t il, float* x, float* h, int32_t* expert,
                             float* weight) = 0;

  // logits [n x n_vocab] = output(output_norm(x)) for x [n x n_embd].
  virtual absl::Status Head(const float* x, int64_t n, float* logits) = 0;

  // Makes the backend's copy of `pool` now (otherwise the first pass over it does), so that a
  // pool that does not fit is an error at startup rather than a failed request.
  // RESOURCE_EXHAUSTED naming the bytes when it does not fit. The CPU needs nothing.
  virtual absl::Status PreparePool(KvBlockPool* pool) = 0;
};

}  // namespace moepool

#endif  // MOEPOOL_ENGINE_ATTENTION_BACKEND_H_
