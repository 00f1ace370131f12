#include "engine/moe_ffn.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "engine/matmul.h"

namespace moepool {

void RouteTopK(const float* logits, int64_t n_rows, int n_expert, int k, int32_t* expert,
               float* weight) {
  std::vector<float> prob(static_cast<size_t>(n_expert));
  std::vector<int> idx(static_cast<size_t>(n_expert));
  for (int64_t r = 0; r < n_rows; ++r) {
    const float* l = logits + r * n_expert;
    float mx = l[0];
    for (int e = 1; e < n_expert; ++e) mx = std::max(mx, l[e]);
    double sum = 0.0;
    for (int e = 0; e < n_expert; ++e) {
      prob[e] = std::exp(l[e] - mx);
      sum += prob[e];
    }
    const float inv = static_cast<float>(1.0 / sum);
    for (int e = 0; e < n_expert; ++e) prob[e] *= inv;
    std::iota(idx.begin(), idx.end(), 0);
    std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), [&](int a, int b) {
      return prob[a] > prob[b] || (prob[a] == prob[b] && a < b);
    });
    std::sort(idx.begin(), idx.begin() + k);
    float wsum = 0.0f;
    for (int j = 0; j < k; ++j) wsum += prob[idx[j]];
    for (int j = 0; j < k; ++j) {
      expert[r * k + j] = idx[j];
      weight[r * k + j] = prob[idx[j]] / wsum;
    }
  }
}

void ExpertFfnCpu(const ExpertWeights& e, const float* x, int64_t n, float* out, ThreadPool* pool) {
  const int64_t n_ff = e.gate.rows;
  std::vector<float> g(static_cast<size_t>(n * n_ff));
  std::vector<float> u(static_cast<size_t>(n * n_ff));
  ConvertedRows cx;
  ConvertRows(e.gate.type, x, n, e.gate.cols, &cx, pool);
  MatMulConverted(e.gate, cx, g.data(), pool);
  if (e.up.type != e.gate.type) ConvertRows(e.up.type, x, n, e.up.cols, &cx, pool);
  MatMulConverted(e.up, cx, u.data(), pool);
  for (size_t i = 0; i < g.size(); ++i) {
    const float a = g[i];
    g[i] = a / (1.0f + std::exp(-a)) * u[i];
  }
  MatMul(e.down, g.data(), n, out, pool);
}

absl::Status CheckRoutes(const ExpertRoutes& routes, const ModelConfig& c) {
  if (routes.layer < 0 || routes.layer >= c.n_layer) {
    return absl::InvalidArgumentError(absl::StrCat("layer ", routes.layer, " out of range"));
  }
  if (routes.n_embd != c.n_embd) {
    return absl::InvalidArgumentError(
        absl::StrCat("row width ", routes.n_embd, " != model embedding length ", c.n_embd));
  }
  if (routes.k < 1 || routes.k > c.n_expert) {
    return absl::InvalidArgumentError(absl::StrCat("k = ", routes.k, " out of range"));
  }
  return absl::OkStatus();
}

absl::Status LocalExpertBackend::Compute(const ExpertRoutes& routes, float* out) {
  const ModelConfig& c = model_->config();
  if (absl::Status s = CheckRoutes(routes, c); !s.ok()) return s;
  const LayerWeights& L = model_->layer(routes.layer);
  const int64_t n = routes.n_rows;
  const int64_t d = routes.n_embd;
  const int k = routes.k;
  for (int64_t i = 0; i < n * k; ++i) {
    const int32_t e = routes.expert[i];
    if (e < 0) continue;
    if (e >= c.n_expert || !L.experts[static_cast<size_t>(e)].present()) {
      return absl::InvalidArgumentError(
          absl::StrCat("expert ", e, " of layer ", routes.layer, " is not held here"));
    }
  }
  std::fill(out, out + n * d, 0.0f);
  // Dispatch: group rows by expert; ExpertCompute; Combine in ascending expert id.
  std::vector<int64_t> rows;
  std::vector<float> w;
  std::vector<float> xg, yg;
  for (int32_t e = 0; e < c.n_expert; ++e) {
    rows.clear();
    w.clear();
    for (int64_t r = 0; r < n; ++r) {
      for (int j = 0; j < k; ++j) {
        if (routes.expert[r * k + j] == e) {
          rows.push_back(r);
          w.push_back(routes.weight[r * k + j]);
        }
      }
    }
    if (rows.empty()) continue;
    const int64_t m = static_cast<int64_t>(rows.size());
    xg.resize(static_cast<size_t>(m * d));
    yg.resize(static_cast<size_t>(m * d));
    for (int64_t i = 0; i < m; ++i) {
      std::copy_n(routes.x + rows[i] * d, d, xg.data() + i * d);
    }
    ExpertFfnCpu(L.experts[static_cast<size_t>(e)], xg.data(), m, yg.data(), pool_);
    for (int64_t i = 0; i < m; ++i) {
      float* o = out + rows[i] * d;
      const float* y = yg.data() + i * d;
      const float wi = w[i];
      for (int64_t j = 0; j < d; ++j) {
        const float p = wi * y[j];
        o[j] += p;
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace moepool
