// Server metrics in the Prometheus text exposition format (version 0.0.4): request counters,
// token counters, latency histograms and per-layer per-expert routing counts.
//
// Threading: every method is thread-safe (atomics, or a mutex for labelled counters); the
// scheduler thread, the forward pass (routing observer) and HTTP threads update concurrently
// while /metrics renders.
#ifndef MOEPOOL_COORDINATOR_METRICS_H_
#define MOEPOOL_COORDINATOR_METRICS_H_

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "coordinator/routing_stats.h"
#include "engine/transformer.h"

namespace moepool {

// A cumulative histogram with fixed upper bounds (seconds for the latency histograms).
class Histogram {
 public:
  explicit Histogram(std::vector<double> upper_bounds);
  void Observe(double value);
  // Appends `name`_bucket{le=...}, _sum and _count lines (HELP/TYPE header included).
  void Render(const std::string& name, const std::string& help, std::string* out) const;
  uint64_t count() const { return count_.load(std::memory_order_relaxed); }

 private:
  std::vector<double> bounds_;
  std::unique_ptr<std::atomic<uint64_t>[]> buckets_;  // per bound, not cumulative; + overflow
  std::atomic<uint64_t> count_{0};
  std::atomic<uint64_t> sum_micros_{0};  // sum in millionths, so it can be atomic
};

// Values the scheduler reports at render time.
struct GaugeSnapshot {
  int64_t queue_depth = 0;
  int64_t active_sequences = 0;
  int64_t kv_blocks_used = 0;
  int64_t kv_blocks_free = 0;
  int64_t kv_blocks_cached = 0;
  int64_t kv_block_size = 0;
  uint64_t prefix_cache_hit_tokens = 0;
  bool draining = false;  // a graceful stop is under way (HttpServer::BeginDrain)
  // With workers (GET /v1/cluster): workers per state, the placement version and the (layer,
  // expert) pairs the coordinator computes because no up worker holds them.
  bool cluster = false;
  std::map<std::string, int64_t> workers_by_state;
  int64_t placement_version = 0;
  int64_t fallback_experts = 0;
};

class ServerMetrics : public RoutingObserver {
 public:
  ServerMetrics(int n_layer, int n_expert);

  // Routing observer: counts each row's selected experts.
  void OnRoutes(int layer, const ExpertRoutes& routes) override;

  void CountRequest(const std::string& endpoint, int http_status);
  void AddPromptTokens(int64_t n) { prompt_tokens_.fetch_add(n, std::memory_order_relaxed); }
  void AddGeneratedTokens(int64_t n) { generated_tokens_.fetch_add(n, std::memory_order_relaxed); }
  void CountFinish(const std::string& reason);
  void CountPreemption() { preemptions_.fetch_add(1, std::memory_order_relaxed); }
  // One forward step of the scheduler: its wall time (building the batch, the forward pass,
  // sampling) and the part of it the forward thread spent blocked waiting for experts computed
  // elsewhere (ExpertBackend::blocked_micros), with the number of micro-batches it ran as.
  void ObserveStep(int micro_batches, double step_seconds, double idle_seconds);
  Histogram& time_to_first_token() { return ttft_; }
  Histogram& inter_token_latency() { return itl_; }

  uint64_t routed(int layer, int expert) const;
  // Load and co-selection over the latest rows (routing_stats.h).
  const RoutingStats& routing_window() const { return window_; }

  std::string Render(const GaugeSnapshot& gauges) const;
  static void RenderRoutingWindow(const RoutingSnapshot& s, std::string* out);

 private:
  int n_layer_;
  int n_expert_;
  std::unique_ptr<std::atomic<uint64_t>[]> routing_;  // [n_layer x n_expert]
  RoutingStats window_;
  mutable std::mutex mu_;
  std::map<std::pair<std::string, int>, uint64_t> requests_;  // guarded by mu_
  std::map<std::string, uint64_t> finishes_;                  // guarded by mu_
  std::atomic<uint64_t> prompt_tokens_{0};
  std::atomic<uint64_t> generated_tokens_{0};
  std::atomic<uint64_t> preemptions_{0};
  Histogram ttft_;
  Histogram itl_;
  // Steps: [0] one micro-batch, [1] two.
  std::atomic<uint64_t> steps_[2] = {0, 0};
  std::atomic<uint64_t> step_micros_{0};
  std::atomic<uint64_t> idle_micros_{0};
  Histogram idle_ratio_;  // per step: idle / step wall time
  Histogram step_;        // per step: wall time
};

}  // namespace moepool

#endif  // MOEPOOL_COORDINATOR_METRICS_H_
