#include "engine/moe_dispatch.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>

namespace moepool {
namespace {

// A programmer error: the caller promised every routed expert a destination.
[[noreturn]] void NoDestination(int32_t expert) {
  std::fprintf(stderr, "PlanDispatch: expert %d has no destination\n", expert);
  std::abort();
}

}  // namespace

void PlanDispatch(const int32_t* expert, const float* weight, int64_t n_rows, int k,
                  absl::Span<const int> destination_of_expert, int n_destinations,
                  DispatchPlan* plan) {
  plan->n_rows = n_rows;
  plan->k = k;
  plan->pairs.clear();
  plan->by_destination.resize(static_cast<size_t>(n_destinations));
  plan->runs.resize(static_cast<size_t>(n_destinations));
  for (auto& v : plan->by_destination) v.clear();
  for (auto& v : plan->runs) v.clear();
  for (int64_t r = 0; r < n_rows; ++r) {
    const int32_t* row = expert + r * k;
    for (int j = 0; j < k; ++j) {
      const int32_t e = row[j];
      if (e < 0) continue;
      if (static_cast<size_t>(e) >= destination_of_expert.size()) NoDestination(e);
      const int dest = destination_of_expert[static_cast<size_t>(e)];
      if (dest < 0 || dest >= n_destinations) NoDestination(e);
      int rank = 0;
      for (int i = 0; i < k; ++i) {
        if (row[i] >= 0 && (row[i] < e || (row[i] == e && i < j))) ++rank;
      }
      plan->pairs.push_back(
          DispatchPair{r, j, static_cast<int32_t>(r * k + rank), e, weight[r * k + j], dest});
    }
  }
  // Per destination, ascending expert then row: a stable sort of the row-ordered pairs.
  std::vector<int32_t> order(plan->pairs.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int32_t>(i);
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
    return plan->pairs[static_cast<size_t>(a)].expert < plan->pairs[static_cast<size_t>(b)].expert;
  });
  for (const int32_t i : order) {
    const DispatchPair& p = plan->pairs[static_cast<size_t>(i)];
    const size_t d = static_cast<size_t>(p.destination);
    std::vector<int32_t>& list = plan->by_destination[d];
    std::vector<DispatchRun>& runs = plan->runs[d];
    if (runs.empty() || runs.back().expert != p.expert) {
      runs.push_back(DispatchRun{p.expert, static_cast<int64_t>(list.size()), 0});
    }
    ++runs.back().count;
    list.push_back(i);
  }
}

void Combine(std::vector<DispatchPartial>* partials, int64_t n_rows, int64_t n_embd, float* out) {
  std::sort(partials->begin(), partials->end(),
            [](const DispatchPartial& a, const DispatchPartial& b) {
              return a.row != b.row ? a.row < b.row : a.slot < b.slot;
            });
  std::fill(out, out + n_rows * n_embd, 0.0f);
  for (const DispatchPartial& p : *partials) {
    float* o = out + p.row * n_embd;
    const float w = p.weight;
    for (int64_t j = 0; j < n_embd; ++j) {
      const float term = w * p.values[j];
      o[j] += term;
    }
  }
}

}  // namespace moepool
