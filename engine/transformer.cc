#include "engine/transformer.h"

#include <algorithm>
#include <cmath>

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

bool ParseMoeResidual(std::string_view name, MoeResidual* out) {
  if (name == "reference") {
    *out = MoeResidual::kReference;
  } else if (name == "standard") {
    *out = MoeResidual::kStandard;
  } else {
    return false;
  }
  return true;
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

absl::Status Transformer::Forward(absl::Span<const BatchRow> rows, std::vector<float>* logits) {
  const ModelConfig& c = model_->config();
  const int64_t n = static_cast<int64_t>(rows.size());
  if (n == 0) return absl::OkStatus();
  const int64_t d = c.n_embd;
  const int64_t kvd = c.kv_dim();
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
  // Paged caches take their blocks now, before any K/V is written.
  for (const BatchRow& row : rows) RETURN_IF_ERROR(row.cache->Reserve(row.pos + 1));

  std::vector<float> x(static_cast<size_t>(n * d));       // residual stream [n x d]
  std::vector<float> h(static_cast<size_t>(n * d));       // normed input [n x d]
  std::vector<float> q(static_cast<size_t>(n * d));       // [n x d]
  std::vector<float> kbuf(static_cast<size_t>(n * kvd));  // [n x kv_dim]
  std::vector<float> vbuf(static_cast<size_t>(n * kvd));  // [n x kv_dim]
  std::vector<float> attn(static_cast<size_t>(n * d));    // [n x d]
  std::vector<float> tmp(static_cast<size_t>(n * d));     // [n x d]
  const int k_used = static_cast<int>(c.n_expert_used);
  std::vector<float> router_logits(static_cast<size_t>(n * c.n_expert));
  std::vector<int32_t> expert(static_cast<size_t>(n * k_used));
  std::vector<float> weight(static_cast<size_t>(n * k_used));

  for (int64_t r = 0; r < n; ++r) DequantizeRow(model_->token_embd(), rows[r].token, &x[r * d]);

  ConvertedRows ch;
  for (int64_t il = 0; il < c.n_layer; ++il) {
    const LayerWeights& L = model_->layer(il);
    // Attention.
    RmsNorm(x.data(), L.attn_norm.data(), n, d, c.rms_eps, h.data());
    ConvertRows(L.wq.type, h.data(), n, d, &ch, pool_);
    MatMulConverted(L.wq, ch, q.data(), pool_);
    if (L.wk.type != L.wq.type) ConvertRows(L.wk.type, h.data(), n, d, &ch, pool_);
    MatMulConverted(L.wk, ch, kbuf.data(), pool_);
    if (L.wv.type != L.wk.type) ConvertRows(L.wv.type, h.data(), n, d, &ch, pool_);
    MatMulConverted(L.wv, ch, vbuf.data(), pool_);
    for (int64_t r = 0; r < n; ++r) {
      const BatchRow& row = rows[r];
      ApplyRope(&q[r * d], c.n_head, c.head_dim, c.n_rot, row.pos, c.rope_base);
      ApplyRope(&kbuf[r * kvd], c.n_head_kv, c.head_dim, c.n_rot, row.pos, c.rope_base);
      row.cache->Store(il, row.pos, &kbuf[r * kvd], &vbuf[r * kvd]);
    }
    Attention(il, rows, q.data(), attn.data());
    MatMul(L.wo, attn.data(), n, tmp.data(), pool_);
    for (size_t i = 0; i < x.size(); ++i) x[i] += tmp[i];

    // MoE FFN: Route -> (Dispatch -> ExpertCompute -> Combine in the backend).
    RmsNorm(x.data(), L.ffn_norm.data(), n, d, c.rms_eps, h.data());
    if (L.router.data != nullptr) {
      MatMul(L.router, h.data(), n, router_logits.data(), pool_);
      RouteTopK(router_logits.data(), n, static_cast<int>(c.n_expert), k_used, expert.data(),
                weight.data());
    } else {
      std::fill(expert.begin(), expert.end(), 0);
      std::fill(weight.begin(), weight.end(), 1.0f);
    }
    ExpertRoutes routes;
    routes.layer = static_cast<int>(il);
    routes.n_rows = n;
    routes.n_embd = d;
    routes.k = k_used;
    routes.x = h.data();
    routes.expert = expert.data();
    routes.weight = weight.data();
    if (observer_ != nullptr) observer_->OnRoutes(static_cast<int>(il), routes);
    RETURN_IF_ERROR(experts_->Compute(routes, tmp.data()));
    // Combine into the residual stream (see MoeResidual for the two conventions).
    const std::vector<float>& base = options_.moe_residual == MoeResidual::kReference ? h : x;
    for (size_t i = 0; i < x.size(); ++i) x[i] = base[i] + tmp[i];
  }

  // Output head for the rows that want logits.
  std::vector<float> sel;
  int64_t n_out = 0;
  for (int64_t r = 0; r < n; ++r) {
    if (!rows[r].want_logits) continue;
    sel.insert(sel.end(), x.begin() + r * d, x.begin() + (r + 1) * d);
    ++n_out;
  }
  if (n_out == 0) return absl::OkStatus();
  std::vector<float> normed(sel.size());
  RmsNorm(sel.data(), model_->output_norm().data(), n_out, d, c.rms_eps, normed.data());
  const size_t base = logits->size();
  logits->resize(base + static_cast<size_t>(n_out * c.n_vocab));
  MatMul(model_->output(), normed.data(), n_out, logits->data() + base, pool_);
  return absl::OkStatus();
}

}  // namespace moepool
