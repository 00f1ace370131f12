#include "engine/cpu_attention.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "engine/attention.h"
#include "engine/matmul.h"
#include "engine/moe_ffn.h"
#include "engine/transformer.h"

namespace moepool {

// One micro-batch's scratch buffers.
class CpuAttentionBackend::CpuPass final : public AttentionBackend::Pass {
 public:
  CpuPass(absl::Span<const BatchRow> r, const ModelConfig& c)
      : rows(r),
        n(static_cast<int64_t>(r.size())),
        q(static_cast<size_t>(n * c.n_embd)),
        kbuf(static_cast<size_t>(n * c.kv_dim())),
        vbuf(static_cast<size_t>(n * c.kv_dim())),
        attn(static_cast<size_t>(n * c.n_embd)),
        proj(static_cast<size_t>(n * c.n_embd)),
        router_logits(static_cast<size_t>(n * c.n_expert)) {}

  absl::Span<const BatchRow> rows;
  int64_t n;
  std::vector<float> q;              // [n x n_embd]
  std::vector<float> kbuf;           // [n x kv_dim]
  std::vector<float> vbuf;           // [n x kv_dim]
  std::vector<float> attn;           // [n x n_embd]
  std::vector<float> proj;           // [n x n_embd] the attention output projection
  std::vector<float> router_logits;  // [n x n_expert]
  ConvertedRows converted;           // the attention input for wq (and whatever shares its type)
  ConvertedRows converted_k, converted_v;  // for wk / wv when they need other activation types
};

absl::StatusOr<std::unique_ptr<AttentionBackend::Pass>> CpuAttentionBackend::BeginPass(
    absl::Span<const BatchRow> rows) {
  return std::make_unique<CpuPass>(rows, model_->config());
}

void CpuAttentionBackend::Attend(int64_t layer, const CpuPass& p, const float* q,
                                 float* out) const {
  const ModelConfig& c = model_->config();
  const int64_t hd = c.head_dim;
  const int group = static_cast<int>(c.n_head / c.n_head_kv);
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  // One task per (row, KV head): the query heads of a group share each converted K/V row.
  pool_->ParallelFor(p.n * c.n_head_kv, [&](int64_t task) {
    const int64_t r = task / c.n_head_kv;
    const int64_t kvh = task % c.n_head_kv;
    const BatchRow& row = p.rows[static_cast<size_t>(r)];
    const KvHeadView kv = row.cache->HeadView(layer, kvh, hd, row.pos + 1);
    thread_local std::vector<float> scratch;
    scratch.resize(static_cast<size_t>(group * kv.n_kv));
    const int64_t h0 = kvh * group;
    AttendKvHead(q + r * c.n_embd + h0 * hd, group, hd, kv, scale, out + r * c.n_embd + h0 * hd,
                 scratch.data());
  });
}

absl::Status CpuAttentionBackend::Layer(Pass* pass, int64_t il, float* x, float* h, int32_t* expert,
                                        float* weight) {
  CpuPass& p = *static_cast<CpuPass*>(pass);
  const ModelConfig& c = model_->config();
  const LayerWeights& L = model_->layer(il);
  const int64_t n = p.n;
  const int64_t d = c.n_embd;
  const int64_t kvd = c.kv_dim();
  ConvertedRows& ch = p.converted;
  RmsNorm(x, L.attn_norm.data(), n, d, c.rms_eps, h);
  // Q, K and V in one parallel loop; the rows are converted once per activation type the three
  // weight types need (Q4_K and Q6_K both take Q8_K rows).
  const auto act_type = [](const WeightMatrix& w) { return GetTypeTraits(w.type).vec_dot_type; };
  ConvertRows(L.wq.type, h, n, d, &ch, pool_);
  const ConvertedRows* ck = &ch;
  if (act_type(L.wk) != ch.type) {
    ConvertRows(L.wk.type, h, n, d, &p.converted_k, pool_);
    ck = &p.converted_k;
  }
  const ConvertedRows* cv = act_type(L.wv) == ch.type ? &ch : ck;
  if (act_type(L.wv) != cv->type) {
    ConvertRows(L.wv.type, h, n, d, &p.converted_v, pool_);
    cv = &p.converted_v;
  }
  MatMulMany({{&L.wq, ch.Slice(0, n), p.q.data()},
              {&L.wk, ck->Slice(0, n), p.kbuf.data()},
              {&L.wv, cv->Slice(0, n), p.vbuf.data()}},
             pool_);
  for (int64_t r = 0; r < n; ++r) {
    const BatchRow& row = p.rows[static_cast<size_t>(r)];
    ApplyRope(&p.q[r * d], c.n_head, c.head_dim, c.n_rot, row.pos, c.rope_base);
    ApplyRope(&p.kbuf[r * kvd], c.n_head_kv, c.head_dim, c.n_rot, row.pos, c.rope_base);
    row.cache->Store(il, row.pos, &p.kbuf[r * kvd], &p.vbuf[r * kvd]);
  }
  Attend(il, p, p.q.data(), p.attn.data());
  MatMul(L.wo, p.attn.data(), n, p.proj.data(), pool_);
  for (int64_t i = 0; i < n * d; ++i) x[i] += p.proj[static_cast<size_t>(i)];

  // The experts' input and the router.
  const int k_used = static_cast<int>(c.n_expert_used);
  RmsNorm(x, L.ffn_norm.data(), n, d, c.rms_eps, h);
  if (L.router.data != nullptr) {
    MatMul(L.router, h, n, p.router_logits.data(), pool_);
    RouteTopK(p.router_logits.data(), n, static_cast<int>(c.n_expert), k_used, expert, weight);
  } else {
    std::fill(expert, expert + n * k_used, 0);
    std::fill(weight, weight + n * k_used, 1.0f);
  }
  return absl::OkStatus();
}

absl::Status CpuAttentionBackend::Head(const float* x, int64_t n, float* logits) {
  const ModelConfig& c = model_->config();
  std::vector<float> normed(static_cast<size_t>(n * c.n_embd));
  RmsNorm(x, model_->output_norm().data(), n, c.n_embd, c.rms_eps, normed.data());
  MatMul(model_->output(), normed.data(), n, logits, pool_);
  return absl::OkStatus();
}

}  // namespace moepool
