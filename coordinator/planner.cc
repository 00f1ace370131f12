// Placement of (layer, expert) pairs over machines (see planner.h).
#include "coordinator/planner.h"

#include <algorithm>
#include <cctype>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "coordinator/planner_internal.h"
#include "engine/status_macros.h"

namespace moepool {
namespace {

constexpr double kInfinity = std::numeric_limits<double>::infinity();

// Splits `items` (in order) into contiguous segments, one per capacity (in order, possibly
// empty), each within its capacity. Minimises the largest segment / weight (weights: the
// capacities, or the machines' speeds), then the sum of squared segment / capacity fractions (so
// the machines' memory ends up evenly used). Returns the segment ends
// (ends[i] = one past segment i's last item), or nothing if no split fits.
std::optional<std::vector<size_t>> PartitionContiguous(const std::vector<uint64_t>& items,
                                                       const std::vector<uint64_t>& caps,
                                                       const std::vector<double>& weights) {
  const size_t n = items.size();
  const size_t w = caps.size();
  if (w == 0) return std::nullopt;
  std::vector<uint64_t> prefix(n + 1, 0);
  for (size_t i = 0; i < n; ++i) prefix[i + 1] = prefix[i] + items[i];
  auto fraction = [&](size_t slot, size_t begin, size_t end) {
    const uint64_t bytes = prefix[end] - prefix[begin];
    if (bytes == 0) return 0.0;
    if (bytes > caps[slot]) return kInfinity;
    return static_cast<double>(bytes) / weights[slot];
  };
  auto room_used = [&](size_t slot, size_t begin, size_t end) {
    const uint64_t bytes = prefix[end] - prefix[begin];
    return bytes == 0 ? 0.0 : static_cast<double>(bytes) / static_cast<double>(caps[slot]);
  };
  // Pass 1: the smallest achievable maximum fraction.
  std::vector<double> best(n + 1, kInfinity), next(n + 1);
  best[0] = 0.0;
  for (size_t s = 0; s < w; ++s) {
    std::fill(next.begin(), next.end(), kInfinity);
    for (size_t end = 0; end <= n; ++end) {
      for (size_t begin = 0; begin <= end; ++begin) {
        if (best[begin] == kInfinity) continue;
        next[end] = std::min(next[end], std::max(best[begin], fraction(s, begin, end)));
      }
    }
    best.swap(next);
  }
  if (best[n] == kInfinity) return std::nullopt;
  const double bound = best[n] * (1.0 + 1e-12) + 1e-15;
  // Pass 2: among splits within that maximum, the smallest sum of squared room fractions.
  std::vector<std::vector<double>> cost(w + 1, std::vector<double>(n + 1, kInfinity));
  std::vector<std::vector<size_t>> from(w + 1, std::vector<size_t>(n + 1, 0));
  cost[0][0] = 0.0;
  for (size_t s = 0; s < w; ++s) {
    for (size_t end = 0; end <= n; ++end) {
      for (size_t begin = 0; begin <= end; ++begin) {
        if (cost[s][begin] == kInfinity) continue;
        if (fraction(s, begin, end) > bound) continue;
        const double f = room_used(s, begin, end);
        const double c = cost[s][begin] + f * f;
        if (c < cost[s + 1][end]) {
          cost[s + 1][end] = c;
          from[s + 1][end] = begin;
        }
      }
    }
  }
  std::vector<size_t> ends(w);
  size_t end = n;
  for (size_t s = w; s > 0; --s) {
    ends[s - 1] = end;
    end = from[s][end];
  }
  return ends;
}

std::string ShellQuote(const std::string& s) {
  const bool plain = !s.empty() && std::all_of(s.begin(), s.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) ||
           std::string_view("_./:=+-,@").find(c) != std::string_view::npos;
  });
  if (plain) return s;
  std::string out = "'";
  for (char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

// Fills a worker's experts_text and command (with a placement file when its pairs are not one
// expert list over one contiguous layer range).
void DescribeWorker(const ModelSizes& sizes, MachinePlan* m) {
  std::map<int, std::vector<int>> by_layer;
  for (const auto& [l, e] : m->pairs) by_layer[l].push_back(e);
  std::set<std::string> sets;
  for (const auto& [l, experts] : by_layer) sets.insert(FormatIdRanges(experts));
  const int first = by_layer.begin()->first;
  const int last = by_layer.rbegin()->first;
  const bool contiguous = last - first + 1 == static_cast<int>(by_layer.size());
  const std::string listen =
      absl::StrCat(" --listen 0.0.0.0:", m->port, " --cluster-token-file ", kClusterTokenFile);
  std::string cmd = absl::StrCat("moepool worker --model ", ShellQuote(sizes.model_path));
  if (sets.size() == 1 && contiguous) {
    const std::string experts = *sets.begin();
    const bool all_layers = first == 0 && last == sizes.n_layer() - 1;
    std::vector<int> layer_ids;
    for (const auto& [l, experts] : by_layer) layer_ids.push_back(l);
    const std::string layers = FormatIdRanges(layer_ids);
    m->experts_text = absl::StrCat("experts ", experts, " on ",
                                   all_layers ? absl::StrCat("all ", sizes.n_layer(), " layers")
                                              : absl::StrCat("layers ", layers));
    absl::StrAppend(&cmd, " --experts ", experts);
    if (!all_layers) absl::StrAppend(&cmd, " --layers ", layers);
  } else {
    m->placement_file_name = absl::StrCat(m->name, ".placement");
    m->placement_file = FormatPlacementFile(
        m->pairs,
        absl::StrCat("moepool placement for ", m->name, ": ", sizes.description, "\n",
                     m->pairs.size(), " (layer, expert) pairs, ", FormatBytes(m->expert_bytes),
                     "\nlines: layers LIST: experts LIST (ids and inclusive ranges)"));
    std::string text;
    for (std::string_view line : planner_internal::Split(m->placement_file, '\n', true)) {
      if (line.front() == '#') continue;
      if (!text.empty()) text += "; ";
      text += std::string(line);
    }
    m->experts_text = text;
    absl::StrAppend(&cmd, " --placement ", ShellQuote(m->placement_file_name));
  }
  if (!m->device.empty()) absl::StrAppend(&cmd, " --device ", m->device);
  m->worker_command = cmd + listen;
}

// Adds whole experts (all layers) to machines with room left, fewest-held experts first, one
// expert per machine per round so replicas spread out.
void AddReplicas(const ModelSizes& sizes, const std::vector<int>& slot_machine,
                 const std::vector<uint64_t>& caps, std::vector<MachinePlan>* machines) {
  const int64_t n_layer = sizes.n_layer(), n_expert = sizes.n_expert();
  std::vector<int> holders(static_cast<size_t>(n_layer * n_expert), 0);
  std::vector<std::set<std::pair<int, int>>> held(slot_machine.size());
  for (size_t s = 0; s < slot_machine.size(); ++s) {
    for (const auto& p : (*machines)[slot_machine[s]].pairs) {
      held[s].insert(p);
      ++holders[static_cast<size_t>(p.first * n_expert + p.second)];
    }
  }
  for (bool added = true; added;) {
    added = false;
    std::vector<size_t> order(slot_machine.size());
    for (size_t s = 0; s < order.size(); ++s) order[s] = s;
    auto spare = [&](size_t s) { return caps[s] - (*machines)[slot_machine[s]].expert_bytes; };
    std::stable_sort(order.begin(), order.end(),
                     [&](size_t a, size_t b) { return spare(a) > spare(b); });
    for (size_t s : order) {
      MachinePlan& m = (*machines)[slot_machine[s]];
      int best = -1, best_holders = 0;
      uint64_t best_extra = 0;
      for (int e = 0; e < n_expert; ++e) {
        uint64_t extra = 0;
        int min_holders = std::numeric_limits<int>::max();
        for (int l = 0; l < n_layer; ++l) {
          min_holders = std::min(min_holders, holders[static_cast<size_t>(l * n_expert + e)]);
          if (!held[s].count({l, e})) extra += sizes.PairBytes(l, e);
        }
        if (extra == 0 || extra > spare(s)) continue;
        if (best < 0 || min_holders < best_holders) {
          best = e;
          best_holders = min_holders;
          best_extra = extra;
        }
      }
      if (best < 0) continue;
      for (int l = 0; l < n_layer; ++l) {
        if (held[s].insert({l, best}).second) {
          ++holders[static_cast<size_t>(l * n_expert + best)];
          m.pairs.push_back({l, best});
        }
      }
      std::sort(m.pairs.begin(), m.pairs.end());
      m.expert_bytes += best_extra;
      m.replica_experts.push_back(best);
      added = true;
    }
  }
}

bool SpeedsDiffer(const PlanRequest& r) {
  const size_t n = r.machines.size();
  for (size_t i = 0; i < n; ++i) {
    const double speed = i < r.machine_speeds.size() ? r.machine_speeds[i] : 1.0;
    const double first = r.machine_speeds.empty() ? 1.0 : r.machine_speeds[0];
    if (speed != first) return true;
  }
  return false;
}

absl::Status CheckPlanRequest(const PlanRequest& r) {
  const ModelSizes& sizes = r.sizes;
  if (r.machines.empty()) return absl::InvalidArgumentError("no machines (give --machine SIZE)");
  for (uint64_t m : r.machines) {
    if (m == 0) return absl::InvalidArgumentError("a machine of 0 bytes");
  }
  if (r.machine_speeds.size() > r.machines.size()) {
    return absl::InvalidArgumentError("more machine speeds than machines");
  }
  for (double speed : r.machine_speeds) {
    if (!(speed > 0 && speed <= 1e6)) {
      return absl::InvalidArgumentError(
          absl::StrCat("a machine speed must be a positive number (at most 1e6): ", speed));
    }
  }
  if (r.coordinator_machine.has_value() && *r.coordinator_machine == 0) {
    return absl::InvalidArgumentError("a coordinator machine of 0 bytes");
  }
  if (r.ctx < 1 || r.batch < 1) return absl::InvalidArgumentError("ctx and batch must be >= 1");
  if (sizes.pair_bytes.empty() ||
      sizes.pair_bytes.size() != static_cast<size_t>(sizes.n_layer() * sizes.n_expert())) {
    return absl::InvalidArgumentError("model sizes without (layer, expert) pairs");
  }
  return absl::OkStatus();
}

// The machines: a separate coordinator first, then the --machine list; the first holds the
// coordinator.
void AddMachines(const PlanRequest& r, Plan* plan) {
  if (r.coordinator_machine.has_value()) {
    MachinePlan c;
    c.name = "coordinator";
    c.size = *r.coordinator_machine;
    plan->machines.push_back(c);
  }
  for (size_t i = 0; i < r.machines.size(); ++i) {
    MachinePlan m;
    m.name = i < r.host_names.size() ? r.host_names[i] : absl::StrCat("machine-", i + 1);
    m.size = r.machines[i];
    if (i < r.machine_devices.size()) m.device = r.machine_devices[i];
    if (i < r.machine_speeds.size()) m.speed = r.machine_speeds[i];
    m.port = r.first_port + static_cast<int>(i);
    plan->machines.push_back(m);
  }
  for (MachinePlan& m : plan->machines) m.reserve = r.reserve;
  plan->machines.front().coordinator = true;
  plan->machines.front().coordinator_bytes = plan->coordinator.total();
}

// How the pairs split over the slots: `order` lists the pairs expert-major and slot s takes
// order[ends[s - 1], ends[s]). Whole experts when they pack, else runs split at some layer;
// nullopt when even that does not fit.
std::optional<std::vector<size_t>> PartitionPairs(const ModelSizes& sizes,
                                                  const std::vector<uint64_t>& caps,
                                                  const std::vector<double>& weights, Plan* plan,
                                                  std::vector<std::pair<int, int>>* order) {
  const int64_t n_layer = sizes.n_layer(), n_expert = sizes.n_expert();
  for (int e = 0; e < n_expert; ++e) {
    for (int l = 0; l < n_layer; ++l) order->push_back({l, e});
  }
  std::vector<uint64_t> per_expert(static_cast<size_t>(n_expert), 0);
  for (int e = 0; e < n_expert; ++e) {
    for (int l = 0; l < n_layer; ++l) per_expert[static_cast<size_t>(e)] += sizes.PairBytes(l, e);
  }
  std::optional<std::vector<size_t>> ends = PartitionContiguous(per_expert, caps, weights);
  if (ends.has_value()) {
    plan->layout = PlanLayout::kExpertRanges;
    std::vector<size_t> pair_ends;
    for (size_t end : *ends) pair_ends.push_back(end * static_cast<size_t>(n_layer));
    return pair_ends;
  }
  // Expert-major pairs: a worker's share is a run of experts, split at some layer.
  std::vector<uint64_t> items;
  for (const auto& [l, e] : *order) items.push_back(sizes.PairBytes(l, e));
  plan->layout = PlanLayout::kPerLayer;
  return PartitionContiguous(items, caps, weights);
}

// Why the model does not fit (plan->problem, plan->shortfall).
void ExplainNoFit(const PlanRequest& r, uint64_t need, uint64_t have, size_t n_slots, Plan* plan) {
  const MachinePlan& coordinator_machine = plan->machines.front();
  const uint64_t coordinator_total = plan->coordinator.total();
  plan->fits = false;
  plan->shortfall = need > have ? need - have : 0;
  if (coordinator_machine.available() < coordinator_total) {
    plan->shortfall =
        std::max(plan->shortfall, coordinator_total - coordinator_machine.available());
    plan->problem = absl::StrCat("the coordinator needs ", FormatBytes(coordinator_total), " but ",
                                 coordinator_machine.name, " has ",
                                 FormatBytes(coordinator_machine.available()), " after the ",
                                 FormatBytes(r.reserve), " reserve");
  } else if (need > have) {
    plan->problem = absl::StrCat(
        "needs ", FormatBytes(need), " (coordinator ", FormatBytes(coordinator_total), ", experts ",
        FormatBytes(r.sizes.ExpertBytes()), ", ", n_slots, " worker buffers of ",
        FormatBytes(plan->worker_buffer), ") but the ", plan->machines.size(), " machines offer ",
        FormatBytes(have), " after the ", FormatBytes(r.reserve), " reserve each: short by ",
        FormatBytes(plan->shortfall));
  } else {
    plan->problem = absl::StrCat("the total fits (", FormatBytes(need), " of ", FormatBytes(have),
                                 ") but whole (layer, expert) pairs do not pack into the room "
                                 "left on each machine");
  }
}

// The request without suggestions or replicas (for the what-ifs of Suggest).
PlanRequest WhatIf(const PlanRequest& r) {
  PlanRequest w = r;
  w.suggest = false;
  w.replicas = false;
  return w;
}

// What would make it fit: more machines like the largest, a smaller context, a coordinator
// machine of its own, a smaller type mix of the same shape.
absl::Status Suggest(const PlanRequest& r, Plan* plan) {
  const uint64_t biggest = *std::max_element(r.machines.begin(), r.machines.end());
  PlanRequest more = WhatIf(r);
  for (int extra = 1; extra <= 64; ++extra) {
    more.machines.push_back(biggest);
    ASSIGN_OR_RETURN(const Plan p, MakePlan(more));
    if (p.fits) {
      plan->suggestions.push_back(absl::StrCat("needs ", extra, " more ", FormatBytes(biggest),
                                               " machine", extra > 1 ? "s" : "", " (",
                                               more.machines.size(), " in all)"));
      break;
    }
  }
  PlanRequest shorter = WhatIf(r);
  for (int64_t ctx = r.ctx / 2; ctx >= 256; ctx /= 2) {
    shorter.ctx = ctx;
    ASSIGN_OR_RETURN(const Plan p, MakePlan(shorter));
    if (p.fits) {
      plan->suggestions.push_back(absl::StrCat("fits with --ctx ", ctx));
      break;
    }
  }
  if (!r.coordinator_machine.has_value()) {  // the coordinator crowds out the first machine
    const uint64_t size = (plan->coordinator.total() + r.reserve + kGiB - 1) / kGiB * kGiB;
    PlanRequest separate = WhatIf(r);
    separate.coordinator_machine = size;
    ASSIGN_OR_RETURN(const Plan p, MakePlan(separate));
    if (p.fits) {
      plan->suggestions.push_back(absl::StrCat("fits with a separate coordinator machine of ",
                                               FormatBytes(size), " (--coordinator ", size / kGiB,
                                               "GiB)"));
    }
  }
  const ModelSizes& sizes = r.sizes;
  for (const char* type : {"Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "Q3_K_M", "Q2_K"}) {
    auto other = SizesFromShape(sizes.shape, type, sizes.n_vocab);
    if (!other.ok() || other->WeightBytes() >= sizes.WeightBytes()) continue;
    PlanRequest smaller = WhatIf(r);
    smaller.sizes = *other;
    ASSIGN_OR_RETURN(const Plan p, MakePlan(smaller));
    if (p.fits) {
      plan->suggestions.push_back(
          absl::StrCat("use ", type, " (", FormatBytes(other->WeightBytes()), " of weights",
                       sizes.type.empty() ? " for this shape, as moepool synth's mix" : "", ")"));
      break;
    }
  }
  return absl::OkStatus();
}

// Gives slot s the pairs order[ends[s - 1], ends[s]), then the workers' files and the serve
// command.
void AssignPairs(const PlanRequest& r, const std::vector<int>& slot_machine,
                 const std::vector<size_t>& ends, const std::vector<std::pair<int, int>>& order,
                 Plan* plan) {
  const ModelSizes& sizes = r.sizes;
  size_t begin = 0;
  for (size_t s = 0; s < ends.size(); ++s) {
    MachinePlan& m = plan->machines[static_cast<size_t>(slot_machine[s])];
    for (size_t i = begin; i < ends[s]; ++i) {
      m.pairs.push_back(order[i]);
      m.expert_bytes += sizes.PairBytes(order[i].first, order[i].second);
    }
    std::sort(m.pairs.begin(), m.pairs.end());
    begin = ends[s];
  }
}

void DescribeWorkers(const PlanRequest& r, Plan* plan) {
  std::vector<std::string> workers;
  for (MachinePlan& m : plan->machines) {
    if (m.pairs.empty()) continue;
    m.worker = true;
    m.worker_buffer_bytes = plan->worker_buffer;
    DescribeWorker(r.sizes, &m);
    if (!m.placement_file_name.empty()) plan->layout = PlanLayout::kPerLayer;
    workers.push_back(absl::StrCat(m.name, ":", m.port));
  }
  plan->serve_command = absl::StrCat("moepool serve --model ", ShellQuote(r.sizes.model_path),
                                     " --ctx ", r.ctx, " --workers ", absl::StrJoin(workers, ","),
                                     " --cluster-token-file ", kClusterTokenFile);
}

}  // namespace

absl::StatusOr<Plan> MakePlan(const PlanRequest& r) {
  RETURN_IF_ERROR(CheckPlanRequest(r));
  const ModelSizes& sizes = r.sizes;
  Plan plan;
  plan.coordinator = {sizes.non_expert_bytes, KvCacheBytes(sizes, r.ctx),
                      CoordinatorComputeBytes(sizes, r.batch)};
  plan.worker_buffer = WorkerBufferBytes(sizes, r.batch);
  AddMachines(r, &plan);
  // Room for experts on each machine that may hold some (a slot).
  std::vector<int> slot_machine;
  std::vector<uint64_t> caps;
  std::vector<double> weights;  // the split evens out bytes / weight
  const bool speeds_differ = SpeedsDiffer(r);
  for (size_t i = r.coordinator_machine.has_value() ? 1 : 0; i < plan.machines.size(); ++i) {
    const MachinePlan& m = plan.machines[i];
    const uint64_t taken = m.coordinator_bytes + plan.worker_buffer;
    slot_machine.push_back(static_cast<int>(i));
    caps.push_back(m.available() > taken ? m.available() - taken : 0);
    weights.push_back(speeds_differ ? m.speed : static_cast<double>(caps.back()));
  }
  const uint64_t need =
      plan.coordinator.total() + sizes.ExpertBytes() + plan.worker_buffer * caps.size();
  uint64_t have = 0;
  for (const MachinePlan& m : plan.machines) have += m.available();

  std::optional<std::vector<size_t>> ends;
  std::vector<std::pair<int, int>> order;
  if (plan.machines.front().available() >= plan.coordinator.total()) {
    ends = PartitionPairs(sizes, caps, weights, &plan, &order);
  }
  if (!ends.has_value()) {
    ExplainNoFit(r, need, have, caps.size(), &plan);
    if (r.suggest) RETURN_IF_ERROR(Suggest(r, &plan));
    return plan;
  }
  plan.fits = true;
  AssignPairs(r, slot_machine, *ends, order, &plan);
  if (r.routing.has_value()) {
    RETURN_IF_ERROR(
        planner_internal::ColocateByRouting(*r.routing, sizes, r.routing_min_gain, &plan));
  }
  if (speeds_differ && r.routing.has_value()) {
    RETURN_IF_ERROR(planner_internal::PaceBySpeed(*r.routing, sizes, &plan));
  }
  if (r.replicas) AddReplicas(sizes, slot_machine, caps, &plan.machines);
  DescribeWorkers(r, &plan);
  plan.pace = planner_internal::MeasurePace(r, &plan);
  if (speeds_differ) {  // the same machines, split as if they were equally fast
    PlanRequest equal = WhatIf(r);
    equal.replicas = r.replicas;
    equal.machine_speeds.clear();
    ASSIGN_OR_RETURN(Plan memory_split, MakePlan(equal));
    for (size_t i = 0; i < memory_split.machines.size(); ++i) {
      memory_split.machines[i].speed = plan.machines[i].speed;
    }
    if (memory_split.fits) plan.pace_memory_split = planner_internal::MeasurePace(r, &memory_split);
  }
  return plan;
}

}  // namespace moepool
