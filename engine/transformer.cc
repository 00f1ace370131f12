#include "engine/transformer.h"

#include <algorithm>
#include <cmath>
#include <memory>

#include "absl/strings/str_cat.h"
#include "engine/cpu_attention.h"
#include "engine/matmul.h"
#include "engine/moe_ffn.h"
#include "engine/status_macros.h"

namespace moepool {

void RmsNorm(const float* x, const float* w, int64_t n, int64_t d, float eps, float* y) {
  for (int64_t r = 0; r < n; ++r) {
    const float* xr = x + r * d;
    float* yr = y + r * d;
    double sum = 0.0;
    for (int64_t i = 0; i < d; ++i) sum += static_cast<double>(xr[i]) * xr[i];
    const float mean = static_cast<float>(sum / static_cast<double>(d));
    const float scale = 1.0f / std::sqrt(mean + eps);
    for (int64_t i = 0; i < d; ++i) yr[i] = (xr[i] * scale) * w[i];
  }
}

void ApplyRope(float* x, int64_t n_heads, int64_t head_dim, int64_t n_rot, int64_t pos,
               float base) {
  const float theta_scale = std::pow(base, -2.0f / static_cast<float>(n_rot));
  for (int64_t h = 0; h < n_heads; ++h) {
    float* v = x + h * head_dim;
    float theta = static_cast<float>(pos);
    for (int64_t i = 0; i < n_rot; i += 2) {
      const float c = std::cos(theta);
      const float s = std::sin(theta);
      const float a = v[i];
      const float b = v[i + 1];
      v[i] = a * c - b * s;
      v[i + 1] = a * s + b * c;
      theta *= theta_scale;
    }
  }
}

Transformer::Transformer(const Model* model, ExpertBackend* experts, ThreadPool* pool,
                         const TransformerOptions& options)
    : model_(model), experts_(experts), pool_(pool), attention_(options.attention) {
  if (attention_ == nullptr) {
    cpu_attention_ = std::make_unique<CpuAttentionBackend>(model, pool);
    attention_ = cpu_attention_.get();
  }
}

// One micro-batch's state through the layers.
struct Transformer::Pass {
  Pass(absl::Span<const BatchRow> r, const ModelConfig& c)
      : rows(r),
        n(static_cast<int64_t>(r.size())),
        x(static_cast<size_t>(n * c.n_embd)),
        h(static_cast<size_t>(n * c.n_embd)),
        moe(static_cast<size_t>(n * c.n_embd)),
        expert(static_cast<size_t>(n * c.n_expert_used)),
        weight(static_cast<size_t>(n * c.n_expert_used)) {}

