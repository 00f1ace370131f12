// The planner's text output (see planner.h).
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "coordinator/planner.h"
#include "coordinator/planner_internal.h"

namespace moepool {
namespace {

std::string ReplicaText(const PlanRequest& r, const Plan& plan) {
  if (!r.replicas) return "";
  size_t n = 0;
  for (const MachinePlan& m : plan.machines) n += m.replica_experts.size();
  if (n == 0) return ", no room for replicas";
  return absl::StrCat(", ", n, " expert replica", n == 1 ? "" : "s");
}

}  // namespace

std::string FormatPlan(const PlanRequest& r, const Plan& plan) {
  const ModelSizes& s = r.sizes;
  const uint64_t n_pairs = s.pair_bytes.size();
  std::string out;
  absl::StrAppend(&out, "model: ", s.description,
                  s.type.empty() ? "" : absl::StrCat(" -> ", s.model_path), "\n");
  absl::StrAppend(&out, "  weights ", FormatBytes(s.WeightBytes()), ": experts ",
                  FormatBytes(s.ExpertBytes()), " (", s.n_layer(), " layers x ", s.n_expert(),
                  " experts, ", FormatBytes(s.ExpertBytes() / n_pairs), " per pair), non-expert ",
                  FormatBytes(s.non_expert_bytes), "\n");
  const CoordinatorMemory& c = plan.coordinator;
  absl::StrAppend(&out, "coordinator needs ", FormatBytes(c.total()), ": non-expert weights ",
                  FormatBytes(c.non_expert), " + KV cache ", FormatBytes(c.kv_cache), " (f16, ctx ",
                  r.ctx, ") + compute ", FormatBytes(c.compute), " (batch ", r.batch, ")\n");
  absl::StrAppend(&out, "each worker needs its experts + ", FormatBytes(plan.worker_buffer), "; ",
                  FormatBytes(r.reserve), " kept free on every machine\n\n");

  if (!plan.fits) {
    absl::StrAppend(&out, "DOES NOT FIT: ", plan.problem, "\n");
    if (!plan.suggestions.empty()) {
      absl::StrAppend(&out, "would fit:\n");
      for (const std::string& line : plan.suggestions) absl::StrAppend(&out, "  - ", line, "\n");
    }
    return out;
  }

  int n_workers = 0;
  for (const MachinePlan& m : plan.machines) n_workers += m.worker ? 1 : 0;
  absl::StrAppend(&out, "FITS: ", n_workers, " worker", n_workers == 1 ? "" : "s", ", ",
                  plan.layout == PlanLayout::kExpertRanges ? "whole expert ranges on all layers"
                                                           : "experts split per layer",
                  ReplicaText(r, plan), "\n\n");
  for (const MachinePlan& m : plan.machines) {
    const std::string role = m.coordinator && m.worker ? "coordinator + worker"
                             : m.coordinator           ? "coordinator"
                             : m.worker                ? "worker"
                                                       : "unused";
    absl::StrAppend(&out, m.name, " (", role, m.device.empty() ? "" : absl::StrCat(", ", m.device),
                    "): uses ", FormatBytes(m.used()), " of ", FormatBytes(m.available()), " (",
                    FormatBytes(m.size), m.device.empty() ? "" : " of GPU memory",
                    " less the reserve)\n");
    if (!m.worker) continue;
    absl::StrAppend(&out, "  ", m.experts_text, ": ", m.pairs.size(), " pairs, ",
                    FormatBytes(m.expert_bytes));
    if (plan.pace_memory_split.has_value()) {
      absl::StrAppend(&out, absl::StrFormat(", speed %g: %.0f%% of the expert work", m.speed,
                                            100 * m.work_share));
    }
    if (!m.replica_experts.empty()) {
      std::vector<int> sorted = m.replica_experts;
      absl::StrAppend(&out, " (replicas: experts ", FormatIdRanges(sorted), ")");
    }
    absl::StrAppend(&out, "\n");
    if (!m.placement_file_name.empty()) {
      absl::StrAppend(&out, "  placement file ", m.placement_file_name, ":\n");
      for (std::string_view line : planner_internal::Split(m.placement_file, '\n', true)) {
        absl::StrAppend(&out, "    ", std::string(line), "\n");
      }
    }
    absl::StrAppend(&out, "  $ ", m.worker_command, "\n");
  }
  if (plan.routing_before.has_value() && plan.routing_after.has_value()) {
    absl::StrAppend(
        &out,
        absl::StrFormat("\nrouting statistics: rows whose two experts share a worker %.0f%% -> "
                        "%.0f%%; workers a routed row visits %.2f -> %.2f (each visit is one row "
                        "out and one sum back)\n",
                        100 * plan.routing_before->colocated_share,
                        100 * plan.routing_after->colocated_share,
                        plan.routing_before->visits_per_row, plan.routing_after->visits_per_row));
  }
  if (plan.pace_memory_split.has_value()) {
    absl::StrAppend(
        &out, absl::StrFormat("\nspeeds: the slowest worker's share of the expert work over its "
                              "speed (it sets every layer's pace) %.3f; %.3f if split by memory "
                              "alone",
                              plan.pace, *plan.pace_memory_split));
    if (plan.routing_before.has_value()) {
      absl::StrAppend(&out, "; ", plan.pace_swaps, " hot expert", plan.pace_swaps == 1 ? "" : "s",
                      " traded for colder ones");
    }
    absl::StrAppend(&out, "\n");
  }
  absl::StrAppend(&out, "\ncoordinator (on ", plan.machines.front().name, "):\n  $ ",
                  plan.serve_command, "\n");
  absl::StrAppend(&out, "\ncluster token: make it once and copy it to every machine, e.g.\n  $ ",
                  "(umask 077; head -c 32 /dev/urandom | base64 > ", kClusterTokenFile, ")\n");
  return out;
}

}  // namespace moepool
