// Sizes, memory formulas, id lists and placement files of the planner (see planner.h).
#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <map>
#include <set>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "coordinator/planner.h"
#include "coordinator/planner_internal.h"
#include "engine/status_macros.h"

namespace moepool {
namespace {

std::string Lower(std::string_view s) {
  std::string out;
  for (char c : s) out.push_back(static_cast<char>(std::tolower(static_cast<unsigned char>(c))));
  return out;
}

std::string_view Trim(std::string_view s) {
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.front()))) s.remove_prefix(1);
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.remove_suffix(1);
  return s;
}

// Parses a whole non-negative decimal integer.
bool ParseId(std::string_view s, int64_t* out) {
  s = Trim(s);
  if (s.empty() || s.size() > 9) return false;
  int64_t v = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return false;
    v = v * 10 + (c - '0');
  }
  *out = v;
  return true;
}

// True for the per-expert layout's expert tensors "blk.L.ffn_{gate,up,down}.E.weight".
bool IsExpertTensorName(std::string_view name) {
  return name.find(".ffn_gate.") != std::string_view::npos ||
         name.find(".ffn_up.") != std::string_view::npos ||
         name.find(".ffn_down.") != std::string_view::npos;
}

}  // namespace

absl::StatusOr<uint64_t> ParseByteSize(std::string_view text) {
  const std::string_view t = Trim(text);
  auto bad = [&](std::string_view why) {
    return absl::InvalidArgumentError(absl::StrCat("bad size '", std::string(text),
                                                   "': ", std::string(why),
                                                   " (examples: 12GiB, 1.5GB, 512MiB, 4096)"));
  };
  size_t i = 0;
  while (i < t.size() && (std::isdigit(static_cast<unsigned char>(t[i])) || t[i] == '.')) ++i;
  const std::string number(t.substr(0, i));
  if (number.empty() || std::count(number.begin(), number.end(), '.') > 1 || number == ".") {
    return bad("expected a number");
  }
  const std::string unit = Lower(Trim(t.substr(i)));
  static const std::map<std::string, double> kUnits = {
      {"", 1.0},
      {"b", 1.0},
      {"kib", 1024.0},
      {"mib", 1048576.0},
      {"gib", 1073741824.0},
      {"tib", 1099511627776.0},
      {"kb", 1e3},
      {"mb", 1e6},
      {"gb", 1e9},
      {"tb", 1e12},
  };
  const auto it = kUnits.find(unit);
  if (it == kUnits.end()) {
    return bad("unknown unit (B, KiB, MiB, GiB, TiB = powers of 1024; KB, MB, GB, TB = of 1000)");
  }
  const double value = std::strtod(number.c_str(), nullptr) * it->second;
  if (!std::isfinite(value) || value >= 9.2e18) return bad("too large");
  return static_cast<uint64_t>(std::floor(value));
}

std::string FormatBytes(uint64_t bytes) {
  const double b = static_cast<double>(bytes);
  if (bytes >= kGiB) return absl::StrFormat("%.2f GiB", b / static_cast<double>(kGiB));
  if (bytes >= kMiB) return absl::StrFormat("%.1f MiB", b / static_cast<double>(kMiB));
  if (bytes >= kKiB) return absl::StrFormat("%.1f KiB", b / static_cast<double>(kKiB));
  return absl::StrCat(bytes, " B");
}

std::string FormatIdRanges(const std::vector<int>& ids_in) {
  std::vector<int> ids = ids_in;
  std::sort(ids.begin(), ids.end());
  ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
  std::string out;
  for (size_t i = 0; i < ids.size();) {
    size_t j = i;
    while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
    if (!out.empty()) out += ",";
    absl::StrAppend(&out, ids[i]);
    if (j > i) absl::StrAppend(&out, "-", ids[j]);
    i = j + 1;
  }
  return out;
}

