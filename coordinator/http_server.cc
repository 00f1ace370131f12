#include "coordinator/http_server.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <httplib.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <chrono>
#include <cstdlib>
#include <random>
#include <utility>

#include "absl/strings/str_cat.h"
#include "coordinator/console.h"
#include "coordinator/openai_api.h"
#include "coordinator/tokenize_api.h"
#include "engine/status_macros.h"

namespace moepool {
namespace {

using json = nlohmann::json;
constexpr std::chrono::milliseconds kPoll(100);

bool ConstantTimeEquals(const std::string& a, const std::string& b) {
  const size_t n = std::max(a.size(), b.size());
  unsigned diff = a.size() == b.size() ? 0u : 1u;
  for (size_t i = 0; i < n; ++i) {
    const unsigned char x = i < a.size() ? static_cast<unsigned char>(a[i]) : 0;
    const unsigned char y = i < b.size() ? static_cast<unsigned char>(b[i]) : 0;
    diff |= static_cast<unsigned>(x ^ y);
  }
  return diff == 0;
}

void SendJson(httplib::Response& res, int status, const json& body) {
  res.status = status;
  res.set_content(DumpJson(body), "application/json");
}

// Label for the request counter: known endpoints by name, everything else "other".
std::string EndpointLabel(const std::string& path) {
  for (const char* p : {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health",
                        "/metrics", "/tokenize", "/detokenize"}) {
    if (path == p) return p;
  }
  if (path.rfind("/v1/models/", 0) == 0) return "/v1/models/{id}";
  if (FindConsoleFile(path) != nullptr) return "console";
  return "other";
}

uint64_t RandomSeed() {
  static std::mutex mu;
  static std::mt19937_64 rng(std::random_device{}());
  std::lock_guard<std::mutex> lock(mu);
  return rng();
}

// One streamed response: what the content provider needs between calls.

std::string SseData(const json& j) { return "data: " + DumpJson(j) + "\n\n"; }

}  // namespace

// One response's generation as the handlers follow it.
struct HttpServer::StreamState {
  std::shared_ptr<GenerationStream> stream;
  ResponseMeta meta;
  bool chat = true;
  bool include_usage = false;
  bool logprobs = false;
  bool finished = false;                       // the final event was written
  int64_t text_offset = 0;                     // completions logprobs
  ToolCallReply reply{false};                  // the reply split into content or tool calls
  std::atomic<int>* open_responses = nullptr;  // counts this response until it is released
  ~StreamState() {
    if (open_responses != nullptr) open_responses->fetch_sub(1);
  }
};

namespace {

// The end of a chat reply that may be a tool call: the calls (finish "tool_calls") when the
// reply is a complete call, else the held-back content.
void FinishReply(ToolCallReply& reply, GenerationResult* result) {
  ToolCallReply::Result r = reply.Finish();
  if (r.is_call && !r.calls.empty() && result->finish == FinishReason::kStop) {
    result->tool_calls = std::move(r.calls);
    result->finish = FinishReason::kToolCalls;
  } else {
    result->text += r.content;
  }
}

}  // namespace

void SendApiError(const absl::Status& status, httplib::Response& res) {
  const ApiError e = ToApiError(status);
  if (e.http_status == 429) res.set_header("Retry-After", "1");
  SendJson(res, e.http_status, ErrorJson(e));
}

HttpServer::HttpServer(Scheduler* scheduler, const ChatTemplate* chat_template,
                       ServerMetrics* metrics, HttpServerOptions options)
    : scheduler_(scheduler),
      chat_template_(chat_template),
      metrics_(metrics),
      options_(std::move(options)),
      created_(std::chrono::duration_cast<std::chrono::seconds>(
                   std::chrono::system_clock::now().time_since_epoch())
                   .count()),
      server_(std::make_unique<httplib::Server>()) {}

HttpServer::~HttpServer() { Stop(); }

absl::Status HttpServer::Authenticate(const httplib::Request& req) const {
  if (options_.api_keys.empty()) return absl::OkStatus();
  const std::string header = req.get_header_value("Authorization");
  const std::string prefix = "Bearer ";
  if (header.empty()) {
    return absl::UnauthenticatedError(
        "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.");
  }
  const std::string key = header.rfind(prefix, 0) == 0 ? header.substr(prefix.size()) : header;
  bool match = false;
  for (const std::string& k : options_.api_keys) match |= ConstantTimeEquals(key, k);
  if (!match) return absl::UnauthenticatedError("Incorrect API key provided.");
  return absl::OkStatus();
}

namespace {

// cpp-httplib 0.11 listens with a backlog of 5, compiled into Debian's library. Clients that open
// connections faster than the accept thread takes them (16 streaming clients on 2 busy cores)
// overflow it, and the kernel drops their connections: the client sees a read error. Listening
// again on the bound socket raises the backlog (Linux keeps the socket, changes the queue).
void RaiseListenBacklog(int port) {
  DIR* dir = opendir("/proc/self/fd");
  if (dir == nullptr) return;
  while (const dirent* entry = readdir(dir)) {
    const int fd = std::atoi(entry->d_name);
    if (fd <= 2 || fd == dirfd(dir)) continue;
    int listening = 0;
    socklen_t len = sizeof(listening);
    if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &len) != 0 || !listening) continue;
    sockaddr_storage address{};
    len = sizeof(address);
    if (getsockname(fd, reinterpret_cast<sockaddr*>(&address), &len) != 0) continue;
    const int bound = address.ss_family == AF_INET
                          ? ntohs(reinterpret_cast<const sockaddr_in*>(&address)->sin_port)
                      : address.ss_family == AF_INET6
                          ? ntohs(reinterpret_cast<const sockaddr_in6*>(&address)->sin6_port)
                          : -1;
    if (bound == port) listen(fd, SOMAXCONN);
  }
  closedir(dir);
}

}  // namespace

