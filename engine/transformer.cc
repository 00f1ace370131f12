#include "engine/transformer.h"

#include <algorithm>
#include <cmath>
#include <memory>

#include "absl/strings/str_cat.h"
#include "engine/attention.h"
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
    : model_(model), experts_(experts), pool_(pool), options_(options) {}

void Transformer::Attention(int64_t layer, absl::Span<const BatchRow> rows, const float* q,
                            float* out) {
  const ModelConfig& c = model_->config();
  const int64_t hd = c.head_dim;
  const int group = static_cast<int>(c.n_head / c.n_head_kv);
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  const int64_t n = static_cast<int64_t>(rows.size());
  // One task per (row, KV head): the query heads of a group share each converted K/V row.
  pool_->ParallelFor(n * c.n_head_kv, [&](int64_t task) {
    const int64_t r = task / c.n_head_kv;
    const int64_t kvh = task % c.n_head_kv;
    const BatchRow& row = rows[static_cast<size_t>(r)];
    const KvHeadView kv = row.cache->HeadView(layer, kvh, hd, row.pos + 1);
    thread_local std::vector<float> scratch;
    scratch.resize(static_cast<size_t>(group * kv.n_kv));
    const int64_t h0 = kvh * group;
    AttendKvHead(q + r * c.n_embd + h0 * hd, group, hd, kv, scale, out + r * c.n_embd + h0 * hd,
                 scratch.data());
  });
}

// One micro-batch's state through the layers.
struct Transformer::Pass {
  Pass(absl::Span<const BatchRow> r, const ModelConfig& c)
      : rows(r),
        n(static_cast<int64_t>(r.size())),
        x(static_cast<size_t>(n * c.n_embd)),
        h(static_cast<size_t>(n * c.n_embd)),
        q(static_cast<size_t>(n * c.n_embd)),
        kbuf(static_cast<size_t>(n * c.kv_dim())),
        vbuf(static_cast<size_t>(n * c.kv_dim())),
        attn(static_cast<size_t>(n * c.n_embd)),
        moe(static_cast<size_t>(n * c.n_embd)),
        router_logits(static_cast<size_t>(n * c.n_expert)),
        expert(static_cast<size_t>(n * c.n_expert_used)),
        weight(static_cast<size_t>(n * c.n_expert_used)) {}