absl::StatusOr<std::vector<int>> ParseIdRanges(std::string_view text, int64_t limit,
                                               std::string_view what) {
  std::set<int> ids;
  for (std::string_view part : planner_internal::Split(text, ',', false)) {
    const size_t dash = part.find('-');
    int64_t lo = 0, hi = 0;
    const bool ok = dash == std::string_view::npos
                        ? ParseId(part, &lo) && ParseId(part, &hi)
                        : ParseId(part.substr(0, dash), &lo) && ParseId(part.substr(dash + 1), &hi);
    if (!ok || lo > hi) {
      return absl::InvalidArgumentError(
          absl::StrCat("bad ", std::string(what), " list '", std::string(text),
                       "' (expected ids and inclusive ranges such as 0-3,5)"));
    }
    if (hi >= limit) {
      return absl::InvalidArgumentError(absl::StrCat("bad ", std::string(what), " list '",
                                                     std::string(text), "': ", std::string(what),
                                                     " ", hi, " >= the model's ", limit));
    }
    for (int64_t v = lo; v <= hi; ++v) ids.insert(static_cast<int>(v));
  }
  return std::vector<int>(ids.begin(), ids.end());
}

uint64_t ModelSizes::ExpertBytes() const {
  uint64_t n = 0;
  for (uint64_t b : pair_bytes) n += b;
  return n;
}

absl::StatusOr<ModelSizes> SizesFromShape(const SynthShape& shape, std::string_view type,
                                          int64_t n_vocab) {
  ASSIGN_OR_RETURN(const std::vector<SynthTensorSpec> specs,
                   PlanSynthTensors(shape, type, n_vocab, /*per_expert_layout=*/true));
  ModelSizes s;
  s.shape = shape;
  s.n_vocab = n_vocab;
  s.type = std::string(type);
  for (char& c : s.type) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  s.description = absl::StrCat(shape.name, " ", s.type, " (synth shape)");
  s.model_path = absl::StrCat(shape.name, "-", s.type, ".gguf");
  s.pair_bytes.assign(static_cast<size_t>(shape.n_layer * shape.n_expert), 0);
  for (const SynthTensorSpec& t : specs) {
    // Per-expert layout names: blk.L.ffn_{gate,up,down}.E.weight.
    int64_t layer = -1, expert = -1;
    if (IsExpertTensorName(t.name)) {
      const std::vector<std::string> parts = planner_internal::Split(t.name, '.', false);
      if (parts.size() == 5 && ParseId(parts[1], &layer) && ParseId(parts[3], &expert) &&
          layer < shape.n_layer && expert < shape.n_expert) {
        s.pair_bytes[static_cast<size_t>(layer * shape.n_expert + expert)] += t.SizeBytes();
        continue;
      }
      return absl::InternalError(absl::StrCat("unexpected synth tensor '", t.name, "'"));
    }
    s.non_expert_bytes += t.SizeBytes();
  }
  return s;
}

ModelSizes SizesFromModel(const Model& model, const std::string& path) {
  const ModelConfig& c = model.config();
  ModelSizes s;
  s.description = path;
  s.model_path = path;
  s.shape.name = c.name.empty() ? path : c.name;
  s.shape.n_embd = c.n_embd;
  s.shape.n_ff = c.n_ff;
  s.shape.n_layer = c.n_layer;
  s.shape.n_head = c.n_head;
  s.shape.n_head_kv = c.n_head_kv;
  s.shape.n_expert = c.n_expert;
  s.shape.n_expert_used = c.n_expert_used;
  s.shape.n_ctx = c.n_ctx_train;
  s.shape.rope_base = c.rope_base;
  s.shape.rms_eps = c.rms_eps;
  s.n_vocab = c.n_vocab;
  s.pair_bytes.assign(static_cast<size_t>(c.n_layer * c.n_expert), 0);
  uint64_t expert_total = 0;
  for (int64_t l = 0; l < c.n_layer; ++l) {
    for (int64_t e = 0; e < c.n_expert; ++e) {
      const ExpertWeights& E = model.layer(l).experts[static_cast<size_t>(e)];
      const uint64_t b = E.gate.SizeBytes() + E.up.SizeBytes() + E.down.SizeBytes();
      s.pair_bytes[static_cast<size_t>(l * c.n_expert + e)] = b;
      expert_total += b;
    }
  }
  uint64_t all = 0;
  for (const GgufTensorInfo& t : model.file().tensors()) all += t.size_bytes;
  s.non_expert_bytes = all > expert_total ? all - expert_total : 0;
  return s;
}

absl::StatusOr<ModelSizes> SizesFromFile(const std::string& path) {
  ASSIGN_OR_RETURN(std::unique_ptr<Model> model, Model::Load(path));
  return SizesFromModel(*model, path);
}