absl::Status HttpServer::Start() {
  httplib::Server& svr = *server_;
  const SchedulerOptions& so = scheduler_->options();
  const size_t threads = options_.threads > 0
                             ? static_cast<size_t>(options_.threads)
                             : static_cast<size_t>(so.max_active + so.max_queue + 8);
  svr.new_task_queue = [threads] { return new httplib::ThreadPool(threads); };
  svr.set_payload_max_length(options_.max_body_bytes);
  InstallHooks();
  InstallRoutes();
  const int port = options_.port == 0
                       ? svr.bind_to_any_port(options_.host)
                       : (svr.bind_to_port(options_.host, options_.port) ? options_.port : -1);
  if (port < 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot listen on ", options_.host, ":", options_.port));
  }
  port_ = port;
  RaiseListenBacklog(port);
  listener_ = std::thread([this] { server_->listen_after_bind(); });
  return absl::OkStatus();
}

void HttpServer::InstallHooks() {
  httplib::Server& svr = *server_;
  svr.set_pre_routing_handler([this](const httplib::Request& req, httplib::Response& res) {
    const bool keyed =
        req.path.rfind("/v1/", 0) == 0 || req.path == "/tokenize" || req.path == "/detokenize";
    if (!keyed) return httplib::Server::HandlerResponse::Unhandled;
    const absl::Status auth = Authenticate(req);
    if (auth.ok()) return httplib::Server::HandlerResponse::Unhandled;
    SendApiError(auth, res);
    return httplib::Server::HandlerResponse::Handled;
  });
  const httplib::Server::HandlerWithResponse json_errors =
      [](const httplib::Request& req, httplib::Response& res) -> httplib::Server::HandlerResponse {
    if (!res.body.empty()) return httplib::Server::HandlerResponse::Unhandled;
    ApiError e;
    e.http_status = res.status;
    e.type = res.status >= 500 ? "server_error" : "invalid_request_error";
    if (res.status == 404) {
      e.message = absl::StrCat("Unknown endpoint ", req.method, " ", req.path);
    } else if (res.status == 413) {
      e.message = "The request body is too large.";
    } else {
      e.message = absl::StrCat("HTTP ", res.status);
    }
    res.set_content(DumpJson(ErrorJson(e)), "application/json");
    return httplib::Server::HandlerResponse::Handled;
  };
  svr.set_error_handler(json_errors);
  // Counted before the response is written, so a client sees its own request in /metrics.
  svr.set_post_routing_handler([this](const httplib::Request& req, httplib::Response& res) {
    if (metrics_ != nullptr) metrics_->CountRequest(EndpointLabel(req.path), res.status);
  });
}

