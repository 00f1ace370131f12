#include "coordinator/routing_stats.h"

#include <algorithm>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"

namespace moepool {
namespace {

LayerRouting EmptyLayer(int n_expert) {
  LayerRouting l;
  l.load.assign(static_cast<size_t>(n_expert), 0);
  l.pairs.assign(static_cast<size_t>(n_expert) * static_cast<size_t>(n_expert), 0);
  return l;
}

void Clear(LayerRouting* l) {
  l->rows = 0;
  std::fill(l->load.begin(), l->load.end(), 0);
  std::fill(l->pairs.begin(), l->pairs.end(), 0);
}

}  // namespace

RoutingStats::RoutingStats(int n_layer, int n_expert, int64_t window_rows, int buckets)
    : n_layer_(n_layer),
      n_expert_(n_expert),
      window_rows_(std::max<int64_t>(window_rows, 1)),
      bucket_rows_(std::max<int64_t>(window_rows_ / std::max(buckets, 1), 1)),
      buckets_(static_cast<size_t>(n_layer),
               std::vector<LayerRouting>(static_cast<size_t>(std::max(buckets, 1)),
                                         EmptyLayer(n_expert))),
      current_(static_cast<size_t>(n_layer), 0) {}

void RoutingStats::Record(const ExpertRoutes& routes) {
  if (routes.layer < 0 || routes.layer >= n_layer_ || routes.k <= 0) return;
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<LayerRouting>& ring = buckets_[static_cast<size_t>(routes.layer)];
  int& cur = current_[static_cast<size_t>(routes.layer)];
  for (int64_t r = 0; r < routes.n_rows; ++r) {
    if (ring[static_cast<size_t>(cur)].rows >= bucket_rows_) {
      cur = (cur + 1) % static_cast<int>(ring.size());
      Clear(&ring[static_cast<size_t>(cur)]);
    }
    LayerRouting& b = ring[static_cast<size_t>(cur)];
    ++b.rows;
    const int32_t* e = routes.expert + r * routes.k;
    for (int i = 0; i < routes.k; ++i) {
      if (e[i] < 0 || e[i] >= n_expert_) continue;
      ++b.load[static_cast<size_t>(e[i])];
      for (int j = i + 1; j < routes.k; ++j) {
        if (e[j] < 0 || e[j] >= n_expert_ || e[j] == e[i]) continue;
        const int a = std::min(e[i], e[j]), c = std::max(e[i], e[j]);
        ++b.pairs[static_cast<size_t>(a * n_expert_ + c)];
      }
    }
  }
}

RoutingSnapshot RoutingStats::Snapshot() const {
  RoutingSnapshot s;
  s.n_expert = n_expert_;
  s.window_rows = window_rows_;
  std::lock_guard<std::mutex> lock(mu_);
  for (const std::vector<LayerRouting>& ring : buckets_) {
    LayerRouting sum = EmptyLayer(n_expert_);
    for (const LayerRouting& b : ring) {
      sum.rows += b.rows;
      for (size_t i = 0; i < sum.load.size(); ++i) sum.load[i] += b.load[i];
      for (size_t i = 0; i < sum.pairs.size(); ++i) sum.pairs[i] += b.pairs[i];
    }
    s.layers.push_back(std::move(sum));
  }
  return s;
}

nlohmann::json RoutingJson(const RoutingSnapshot& s) {
  nlohmann::json layers = nlohmann::json::array();
  for (const LayerRouting& l : s.layers) {
    nlohmann::json pairs = nlohmann::json::array();
    for (int a = 0; a < s.n_expert; ++a) {
      for (int b = a + 1; b < s.n_expert; ++b) {
        const int64_t n = l.pair(a, b, s.n_expert);
        if (n > 0) pairs.push_back({a, b, n});
      }
    }
    layers.push_back({{"rows", l.rows}, {"load", l.load}, {"pairs", std::move(pairs)}});
  }
  return {{"n_expert", s.n_expert}, {"window_rows", s.window_rows}, {"layers", std::move(layers)}};
}

absl::StatusOr<RoutingSnapshot> RoutingFromJson(const nlohmann::json& j) {
  auto bad = [](const std::string& what) {
    return absl::InvalidArgumentError(absl::StrCat("routing statistics: ", what));
  };
  if (!j.is_object() || !j.contains("n_expert") || !j["n_expert"].is_number_integer() ||
      !j.contains("layers") || !j["layers"].is_array()) {
    return bad("expected {\"n_expert\": N, \"layers\": [...]}");
  }
  RoutingSnapshot s;
  s.n_expert = j["n_expert"].get<int>();
  if (s.n_expert < 1 || s.n_expert > 1024) return bad("n_expert out of range");
  if (j.contains("window_rows") && j["window_rows"].is_number_integer()) {
    s.window_rows = j["window_rows"].get<int64_t>();
  }
  for (size_t i = 0; i < j["layers"].size(); ++i) {
    const nlohmann::json& l = j["layers"][i];
    const std::string where = absl::StrCat("layers[", i, "]");
    if (!l.is_object() || !l.contains("load") || !l["load"].is_array() ||
        l["load"].size() != static_cast<size_t>(s.n_expert)) {
      return bad(where + ".load must have n_expert counts");
    }
    LayerRouting out = EmptyLayer(s.n_expert);
    out.rows = l.value("rows", int64_t{0});
    for (int e = 0; e < s.n_expert; ++e) {
      const nlohmann::json& v = l["load"][static_cast<size_t>(e)];
      if (!v.is_number_integer() || v.get<int64_t>() < 0) return bad(where + ".load: counts");
      out.load[static_cast<size_t>(e)] = v.get<int64_t>();
    }
    if (l.contains("pairs")) {
      if (!l["pairs"].is_array()) return bad(where + ".pairs must be an array");
      for (const nlohmann::json& p : l["pairs"]) {
        if (!p.is_array() || p.size() != 3 || !p[0].is_number_integer() ||
            !p[1].is_number_integer() || !p[2].is_number_integer()) {
          return bad(where + ".pairs: each is [a, b, count]");
        }
        const int a = p[0].get<int>(), b = p[1].get<int>();
        const int64_t n = p[2].get<int64_t>();
        if (a < 0 || b < 0 || a >= s.n_expert || b >= s.n_expert || a == b || n < 0) {
          return bad(where + ".pairs: expert ids out of range or a count below 0");
        }
        out.pairs[static_cast<size_t>(std::min(a, b) * s.n_expert + std::max(a, b))] = n;
      }
    }
    s.layers.push_back(std::move(out));
  }
  return s;
}

}  // namespace moepool
