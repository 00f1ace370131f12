#include "engine/moe_ffn.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "engine/matmul.h"
#include "engine/swiglu.h"

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
  SwiGlu(g.data(), u.data(), static_cast<int64_t>(g.size()));
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
  std::lock_guard<std::mutex> lock(mu_);

  // Dispatch: one destination (here); its pairs come grouped by expert in ascending id, and
  // each group's rows are gathered into one run of `xg`.
  Scratch& s = scratch_;
  s.destination_of.assign(static_cast<size_t>(c.n_expert), 0);
  PlanDispatch(routes.expert, routes.weight, n, k, s.destination_of, 1, &s.plan);
  const std::vector<int32_t>& order = s.plan.by_destination[0];
  const int64_t slots = static_cast<int64_t>(order.size());
  if (slots == 0) {
    std::fill(out, out + n * d, 0.0f);
    return absl::OkStatus();
  }
  s.groups.clear();
  for (const DispatchRun& run : s.plan.runs[0]) {
    s.groups.push_back({&L.experts[static_cast<size_t>(run.expert)], run.begin, run.count});
  }
  s.xg.resize(static_cast<size_t>(slots * d));
  for (int64_t i = 0; i < slots; ++i) {
    const DispatchPair& p = s.plan.pairs[static_cast<size_t>(order[static_cast<size_t>(i)])];
    std::copy_n(routes.x + p.row * d, d, s.xg.data() + i * d);
  }

  // ExpertCompute: all experts of the layer together, in two parallel passes (SwiGLU, down).
  const int64_t n_ff = s.groups.front().expert->gate.rows;
  s.h.resize(static_cast<size_t>(slots * n_ff));
  s.u.resize(static_cast<size_t>(slots * n_ff));
  s.y.resize(static_cast<size_t>(slots * d));
  SwiGluPass(s.xg.data(), slots);
  DownPass(slots);

  // Combine: each row's weighted expert outputs in ascending expert id (moe_dispatch.h).
  s.partials.clear();
  for (int64_t i = 0; i < slots; ++i) {
    const DispatchPair& p = s.plan.pairs[static_cast<size_t>(order[static_cast<size_t>(i)])];
    s.partials.push_back({p.row, p.slot, p.weight, s.y.data() + i * d});
  }
  Combine(&s.partials, n, d, out);
  return absl::OkStatus();
}

const ConvertedRows& LocalExpertBackend::Converted(TensorType weight_type, const float* x,
                                                   int64_t rows, int64_t cols, int pass) {
  auto& cache = scratch_.converted[pass];
  const TensorType dot_type = GetTypeTraits(weight_type).vec_dot_type;
  for (ConvertedRows& cr : cache) {
    if (cr.type == dot_type) return cr;
  }
  cache.emplace_back();
  ConvertRows(weight_type, x, rows, cols, &cache.back(), pool_);
  return cache.back();
}

void LocalExpertBackend::AddTasks(size_t group, int64_t rows, RowsView a, RowsView b) {
  const int64_t per_task = MatMulRowsPerTask(rows, pool_->size(), a.n);
  for (int64_t r0 = 0; r0 < rows; r0 += per_task) {
    scratch_.tasks.push_back({group, r0, std::min(rows, r0 + per_task), a, b});
  }
}

void LocalExpertBackend::SwiGluPass(const float* xg, int64_t slots) {
  Scratch& s = scratch_;
  const int64_t d = model_->config().n_embd;
  const int64_t n_ff = s.groups.front().expert->gate.rows;
  // Activations converted once per distinct weight type over all slots (usually one type).
  s.converted[0].clear();
  s.tasks.clear();
  for (size_t g = 0; g < s.groups.size(); ++g) {
    const Group& grp = s.groups[g];
    const ConvertedRows& cg = Converted(grp.expert->gate.type, xg, slots, d, 0);
    const ConvertedRows& cu = Converted(grp.expert->up.type, xg, slots, d, 0);
    AddTasks(g, n_ff, cg.Slice(grp.first, grp.m), cu.Slice(grp.first, grp.m));
  }
  pool_->ParallelFor(static_cast<int64_t>(s.tasks.size()), [&](int64_t ti) {
    const Task& t = s.tasks[static_cast<size_t>(ti)];
    const Group& grp = s.groups[t.group];
    float* h = s.h.data() + grp.first * n_ff;
    float* u = s.u.data() + grp.first * n_ff;
    MatMulRowRange(grp.expert->gate, t.a, t.r0, t.r1, h, n_ff);
    MatMulRowRange(grp.expert->up, t.b, t.r0, t.r1, u, n_ff);
    for (int64_t i = 0; i < grp.m; ++i) {
      SwiGlu(h + i * n_ff + t.r0, u + i * n_ff + t.r0, t.r1 - t.r0);
    }
  });
}

void LocalExpertBackend::DownPass(int64_t slots) {
  Scratch& s = scratch_;
  const int64_t d = model_->config().n_embd;
  const int64_t n_ff = s.groups.front().expert->gate.rows;
  s.converted[1].clear();
  s.tasks.clear();
  for (size_t g = 0; g < s.groups.size(); ++g) {
    const Group& grp = s.groups[g];
    const ConvertedRows& ch = Converted(grp.expert->down.type, s.h.data(), slots, n_ff, 1);
    AddTasks(g, d, ch.Slice(grp.first, grp.m), {});
  }
  pool_->ParallelFor(static_cast<int64_t>(s.tasks.size()), [&](int64_t ti) {
    const Task& t = s.tasks[static_cast<size_t>(ti)];
    const Group& grp = s.groups[t.group];
    MatMulRowRange(grp.expert->down, t.a, t.r0, t.r1, s.y.data() + grp.first * d, d);
  });
}

}  // namespace moepool