// The routes that take a body: completions and the tokenizer's.
void HttpServer::InstallBodyRoutes() {
  httplib::Server& svr = *server_;
  // Bodies are read through a ContentReader: httplib's own body reading would apply its 8 KiB
  // form limit to the curl default Content-Type (application/x-www-form-urlencoded).
  const auto with_body = [](std::function<void(const std::string&, httplib::Response&)> handle) {
    return [handle](const httplib::Request&, httplib::Response& res,
                    const httplib::ContentReader& reader) {
      std::string body;
      const bool read = reader([&](const char* data, size_t n) {
        body.append(data, n);
        return true;
      });
      if (!read) {
        if (res.status < 400) res.status = 400;  // 413 when over the size limit
        return;
      }
      handle(body, res);
    };
  };
  for (const bool chat : {true, false}) {
    svr.Post(chat ? "/v1/chat/completions" : "/v1/completions",
             with_body([this, chat](const std::string& body, httplib::Response& res) {
               HandleGenerate(body, res, chat);
             }));
  }
  // llama-server's tokenizer endpoints (coordinator/tokenize_api.h).
  for (const bool tokenize : {true, false}) {
    svr.Post(tokenize ? "/tokenize" : "/detokenize",
             with_body([this, tokenize](const std::string& body, httplib::Response& res) {
               const Tokenizer& tok = scheduler_->engine().tokenizer();
               const absl::StatusOr<json> out =
                   tokenize ? TokenizeResponse(tok, body) : DetokenizeResponse(tok, body);
               if (out.ok()) {
                 SendJson(res, 200, *out);
               } else {
                 SendApiError(out.status(), res);
               }
             }));
  }
}

void HttpServer::InstallRoutes() {
  httplib::Server& svr = *server_;
  InstallBodyRoutes();
  // The web console: public files; the page asks for the API key for its /v1 calls.
  for (int i = 0; i < kEmbeddedFileCount; ++i) {
    const EmbeddedFile* f = &kEmbeddedFiles[i];
    svr.Get(f->url, [f](const httplib::Request&, httplib::Response& res) {
      res.set_header("Cache-Control", "no-cache");
      res.set_content(reinterpret_cast<const char*>(f->data), f->size, f->content_type);
    });
  }
  svr.Get("/v1/models", [this](const httplib::Request&, httplib::Response& res) {
    SendJson(res, 200,
             {{"object", "list"}, {"data", json::array({ModelJson(options_.model_id, created_)})}});
  });
  svr.Get(R"(/v1/models/(.+))", [this](const httplib::Request& req, httplib::Response& res) {
    if (req.matches[1] != options_.model_id) {
      SendApiError(absl::NotFoundError(
                       absl::StrCat("The model '", req.matches[1].str(), "' does not exist")),
                   res);
      return;
    }
    SendJson(res, 200, ModelJson(options_.model_id, created_));
  });
  svr.Get("/v1/cluster", [this](const httplib::Request&, httplib::Response& res) {
    json body = ClusterJson();
    // What the router chose over the latest rows: the input of placement (routing_stats.h).
    if (metrics_ != nullptr) body["routing"] = RoutingJson(metrics_->routing_window().Snapshot());
    SendJson(res, 200, body);
  });
  svr.Post(R"(/v1/cluster/workers/([A-Za-z0-9_-]{1,64})/drain)",
           [this](const httplib::Request& req, httplib::Response& res) {
             if (!options_.drain_worker) {
               SendApiError(absl::NotFoundError("this server has no cluster to drain"), res);
               return;
             }
             const std::string id = req.matches[1];
             const absl::Status drained = options_.drain_worker(id);
             if (!drained.ok()) {
               SendApiError(drained, res);
               return;
             }
             SendJson(res, 200, {{"id", id}, {"state", "gone"}, {"drained", true}});
           });
  svr.Post("/v1/cluster/rebalance", [this](const httplib::Request& req, httplib::Response& res) {
    HandleRebalance(req, res);
  });
  svr.Get("/health",
          [this](const httplib::Request&, httplib::Response& res) { HandleHealth(res); });
  svr.Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
    const SchedulerStats s = scheduler_->stats();
    GaugeSnapshot g;
    g.queue_depth = s.queued;
    g.active_sequences = s.active;
    g.kv_blocks_used = s.kv_blocks_used;
    g.kv_blocks_free = s.kv_blocks_free;
    g.kv_blocks_cached = s.kv_blocks_cached;
    g.kv_block_size = s.block_size;
    g.prefix_cache_hit_tokens = s.prefix_hit_tokens;
    g.draining = draining_.load();
    if (options_.cluster) {
      const json c = ClusterJson();
      g.cluster = true;
      g.placement_version = c.value("placement_version", int64_t{0});
      g.fallback_experts = c.value("fallback_expert_pairs", int64_t{0});
      for (const json& w : c["workers"]) ++g.workers_by_state[w.value("state", "")];
    }
    const std::string body = metrics_ != nullptr ? metrics_->Render(g) : std::string();
    res.set_content(body, "text/plain; version=0.0.4; charset=utf-8");
  });
}

