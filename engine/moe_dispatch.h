// One MoE layer's routed (row, expert) pairs grouped by where each expert runs, and the one rule
// for adding the results back. Every expert backend uses these two steps: LocalExpertBackend
// (one destination, this process), the CUDA backend (a destination per device) and the
// cluster backend (here, or a worker):
//
//   PlanDispatch(routes, destination_of_expert) -> per destination, the pairs it computes
//   ... each destination computes weight * FFN_expert(row), or a sum of them per row ...
//   Combine(partials, out)                      -> out[row] = 0 + the row's partials in order
//
// The order (the exactness contract). A pair's slot is r * k + its rank among row r's routed
// pairs in ascending (expert id, position) order. A partial result covers one or more pairs of
// one row and is ordered by the smallest slot it covers. Combine starts every row from 0.0f and
// adds its partials in ascending slot order, each as weight * value rounded to f32 and then
// added. So a row's result is the f32 sum of its experts' weighted outputs in ascending expert
// id, whichever destination computed which pair, as long as each destination sums a row's pairs
// in that order too (workers do); with k = 2 this is bit-identical whatever the split.
//
// Pure functions and value types; thread-compatible.
#ifndef MOEPOOL_ENGINE_MOE_DISPATCH_H_
#define MOEPOOL_ENGINE_MOE_DISPATCH_H_

#include <cstdint>
#include <vector>

#include "absl/types/span.h"

namespace moepool {

// One routed pair of the layer.
struct DispatchPair {
  int64_t row = 0;
  int32_t position = 0;     // j: the pair is routes.expert[row * k + j]
  int32_t slot = 0;         // row * k + rank in the row's ascending (expert, position) order
  int32_t expert = 0;       // >= 0
  float weight = 0;         // routing weight
  int32_t destination = 0;  // destination_of_expert[expert]
};

// A run of one destination's pairs that share an expert.
struct DispatchRun {
  int32_t expert = 0;
  int64_t begin = 0;  // into DispatchPlan::by_destination[d]
  int64_t count = 0;
};

struct DispatchPlan {
  int64_t n_rows = 0;
  int k = 0;
  // Every pair with expert >= 0, in row order (row, then position).
  std::vector<DispatchPair> pairs;
  // Per destination: indices into `pairs`, ascending expert then row (the order a destination
  // gathers its rows and computes its experts in), and the runs of one expert in it.
  std::vector<std::vector<int32_t>> by_destination;
  std::vector<std::vector<DispatchRun>> runs;
};

// Groups the pairs of [n_rows x k] (expert, weight) routes by destination_of_expert[expert]
// (in [0, n_destinations)); ids < 0 are empty slots. The caller has checked that every id is
// below destination_of_expert.size() and maps to a destination (a programmer error aborts).
void PlanDispatch(const int32_t* expert, const float* weight, int64_t n_rows, int k,
                  absl::Span<const int> destination_of_expert, int n_destinations,
                  DispatchPlan* plan);

// A result to add to one row: weight * values[0, n_embd), ordered by `slot` (the smallest slot
// of the pairs it covers). Sums that are already weighted come with weight 1.
struct DispatchPartial {
  int64_t row = 0;
  int32_t slot = 0;
  float weight = 1;
  const float* values = nullptr;
};

// Sets out [n_rows x n_embd]: each row is 0.0f plus its partials in ascending slot order (rows
// without a partial are 0). Reorders `partials`.
void Combine(std::vector<DispatchPartial>* partials, int64_t n_rows, int64_t n_embd, float* out);

}  // namespace moepool

#endif  // MOEPOOL_ENGINE_MOE_DISPATCH_H_
