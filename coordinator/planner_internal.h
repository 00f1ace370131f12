// Small string helpers shared by the planner's source files (not part of its interface).
#ifndef MOEPOOL_COORDINATOR_PLANNER_INTERNAL_H_
#define MOEPOOL_COORDINATOR_PLANNER_INTERNAL_H_

#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "coordinator/planner.h"

namespace moepool::planner_internal {

// MakePlan's pass for PlanRequest::routing (planner_routing.cc): per layer, deals the experts to
// the workers that hold that layer's pairs, with the same count each, maximising the rows whose
// two experts share a worker, where that puts at least `min_gain` more of the layer's rows on one
// worker; sets plan->routing_before / routing_after. INVALID_ARGUMENT when the statistics are
// for another shape (layers, experts).
absl::Status ColocateByRouting(const RoutingSnapshot& stats, const ModelSizes& sizes,
                               double min_gain, Plan* plan);

// MakePlan's pass for machines of different speed with PlanRequest::routing
// (planner_routing.cc): per layer, the slowest machine's hot experts are traded for colder ones
// of faster machines (same bytes) while that shortens the layer's pace (rebalance_plan.h's pace
// pass, with time per row = 1 / speed); updates routing_after and pace_swaps.
absl::Status PaceBySpeed(const RoutingSnapshot& stats, const ModelSizes& sizes, Plan* plan);

// Sets each machine's work_share (from r.routing's loads, else from the pairs' bytes; a pair
// held twice counts half on each) and returns the largest work_share / speed among workers.
double MeasurePace(const PlanRequest& r, Plan* plan);

// Splits `text` at each `sep`; empty pieces are dropped when skip_empty.
inline std::vector<std::string> Split(std::string_view text, char sep, bool skip_empty) {
  std::vector<std::string> out;
  size_t begin = 0;
  while (begin <= text.size()) {
    size_t end = text.find(sep, begin);
    if (end == std::string_view::npos) end = text.size();
    if (!skip_empty || end > begin) out.emplace_back(text.substr(begin, end - begin));
    begin = end + 1;
  }
  return out;
}

// Removes `prefix` from the front of *s if it is there.
inline bool ConsumePrefix(std::string_view* s, std::string_view prefix) {
  if (s->substr(0, prefix.size()) != prefix) return false;
  s->remove_prefix(prefix.size());
  return true;
}

}  // namespace moepool::planner_internal

#endif  // MOEPOOL_COORDINATOR_PLANNER_INTERNAL_H_
