#include "worker/expert_set.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <set>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace moepool::worker {
namespace {

std::string_view Trim(std::string_view s) {
  while (!s.empty() && absl::ascii_isspace(static_cast<unsigned char>(s.front()))) {
    s.remove_prefix(1);
  }
  while (!s.empty() && absl::ascii_isspace(static_cast<unsigned char>(s.back()))) {
    s.remove_suffix(1);
  }
  return s;
}

absl::StatusOr<int64_t> ParseIndex(std::string_view item, std::string_view text, int64_t limit,
                                   std::string_view what) {
  const std::string s(Trim(text));
  int64_t v = 0;
  if (s.empty() || !std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; }) ||
      !absl::SimpleAtoi(s, &v)) {
    return absl::InvalidArgumentError(absl::StrCat(std::string(what), ": '", std::string(item),
                                                   "' is not a number or a range like 0-3"));
  }
  if (v >= limit) {
    return absl::InvalidArgumentError(absl::StrCat(std::string(what), ": ", v,
                                                   " is out of range (the model has ", limit,
                                                   ", numbered 0-", limit - 1, ")"));
  }
  return v;
}

// Splits at every `sep` (no absl::StrSplit: this Abseil's string_view is not std::string_view).
std::vector<std::string_view> Split(std::string_view s, char sep) {
  std::vector<std::string_view> parts;
  size_t start = 0;
  while (true) {
    const size_t at = s.find(sep, start);
    if (at == std::string_view::npos) {
      parts.push_back(s.substr(start));
      return parts;
    }
    parts.push_back(s.substr(start, at - start));
    start = at + 1;
  }
}

// `s` without a leading `plural` or `singular` word (the planner's "layers 0-21: experts 0-3").
std::string_view DropWord(std::string_view s, std::string_view plural, std::string_view singular) {
  s = Trim(s);
  for (std::string_view word : {plural, singular}) {
    if (s.size() > word.size() && s.substr(0, word.size()) == word &&
        absl::ascii_isspace(static_cast<unsigned char>(s[word.size()]))) {
      return Trim(s.substr(word.size()));
    }
  }
  return s;
}

}  // namespace

ExpertSet::ExpertSet(std::vector<std::pair<int, int>> pairs) : pairs_(std::move(pairs)) {
  std::sort(pairs_.begin(), pairs_.end());
  pairs_.erase(std::unique(pairs_.begin(), pairs_.end()), pairs_.end());
}

bool ExpertSet::Contains(int layer, int expert) const {
  return std::binary_search(pairs_.begin(), pairs_.end(), std::make_pair(layer, expert));
}

std::vector<uint32_t> ExpertSet::Packed() const {
  std::vector<uint32_t> packed;
  packed.reserve(pairs_.size());
  for (const auto& [layer, expert] : pairs_) packed.push_back(PackExpert(layer, expert));
  return packed;
}

ExpertFilter ExpertSet::Filter() const {
  ExpertFilter filter;
  filter.non_expert = false;
  filter.keep = [set = *this](int layer, int expert) { return set.Contains(layer, expert); };
  return filter;
}

std::string ExpertSet::Summary() const {
  std::set<int> layers;
  for (const auto& p : pairs_) layers.insert(p.first);
  return absl::StrCat(pairs_.size(), pairs_.size() == 1 ? " expert" : " experts", " on ",
                      layers.size(), layers.size() == 1 ? " layer" : " layers");
}

