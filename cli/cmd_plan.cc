// moepool plan: where the coordinator and each expert go on a set of machines.
//
//   moepool plan (--model M.gguf | --shape mixtral-8x7b --type Q5_K_M) --machine 12GiB ...
//                [--machine cuda:24GiB (a GPU worker) | --machine cuda (this machine's GPU)]
//                [--machine 12GiB:speed=0.5 (a machine half as fast as the others)]
//                [--coordinator 8GiB] [--ctx 4096] [--reserve 0.5GiB] [--replicas]
//                [--host NAME ...] [--json]
//
// Exit status: 0 when it fits, 1 when it does not, 2 for bad arguments or an unreadable model.
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cli/args.h"
#include "cli/commands.h"
#include "coordinator/planner.h"
#include "engine/cuda/cuda_backend.h"
#include "engine/status_macros.h"
#include "engine/synth.h"
#include "nlohmann/json.hpp"

namespace moepool::cli {
namespace {

constexpr char kUsage[] =
    "usage: moepool plan (--model M.gguf | --shape NAME --type MIX) --machine [cuda:]SIZE "
    "[--machine SIZE ...] [--coordinator SIZE] [--ctx N] [--reserve SIZE] [--replicas] "
    "[--host NAME ...] [--json]";

struct MachineArg {
  uint64_t bytes = 0;
  std::string device;  // "" or "cuda:0"
  double speed = 1;
};

// --machine SIZE (host memory), cuda:SIZE (a GPU worker: its experts on a card of SIZE) or cuda
// (the card of this machine: cuda:0's total memory, as the driver reports it), each optionally
// followed by :speed=X (its compute speed relative to the others, e.g. 0.5: half as fast).
absl::StatusOr<MachineArg> ParseMachine(std::string text) {
  MachineArg machine;
  const std::string::size_type at = text.find(":speed=");
  if (at != std::string::npos) {
    const std::string value = text.substr(at + 7);
    char* end = nullptr;
    machine.speed = std::strtod(value.c_str(), &end);
    if (value.empty() || *end != '\0' || !(machine.speed > 0 && machine.speed <= 1e6)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--machine ", text, ": speed must be a positive number, e.g. 12GiB:speed=0.5"));
    }
    text.resize(at);
  }
  if (text == "cuda") {
    ASSIGN_OR_RETURN(const std::vector<CudaDeviceInfo> devices, ListCudaDevices());
    if (devices.empty()) return absl::UnavailableError("--machine cuda: no CUDA device found");
    machine.bytes = devices.front().total_bytes;
    machine.device = "cuda:0";
    return machine;
  }
  const std::string prefix = "cuda:";
  const bool gpu = text.rfind(prefix, 0) == 0;
  ASSIGN_OR_RETURN(machine.bytes, ParseByteSize(gpu ? text.substr(prefix.size()) : text));
  if (gpu) machine.device = "cuda:0";
  return machine;
}

absl::StatusOr<PlanRequest> ReadRequest(const Args& args) {
  if (!args.positional().empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("unexpected argument '", args.positional()[0], "'; ", kUsage));
  }
  PlanRequest r;
  if (args.Has("model") == args.Has("shape")) {
    return absl::InvalidArgumentError(absl::StrCat("give --model or --shape; ", kUsage));
  }
  if (args.Has("model")) {
    if (args.Has("type")) {
      return absl::InvalidArgumentError("--type goes with --shape; a --model file has its types");
    }
    ASSIGN_OR_RETURN(r.sizes, SizesFromFile(args.Get("model")));
  } else {
    ASSIGN_OR_RETURN(const SynthShape shape, SynthShapeByName(args.Get("shape")));
    ASSIGN_OR_RETURN(r.sizes, SizesFromShape(shape, args.Get("type", "Q4_K_M")));
  }
  for (const std::string& m : args.GetAll("machine")) {
    ASSIGN_OR_RETURN(const MachineArg machine, ParseMachine(m));
    if (machine.bytes == 0) return absl::InvalidArgumentError("--machine: a machine of 0 bytes");
    r.machines.push_back(machine.bytes);
    r.machine_devices.push_back(machine.device);
    r.machine_speeds.push_back(machine.speed);
  }
  if (r.machines.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("give at least one --machine SIZE; ", kUsage));
  }
  if (args.Has("coordinator")) {
    ASSIGN_OR_RETURN(const uint64_t bytes, ParseByteSize(args.Get("coordinator")));
    if (bytes == 0) return absl::InvalidArgumentError("--coordinator: a machine of 0 bytes");
    r.coordinator_machine = bytes;
  }
  if (args.Has("reserve")) {
    ASSIGN_OR_RETURN(r.reserve, ParseByteSize(args.Get("reserve")));
  }
  ASSIGN_OR_RETURN(r.ctx, args.GetInt("ctx", 4096));
  if (r.ctx < 1 || r.ctx > (int64_t{1} << 24)) {
    return absl::InvalidArgumentError(absl::StrCat("--ctx must be in [1, 16777216]: ", r.ctx));
  }
  r.replicas = args.Has("replicas");
  if (args.Has("stats")) {
    const std::string path = args.Get("stats");
    std::ifstream in(path);
    if (!in) return absl::NotFoundError(absl::StrCat("--stats ", path, ": cannot read"));
    const nlohmann::json j = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded()) {
      return absl::InvalidArgumentError(absl::StrCat("--stats ", path, ": not JSON"));
    }
    // A serve's --routing-stats-file, or GET /v1/cluster's "routing".
    absl::StatusOr<RoutingSnapshot> stats =
        RoutingFromJson(j.contains("routing") ? j["routing"] : j);
    if (!stats.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--stats ", path, ": ", std::string(stats.status().message())));
    }
    r.routing = std::move(*stats);
    ASSIGN_OR_RETURN(r.routing_min_gain, args.GetDouble("stats-min-gain", 0.15));
    if (!(r.routing_min_gain >= 0 && r.routing_min_gain <= 1)) {
      return absl::InvalidArgumentError("--stats-min-gain must be in [0, 1]");
    }
  }
  r.host_names = args.GetAll("host");
  if (r.host_names.size() > r.machines.size()) {
    return absl::InvalidArgumentError(absl::StrCat("more --host names (", r.host_names.size(),
                                                   ") than --machine sizes (", r.machines.size(),
                                                   ")"));
  }
  return r;
}