uint64_t KvCacheBytes(const ModelSizes& sizes, int64_t ctx) {
  return 2ull * static_cast<uint64_t>(sizes.n_layer()) * static_cast<uint64_t>(ctx) *
         static_cast<uint64_t>(sizes.kv_dim()) * 2ull;
}

uint64_t CoordinatorComputeBytes(const ModelSizes& sizes, int64_t batch) {
  const uint64_t d = static_cast<uint64_t>(sizes.shape.n_embd);
  const uint64_t k = static_cast<uint64_t>(sizes.shape.n_expert_used);
  const uint64_t per_row = 4 * (7 * d + 2 * static_cast<uint64_t>(sizes.kv_dim()) +
                                static_cast<uint64_t>(sizes.n_expert()) + 2 * k +
                                static_cast<uint64_t>(sizes.n_vocab) + 2 * k * d) +
                           2 * d;
  return kProcessOverheadBytes + static_cast<uint64_t>(batch) * per_row;
}

uint64_t WorkerBufferBytes(const ModelSizes& sizes, int64_t batch) {
  const uint64_t d = static_cast<uint64_t>(sizes.shape.n_embd);
  const uint64_t ff = static_cast<uint64_t>(sizes.shape.n_ff);
  const uint64_t per_row = 4 * (2 * d + 3 * ff) + 2 * (d + ff);
  return kProcessOverheadBytes + static_cast<uint64_t>(batch) * per_row;
}

std::string FormatPlacementFile(const std::vector<std::pair<int, int>>& pairs,
                                std::string_view header_comment) {
  std::map<int, std::vector<int>> by_layer;
  for (const auto& [l, e] : pairs) by_layer[l].push_back(e);
  std::string out;
  for (std::string_view line : planner_internal::Split(header_comment, '\n', true)) {
    absl::StrAppend(&out, "# ", std::string(line), "\n");
  }
  // Consecutive layers with the same expert set share a line.
  auto it = by_layer.begin();
  while (it != by_layer.end()) {
    const std::string experts = FormatIdRanges(it->second);
    const int first = it->first;
    int last = first;
    auto next = std::next(it);
    while (next != by_layer.end() && next->first == last + 1 &&
           FormatIdRanges(next->second) == experts) {
      last = next->first;
      ++next;
    }
    absl::StrAppend(
        &out,
        first == last ? absl::StrCat("layer ", first) : absl::StrCat("layers ", first, "-", last),
        ": experts ", experts, "\n");
    it = next;
  }
  return out;
}

absl::StatusOr<std::vector<std::pair<int, int>>> ParsePlacementFile(std::string_view text,
                                                                    int64_t n_layer,
                                                                    int64_t n_expert) {
  std::set<std::pair<int, int>> pairs;
  int line_no = 0;
  for (std::string_view line : planner_internal::Split(text, '\n', false)) {
    ++line_no;
    const size_t hash = line.find('#');
    if (hash != std::string_view::npos) line = line.substr(0, hash);
    line = Trim(line);
    if (line.empty()) continue;
    auto bad = [&](std::string_view why) {
      return absl::InvalidArgumentError(absl::StrCat("placement line ", line_no, " '",
                                                     std::string(line), "': ", std::string(why)));
    };
    std::string_view rest = line;
    if (!planner_internal::ConsumePrefix(&rest, "layers ") &&
        !planner_internal::ConsumePrefix(&rest, "layer ")) {
      return bad("expected 'layers A-B: experts C-D'");
    }
    const size_t colon = rest.find(':');
    if (colon == std::string_view::npos) return bad("expected ':' after the layers");
    std::string_view experts_part = Trim(rest.substr(colon + 1));
    if (!planner_internal::ConsumePrefix(&experts_part, "experts ") &&
        !planner_internal::ConsumePrefix(&experts_part, "expert ")) {
      return bad("expected 'experts' after ':'");
    }
    auto layers = ParseIdRanges(Trim(rest.substr(0, colon)), n_layer, "layer");
    if (!layers.ok()) return bad(std::string(layers.status().message()));
    auto experts = ParseIdRanges(Trim(experts_part), n_expert, "expert");
    if (!experts.ok()) return bad(std::string(experts.status().message()));
    for (int l : *layers) {
      for (int e : *experts) pairs.insert({l, e});
    }
  }
  return std::vector<std::pair<int, int>>(pairs.begin(), pairs.end());
}

}  // namespace moepool
