// Where each (layer, expert) pair of the model lives in a cluster: on which workers (from their
// Describe answers) and/or in this process (`--local-experts`).
//
// Built once at startup by the coordinator. A pair that nobody holds is a startup error listing
// the missing pairs compactly, unless the coordinator computes such pairs itself (local
// fallback: then whatever no up worker holds goes to kFallback); a worker speaking another protocol
// version, serving another model file (fingerprint) or other hyperparameters is refused with an
// error naming it.
//
// Threading: immutable after Build; ChooseHolders is const and may run on any thread.
#ifndef MOEPOOL_COORDINATOR_EXPERT_PLACEMENT_H_
#define MOEPOOL_COORDINATOR_EXPERT_PLACEMENT_H_

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/model.h"
#include "moepool/v1/expert_service.pb.h"

namespace moepool {

// (layer, expert) packed as in the protocol's ExpertSet: layer * 65536 + expert.
inline uint32_t PackExpertPair(int layer, int expert) {
  return static_cast<uint32_t>(layer) * 65536u + static_cast<uint32_t>(expert);
}
inline int PackedLayer(uint32_t packed) { return static_cast<int>(packed >> 16); }
inline int PackedExpert(uint32_t packed) { return static_cast<int>(packed & 0xffffu); }

// Parses an expert list such as "0,2,5-7" (ids and inclusive ranges, any order, duplicates
// allowed) into ascending unique ids. INVALID_ARGUMENT for bad syntax or an id >= n_expert.
// An empty spec gives an empty list.
absl::StatusOr<std::vector<int>> ParseExpertList(std::string_view spec, int64_t n_expert);

// Compact text for a set of (layer, expert) pairs, e.g. "layers 0-31: experts 6-7; layer 3:
// expert 1": consecutive layers with the same expert set share one entry.
std::string DescribeExpertPairs(std::vector<std::pair<int, int>> pairs);

// The (layer, expert) pairs of a Describe answer, ascending. INVALID_ARGUMENT (naming
// `worker`) for a pair outside the model's layers/experts or a list not strictly ascending.
absl::StatusOr<std::vector<std::pair<int, int>>> WorkerExpertPairs(
    const std::string& worker, const moepool::v1::DescribeResponse& describe,
    const ModelConfig& config);

// Checks a worker's Describe answer against the coordinator's model: protocol version,
// hyperparameters, and the fingerprint the coordinator computes over the worker's pairs from
// its own file (`model` must bind all experts). FAILED_PRECONDITION naming `worker` on any
// mismatch.
absl::Status ValidateWorker(const std::string& worker,
                            const moepool::v1::DescribeResponse& describe, const Model& model);

class ExpertPlacement {
 public:
  // Holder index meaning "this process" (--local-experts).
  static constexpr int kLocal = -1;
  // Holder meaning "this process, because no up worker holds it" (local fallback).
  static constexpr int kFallback = -3;

  // worker_pairs[i]: the pairs worker i holds (names[i] is its address, used in messages).
  // local_experts: expert ids kept in this process on every layer. FAILED_PRECONDITION listing
  // the missing pairs if some pair has no holder, unless `local_fallback` or `allow_missing` (an
  // elastic cluster, whose workers join later: such pairs fail UNAVAILABLE until held).
  static absl::StatusOr<ExpertPlacement> Build(
      int64_t n_layer, int64_t n_expert, const std::vector<std::string>& names,
      const std::vector<std::vector<std::pair<int, int>>>& worker_pairs,
      const std::vector<int>& local_experts, bool local_fallback = false,
      bool allow_missing = false);

  int64_t n_layer() const { return n_layer_; }
  int64_t n_expert() const { return n_expert_; }
  int n_workers() const { return static_cast<int>(names_.size()); }
  const std::string& worker_name(int i) const { return names_[static_cast<size_t>(i)]; }

  // Holders of a pair: kLocal first if held here, then worker indices ascending.
  const std::vector<int>& holders(int layer, int expert) const {
    return holders_[static_cast<size_t>(layer * n_expert_ + expert)];
  }
  bool local(int layer, int expert) const;
  bool local_fallback() const { return local_fallback_; }

  // Picks one holder for each expert of `layer` that has rows (rows_per_expert[e] > 0):
  // this process if it holds the expert, otherwise among the workers for which is_up(i) is
  // true, the one that will answer first: the least round_trip_micros + (rows assigned so far
  // in this call + the expert's rows) x micros_per_row, by `pace` (indexed by worker; null or
  // missing entries: 1 us per row and no round trip, i.e. the fewest rows assigned so far);
  // ties go to the first holder at or after position `rotation` (mod the number of holders),
  // so repeated steps spread evenly over replicas. holder_of[e] = the chosen holder (kLocal or
  // a worker index), or kNone for experts without rows. If no holder is up (or there is none):
  // kFallback with local fallback, else UNAVAILABLE naming the expert and its (down) holders.
  static constexpr int kNone = -2;
  struct HolderPace {
    double micros_per_row = 1;
    double round_trip_micros = 0;  // the link's part of an exchange (without the compute)
  };
  absl::Status ChooseHolders(int layer, const std::vector<int64_t>& rows_per_expert,
                             const std::function<bool(int)>& is_up, uint64_t rotation,
                             std::vector<int>* holder_of,
                             const std::vector<HolderPace>* pace = nullptr) const;

 private:
  int64_t n_layer_ = 0;
  int64_t n_expert_ = 0;
  std::vector<std::string> names_;
  std::vector<std::vector<int>> holders_;  // [n_layer * n_expert]
  bool local_fallback_ = false;
};

// Measured paces differ by noise even between equal machines, and ChooseHolders would then
// send every row of a replicated expert to the one measured a hair faster (and never measure
// the other again). This gives holders whose paces are near each other the same pace: sorted
// by micros_per_row, each holder within `tolerance` (relative) of the fastest of its group takes
// that group's pace; the same for round_trip_micros, where `link_slack_micros` also counts as
// near. Holders left equal split rows by count, as without paces.
void MergeNearPaces(std::vector<ExpertPlacement::HolderPace>* paces, double tolerance = 1.25,
                    double link_slack_micros = 100);

}  // namespace moepool

#endif  // MOEPOOL_COORDINATOR_EXPERT_PLACEMENT_H_