nlohmann::json MachineJson(const MachinePlan& m) {
  nlohmann::json jm;
  jm["name"] = m.name;
  jm["role"] = m.coordinator && m.worker ? "coordinator+worker"
               : m.coordinator           ? "coordinator"
               : m.worker                ? "worker"
                                         : "unused";
  jm["device"] = m.device.empty() ? "cpu" : m.device;
  jm["size_bytes"] = m.size;
  jm["available_bytes"] = m.available();
  jm["used_bytes"] = m.used();
  jm["coordinator_bytes"] = m.coordinator_bytes;
  jm["worker_buffer_bytes"] = m.worker_buffer_bytes;
  jm["expert_bytes"] = m.expert_bytes;
  jm["speed"] = m.speed;
  jm["work_share"] = m.work_share;
  nlohmann::json pairs = nlohmann::json::array();
  for (const auto& [l, e] : m.pairs) pairs.push_back({l, e});
  jm["pairs"] = pairs;
  jm["replica_experts"] = m.replica_experts;
  if (m.worker) {
    jm["port"] = m.port;
    jm["experts"] = m.experts_text;
    jm["command"] = m.worker_command;
  }
  if (!m.placement_file_name.empty()) {
    jm["placement_file"] = {{"name", m.placement_file_name}, {"content", m.placement_file}};
  }
  return jm;
}

