// The placement planner behind `moepool plan`: given a model's sizes and the memory of some
// machines, decides which machine runs the coordinator and which (layer, expert) pairs each
// worker holds, or explains why the model does not fit and what would.
//
// Sizes come from a GGUF file (exact tensor bytes) or from a synth shape and type mix (the exact
// tensors `moepool synth` would write, see PlanSynthTensors). Memory model, per machine:
//   coordinator = non-expert weights + KV cache (f16) + compute buffers (CoordinatorComputeBytes)
//   worker      = its experts' bytes + WorkerBufferBytes
//   reserve     = kept free on every machine (OS, CUDA context, ...)
// docs/planner.md states the formulas and shows real numbers.
//
// Pure logic: no I/O except SizesFromFile (which maps the file). All functions are thread-safe
// (no shared state). Errors are absl::Status values, never exceptions.
#ifndef MOEPOOL_COORDINATOR_PLANNER_H_
#define MOEPOOL_COORDINATOR_PLANNER_H_

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "coordinator/colocation.h"
#include "coordinator/routing_stats.h"
#include "engine/model.h"
#include "engine/synth.h"

namespace moepool {

// The token file the plan's commands name: the same file on every machine (docs/planner.md).
inline constexpr char kClusterTokenFile[] = "cluster.token";

inline constexpr uint64_t kKiB = uint64_t{1} << 10;
inline constexpr uint64_t kMiB = uint64_t{1} << 20;
inline constexpr uint64_t kGiB = uint64_t{1} << 30;

// Parses a memory size: a non-negative number with an optional unit, case-insensitive, spaces
// allowed between them: B, KiB / MiB / GiB / TiB (powers of 1024), KB / MB / GB / TB (powers of
// 1000); no unit means bytes ("12GiB", "1.5 GB", "512MiB", "4096"). Fractions are rounded down
// to whole bytes. INVALID_ARGUMENT quoting the text for anything else ("12G" is refused as
// ambiguous) or a size of 2^63 bytes or more.
absl::StatusOr<uint64_t> ParseByteSize(std::string_view text);

// "11.18 GiB", "512.0 MiB", "300 B": binary units, for people.
std::string FormatBytes(uint64_t bytes);

// Id lists such as "0-3,5": ascending ids, consecutive runs as inclusive ranges. Empty: "".
std::string FormatIdRanges(const std::vector<int>& ids);
// Parses "0-3,5" (any order, duplicates allowed) into ascending unique ids in [0, limit).
// INVALID_ARGUMENT naming `what` ("expert", "layer") for bad syntax or an id out of range.
absl::StatusOr<std::vector<int>> ParseIdRanges(std::string_view text, int64_t limit,
                                               std::string_view what);

// Byte sizes of a model split the way the cluster splits it.
struct ModelSizes {
  std::string description;  // "mixtral-8x7b Q5_K_M (synth shape)" or the file path
  std::string model_path;   // the file workers and the coordinator load
  std::string type;         // the type mix for a shape ("Q5_K_M"); "" for a file
  SynthShape shape;         // hyperparameters (for a file: read from it) for re-sizing as a mix
  int64_t n_vocab = 0;
  // Bytes of each (layer, expert) pair's gate + up + down slices: [n_layer * n_expert], pair
  // (l, e) at l * n_expert + e.
  std::vector<uint64_t> pair_bytes;
  uint64_t non_expert_bytes = 0;  // every other tensor: embedding, attention, norms, router, head

