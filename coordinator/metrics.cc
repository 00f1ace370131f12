#include "coordinator/metrics.h"

#include <algorithm>
#include <charconv>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace moepool {
namespace {

// The shortest decimal that reads back as `v` (le="0.0025", not "0.0025000000000000001"; 10
// as "10").
std::string FormatDouble(double v) {
  char buf[32];
  const std::to_chars_result r = std::to_chars(buf, buf + sizeof(buf), v);
  return std::string(buf, r.ptr);
}

void Header(const std::string& name, const std::string& type, const std::string& help,
            std::string* out) {
  absl::StrAppend(out, "# HELP ", name, " ", help, "\n# TYPE ", name, " ", type, "\n");
}

void Simple(const std::string& name, const std::string& type, const std::string& help, double value,
            std::string* out) {
  Header(name, type, help, out);
  absl::StrAppend(out, name, " ", FormatDouble(value), "\n");
}

// Latency buckets from 1 ms to 60 s.
std::vector<double> LatencyBounds() {
  return {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60};
}

}  // namespace

Histogram::Histogram(std::vector<double> upper_bounds)
    : bounds_(std::move(upper_bounds)), buckets_(new std::atomic<uint64_t>[bounds_.size() + 1]) {
  for (size_t i = 0; i <= bounds_.size(); ++i) buckets_[i].store(0);
}

void Histogram::Observe(double value) {
  size_t i = 0;
  while (i < bounds_.size() && value > bounds_[i]) ++i;
  buckets_[i].fetch_add(1, std::memory_order_relaxed);
  count_.fetch_add(1, std::memory_order_relaxed);
  const double micros = std::max(0.0, value) * 1e6;
  sum_micros_.fetch_add(static_cast<uint64_t>(std::llround(micros)), std::memory_order_relaxed);
}

void Histogram::Render(const std::string& name, const std::string& help, std::string* out) const {
  Header(name, "histogram", help, out);
  uint64_t cumulative = 0;
  for (size_t i = 0; i < bounds_.size(); ++i) {
    cumulative += buckets_[i].load(std::memory_order_relaxed);
    absl::StrAppend(out, name, "_bucket{le=\"", FormatDouble(bounds_[i]), "\"} ", cumulative, "\n");
  }
  cumulative += buckets_[bounds_.size()].load(std::memory_order_relaxed);
  absl::StrAppend(out, name, "_bucket{le=\"+Inf\"} ", cumulative, "\n");
  absl::StrAppend(
      out, name, "_sum ",
      FormatDouble(static_cast<double>(sum_micros_.load(std::memory_order_relaxed)) / 1e6), "\n");
  absl::StrAppend(out, name, "_count ", cumulative, "\n");
}

ServerMetrics::ServerMetrics(int n_layer, int n_expert)
    : n_layer_(n_layer),
      n_expert_(n_expert),
      routing_(new std::atomic<uint64_t>[static_cast<size_t>(n_layer * n_expert)]),
      window_(n_layer, n_expert),
      ttft_(LatencyBounds()),
      itl_(LatencyBounds()),
      idle_ratio_({0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1}),
      step_(LatencyBounds()) {
  for (int i = 0; i < n_layer * n_expert; ++i) routing_[i].store(0);
}

void ServerMetrics::OnRoutes(int layer, const ExpertRoutes& routes) {
  window_.Record(routes);
  if (layer < 0 || layer >= n_layer_) return;
  const int64_t n = routes.n_rows * routes.k;
  for (int64_t i = 0; i < n; ++i) {
    const int32_t e = routes.expert[i];
    if (e >= 0 && e < n_expert_) {
      routing_[layer * n_expert_ + e].fetch_add(1, std::memory_order_relaxed);
    }
  }
}

uint64_t ServerMetrics::routed(int layer, int expert) const {
  return routing_[layer * n_expert_ + expert].load(std::memory_order_relaxed);
}

