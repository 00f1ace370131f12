// `moepool serve` as a library: loads the engine, chooses the chat template, and runs the
// scheduler and the HTTP server until stopped. The command line (cli/cmd_serve.cc) only parses
// flags into a ServeConfig.
//
// The engine comes from an EngineFactory, so a cluster coordinator can put its remote
// ExpertBackend in (set EngineOptions::experts, keep the backend alive as long as the server)
// without this file knowing about workers; it can also report worker coverage through
// ServeConfig::http.health.
//
// Threading: Start/Stop from one controlling thread.
#ifndef MOEPOOL_COORDINATOR_SERVE_H_
#define MOEPOOL_COORDINATOR_SERVE_H_

#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "coordinator/chat_template.h"
#include "coordinator/http_server.h"
#include "coordinator/metrics.h"
#include "coordinator/scheduler.h"
#include "engine/engine.h"

namespace moepool {

using EngineFactory =
    std::function<absl::StatusOr<std::unique_ptr<Engine>>(const EngineOptions& options)>;

// Engine::Load: every expert in this process.
EngineFactory LocalEngineFactory();

struct ServeConfig {
  EngineOptions engine;
  SchedulerOptions scheduler;
  HttpServerOptions http;     // model_id "" -> the model file's name without ".gguf"
  std::string chat_template;  // "" (from the model), "mistral" or "chatml"
};

class ServeSession {
 public:
  // Loads everything; listening starts with Start. Errors: the factory's, the chat template's
  // (an unrecognised template is INVALID_ARGUMENT naming --chat-template).
  static absl::StatusOr<std::unique_ptr<ServeSession>> Create(const ServeConfig& config,
                                                              const EngineFactory& factory);
  ~ServeSession();  // Stop()

  // Starts the scheduler and the HTTP server. UNAVAILABLE if the address cannot be bound.
  absl::Status Start();
  int port() const { return http_->port(); }
  // Ends in-flight requests, stops listening and the scheduler. Idempotent.
  void Stop();
  // Graceful shutdown: stops taking requests (HttpServer::BeginDrain) and waits until every
  // admitted request has finished or `timeout` has passed. True if all finished. Call Stop next.
  bool Drain(absl::Duration timeout);

  // A line to log once at startup (e.g. "no chat template in the file; using mistral"), or "".
  const std::string& notice() const { return notice_; }
  Engine& engine() { return *engine_; }
  Scheduler& scheduler() { return *scheduler_; }
  ServerMetrics& metrics() { return *metrics_; }

 private:
  ServeSession() = default;
  std::unique_ptr<Engine> engine_;
  std::unique_ptr<ChatTemplate> chat_template_;
  std::unique_ptr<ServerMetrics> metrics_;
  std::unique_ptr<Scheduler> scheduler_;
  std::unique_ptr<HttpServer> http_;
  std::string notice_;
};

}  // namespace moepool

#endif  // MOEPOOL_COORDINATOR_SERVE_H_