  absl::Span<const BatchRow> rows;
  int64_t n;
  std::vector<float> x;              // residual stream [n x n_embd]
  std::vector<float> h;              // normed input [n x n_embd]; the experts' input
  std::vector<float> q;              // [n x n_embd]
  std::vector<float> kbuf;           // [n x kv_dim]
  std::vector<float> vbuf;           // [n x kv_dim]
  std::vector<float> attn;           // [n x n_embd]; also the attention output projection
  std::vector<float> moe;            // the experts' output [n x n_embd]
  std::vector<float> router_logits;  // [n x n_expert]
  std::vector<int32_t> expert;       // [n x k]
  std::vector<float> weight;         // [n x k]
  ConvertedRows converted;           // the attention input for wq (and whatever shares its type)
  ConvertedRows converted_k, converted_v;  // for wk / wv when they need other activation types
  ExpertRoutes routes;  // of the current layer, pointing into h / expert / weight
  std::unique_ptr<AttentionBackend::Pass> device;  // with an AttentionBackend
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

void Transformer::Begin(Pass* p) const {
  const int64_t d = model_->config().n_embd;
  for (int64_t r = 0; r < p->n; ++r) {
    DequantizeRow(model_->token_embd(), p->rows[r].token, &p->x[r * d]);
  }
}

absl::Status Transformer::AttentionAndRoute(int64_t il, Pass* p) {
  if (options_.attention != nullptr) {
    RETURN_IF_ERROR(options_.attention->Layer(p->device.get(), il, p->x.data(), p->h.data(),
                                              p->expert.data(), p->weight.data()));
  } else {
    AttentionAndRouteOnCpu(il, p);
  }
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
  return absl::OkStatus();
}

void Transformer::AttentionAndRouteOnCpu(int64_t il, Pass* p) {
  const ModelConfig& c = model_->config();
  const LayerWeights& L = model_->layer(il);
  const int64_t n = p->n;
  const int64_t d = c.n_embd;
  const int64_t kvd = c.kv_dim();
  ConvertedRows& ch = p->converted;
  RmsNorm(p->x.data(), L.attn_norm.data(), n, d, c.rms_eps, p->h.data());
  // Q, K and V in one parallel loop; the rows are converted once per activation type the three
  // weight types need (Q4_K and Q6_K both take Q8_K rows).
  const auto act_type = [](const WeightMatrix& w) { return GetTypeTraits(w.type).vec_dot_type; };
  ConvertRows(L.wq.type, p->h.data(), n, d, &ch, pool_);
  const ConvertedRows* ck = &ch;
  if (act_type(L.wk) != ch.type) {
    ConvertRows(L.wk.type, p->h.data(), n, d, &p->converted_k, pool_);
    ck = &p->converted_k;
  }
  const ConvertedRows* cv = act_type(L.wv) == ch.type ? &ch : ck;
  if (act_type(L.wv) != cv->type) {
    ConvertRows(L.wv.type, p->h.data(), n, d, &p->converted_v, pool_);
    cv = &p->converted_v;
  }
  MatMulMany({{&L.wq, ch.Slice(0, n), p->q.data()},
              {&L.wk, ck->Slice(0, n), p->kbuf.data()},
              {&L.wv, cv->Slice(0, n), p->vbuf.data()}},
             pool_);
  for (int64_t r = 0; r < n; ++r) {
    const BatchRow& row = p->rows[r];
    ApplyRope(&p->q[r * d], c.n_head, c.head_dim, c.n_rot, row.pos, c.rope_base);
    ApplyRope(&p->kbuf[r * kvd], c.n_head_kv, c.head_dim, c.n_rot, row.pos, c.rope_base);
    row.cache->Store(il, row.pos, &p->kbuf[r * kvd], &p->vbuf[r * kvd]);
  }
  Attention(il, p->rows, p->q.data(), p->attn.data());
  // The projection goes to `moe` (free until the experts run), then into the residual.
  MatMul(L.wo, p->attn.data(), n, p->moe.data(), pool_);
  for (size_t i = 0; i < p->x.size(); ++i) p->x[i] += p->moe[i];

  // MoE FFN: Route here; Dispatch -> ExpertCompute -> Combine in the backend.
  const int k_used = static_cast<int>(c.n_expert_used);
  RmsNorm(p->x.data(), L.ffn_norm.data(), n, d, c.rms_eps, p->h.data());
  if (L.router.data != nullptr) {
    MatMul(L.router, p->h.data(), n, p->router_logits.data(), pool_);
    RouteTopK(p->router_logits.data(), n, static_cast<int>(c.n_expert), k_used, p->expert.data(),
              p->weight.data());
  } else {
    std::fill(p->expert.begin(), p->expert.end(), 0);
    std::fill(p->weight.begin(), p->weight.end(), 1.0f);
  }
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
  if (options_.attention != nullptr) {
    const absl::Status s = options_.attention->Head(sel.data(), n_out, logits->data() + base);
    if (!s.ok()) logits->resize(base);
    return s;
  }
  std::vector<float> normed(sel.size());
  RmsNorm(sel.data(), model_->output_norm().data(), n_out, d, c.rms_eps, normed.data());
  MatMul(model_->output(), normed.data(), n_out, logits->data() + base, pool_);
  return absl::OkStatus();
}

absl::Status Transformer::BeginOnBackend(Pass* p) const {
  if (options_.attention == nullptr) return absl::OkStatus();
  ASSIGN_OR_RETURN(p->device, options_.attention->BeginPass(p->rows));
  return absl::OkStatus();
}

absl::Status Transformer::Forward(absl::Span<const BatchRow> rows, std::vector<float>* logits) {
  if (rows.empty()) return absl::OkStatus();
  RETURN_IF_ERROR(Prepare(rows));
  // Paged caches take their blocks now, before any K/V is written.
  for (const BatchRow& row : rows) RETURN_IF_ERROR(row.cache->Reserve(row.pos + 1));
  Pass p(rows, model_->config());
  RETURN_IF_ERROR(BeginOnBackend(&p));
  Begin(&p);
  for (int64_t il = 0; il < model_->config().n_layer; ++il) {
    RETURN_IF_ERROR(AttentionAndRoute(il, &p));
    RETURN_IF_ERROR(experts_->Compute(p.routes, p.moe.data()));
    AddExperts(&p);
  }
  return Head(p, logits);
}

absl::Status Transformer::ForwardMicroBatches(
    absl::Span<const absl::Span<const BatchRow>> micro_batches, std::vector<float>* logits) {
  std::vector<absl::Span<const BatchRow>> batches;
  for (const auto& mb : micro_batches) {
    if (!mb.empty()) batches.push_back(mb);
  }
  if (batches.size() <= 1) return batches.empty() ? absl::OkStatus() : Forward(batches[0], logits);
  for (const auto& mb : batches) RETURN_IF_ERROR(Prepare(mb));
  for (const auto& mb : batches) {
    for (const BatchRow& row : mb) RETURN_IF_ERROR(row.cache->Reserve(row.pos + 1));
  }
  const ModelConfig& c = model_->config();
  std::vector<std::unique_ptr<Pass>> passes;
  for (const auto& mb : batches) {
    passes.push_back(std::make_unique<Pass>(mb, c));
    RETURN_IF_ERROR(BeginOnBackend(passes.back().get()));
  }
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
  for (auto& p : passes) Begin(p.get());
  // The start order is (layer, micro-batch) ascending, so finishing micro-batch i's previous
  // layer before starting its next one finishes in start order.
  for (int64_t il = 0; il < c.n_layer; ++il) {
    for (size_t i = 0; i < passes.size(); ++i) {
      Pass* p = passes[i].get();
      if (pending[i] != nullptr) {
        const absl::Status s = pending[i]->Finish();
        pending[i].reset();
        if (!s.ok()) return drain(i, s);
        AddExperts(p);
      }
      if (absl::Status s = AttentionAndRoute(il, p); !s.ok()) return drain(i, s);
      pending[i] = experts_->Start(p->routes, p->moe.data());
    }
  }
  // Each micro-batch's output head runs while the later ones' last experts are in flight.
  const size_t logits_before = logits->size();
  for (size_t i = 0; i < passes.size(); ++i) {
    const absl::Status s = pending[i]->Finish();
    pending[i].reset();
    if (!s.ok()) {
      logits->resize(logits_before);
      return drain(i, s);
    }
    AddExperts(passes[i].get());
    if (absl::Status s = Head(*passes[i], logits); !s.ok()) {
      logits->resize(logits_before);
      return drain(i, s);
    }
  }
  return absl::OkStatus();
}

}  // namespace moepool