void ServerMetrics::ObserveStep(int micro_batches, double step_seconds, double idle_seconds) {
  steps_[micro_batches >= 2 ? 1 : 0].fetch_add(1, std::memory_order_relaxed);
  const double step = std::max(0.0, step_seconds);
  const double idle = std::clamp(idle_seconds, 0.0, step);
  step_micros_.fetch_add(static_cast<uint64_t>(std::llround(step * 1e6)),
                         std::memory_order_relaxed);
  idle_micros_.fetch_add(static_cast<uint64_t>(std::llround(idle * 1e6)),
                         std::memory_order_relaxed);
  idle_ratio_.Observe(step > 0 ? idle / step : 0.0);
  step_.Observe(step);
}

void ServerMetrics::CountRequest(const std::string& endpoint, int http_status) {
  std::lock_guard<std::mutex> lock(mu_);
  ++requests_[{endpoint, http_status}];
}

void ServerMetrics::CountFinish(const std::string& reason) {
  std::lock_guard<std::mutex> lock(mu_);
  ++finishes_[reason];
}

std::string ServerMetrics::Render(const GaugeSnapshot& g) const {
  std::string out;
  {
    std::lock_guard<std::mutex> lock(mu_);
    Header("moepool_http_requests_total", "counter", "HTTP requests by endpoint and status.", &out);
    for (const auto& [key, n] : requests_) {
      absl::StrAppend(&out, "moepool_http_requests_total{endpoint=\"", key.first, "\",status=\"",
                      key.second, "\"} ", n, "\n");
    }
    Header("moepool_sequences_finished_total", "counter",
           "Generated sequences by finish reason (stop, length, cancelled, error).", &out);
    for (const auto& [reason, n] : finishes_) {
      absl::StrAppend(&out, "moepool_sequences_finished_total{reason=\"", reason, "\"} ", n, "\n");
    }
  }
  Simple("moepool_prompt_tokens_total", "counter", "Prompt tokens admitted.",
         static_cast<double>(prompt_tokens_.load()), &out);
  Simple("moepool_generated_tokens_total", "counter", "Tokens generated.",
         static_cast<double>(generated_tokens_.load()), &out);
  Simple("moepool_preemptions_total", "counter",
         "Sequences whose KV blocks were reclaimed for older ones (recomputed later).",
         static_cast<double>(preemptions_.load()), &out);
  ttft_.Render("moepool_time_to_first_token_seconds",
               "Time from request admission to its first generated token.", &out);
  itl_.Render("moepool_inter_token_latency_seconds",
              "Time between consecutive generated tokens of a sequence.", &out);
  Header("moepool_forward_steps_total", "counter",
         "Scheduler steps (one forward pass each), by the micro-batches they ran as.", &out);
  for (int i = 0; i < 2; ++i) {
    absl::StrAppend(&out, "moepool_forward_steps_total{micro_batches=\"", i + 1, "\"} ",
                    steps_[i].load(std::memory_order_relaxed), "\n");
  }
  Simple("moepool_step_seconds_total", "counter",
         "Wall time of the scheduler's steps (batch building, forward pass, sampling).",
         static_cast<double>(step_micros_.load()) / 1e6, &out);
  step_.Render("moepool_step_duration_seconds",
               "Wall time of each scheduler step (batch building, forward pass, sampling).", &out);
  Simple("moepool_coordinator_idle_seconds_total", "counter",
         "Part of the step time the forward thread spent blocked waiting for remote experts.",
         static_cast<double>(idle_micros_.load()) / 1e6, &out);
  idle_ratio_.Render("moepool_coordinator_idle_ratio",
                     "Per step: time blocked waiting for remote experts / step wall time.", &out);
  Simple("moepool_draining", "gauge",
         "1 while a graceful stop drains the requests in flight (new ones get 503).",
         g.draining ? 1.0 : 0.0, &out);
  Simple("moepool_queue_depth", "gauge", "Requests waiting for a sequence slot.",
         static_cast<double>(g.queue_depth), &out);
  Simple("moepool_active_sequences", "gauge", "Sequences being generated.",
         static_cast<double>(g.active_sequences), &out);
  Simple("moepool_kv_blocks_used", "gauge", "KV cache blocks held by sequences.",
         static_cast<double>(g.kv_blocks_used), &out);
  Simple("moepool_kv_blocks_free", "gauge",
         "KV cache blocks no sequence holds (free, or cached and evictable).",
         static_cast<double>(g.kv_blocks_free), &out);
  Simple("moepool_kv_blocks_cached", "gauge",
         "KV cache blocks in the prefix cache (held by sequences or evictable).",
         static_cast<double>(g.kv_blocks_cached), &out);
  Simple("moepool_prefix_cache_hit_tokens_total", "counter",
         "Prompt positions taken from the prefix cache instead of being computed.",
         static_cast<double>(g.prefix_cache_hit_tokens), &out);
  Simple("moepool_kv_block_size_tokens", "gauge", "Positions per KV cache block.",
         static_cast<double>(g.kv_block_size), &out);
  if (g.cluster) {
    Header("moepool_cluster_workers", "gauge", "Workers per state (ready, gone).", &out);
    for (const char* state : {"joining", "fetching", "ready", "draining", "gone"}) {
      const auto it = g.workers_by_state.find(state);
      absl::StrAppend(&out, "moepool_cluster_workers{state=\"", state, "\"} ",
                      it == g.workers_by_state.end() ? 0 : it->second, "\n");
    }
    Simple("moepool_cluster_placement_version", "gauge",
           "Version of the placement of experts on workers.",
           static_cast<double>(g.placement_version), &out);
    Simple("moepool_cluster_fallback_experts", "gauge",
           "(layer, expert) pairs computed by the coordinator because no up worker holds them.",
           static_cast<double>(g.fallback_experts), &out);
  }
  Header("moepool_expert_routed_tokens_total", "counter",
         "Token rows routed to each expert, per layer.", &out);
  for (int l = 0; l < n_layer_; ++l) {
    for (int e = 0; e < n_expert_; ++e) {
      absl::StrAppend(&out, "moepool_expert_routed_tokens_total{layer=\"", l, "\",expert=\"", e,
                      "\"} ", routed(l, e), "\n");
    }
  }
  RenderRoutingWindow(window_.Snapshot(), &out);
  return out;
}

