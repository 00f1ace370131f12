#include "coordinator/serve.h"

#include <filesystem>
#include <utility>

#include "engine/status_macros.h"

namespace moepool {

EngineFactory LocalEngineFactory() {
  return [](const EngineOptions& options) { return Engine::Load(options); };
}

absl::StatusOr<std::unique_ptr<ServeSession>> ServeSession::Create(const ServeConfig& config,
                                                                   const EngineFactory& factory) {
  auto s = std::unique_ptr<ServeSession>(new ServeSession);
  ASSIGN_OR_RETURN(s->engine_, factory(config.engine));
  ASSIGN_OR_RETURN(ChatTemplate tmpl,
                   ChatTemplate::ForModel(s->engine_->model().file(), &s->engine_->tokenizer(),
                                          config.chat_template, &s->notice_));
  s->chat_template_ = std::make_unique<ChatTemplate>(std::move(tmpl));
  const ModelConfig& c = s->engine_->config();
  s->metrics_ =
      std::make_unique<ServerMetrics>(static_cast<int>(c.n_layer), static_cast<int>(c.n_expert));
  s->engine_->transformer().set_routing_observer(s->metrics_.get());
  s->scheduler_ =
      std::make_unique<Scheduler>(s->engine_.get(), config.scheduler, s->metrics_.get());
  RETURN_IF_ERROR(s->scheduler_->PrepareBackend());
  HttpServerOptions http = config.http;
  if (http.model_id.empty()) {
    http.model_id = std::filesystem::path(config.engine.model_path).stem().string();
  }
  s->http_ = std::make_unique<HttpServer>(s->scheduler_.get(), s->chat_template_.get(),
                                          s->metrics_.get(), std::move(http));
  return s;
}

ServeSession::~ServeSession() { Stop(); }

absl::Status ServeSession::Start() {
  scheduler_->Start();
  return http_->Start();
}

bool ServeSession::Drain(absl::Duration timeout) {
  if (http_ == nullptr || scheduler_ == nullptr) return true;
  http_->BeginDrain();
  const absl::Time deadline = absl::Now() + timeout;
  while (true) {
    const SchedulerStats s = scheduler_->stats();
    if (s.active == 0 && s.queued == 0 && http_->open_responses() == 0) return true;
    if (absl::Now() >= deadline) return false;
    absl::SleepFor(absl::Milliseconds(20));
  }
}

void ServeSession::Stop() {
  // HTTP first: its handlers end their responses; then the scheduler ends the sequences.
  if (http_ != nullptr) http_->Stop();
  if (scheduler_ != nullptr) scheduler_->Stop();
  if (engine_ != nullptr) engine_->transformer().set_routing_observer(nullptr);
}

}  // namespace moepool
