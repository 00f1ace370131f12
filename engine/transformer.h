// The Mixtral forward pass: embedding, then per layer attention and routing (an AttentionBackend:
// the CPU's, engine/cpu_attention.h, unless another is given), the routed MoE FFN (an
// ExpertBackend) and the residual; then the output head (the AttentionBackend again).
//
// A batch is a list of rows, each a (token, position, sequence cache) triple, so prompt chunks
// and decode tokens of different sequences share one pass. Every per-row computation depends only
// on that row and its own sequence's cache, never on the other rows or the thread count.
//
// Each layer reads Attention -> Route -> Experts (Start / Finish; the backend's Dispatch ->
// ExpertCompute -> Combine) -> Residual: see ForwardMicroBatches in transformer.cc.
#ifndef MOEPOOL_ENGINE_TRANSFORMER_H_
#define MOEPOOL_ENGINE_TRANSFORMER_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "engine/attention_backend.h"
#include "engine/expert_backend.h"
#include "engine/kv_cache.h"
#include "engine/model.h"
#include "engine/thread_pool.h"

namespace moepool {

// Observes each layer's routing (for metrics). Called on the forward thread.
class RoutingObserver {
 public:
  virtual ~RoutingObserver() = default;
  virtual void OnRoutes(int layer, const ExpertRoutes& routes) = 0;
};

struct TransformerOptions {
  // Where attention, router and output head run (borrowed; must outlive the Transformer).
  // nullptr: a CpuAttentionBackend the Transformer owns. A backend keeps its own K/V: every pass
  // over one cache must use the same backend.
  AttentionBackend* attention = nullptr;
};

class Transformer {
 public:
  // Borrows all three; they must outlive the Transformer. The model must bind the non-expert
  // weights; experts may be anywhere behind `experts`.
  Transformer(const Model* model, ExpertBackend* experts, ThreadPool* pool,
              const TransformerOptions& options = {});

  // Runs the rows, writes their K/V into their caches and, for rows with want_logits, appends
  // one row of n_vocab logits each (in row order) to `logits`. Paged caches get the blocks their
  // rows need first (KvCache::Reserve). Errors: INVALID_ARGUMENT for a token id out of range or a
  // position past the cache; RESOURCE_EXHAUSTED when a paged cache's pool has no free block
  // (nothing computed; blocks taken stay with their caches); whatever the ExpertBackend returns.
  // After an error the caches may hold partial K/V for the batch positions (callers roll back
  // n_past, which this function never changes).
  absl::Status Forward(absl::Span<const BatchRow> rows, std::vector<float>* logits);

  // Forward over several micro-batches at once, pipelined so that the experts of one run while
  // the attention (and everything else outside the experts) of the next is computed here: per
  // layer, for each micro-batch in turn, finish its previous layer's experts, run its
  // attention and routing, and start its experts (ExpertBackend::Start); at the end, each
  // micro-batch's output head runs while the later ones' last experts are in flight. With remote
  // experts this keeps this thread busy while the workers compute.
  // Each micro-batch's rows give exactly the bits Forward gives for them alone (per-row
  // independence). Logits are appended micro-batch by micro-batch, each in row order (so a
  // split of one row list into consecutive parts gives the logits of Forward on the whole).
  // Rows of one sequence go in one micro-batch, or in increasing position order across
  // micro-batches (the earlier micro-batch's K/V of a layer is stored before the later one's
  // attention of that layer). Same errors as Forward; on an error every started expert
  // computation is finished before returning and no logits are appended. One non-empty
  // micro-batch: exactly Forward.
  absl::Status ForwardMicroBatches(absl::Span<const absl::Span<const BatchRow>> micro_batches,
                                   std::vector<float>* logits);

  // Reserves the attention backend's copy of `pool` (AttentionBackend::PreparePool; the CPU's
  // needs none).
  absl::Status PreparePool(KvBlockPool* pool) { return attention_->PreparePool(pool); }

  void set_routing_observer(RoutingObserver* obs) { observer_ = obs; }
  const Model& model() const { return *model_; }
  ThreadPool* pool() const { return pool_; }
  ExpertBackend* experts() const { return experts_; }

 private:
  struct Pass;  // one micro-batch's buffers

  // Checks tokens and positions (INVALID_ARGUMENT).
  absl::Status Prepare(absl::Span<const BatchRow> rows) const;
  // The attention backend's pass for p's rows, and the embedding into the residual stream.
  absl::Status BeginPass(Pass* p) const;
  void Embed(Pass* p) const;
  // Layer `il` up to the experts on the attention backend: x += attention, h = ffn_norm(x), the
  // top-k experts and weights of each row (the backend's errors).
  absl::Status Attention(int64_t il, Pass* p);
  // p->routes for layer il (and the routing observer).
  void Route(int64_t il, Pass* p);
  // The MoE residual, x = x + MoE(ffn_norm(x)): adds the experts' output (p->moe) to the
  // un-normalised residual stream, as Mixtral was trained (docs/engine.md).
  void AddExperts(Pass* p) const;
  // Output norm and head for the rows that want logits (appended to `logits`).
  absl::Status Head(const Pass& p, std::vector<float>* logits) const;

  const Model* model_;
  ExpertBackend* experts_;
  ThreadPool* pool_;
  RoutingObserver* observer_ = nullptr;
  AttentionBackend* attention_;                      // never null
  std::unique_ptr<AttentionBackend> cpu_attention_;  // when no backend was given
};

// y = x / sqrt(mean(x^2) + eps) * w for each of n rows of width d (sum of squares in double).
void RmsNorm(const float* x, const float* w, int64_t n, int64_t d, float eps, float* y);

// Rotates pairs (2i, 2i+1) for i < n_rot/2 of each head of `x` [n_heads x head_dim] (llama/GGUF
// convention), angle pos * base^(-2i/n_rot).
void ApplyRope(float* x, int64_t n_heads, int64_t head_dim, int64_t n_rot, int64_t pos, float base);

}  // namespace moepool

#endif  // MOEPOOL_ENGINE_TRANSFORMER_H_