  int64_t n_layer() const { return shape.n_layer; }
  int64_t n_expert() const { return shape.n_expert; }
  int64_t kv_dim() const { return shape.n_head_kv * (shape.n_embd / shape.n_head); }
  uint64_t PairBytes(int layer, int expert) const {
    return pair_bytes[static_cast<size_t>(layer * n_expert() + expert)];
  }
  uint64_t ExpertBytes() const;  // all pairs
  uint64_t WeightBytes() const { return ExpertBytes() + non_expert_bytes; }
};

// Vocabulary size assumed for a shape: the Mistral tokenizer that `moepool synth` copies.
inline constexpr int64_t kSynthVocabSize = 32000;

// Sizes of the model `moepool synth --shape S --type T` writes (merged and per-expert layouts
// have the same sizes). Errors: PlanSynthTensors's.
absl::StatusOr<ModelSizes> SizesFromShape(const SynthShape& shape, std::string_view type,
                                          int64_t n_vocab = kSynthVocabSize);
// Sizes of a loaded model (merged or per-expert expert layout); the model must bind all experts
// and the non-expert weights. `path` is what the commands will name.
ModelSizes SizesFromModel(const Model& model, const std::string& path);
// Loads `path` (Model::Load's errors) and returns its sizes.
absl::StatusOr<ModelSizes> SizesFromFile(const std::string& path);

// Memory formulas (bytes). Micro-batch of `batch` token rows (the engine's prompt batch).
inline constexpr int64_t kPlanBatch = 512;
// Fixed part of every moepool process: runtime, thread stacks, RPC buffers, tokenizer.
inline constexpr uint64_t kProcessOverheadBytes = 64 * kMiB;
// K and V, f16, for `ctx` positions: 2 * n_layer * ctx * kv_dim * 2.
uint64_t KvCacheBytes(const ModelSizes& sizes, int64_t ctx);
// kProcessOverheadBytes + batch * (4 * (7 n_embd + 2 kv_dim + n_expert + 2 k + n_vocab
// + 2 k n_embd) + 2 n_embd), k = experts used per token (see docs/planner.md).
uint64_t CoordinatorComputeBytes(const ModelSizes& sizes, int64_t batch);
// kProcessOverheadBytes + batch * (4 * (2 n_embd + 3 n_ff) + 2 (n_embd + n_ff)).
uint64_t WorkerBufferBytes(const ModelSizes& sizes, int64_t batch);

struct PlanRequest {
  ModelSizes sizes;
  std::vector<uint64_t> machines;               // bytes of memory of each machine, in order
  std::optional<uint64_t> coordinator_machine;  // a separate coordinator machine
  std::vector<std::string> host_names;          // names of `machines` (missing: machine-N)
  // Where each machine's experts live: "" (missing) for host memory, "cuda:0" for a GPU whose
  // memory is the size given in `machines` (its worker command then gets --device cuda:0).
  std::vector<std::string> machine_devices;
  // Relative compute speed of each machine's worker (missing: 1; `--machine 12GiB:speed=0.5` is
  // a machine half as fast per row). When they differ, the experts are split so that each
  // machine's share of the expert work over its speed is as even as memory allows (the slowest
  // worker sets every layer's pace); with `routing`, a slow machine also gets colder experts.
  std::vector<double> machine_speeds;
  int64_t ctx = 4096;
  int64_t batch = kPlanBatch;
  uint64_t reserve = 512 * kMiB;
  bool replicas = false;
  // Routing statistics (`moepool plan --stats`, a serve's --routing-stats-file): each layer's
  // experts are then dealt to the workers so that pairs the router chooses together share a
  // worker, as often as the statistics say (same number of pairs per worker and layer).
  std::optional<RoutingSnapshot> routing;
  // A layer is dealt again only when that co-locates at least this share of its rows more.
  double routing_min_gain = 0.15;
  int first_port = 7070;
  bool suggest = true;  // compute `suggestions` when it does not fit
};

struct CoordinatorMemory {
  uint64_t non_expert = 0;
  uint64_t kv_cache = 0;
  uint64_t compute = 0;
  uint64_t total() const { return non_expert + kv_cache + compute; }
};

struct MachinePlan {
  std::string name;
  std::string device;    // "" (host memory) or "cuda:0" (size is the card's memory)
  uint64_t size = 0;     // the machine's memory
  uint64_t reserve = 0;  // kept free
  double speed = 1;      // relative compute speed (PlanRequest::machine_speeds)
  // Its share of the routed (row, expert) work: from the routing statistics when given, else
  // its share of the expert bytes (rows spread evenly over experts); replicas split evenly.
  double work_share = 0;
  bool coordinator = false;
  bool worker = false;  // holds experts
  uint64_t coordinator_bytes = 0;
  uint64_t worker_buffer_bytes = 0;
  uint64_t expert_bytes = 0;
  std::vector<std::pair<int, int>> pairs;  // (layer, expert) held, ascending
  std::vector<int> replica_experts;        // experts added as replicas (all layers)
  int port = 0;                            // the worker's port
  std::string experts_text;                // "experts 0-3" or "layers 0-12: experts 0-3; ..."
  std::string worker_command;              // empty when not a worker
  std::string placement_file_name;         // set when the pairs need a placement file
  std::string placement_file;              // its content

