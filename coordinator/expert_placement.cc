#include "coordinator/expert_placement.h"

#include <algorithm>
#include <map>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "engine/fingerprint.h"

namespace moepool {
namespace {

// "0-3,5,7-9" for ascending ids.
std::string RangesText(const std::vector<int>& ids) {
  std::vector<std::string> parts;
  for (size_t i = 0; i < ids.size();) {
    size_t j = i;
    while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
    parts.push_back(j == i ? absl::StrCat(ids[i]) : absl::StrCat(ids[i], "-", ids[j]));
    i = j + 1;
  }
  return absl::StrJoin(parts, ",");
}

std::string Plural(const char* word, size_t n) { return n == 1 ? word : absl::StrCat(word, "s"); }

}  // namespace

absl::StatusOr<std::vector<int>> ParseExpertList(std::string_view spec, int64_t n_expert) {
  const std::string text(spec);
  std::vector<int> ids;
  if (absl::StripAsciiWhitespace(text).empty()) return ids;
  for (absl::string_view part : absl::StrSplit(text, ',')) {
    part = absl::StripAsciiWhitespace(part);
    const size_t dash = part.find('-');
    int lo = 0, hi = 0;
    bool ok = false;
    if (dash == absl::string_view::npos) {
      ok = absl::SimpleAtoi(part, &lo);
      hi = lo;
    } else {
      ok = absl::SimpleAtoi(part.substr(0, dash), &lo) &&
           absl::SimpleAtoi(part.substr(dash + 1), &hi);
    }
    if (!ok || lo < 0 || hi < lo) {
      return absl::InvalidArgumentError(absl::StrCat("bad expert list '", text, "': '",
                                                     std::string(part),
                                                     "' is not an expert id or a range like 5-7"));
    }
    if (hi >= n_expert) {
      return absl::InvalidArgumentError(absl::StrCat("bad expert list '", text, "': expert ", hi,
                                                     " >= the model's ", n_expert, " experts"));
    }
    for (int e = lo; e <= hi; ++e) ids.push_back(e);
  }
  std::sort(ids.begin(), ids.end());
  ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
  return ids;
}

std::string DescribeExpertPairs(std::vector<std::pair<int, int>> pairs) {
  std::sort(pairs.begin(), pairs.end());
  pairs.erase(std::unique(pairs.begin(), pairs.end()), pairs.end());
  // Experts per layer, then layers per expert set (in order of each set's first layer).
  std::map<int, std::vector<int>> by_layer;
  for (const auto& [layer, expert] : pairs) by_layer[layer].push_back(expert);
  std::vector<std::pair<std::vector<int>, std::vector<int>>> groups;  // (experts, layers)
  for (const auto& [layer, experts] : by_layer) {
    auto it = std::find_if(groups.begin(), groups.end(),
                           [&experts = experts](const auto& g) { return g.first == experts; });
    if (it == groups.end()) {
      groups.push_back({experts, {layer}});
    } else {
      it->second.push_back(layer);
    }
  }
  std::vector<std::string> parts;
  for (const auto& [experts, layers] : groups) {
    parts.push_back(absl::StrCat(Plural("layer", layers.size()), " ", RangesText(layers), ": ",
                                 Plural("expert", experts.size()), " ", RangesText(experts)));
  }
  return absl::StrJoin(parts, "; ");
}

absl::StatusOr<std::vector<std::pair<int, int>>> WorkerExpertPairs(
    const std::string& worker, const moepool::v1::DescribeResponse& describe,
    const ModelConfig& config) {
  std::vector<std::pair<int, int>> pairs;
  int64_t prev = -1;
  for (const uint32_t packed : describe.experts().packed()) {
    const int layer = PackedLayer(packed);
    const int expert = PackedExpert(packed);
    if (layer >= config.n_layer || expert >= config.n_expert) {
      return absl::InvalidArgumentError(absl::StrCat(
          "worker ", worker, " claims layer ", layer, " expert ", expert, ", outside the model's ",
          config.n_layer, " layers x ", config.n_expert, " experts"));
    }
    if (static_cast<int64_t>(packed) <= prev) {
      return absl::InvalidArgumentError(
          absl::StrCat("worker ", worker, ": its expert list is not strictly ascending"));
    }
    prev = packed;
    pairs.emplace_back(layer, expert);
  }
  return pairs;
}

absl::Status ValidateWorker(const std::string& worker, const moepool::v1::DescribeResponse& d,
                            const Model& model) {
  const ModelConfig& c = model.config();
  if (d.protocol_version() != moepool::v1::PROTOCOL_VERSION_CURRENT) {
    return absl::FailedPreconditionError(
        absl::StrCat("worker ", worker, " speaks protocol version ",
                     static_cast<int>(d.protocol_version()), ", this coordinator version ",
                     static_cast<int>(moepool::v1::PROTOCOL_VERSION_CURRENT), "; refusing it"));
  }
  const moepool::v1::Hyperparameters& h = d.hparams();
  if (h.n_embd() != c.n_embd || h.n_ff() != c.n_ff || h.n_layer() != c.n_layer ||
      h.n_expert() != c.n_expert || h.n_expert_used() != c.n_expert_used) {
    return absl::FailedPreconditionError(
        absl::StrCat("worker ", worker, " serves a model of other hyperparameters (n_embd ",
                     h.n_embd(), ", n_ff ", h.n_ff(), ", ", h.n_layer(), " layers, ", h.n_expert(),
                     " experts, ", h.n_expert_used(), " used) than this coordinator's (n_embd ",
                     c.n_embd, ", n_ff ", c.n_ff, ", ", c.n_layer, " layers, ", c.n_expert,
                     " experts, ", c.n_expert_used, " used); refusing it"));
  }
  auto pairs = WorkerExpertPairs(worker, d, c);
  if (!pairs.ok()) return absl::FailedPreconditionError(pairs.status().message());
  const std::string expected = ModelFingerprint(model, *pairs);
  if (d.model().fingerprint() != expected) {
    return absl::FailedPreconditionError(
        absl::StrCat("worker ", worker, " serves a different model file (", d.model().name(), ", ",
                     d.model().file_bytes(), " bytes, fingerprint ", d.model().fingerprint(),
                     ") than this coordinator's (", c.name, ", ", model.file().file_size(),
                     " bytes, fingerprint ", expected, " over the same experts); refusing it"));
  }
  return absl::OkStatus();
}

absl::StatusOr<ExpertPlacement> ExpertPlacement::Build(
    int64_t n_layer, int64_t n_expert, const std::vector<std::string>& names,
    const std::vector<std::vector<std::pair<int, int>>>& worker_pairs,
    const std::vector<int>& local_experts, bool local_fallback, bool allow_missing) {
  ExpertPlacement p;
  p.local_fallback_ = local_fallback;
  p.n_layer_ = n_layer;
  p.n_expert_ = n_expert;
  p.names_ = names;
  p.holders_.assign(static_cast<size_t>(n_layer * n_expert), {});
  for (const int e : local_experts) {
    if (e < 0 || e >= n_expert) {
      return absl::InvalidArgumentError(absl::StrCat("local expert ", e, " out of range"));
    }
    for (int64_t l = 0; l < n_layer; ++l) {
      auto& h = p.holders_[static_cast<size_t>(l * n_expert + e)];
      if (h.empty()) h.push_back(kLocal);
    }
  }
  for (size_t w = 0; w < worker_pairs.size(); ++w) {
    for (const auto& [layer, expert] : worker_pairs[w]) {
      if (layer < 0 || layer >= n_layer || expert < 0 || expert >= n_expert) {
        return absl::InvalidArgumentError(
            absl::StrCat("worker ", names[w], ": pair (", layer, ", ", expert, ") out of range"));
      }
      auto& h = p.holders_[static_cast<size_t>(layer * n_expert + expert)];
      if (std::find(h.begin(), h.end(), static_cast<int>(w)) == h.end()) {
        h.push_back(static_cast<int>(w));
      }
    }
  }
  std::vector<std::pair<int, int>> missing;
  for (int64_t l = 0; l < n_layer; ++l) {
    for (int64_t e = 0; e < n_expert; ++e) {
      if (p.holders_[static_cast<size_t>(l * n_expert + e)].empty()) {
        missing.emplace_back(static_cast<int>(l), static_cast<int>(e));
      }
    }
  }
  if (!missing.empty() && !local_fallback && !allow_missing) {
    return absl::FailedPreconditionError(
        absl::StrCat("no worker holds ", DescribeExpertPairs(missing),
                     " (workers: ", names.empty() ? "none" : absl::StrJoin(names, ", "),
                     "); start workers for them or keep them here with --local-experts"));
  }
  return p;
}

bool ExpertPlacement::local(int layer, int expert) const {
  const auto& h = holders(layer, expert);
  return !h.empty() && h.front() == kLocal;
}

absl::Status ExpertPlacement::ChooseHolders(int layer, const std::vector<int64_t>& rows_per_expert,
                                            const std::function<bool(int)>& is_up,
                                            uint64_t rotation, std::vector<int>* holder_of,
                                            const std::vector<HolderPace>* pace) const {
  holder_of->assign(static_cast<size_t>(n_expert_), kNone);
  std::vector<int64_t> assigned(names_.size(), 0);
  // When worker w would be done with its rows so far plus `rows`.
  auto done_at = [&](int w, int64_t rows) {
    const size_t i = static_cast<size_t>(w);
    const HolderPace p = pace != nullptr && i < pace->size() ? (*pace)[i] : HolderPace{};
    return p.round_trip_micros + static_cast<double>(assigned[i] + rows) * p.micros_per_row;
  };
  for (int e = 0; e < n_expert_; ++e) {
    const int64_t rows = rows_per_expert[static_cast<size_t>(e)];
    if (rows == 0) continue;
    const std::vector<int>& h = holders(layer, e);
    if (!h.empty() && h.front() == kLocal) {
      (*holder_of)[static_cast<size_t>(e)] = kLocal;
      continue;
    }
    int best = kNone;
    double best_done = 0;
    const size_t n = h.size();
    for (size_t i = 0; i < n; ++i) {
      const int w = h[(rotation + i) % n];
      if (!is_up(w)) continue;
      const double done = n == 1 ? 0 : done_at(w, rows);
      if (best == kNone || done < best_done) {
        best = w;
        best_done = done;
      }
    }
    if (best == kNone && local_fallback_) {
      (*holder_of)[static_cast<size_t>(e)] = kFallback;
      continue;
    }
    if (best == kNone) {
      std::vector<std::string> down;
      for (const int w : h) down.push_back(names_[static_cast<size_t>(w)]);
      return absl::UnavailableError(absl::StrCat("layer ", layer, " expert ", e,
                                                 ": every worker holding it is down (",
                                                 absl::StrJoin(down, ", "), ")"));
    }
    assigned[static_cast<size_t>(best)] += rows;
    (*holder_of)[static_cast<size_t>(e)] = best;
  }
  return absl::OkStatus();
}

namespace {

// Each value takes the smallest value of its group; a group starts at a value beyond
// tolerance x (its smallest) + slack.
void MergeNear(std::vector<double*> values, double tolerance, double slack) {
  std::sort(values.begin(), values.end(), [](const double* a, const double* b) { return *a < *b; });
  double group = 0;
  for (size_t i = 0; i < values.size(); ++i) {
    if (i == 0 || *values[i] > group * tolerance + slack) group = *values[i];
    *values[i] = group;
  }
}

}  // namespace

void MergeNearPaces(std::vector<ExpertPlacement::HolderPace>* paces, double tolerance,
                    double link_slack_micros) {
  std::vector<double*> per_row, link;
  for (ExpertPlacement::HolderPace& p : *paces) {
    per_row.push_back(&p.micros_per_row);
    link.push_back(&p.round_trip_micros);
  }
  MergeNear(per_row, tolerance, 0);
  MergeNear(link, tolerance, link_slack_micros);
}

}  // namespace moepool
