// The (layer, expert) pairs a worker serves, and the ways to name them on the command line.
//
// Index lists (`--experts`, `--layers`, and each side of a placement line) are comma-separated
// numbers and inclusive ranges: "0-3", "0,2,5-7", "7". Whitespace around items is ignored. Every
// index must lie in [0, limit) and appear once; an empty list is an error.
//
// Placement file (text), one line per layer or layer range, as `moepool plan` writes it:
//
//   # worker A of a two-worker cluster of Mixtral 8x7B
//   layers 0-15: experts 0-3      # layers 0..15 hold experts 0, 1, 2, 3
//   layer 16: experts 0,2,4,6
//   17-31: 4-7                    # the words "layers"/"layer", "experts"/"expert" are optional
//
// `#` starts a comment (to the end of the line); blank lines are ignored. Each line is
// `[layers] LIST: [experts] LIST` with index lists; layers not listed hold no experts; a layer
// listed twice is an error; the file must name at least one pair.
//
// Errors are INVALID_ARGUMENT naming the flag or file (and line) and the bad item. Threading:
// ExpertSet is a value type, immutable after construction; const methods are thread-safe.
#ifndef MOEPOOL_WORKER_EXPERT_SET_H_
#define MOEPOOL_WORKER_EXPERT_SET_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/model.h"

namespace moepool::worker {

// Packs a pair the way the protocol's ExpertSet message does: layer * 65536 + expert.
inline uint32_t PackExpert(int layer, int expert) {
  return static_cast<uint32_t>(layer) * 65536u + static_cast<uint32_t>(expert);
}

class ExpertSet {
 public:
  ExpertSet() = default;
  // `pairs` may be in any order; duplicates are merged. Indices are not checked here (the
  // parsers below check them against the model).
  explicit ExpertSet(std::vector<std::pair<int, int>> pairs);

  // Ascending by (layer, expert).
  const std::vector<std::pair<int, int>>& pairs() const { return pairs_; }
  size_t size() const { return pairs_.size(); }
  bool empty() const { return pairs_.empty(); }
  bool Contains(int layer, int expert) const;
  // Packed pairs (PackExpert), ascending.
  std::vector<uint32_t> Packed() const;
  // Binds exactly these experts and none of the non-expert weights.
  ExpertFilter Filter() const;
  // "8 experts on 4 layers" style summary for logs.
  std::string Summary() const;

 private:
  std::vector<std::pair<int, int>> pairs_;
};

// Parses an index list ("0-3", "0,2,5-7") with every index in [0, limit). `what` names the
// source in errors (e.g. "--experts").
absl::StatusOr<std::vector<int>> ParseIndexList(std::string_view spec, int64_t limit,
                                                std::string_view what);

// `--experts EXPERTS [--layers LAYERS]`: the experts on each listed layer (all layers when
// `layers_spec` is empty).
absl::StatusOr<ExpertSet> ExpertSetFromFlags(std::string_view experts_spec,
                                             std::string_view layers_spec, int64_t n_layer,
                                             int64_t n_expert);

// Parses placement-file text (format above). `source` names the file in errors.
absl::StatusOr<ExpertSet> ParsePlacement(std::string_view text, int64_t n_layer, int64_t n_expert,
                                         std::string_view source);

// Reads and parses a placement file (NOT_FOUND / INVALID_ARGUMENT naming the path).
absl::StatusOr<ExpertSet> ReadPlacementFile(const std::string& path, int64_t n_layer,
                                            int64_t n_expert);

}  // namespace moepool::worker

#endif  // MOEPOOL_WORKER_EXPERT_SET_H_