  uint64_t available() const { return size > reserve ? size - reserve : 0; }
  uint64_t used() const { return coordinator_bytes + worker_buffer_bytes + expert_bytes; }
};

enum class PlanLayout {
  kExpertRanges,  // every worker: one contiguous expert range on all layers
  kPerLayer,      // some worker holds different experts on different layers (placement files)
};

struct Plan {
  bool fits = false;
  // With PlanRequest::routing: the estimate of the balanced split and of the co-located one.
  std::optional<RoutingEstimate> routing_before;
  std::optional<RoutingEstimate> routing_after;
  // The slowest worker's work_share / speed (what sets every layer's pace; an even split over
  // n equal machines is 1/n). With speeds that differ, `pace_memory_split` is the same for the
  // split that ignores speed, and `pace_swaps` counts the experts traded for colder ones.
  double pace = 0;
  std::optional<double> pace_memory_split;
  int pace_swaps = 0;
  PlanLayout layout = PlanLayout::kExpertRanges;
  CoordinatorMemory coordinator;
  uint64_t worker_buffer = 0;
  std::vector<MachinePlan> machines;  // a separate coordinator machine first
  std::string serve_command;
  // When it does not fit: total memory needed minus total available (0 when the total would fit
  // but whole pairs do not pack), a sentence saying so, and what would fit.
  uint64_t shortfall = 0;
  std::string problem;
  std::vector<std::string> suggestions;
};

// Plans the placement. Every (layer, expert) pair is held by exactly one worker (more with
// replicas). Contiguous expert ranges on all layers are preferred; when they do not fit, pairs
// are split per layer (expert-major, so each layer's experts stay spread over the workers).
// Either way the split minimises the largest fraction of any machine's room used, then evens
// the fractions out; with machine speeds that differ, it minimises the largest share of the
// expert bytes over speed instead (memory stays a hard limit), then evens those out. Not
// fitting is not an error (fits = false, with the problem and suggestions); INVALID_ARGUMENT
// only for a malformed request: no machines, a machine of 0 bytes, a speed that is not a
// positive number, ctx or batch < 1, sizes without pairs.
absl::StatusOr<Plan> MakePlan(const PlanRequest& request);

// The plan for people: sizes, per machine role, memory, experts and commands, or the problem
// and suggestions.
std::string FormatPlan(const PlanRequest& request, const Plan& plan);

// A worker's placement file: lines "layers A-B: experts C-D,E" (ids and inclusive ranges);
// '#' starts a comment. FormatPlacementFile groups consecutive layers holding the same experts.
std::string FormatPlacementFile(const std::vector<std::pair<int, int>>& pairs,
                                std::string_view header_comment);
// Parses a placement file into ascending unique (layer, expert) pairs. INVALID_ARGUMENT naming
// the line for bad syntax or ids out of range.
absl::StatusOr<std::vector<std::pair<int, int>>> ParsePlacementFile(std::string_view text,
                                                                    int64_t n_layer,
                                                                    int64_t n_expert);

}  // namespace moepool

#endif  // MOEPOOL_COORDINATOR_PLANNER_H_