absl::StatusOr<std::vector<int>> ParseIndexList(std::string_view spec, int64_t limit,
                                                std::string_view what) {
  if (Trim(spec).empty())
    return absl::InvalidArgumentError(absl::StrCat(std::string(what), ": empty list"));
  std::vector<int> out;
  std::set<int64_t> seen;
  for (std::string_view item : Split(spec, ',')) {
    item = Trim(item);
    if (item.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat(std::string(what), ": empty item in '", std::string(spec), "'"));
    }
    int64_t lo = 0, hi = 0;
    const size_t dash = item.find('-');
    if (dash == std::string_view::npos) {
      auto v = ParseIndex(item, item, limit, what);
      if (!v.ok()) return v.status();
      lo = hi = *v;
    } else {
      auto a = ParseIndex(item, item.substr(0, dash), limit, what);
      if (!a.ok()) return a.status();
      auto b = ParseIndex(item, item.substr(dash + 1), limit, what);
      if (!b.ok()) return b.status();
      lo = *a;
      hi = *b;
      if (lo > hi) {
        return absl::InvalidArgumentError(
            absl::StrCat(std::string(what), ": range '", std::string(item), "' runs backwards"));
      }
    }
    for (int64_t v = lo; v <= hi; ++v) {
      if (!seen.insert(v).second) {
        return absl::InvalidArgumentError(
            absl::StrCat(std::string(what), ": ", v, " is listed twice"));
      }
      out.push_back(static_cast<int>(v));
    }
  }
  std::sort(out.begin(), out.end());
  return out;
}

absl::StatusOr<ExpertSet> ExpertSetFromFlags(std::string_view experts_spec,
                                             std::string_view layers_spec, int64_t n_layer,
                                             int64_t n_expert) {
  auto experts = ParseIndexList(experts_spec, n_expert, "--experts");
  if (!experts.ok()) return experts.status();
  std::vector<int> layers;
  if (Trim(layers_spec).empty()) {
    for (int64_t l = 0; l < n_layer; ++l) layers.push_back(static_cast<int>(l));
  } else {
    auto parsed = ParseIndexList(layers_spec, n_layer, "--layers");
    if (!parsed.ok()) return parsed.status();
    layers = *std::move(parsed);
  }
  std::vector<std::pair<int, int>> pairs;
  for (int l : layers) {
    for (int e : *experts) pairs.emplace_back(l, e);
  }
  return ExpertSet(std::move(pairs));
}

absl::StatusOr<ExpertSet> ParsePlacement(std::string_view text, int64_t n_layer, int64_t n_expert,
                                         std::string_view source) {
  std::vector<std::pair<int, int>> pairs;
  std::set<int> layers_seen;
  int line_no = 0;
  for (std::string_view line : Split(text, '\n')) {
    ++line_no;
    const size_t hash = line.find('#');
    if (hash != std::string_view::npos) line = line.substr(0, hash);
    line = Trim(line);
    if (line.empty()) continue;
    const std::string where = absl::StrCat(std::string(source), ":", line_no);
    const size_t colon = line.find(':');
    if (colon == std::string_view::npos) {
      return absl::InvalidArgumentError(absl::StrCat(
          where, ": expected 'layers LIST: experts LIST' (e.g. 'layers 0-31: experts 0-3'), got '",
          std::string(line), "'"));
    }
    const std::string_view layers_part = DropWord(line.substr(0, colon), "layers", "layer");
    const std::string_view experts_part = DropWord(line.substr(colon + 1), "experts", "expert");
    auto layers = ParseIndexList(layers_part, n_layer, absl::StrCat(where, ": layers"));
    if (!layers.ok()) return layers.status();
    auto experts = ParseIndexList(experts_part, n_expert, absl::StrCat(where, ": experts"));
    if (!experts.ok()) return experts.status();
    for (int l : *layers) {
      if (!layers_seen.insert(l).second) {
        return absl::InvalidArgumentError(
            absl::StrCat(where, ": layer ", l, " is already placed by an earlier line"));
      }
      for (int e : *experts) pairs.emplace_back(l, e);
    }
  }
  if (pairs.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(std::string(source), ": the placement names no (layer, expert) pairs"));
  }
  return ExpertSet(std::move(pairs));
}

absl::StatusOr<ExpertSet> ReadPlacementFile(const std::string& path, int64_t n_layer,
                                            int64_t n_expert) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    const int err = errno;
    if (err == ENOENT) return absl::NotFoundError(absl::StrCat(path, ": no such file"));
    return absl::InvalidArgumentError(absl::StrCat(path, ": cannot open: ", std::strerror(err)));
  }
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) return absl::InvalidArgumentError(absl::StrCat(path, ": read failed"));
  return ParsePlacement(text.str(), n_layer, n_expert, path);
}

}  // namespace moepool::worker