void HttpServer::Stop() {
  stopping_.store(true);
  server_->stop();
  if (listener_.joinable()) listener_.join();
}

json HttpServer::ClusterJson() const {
  if (options_.cluster) return options_.cluster();
  return {{"placement_version", 0}, {"workers", json::array()}, {"fallback_expert_pairs", 0}};
}

void HttpServer::HandleRebalance(const httplib::Request& req, httplib::Response& res) {
  if (!options_.rebalance || metrics_ == nullptr) {
    SendApiError(absl::NotFoundError("this server has no cluster to rebalance"), res);
    return;
  }
  bool dry_run = false;
  if (!req.body.empty()) {
    const json body = json::parse(req.body, nullptr, /*allow_exceptions=*/false);
    if (!body.is_object() || (body.contains("dry_run") && !body["dry_run"].is_boolean())) {
      SendApiError(
          absl::InvalidArgumentError("the body must be a JSON object such as {\"dry_run\": true}"),
          res);
      return;
    }
    dry_run = body.value("dry_run", false);
  }
  const absl::StatusOr<json> plan =
      options_.rebalance(metrics_->routing_window().Snapshot(), dry_run);
  if (!plan.ok()) {
    ApiError e = ToApiError(plan.status());
    if (plan.status().code() == absl::StatusCode::kFailedPrecondition) {
      e.http_status = 409;  // a change under way, or the cluster changed since the plan
      e.type = "conflict_error";
    }
    SendJson(res, e.http_status, ErrorJson(e));
    return;
  }
  SendJson(res, 200, *plan);
}

void HttpServer::HandleHealth(httplib::Response& res) {
  const SchedulerStats s = scheduler_->stats();
  HealthReport extra = options_.health ? options_.health() : HealthReport{};
  const bool draining = draining_.load();
  const bool ok = extra.ok && !stopping_.load() && !draining;
  json body = {{"status", ok         ? "ok"
                          : draining ? "draining"
                                     : "unavailable"},
               {"model", options_.model_id},
               {"active_sequences", s.active},
               {"queued_requests", s.queued},
               {"kv_blocks_free", s.kv_blocks_free},
               {"kv_blocks_total", s.kv_blocks_total},
               {"kv_blocks_cached", s.kv_blocks_cached}};
  if (extra.details.is_object()) body.update(extra.details);
  SendJson(res, ok ? 200 : 503, body);
}