nlohmann::json PlanJson(const PlanRequest& r, const Plan& plan) {
  const ModelSizes& s = r.sizes;
  nlohmann::json j;
  j["fits"] = plan.fits;
  j["model"] = {
      {"description", s.description},
      {"path", s.model_path},
      {"type", s.type},
      {"n_layer", s.n_layer()},
      {"n_expert", s.n_expert()},
      {"n_expert_used", s.shape.n_expert_used},
      {"n_embd", s.shape.n_embd},
      {"n_ff", s.shape.n_ff},
      {"n_vocab", s.n_vocab},
      {"kv_dim", s.kv_dim()},
      {"weight_bytes", s.WeightBytes()},
      {"expert_bytes", s.ExpertBytes()},
      {"non_expert_bytes", s.non_expert_bytes},
  };
  j["ctx"] = r.ctx;
  j["batch"] = r.batch;
  j["reserve_bytes"] = r.reserve;
  j["coordinator"] = {
      {"machine", plan.machines.front().name},
      {"non_expert_bytes", plan.coordinator.non_expert},
      {"kv_cache_bytes", plan.coordinator.kv_cache},
      {"compute_bytes", plan.coordinator.compute},
      {"total_bytes", plan.coordinator.total()},
  };
  j["worker_buffer_bytes"] = plan.worker_buffer;
  if (plan.routing_before.has_value() && plan.routing_after.has_value()) {
    auto est = [](const RoutingEstimate& e) {
      return nlohmann::json{{"visits_per_row", e.visits_per_row},
                            {"colocated_share", e.colocated_share}};
    };
    j["routing"] = {{"balanced", est(*plan.routing_before)},
                    {"colocated", est(*plan.routing_after)}};
  }
  j["pace"] = plan.pace;
  if (plan.pace_memory_split.has_value()) {
    j["pace_memory_split"] = *plan.pace_memory_split;
    j["pace_swaps"] = plan.pace_swaps;
  }
  j["layout"] = plan.layout == PlanLayout::kExpertRanges ? "expert-ranges" : "per-layer";
  nlohmann::json machines = nlohmann::json::array();
  for (const MachinePlan& m : plan.machines) machines.push_back(MachineJson(m));
  j["machines"] = machines;
  if (plan.fits) {
    j["serve_command"] = plan.serve_command;
  } else {
    j["shortfall_bytes"] = plan.shortfall;
    j["problem"] = plan.problem;
    j["suggestions"] = plan.suggestions;
  }
  return j;
}

}  // namespace

int RunPlan(int argc, char** argv) {
  FlagSpec spec = {{"model", "shape", "type", "machine", "coordinator", "ctx", "reserve", "host",
                    "stats", "stats-min-gain"},
                   {"replicas", "json"}};
  spec.usage =
      "moepool plan (--model M.gguf | --shape NAME) --machine SIZE [--machine SIZE ...] [flags]";
  spec.summary =
      "place the coordinator and the experts on machines and print their commands (exit 1: no fit)";
  spec.help = {
      {"model", "PATH  the GGUF file to place, with its exact sizes (this or --shape is required)"},
      {"shape",
       "NAME  plan the model moepool synth would write: tiny, mini or mixtral-8x7b, of --type"},
      {"type", "NAME  type or mix of the --shape, as moepool synth --type takes (default Q4_K_M)"},
      {"machine",
       "SIZE[:speed=X]  memory of one machine, e.g. 12GiB; cuda:SIZE is a GPU worker with a card "
       "of SIZE, cuda this machine's cuda:0; :speed=X its compute speed relative to the others "
       "(12GiB:speed=0.5 is half as fast: it gets less of the expert work, and with --stats "
       "colder experts); repeatable, at least one"},
      {"coordinator",
       "SIZE  a machine of its own for the coordinator, holding no experts (default: the first "
       "--machine runs it)"},
      {"ctx",
       "N  KV cache positions the coordinator reserves, all sequences together (default 4096)"},
      {"reserve", "SIZE  memory kept free on every machine (default 512MiB)"},
      {"host", "NAME  name of the next --machine, in order; repeatable (default machine-N)"},
      {"replicas", "use the room left over for extra copies of whole experts"},
      {"stats",
       "FILE  routing statistics (moepool serve --routing-stats-file, or GET /v1/cluster saved): "
       "experts the router chooses together are placed on one worker, per layer, and the plan "
       "prints the workers a routed row visits before and after"},
      {"stats-min-gain",
       "X  with --stats, a layer's experts move only if that puts at least this share of its "
       "rows more on one worker (default 0.15)"},
      {"json", "print one JSON object instead of text"},
  };
  auto args = Args::Parse(argc, argv, spec);
  if (!args.ok() && IsHelpRequest(args.status())) return 0;
  absl::StatusOr<PlanRequest> request =
      args.ok() ? ReadRequest(*args) : absl::StatusOr<PlanRequest>(args.status());
  absl::StatusOr<Plan> plan =
      request.ok() ? MakePlan(*request) : absl::StatusOr<Plan>(request.status());
  if (!plan.ok()) {
    std::fprintf(stderr, "moepool: %s\n", std::string(plan.status().message()).c_str());
    return 2;
  }
  if (args->Has("json")) {
    std::cout << PlanJson(*request, *plan).dump() << std::endl;
  } else {
    std::cout << FormatPlan(*request, *plan);
  }
  return plan->fits ? 0 : 1;
}

}  // namespace moepool::cli
