// The OpenAI-compatible HTTP front (cpp-httplib): POST /v1/chat/completions and
// /v1/completions (JSON or server-sent events), GET /v1/models, /health and /metrics.
// Requests become GenerationRequests for the Scheduler; see docs/api.md for the wire format.
//
// Authentication: with API keys configured, every /v1/ request needs "Authorization: Bearer
// KEY" matching one of them (constant-time comparison); /health and /metrics stay open for
// probes and scrapers. A streamed request whose client goes away is cancelled (its KV blocks
// return to the pool) at its next write.
//
// Ownership: borrows the Scheduler, ChatTemplate and ServerMetrics, which must outlive it.
// Threading: handlers run on a pool of HTTP threads; Start/Stop are for one controlling thread.
#ifndef MOEPOOL_COORDINATOR_HTTP_SERVER_H_
#define MOEPOOL_COORDINATOR_HTTP_SERVER_H_

#include <atomic>
#include <cstddef>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "coordinator/chat_template.h"
#include "coordinator/metrics.h"
#include "coordinator/openai_api.h"
#include "coordinator/routing_stats.h"
#include "coordinator/scheduler.h"
#include "nlohmann/json.hpp"

namespace httplib {
class Server;
struct Request;
struct Response;
class DataSink;
}  // namespace httplib

namespace moepool {

// What /health reports beyond the scheduler's state (e.g. the coverage of remote workers).
struct HealthReport {
  bool ok = true;                                     // false: /health answers 503
  nlohmann::json details = nlohmann::json::object();  // merged into the response
};

struct HttpServerOptions {
  std::string host = "127.0.0.1";
  int port = 8080;                    // 0: any free port (see port())
  std::vector<std::string> api_keys;  // empty: no authentication
  size_t max_body_bytes = 8u << 20;   // larger request bodies get 413
  // HTTP threads; 0: parallel + max-queue + 8, so every running or queued request holds a
  // thread and /health and /metrics still get one.
  int threads = 0;
  std::string model_id = "moepool";      // reported by /v1/models and in responses
  std::function<HealthReport()> health;  // optional
  // GET /v1/cluster: {"placement_version", "workers": [{"id", "address", "state", "experts",
  // ...}]} (see ClusterView); unset: a server without workers (version 0, no workers).
  std::function<nlohmann::json()> cluster;
  // POST /v1/cluster/workers/{id}/drain: stops routing to the worker and tells it to exit;
  // returns once no step uses it (NOT_FOUND for an unknown id). Unset: 404.
  std::function<absl::Status(const std::string& worker_id)> drain_worker;
  // POST /v1/cluster/rebalance, body {} or {"dry_run": true}: plans placement from the routing
  // statistics now (rebalancer.h) and applies it unless a dry run; answers the plan. Unset: 404.
  std::function<absl::StatusOr<nlohmann::json>(const RoutingSnapshot& stats, bool dry_run)>
      rebalance;
};

class HttpServer {
 public:
  HttpServer(Scheduler* scheduler, const ChatTemplate* chat_template, ServerMetrics* metrics,
             HttpServerOptions options);
  ~HttpServer();  // Stop()
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  // Binds and serves on a background thread. UNAVAILABLE if the address cannot be bound.
  absl::Status Start();
  // The bound port (after Start).
  int port() const { return port_; }
  // Ends in-flight requests (streams get an error event, waiting requests 503), stops
  // listening and joins the HTTP threads. Idempotent.
  void Stop();
  // Graceful shutdown's first half: /health answers 503 ("draining") and new completions get 503,
  // while the requests already admitted run to their end. Thread-safe.
  void BeginDrain() { draining_.store(true); }
  // Completion responses not yet fully written (streams included). Thread-safe.
  int open_responses() const { return open_responses_.load(); }

 private:
  struct StreamState;  // one response's generation (http_server.cc)
  // A completion or chat completion request checked and turned into a GenerationRequest.
  struct ParsedGeneration {
    GenerationRequest request;
    GenerationParams params;
    std::string prompt_param;  // "prompt" or "messages": where prompt errors point
    bool tool_calls = false;   // the reply may be a tool call (tool_calls.h)
  };

  // Start's parts: authentication, JSON errors and request metrics; the endpoints.
  void InstallHooks();
  void InstallRoutes();
  void InstallBodyRoutes();
  // Request -> generation request -> submitted; then collected (RespondWhole) or streamed as
  // server-sent events (StreamEvents, SendStreamEnd).
  void HandleGenerate(const std::string& body, httplib::Response& res, bool chat);
  // The OpenAI error (INVALID_ARGUMENT with its parameter) for a bad request.
  absl::StatusOr<ParsedGeneration> ParseGeneration(const std::string& body, bool chat) const;
  void RespondWhole(StreamState& state, httplib::Response& res);
  // The chunked content provider of a streamed response: false ends it (client gone).
  bool StreamEvents(StreamState* state, httplib::DataSink& sink);
  bool SendStreamEnd(const StreamState& state, const GenerationEvent& ev,
                     const std::function<bool(const std::string&)>& send, httplib::DataSink& sink);
  void HandleHealth(httplib::Response& res);
  // POST /v1/cluster/rebalance (HttpServerOptions::rebalance).
  void HandleRebalance(const httplib::Request& req, httplib::Response& res);
  nlohmann::json ClusterJson() const;
  // Ok, or UNAUTHENTICATED when keys are configured and the request has none of them.
  absl::Status Authenticate(const httplib::Request& req) const;

  Scheduler* scheduler_;
  const ChatTemplate* chat_template_;
  ServerMetrics* metrics_;
  HttpServerOptions options_;
  int64_t created_;
  std::unique_ptr<httplib::Server> server_;
  std::thread listener_;
  std::atomic<bool> stopping_{false};
  std::atomic<bool> draining_{false};
  std::atomic<int> open_responses_{0};
  int port_ = 0;
};

// Writes `status` as an OpenAI error object (and Retry-After for 429) into `res`.
void SendApiError(const absl::Status& status, httplib::Response& res);

}  // namespace moepool

#endif  // MOEPOOL_COORDINATOR_HTTP_SERVER_H_