void HttpServer::HandleGenerate(const std::string& body, httplib::Response& res, bool chat) {
  if (draining_.load()) {
    return SendApiError(absl::UnavailableError("the server is shutting down; retry elsewhere"),
                        res);
  }
  absl::StatusOr<ParsedGeneration> parsed = ParseGeneration(body, chat);
  if (!parsed.ok()) return SendApiError(parsed.status(), res);
  const GenerationParams& params = parsed->params;
  absl::StatusOr<std::shared_ptr<GenerationStream>> submitted =
      scheduler_->Submit(std::move(parsed->request));
  if (!submitted.ok()) {
    const absl::Status& s = submitted.status();
    return SendApiError(s.code() == absl::StatusCode::kInvalidArgument && ApiParam(s).empty()
                            ? InvalidRequestError(parsed->prompt_param, std::string(s.message()))
                            : s,
                        res);
  }
  ResponseMeta meta;
  meta.id = NewResponseId(chat ? "chatcmpl-" : "cmpl-");
  meta.created = std::chrono::duration_cast<std::chrono::seconds>(
                     std::chrono::system_clock::now().time_since_epoch())
                     .count();
  meta.model = options_.model_id;
  auto state = std::make_shared<StreamState>();
  open_responses_.fetch_add(1);
  state->open_responses = &open_responses_;
  state->stream = *submitted;
  state->meta = meta;
  state->chat = chat;
  state->include_usage = params.include_usage;
  state->logprobs = params.top_logprobs >= 0;
  state->reply = ToolCallReply(parsed->tool_calls);
  if (!params.stream) return RespondWhole(*state, res);
  res.set_header("Cache-Control", "no-cache");
  res.set_header("X-Accel-Buffering", "no");
  res.set_chunked_content_provider(
      "text/event-stream",
      [this, state](size_t, httplib::DataSink& sink) { return StreamEvents(state.get(), sink); },
      [state](bool) {
        // However the response ended (done, write error, disconnect before the first byte),
        // an unfinished sequence must not keep running.
        if (!state->finished) state->stream->Cancel();
      });
}

absl::StatusOr<HttpServer::ParsedGeneration> HttpServer::ParseGeneration(const std::string& body,
                                                                         bool chat) const {
  const Tokenizer& tok = scheduler_->engine().tokenizer();
  ParsedGeneration out;
  GenerationRequest& gen = out.request;
  if (chat) {
    absl::StatusOr<ChatCompletionRequest> r = ParseChatCompletionRequest(body);
    if (!r.ok()) return r.status();
    absl::StatusOr<std::vector<int32_t>> ids = chat_template_->Apply(r->messages);
    if (!ids.ok()) return InvalidRequestError("messages", std::string(ids.status().message()));
    gen.prompt = std::move(*ids);
    gen.stop_tokens = chat_template_->stop_tokens();
    gen.stop = chat_template_->stop_strings();
    gen.trim_leading_space = chat_template_->trims_leading_space();
    out.params = std::move(r->params);
    out.prompt_param = "messages";
    out.tool_calls = r->tools.active();
  } else {
    absl::StatusOr<CompletionRequest> r = ParseCompletionRequest(body);
    if (!r.ok()) return r.status();
    gen.prompt =
        r->has_prompt_tokens ? r->prompt_tokens : tok.Encode(r->prompt, tok.add_bos_default());
    out.params = std::move(r->params);
    out.prompt_param = "prompt";
  }
  if (gen.prompt.empty()) return InvalidRequestError(out.prompt_param, "the prompt is empty");
  const int64_t n_prompt = static_cast<int64_t>(gen.prompt.size());
  if (n_prompt >= scheduler_->n_ctx()) {
    return InvalidRequestError(
        out.prompt_param,
        absl::StrCat("This model's maximum context length is ", scheduler_->n_ctx(),
                     " tokens. However, your ", chat ? "messages" : "prompt", " resulted in ",
                     n_prompt, " tokens, which leaves no room for a reply."),
        "context_length_exceeded");
  }
  const GenerationParams& params = out.params;
  gen.sampling = params.sampling;
  if (!params.seed_given) gen.sampling.seed = RandomSeed();
  gen.max_tokens = params.max_tokens;
  gen.stop.insert(gen.stop.end(), params.stop.begin(), params.stop.end());
  gen.logit_bias = params.logit_bias;
  gen.top_logprobs = params.top_logprobs;
  gen.grammar = params.grammar;
  // A reply that must be JSON ends where its grammar does: stop strings could cut it.
  if (gen.grammar != nullptr && !out.tool_calls) gen.stop.clear();
  return out;
}