void ServerMetrics::RenderRoutingWindow(const RoutingSnapshot& s, std::string* out) {
  Header("moepool_routing_window_rows", "gauge",
         "Rows in the routing statistics window, per layer (the latest rows routed).", out);
  for (size_t l = 0; l < s.layers.size(); ++l) {
    absl::StrAppend(out, "moepool_routing_window_rows{layer=\"", l, "\"} ", s.layers[l].rows, "\n");
  }
  Header("moepool_expert_window_load", "gauge",
         "Rows of the window that chose each expert, per layer.", out);
  for (size_t l = 0; l < s.layers.size(); ++l) {
    for (int e = 0; e < s.n_expert; ++e) {
      absl::StrAppend(out, "moepool_expert_window_load{layer=\"", l, "\",expert=\"", e, "\"} ",
                      s.layers[l].load[static_cast<size_t>(e)], "\n");
    }
  }
  Header("moepool_expert_pair_window_rows", "gauge",
         "Rows of the window that chose both experts a and b, per layer (pairs seen only).", out);
  for (size_t l = 0; l < s.layers.size(); ++l) {
    for (int a = 0; a < s.n_expert; ++a) {
      for (int b = a + 1; b < s.n_expert; ++b) {
        const int64_t n = s.layers[l].pair(a, b, s.n_expert);
        if (n == 0) continue;
        absl::StrAppend(out, "moepool_expert_pair_window_rows{layer=\"", l, "\",a=\"", a, "\",b=\"",
                        b, "\"} ", n, "\n");
      }
    }
  }
}

}  // namespace moepool