  absl::Span<const BatchRow> rows;
  int64_t n;
  std::vector<float> x;         // residual stream [n x n_embd]
  std::vector<float> h;         // ffn_norm(x) [n x n_embd]: the experts' input
  std::vector<float> moe;       // the experts' output [n x n_embd]
  std::vector<int32_t> expert;  // [n x k]
  std::vector<float> weight;    // [n x k]
  ExpertRoutes routes;          // of the current layer, pointing into h / expert / weight
  std::unique_ptr<AttentionBackend::Pass> attention;  // the backend's state for these rows
};

absl::Status Transformer::Prepare(absl::Span<const BatchRow> rows) const {
  const ModelConfig& c = model_->config();
  for (const BatchRow& row : rows) {
    if (row.token < 0 || row.token >= c.n_vocab) {
      return absl::InvalidArgumentError(
          absl::StrCat("token id ", row.token, " out of range [0, ", c.n_vocab, ")"));
    }
    if (row.cache == nullptr || row.pos < 0 || row.pos >= row.cache->n_ctx()) {
      return absl::InvalidArgumentError(
          absl::StrCat("position ", row.pos, " exceeds the context of ",
                       row.cache ? row.cache->n_ctx() : 0, " tokens"));
    }
  }
  return absl::OkStatus();
}

void Transformer::Embed(Pass* p) const {
  const int64_t d = model_->config().n_embd;
  for (int64_t r = 0; r < p->n; ++r) {
    DequantizeRow(model_->token_embd(), p->rows[r].token, &p->x[r * d]);
  }
}

absl::Status Transformer::Attention(int64_t il, Pass* p) {
  return attention_->Layer(p->attention.get(), il, p->x.data(), p->h.data(), p->expert.data(),
                           p->weight.data());
}

void Transformer::Route(int64_t il, Pass* p) {
  const ModelConfig& c = model_->config();
  ExpertRoutes& routes = p->routes;
  routes.layer = static_cast<int>(il);
  routes.n_rows = p->n;
  routes.n_embd = c.n_embd;
  routes.k = static_cast<int>(c.n_expert_used);
  routes.x = p->h.data();
  routes.expert = p->expert.data();
  routes.weight = p->weight.data();
  if (observer_ != nullptr) observer_->OnRoutes(static_cast<int>(il), routes);
}

void Transformer::AddExperts(Pass* p) const {
  for (size_t i = 0; i < p->x.size(); ++i) p->x[i] += p->moe[i];
}

absl::Status Transformer::Head(const Pass& p, std::vector<float>* logits) const {
  const ModelConfig& c = model_->config();
  const int64_t d = c.n_embd;
  std::vector<float> sel;
  int64_t n_out = 0;
  for (int64_t r = 0; r < p.n; ++r) {
    if (!p.rows[r].want_logits) continue;
    sel.insert(sel.end(), p.x.begin() + r * d, p.x.begin() + (r + 1) * d);
    ++n_out;
  }
  if (n_out == 0) return absl::OkStatus();
  const size_t base = logits->size();
  logits->resize(base + static_cast<size_t>(n_out * c.n_vocab));
  const absl::Status s = attention_->Head(sel.data(), n_out, logits->data() + base);
  if (!s.ok()) logits->resize(base);
  return s;
}

absl::Status Transformer::BeginPass(Pass* p) const {
  ASSIGN_OR_RETURN(p->attention, attention_->BeginPass(p->rows));
  Embed(p);
  return absl::OkStatus();
}

absl::Status Transformer::Forward(absl::Span<const BatchRow> rows, std::vector<float>* logits) {
  const absl::Span<const BatchRow> one[] = {rows};
  return ForwardMicroBatches(one, logits);
}

// The one driver of the layers. Per layer and micro-batch:
//   Attention  x += attn(attn_norm(x)); h = ffn_norm(x)      x, h   [n x n_embd]
//   Route      expert, weight = top-k(router(h))             [n x k] (ExpertRoutes)
//   Experts    moe = sum_j weight_j * FFN_expert_j(h)         moe    [n x n_embd]
//   Residual   x += moe
// With one micro-batch the experts run synchronously (ExpertBackend::Compute, which lets a
// cluster backend write a request on this thread); with several, Start / Finish pipeline them:
// micro-batch i's experts run while micro-batch i + 1's attention runs here.
absl::Status Transformer::ForwardMicroBatches(
    absl::Span<const absl::Span<const BatchRow>> micro_batches, std::vector<float>* logits) {
  const ModelConfig& c = model_->config();
  std::vector<std::unique_ptr<Pass>> passes;
  for (const auto& mb : micro_batches) {
    if (mb.empty()) continue;
    RETURN_IF_ERROR(Prepare(mb));
    passes.push_back(std::make_unique<Pass>(mb, c));
  }
  if (passes.empty()) return absl::OkStatus();
  // Paged caches take their blocks now, before any K/V is written.
  for (const auto& p : passes) {
    for (const BatchRow& row : p->rows) RETURN_IF_ERROR(row.cache->Reserve(row.pos + 1));
  }
  for (const auto& p : passes) RETURN_IF_ERROR(BeginPass(p.get()));
  const bool pipelined = passes.size() > 1;
  std::vector<std::unique_ptr<PendingExperts>> pending(passes.size());
  // After micro-batch `failed` failed: finishes every outstanding computation in start order
  // (the micro-batches after it started first) and returns `error`.
  auto drain = [&](size_t failed, absl::Status error) {
    for (size_t t = 1; t <= pending.size(); ++t) {
      const size_t j = (failed + t) % pending.size();
      if (pending[j] == nullptr) continue;
      pending[j]->Finish().IgnoreError();
      pending[j].reset();
    }
    return error;
  };
  // Finishes micro-batch i's experts in flight, if any, and adds them to its residual stream.
  auto finish = [&](size_t i) {
    if (pending[i] == nullptr) return absl::OkStatus();
    const absl::Status s = pending[i]->Finish();
    pending[i].reset();
    if (s.ok()) AddExperts(passes[i].get());
    return s;
  };
  // The start order is (layer, micro-batch) ascending, so finishing micro-batch i's previous
  // layer before starting its next one finishes in start order.
  for (int64_t il = 0; il < c.n_layer; ++il) {
    for (size_t i = 0; i < passes.size(); ++i) {
      Pass* p = passes[i].get();
      if (absl::Status s = finish(i); !s.ok()) return drain(i, s);
      if (absl::Status s = Attention(il, p); !s.ok()) return drain(i, s);
      Route(il, p);
      if (pipelined) {
        pending[i] = experts_->Start(p->routes, p->moe.data());
        continue;
      }
      RETURN_IF_ERROR(experts_->Compute(p->routes, p->moe.data()));
      AddExperts(p);
    }
  }
  // Each micro-batch's output head runs while the later ones' last experts are in flight.
  const size_t logits_before = logits->size();
  for (size_t i = 0; i < passes.size(); ++i) {
    absl::Status s = finish(i);
    if (s.ok()) s = Head(*passes[i], logits);
    if (!s.ok()) {
      logits->resize(logits_before);
      return drain(i, s);
    }
  }
  return absl::OkStatus();
}

}  // namespace moepool