void HttpServer::RespondWhole(StreamState& state, httplib::Response& res) {
  const Tokenizer& tok = scheduler_->engine().tokenizer();
  GenerationResult result;
  while (true) {
    GenerationEvent ev;
    if (!state.stream->Next(&ev, kPoll)) {
      if (!stopping_.load()) continue;
      state.stream->Cancel();  // the scheduler frees it; this response ends now
      return SendApiError(absl::UnavailableError("the server is shutting down"), res);
    }
    result.text += state.reply.Push(ev.text);
    for (SampledToken& t : ev.tokens) result.tokens.push_back(std::move(t));
    if (ev.finish == FinishReason::kNone) continue;
    state.finished = true;
    if (ev.finish != FinishReason::kStop && ev.finish != FinishReason::kLength) {
      return SendApiError(
          ev.error.ok() ? absl::UnavailableError("the request was cancelled") : ev.error, res);
    }
    result.finish = ev.finish;
    FinishReply(state.reply, &result);
    result.prompt_tokens = ev.prompt_tokens;
    result.cached_prompt_tokens = ev.cached_prompt_tokens;
    result.completion_tokens = ev.completion_tokens;
    break;
  }
  SendJson(res, 200,
           state.chat ? ChatCompletionJson(state.meta, result, state.logprobs, tok)
                      : CompletionJson(state.meta, result, state.logprobs, tok));
}

bool HttpServer::StreamEvents(StreamState* state, httplib::DataSink& sink) {
  const Tokenizer& tok = scheduler_->engine().tokenizer();
  auto send = [&](const std::string& data) {
    if (sink.write(data.data(), data.size())) return true;
    state->stream->Cancel();  // the client went away
    return false;
  };
  if (state->chat &&
      !send(SseData(ChatCompletionChunkJson(state->meta, {{"role", "assistant"}, {"content", ""}},
                                            FinishReason::kNone, nullptr)))) {
    return false;
  }
  while (true) {
    GenerationEvent ev;
    if (!state->stream->Next(&ev, kPoll)) {
      if (!stopping_.load()) continue;
      state->stream->Cancel();  // the scheduler frees it; this response ends now
      ev.finish = FinishReason::kCancelled;
      ev.error = absl::UnavailableError("the server is shutting down");
    }
    const bool has_tokens = state->logprobs && !ev.tokens.empty();
    ev.text = state->reply.Push(ev.text);
    if (!ev.text.empty() || has_tokens) {
      json chunk;
      if (state->chat) {
        chunk =
            ChatCompletionChunkJson(state->meta, {{"content", ev.text}}, FinishReason::kNone,
                                    has_tokens ? ChatLogprobsJson(ev.tokens, tok) : json(nullptr));
      } else {
        chunk = CompletionChunkJson(state->meta, ev.text, FinishReason::kNone,
                                    has_tokens
                                        ? CompletionLogprobsJson(ev.tokens, tok, state->text_offset)
                                        : json(nullptr));
        state->text_offset += static_cast<int64_t>(ev.text.size());
      }
      if (!send(SseData(chunk))) return false;
    }
    if (ev.finish == FinishReason::kNone) continue;
    state->finished = true;
    if (ev.finish != FinishReason::kStop && ev.finish != FinishReason::kLength) {
      const absl::Status err =
          ev.error.ok() ? absl::UnavailableError("the request was cancelled") : ev.error;
      send(SseData(ErrorJson(ToApiError(err))));
      sink.done();
      return true;
    }
    GenerationResult end;
    end.finish = ev.finish;
    FinishReply(state->reply, &end);
    std::vector<json> deltas = ToolCallDeltas(end.tool_calls);
    if (!end.text.empty()) deltas.push_back({{"content", end.text}});
    for (json& d : deltas) {
      if (!send(SseData(
              ChatCompletionChunkJson(state->meta, std::move(d), FinishReason::kNone, nullptr)))) {
        return false;
      }
    }
    ev.finish = end.finish;
    return SendStreamEnd(*state, ev, send, sink);
  }
}

bool HttpServer::SendStreamEnd(const StreamState& state, const GenerationEvent& ev,
                               const std::function<bool(const std::string&)>& send,
                               httplib::DataSink& sink) {
  const json last = state.chat
                        ? ChatCompletionChunkJson(state.meta, json::object(), ev.finish, nullptr)
                        : CompletionChunkJson(state.meta, "", ev.finish, nullptr);
  if (!send(SseData(last))) return false;
  if (state.include_usage &&
      !send(SseData(UsageChunkJson(state.meta, state.chat, ev.prompt_tokens, ev.completion_tokens,
                                   ev.cached_prompt_tokens)))) {
    return false;
  }
  if (!send("data: [DONE]\n\n")) return false;
  sink.done();
  return true;
}

}  // namespace moepool
