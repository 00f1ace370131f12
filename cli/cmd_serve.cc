// moepool serve: the OpenAI-compatible HTTP server (see docs/api.md, docs/operations.md).
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/strip.h"
#include "cli/args.h"
#include "cli/cluster_flags.h"
#include "cli/commands.h"
#include "cli/device_flags.h"
#include "cli/engine_flags.h"
#include "cli/service_notify.h"
#include "cli/weights_in_memory.h"
#include "coordinator/cluster_control.h"
#include "coordinator/cluster_expert_backend.h"
#include "coordinator/cluster_service.h"
#include "coordinator/expert_placement.h"
#include "coordinator/rebalancer.h"
#include "coordinator/routing_stats.h"
#include "coordinator/serve.h"
#include "engine/status_macros.h"

namespace moepool::cli {
namespace {

// "HOST:PORT" or "[V6HOST]:PORT".
absl::Status ParseListen(const std::string& listen, std::string* host, int* port) {
  const size_t colon = listen.rfind(':');
  if (colon == std::string::npos || colon + 1 == listen.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--listen must be HOST:PORT, got '", listen, "'"));
  }
  *host = listen.substr(0, colon);
  if (host->size() >= 2 && host->front() == '[' && host->back() == ']') {
    *host = host->substr(1, host->size() - 2);
  }
  const std::string p = listen.substr(colon + 1);
  char* end = nullptr;
  const long v = std::strtol(p.c_str(), &end, 10);
  if (*end != '\0' || v < 0 || v > 65535 || host->empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--listen must be HOST:PORT, got '", listen, "'"));
  }
  *port = static_cast<int>(v);
  return absl::OkStatus();
}

absl::StatusOr<std::vector<std::string>> ApiKeys(const Args& args) {
  std::vector<std::string> keys = args.GetAll("api-key");
  for (const std::string& path : args.GetAll("api-key-file")) {
    ASSIGN_OR_RETURN(std::string text, ReadFileToString(path));
    size_t start = 0;
    while (start <= text.size()) {
      size_t end = text.find('\n', start);
      if (end == std::string::npos) end = text.size();
      std::string line = text.substr(start, end - start);
      while (!line.empty() && (line.back() == '\r' || line.back() == ' ')) line.pop_back();
      if (!line.empty() && line[0] != '#') keys.push_back(line);
      start = end + 1;
    }
  }
  for (const std::string& k : keys) {
    if (k.empty()) return absl::InvalidArgumentError("--api-key must not be empty");
  }
  return keys;
}

absl::StatusOr<ServeConfig> ParseConfig(const Args& args) {
  ServeConfig c;
  c.engine.model_path = args.Get("model");
  if (c.engine.model_path.empty()) return absl::InvalidArgumentError("--model is required");
  ASSIGN_OR_RETURN(int64_t threads, args.GetInt("threads", 0));
  c.engine.threads = static_cast<int>(threads);
  ASSIGN_OR_RETURN(c.engine.n_ctx, args.GetInt("ctx", 0));
  ASSIGN_OR_RETURN(int64_t parallel, args.GetInt("parallel", 4));
  ASSIGN_OR_RETURN(int64_t max_queue, args.GetInt("max-queue", 64));
  ASSIGN_OR_RETURN(c.scheduler.step_tokens, args.GetInt("step-tokens", 512));
  ASSIGN_OR_RETURN(c.scheduler.block_size, args.GetInt("kv-block-size", 16));
  ASSIGN_OR_RETURN(int64_t kv_tokens, args.GetInt("kv-cache-tokens", 0));
  if (parallel < 1 || parallel > 1024) return absl::InvalidArgumentError("--parallel: 1..1024");
  if (max_queue < 0 || max_queue > 100000) {
    return absl::InvalidArgumentError("--max-queue: 0..100000");
  }
  if (c.scheduler.step_tokens < 1) return absl::InvalidArgumentError("--step-tokens: >= 1");
  if (c.scheduler.block_size < 1 || c.scheduler.block_size > 4096) {
    return absl::InvalidArgumentError("--kv-block-size: 1..4096");
  }
  if (kv_tokens < 0) return absl::InvalidArgumentError("--kv-cache-tokens: >= 0");
  ASSIGN_OR_RETURN(int64_t micro_batches, args.GetInt("micro-batches", 2));
  if (micro_batches != 1 && micro_batches != 2) {
    return absl::InvalidArgumentError("--micro-batches must be 1 or 2");
  }
  c.scheduler.micro_batches = static_cast<int>(micro_batches);
  const std::string prefix_cache = args.Get("prefix-cache", "on");
  if (prefix_cache != "on" && prefix_cache != "off") {
    return absl::InvalidArgumentError("--prefix-cache must be on or off");
  }
  c.scheduler.prefix_cache = prefix_cache == "on";
  c.scheduler.max_active = static_cast<int>(parallel);
  c.scheduler.max_queue = static_cast<int>(max_queue);
  c.scheduler.kv_blocks = (kv_tokens + c.scheduler.block_size - 1) / c.scheduler.block_size;
  RETURN_IF_ERROR(ParseListen(args.Get("listen", "127.0.0.1:8080"), &c.http.host, &c.http.port));
  ASSIGN_OR_RETURN(c.http.api_keys, ApiKeys(args));
  ASSIGN_OR_RETURN(int64_t http_threads, args.GetInt("http-threads", 0));
  ASSIGN_OR_RETURN(int64_t max_body, args.GetInt("max-body-bytes", 8 << 20));
  if (http_threads < 0 || max_body < 1) {
    return absl::InvalidArgumentError("--http-threads >= 0 and --max-body-bytes >= 1 required");
  }
  c.http.threads = static_cast<int>(http_threads);
  c.http.max_body_bytes = static_cast<size_t>(max_body);
  c.http.model_id = args.Get("model-name");
  c.chat_template = args.Get("chat-template");
  if (!c.chat_template.empty()) RETURN_IF_ERROR(ChatFormatByName(c.chat_template).status());
  return c;
}

// Where the experts run: here, or with --workers on a ClusterExpertBackend that the engine
// factory and /health share (kept alive by both as long as the server). /health reports each
// worker and answers 503 while some expert has no reachable holder.
// With --device cuda:* the experts of this process (all of them, or the --local-experts) run on
// the GPU, and so do attention, router and head; the check comes first, so a build without CUDA
// fails before loading anything.
// --cluster-listen off loopback without a token: a token is made (32 random bytes, base64url)
// and kept in the --cluster-token-file (made if missing) or ~/.config/moepool/cluster.token
// (reused on the next start, so the workers' copies stay valid), mode 0600.
absl::StatusOr<std::string> GeneratedClusterToken(const Args& args, std::string* path) {
  *path = args.Get("cluster-token-file");
  if (path->empty()) {
    const char* home = std::getenv("HOME");
    const std::string dir = absl::StrCat(home != nullptr ? home : ".", "/.config/moepool");
    std::error_code error;  // a failure shows as the write error below
    std::filesystem::create_directories(dir, error);
    *path = dir + "/cluster.token";
  }
  std::error_code missing;
  if (std::filesystem::exists(*path, missing)) {
    ASSIGN_OR_RETURN(std::string text, ReadFileToString(*path));
    std::string token(absl::StripTrailingAsciiWhitespace(text));
    if (!token.empty()) return token;
  }
  unsigned char raw[32];
  std::ifstream urandom("/dev/urandom", std::ios::binary);
  if (!urandom.read(reinterpret_cast<char*>(raw), sizeof(raw))) {
    return absl::InternalError("cannot read /dev/urandom for a cluster token");
  }
  std::string token =
      absl::WebSafeBase64Escape(absl::string_view(reinterpret_cast<const char*>(raw), sizeof(raw)));
  const int fd = ::open(path->c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
  if (fd < 0 || ::write(fd, token.data(), token.size()) != static_cast<ssize_t>(token.size()) ||
      ::fchmod(fd, 0600) != 0) {
    if (fd >= 0) ::close(fd);
    return absl::PermissionDeniedError(absl::StrCat("cannot write the cluster token to ", *path));
  }
  ::close(fd);
  return token;
}

// The control port of an elastic cluster: token (given, or generated off loopback), TLS, and
// the line to run on the other PCs.
absl::StatusOr<ClusterServerOptions> ClusterServerOptionsFromArgs(const Args& args,
                                                                  ClusterOptions* cluster,
                                                                  std::string* join_line) {
  ClusterServerOptions o;
  o.listen_address = args.Get("cluster-listen");
  std::string token_file = args.Get("cluster-token-file");
  if (cluster->cluster_token.empty() && !IsLoopbackAddress(o.listen_address) &&
      !args.Has("insecure")) {
    ASSIGN_OR_RETURN(cluster->cluster_token, GeneratedClusterToken(args, &token_file));
    std::printf("moepool: cluster token in %s (mode 0600); copy it to each worker PC\n",
                token_file.c_str());
  }
  o.cluster_token = cluster->cluster_token;
  if (args.Has("cluster-tls-cert")) {
    ASSIGN_OR_RETURN(o.tls_cert_pem, ReadFileToString(args.Get("cluster-tls-cert")));
  }
  if (args.Has("cluster-tls-key")) {
    ASSIGN_OR_RETURN(o.tls_key_pem, ReadFileToString(args.Get("cluster-tls-key")));
  }
  std::string host = o.listen_address.substr(0, o.listen_address.rfind(':'));
  if (host == "0.0.0.0" || host == "[::]" || host.empty()) {
    char name[256] = {};
    host = gethostname(name, sizeof(name) - 1) == 0 ? name : "THIS-PC";
  }
  *join_line = absl::StrCat(
      "moepool worker --join ", host, ":PORT --listen ",
      IsLoopbackAddress(host) ? "127.0.0.1" : "0.0.0.0", ":7070 --cache-dir moepool-cache",
      o.cluster_token.empty()
          ? ""
          : absl::StrCat(" --cluster-token-file ", token_file.empty() ? "TOKEN-FILE" : token_file));
  return o;
}

// /health of a cluster: each worker's link, and 503 while some pair has no holder (with the
// local fallback off).
HealthReport HealthOf(const ClusterExpertBackend& backend) {
  HealthReport report;
  nlohmann::json workers = nlohmann::json::array();
  for (const WorkerStats& w : backend.Stats().workers) {
    workers.push_back({{"address", w.address},
                       {"worker_id", w.worker_id},
                       {"up", w.up},
                       {"last_error", w.last_error},
                       {"requests", w.requests},
                       {"failures", w.failures},
                       {"reconnects", w.reconnects}});
  }
  report.details["workers"] = workers;
  const auto uncovered = backend.UncoveredPairs();
  const bool fallback = backend.options().local_fallback;
  report.ok = uncovered.empty() || fallback;
  if (!uncovered.empty()) {
    report.details[fallback ? "fallback_experts" : "unavailable_experts"] =
        DescribeExpertPairs(uncovered);
  }
  return report;
}

// Starts the control port of --cluster-listen and prints the line workers join with.
absl::StatusOr<std::shared_ptr<ClusterServer>> StartControl(
    const std::shared_ptr<ClusterControl>& control, const ClusterServerOptions& options,
    std::string join_line) {
  ASSIGN_OR_RETURN(std::unique_ptr<ClusterServer> started,
                   ClusterServer::Start(control.get(), options));
  const std::string& listen = options.listen_address;
  const std::string port = absl::StrCat(started->port());
  join_line.replace(join_line.find("PORT"), 4, port);
  std::printf("moepool: cluster control on %s:%s%s; workers join with:\n  %s\n",
              listen.substr(0, listen.rfind(':')).c_str(), port.c_str(),
              started->tls() ? " (TLS)" : "", join_line.c_str());
  std::fflush(stdout);
  // The control port stops before the registry it serves.
  return std::shared_ptr<ClusterServer>(started.release(),
                                        [control](ClusterServer* s) { delete s; });
}

absl::StatusOr<RebalancerOptions> RebalancerOptionsFromArgs(const Args& args) {
  RebalancerOptions o;
  ASSIGN_OR_RETURN(o.mode, ParseRebalanceMode(args.Get("rebalance", "on")));
  ASSIGN_OR_RETURN(o.interval_s, args.GetDouble("rebalance-interval", o.interval_s));
  if (!(o.interval_s >= 1)) return absl::InvalidArgumentError("--rebalance-interval must be >= 1");
  ASSIGN_OR_RETURN(o.plan.min_gain, args.GetDouble("rebalance-min-gain", o.plan.min_gain));
  if (!(o.plan.min_gain >= 0 && o.plan.min_gain <= 1)) {
    return absl::InvalidArgumentError("--rebalance-min-gain must be in [0, 1]");
  }
  ASSIGN_OR_RETURN(const double min_rows,
                   args.GetDouble("rebalance-min-rows", static_cast<double>(o.plan.min_rows)));
  if (!(min_rows >= 1)) return absl::InvalidArgumentError("--rebalance-min-rows must be >= 1");
  o.plan.min_rows = static_cast<int64_t>(min_rows);
  for (const auto& [flag, value] : {std::pair{"rebalance-colocate", &o.plan.colocate},
                                    std::pair{"rebalance-replicas", &o.plan.replicate}}) {
    const std::string text = args.Get(flag, *value ? "on" : "off");
    if (text != "on" && text != "off") {
      return absl::InvalidArgumentError(absl::StrCat("--", flag, " must be on or off"));
    }
    *value = text == "on";
  }
  return o;
}

absl::Status ConfigureExperts(const Args& args, ServeConfig* config, EngineFactory* factory,
                              std::shared_ptr<Rebalancer>* rebalancer) {
  ASSIGN_OR_RETURN(const DeviceSpec device, DeviceFromArgs(args));
  if (args.Has("cluster-listen") && args.Has("cluster-token-file") &&
      ::access(args.Get("cluster-token-file").c_str(), F_OK) != 0) {
    std::string path;  // made here, then read like any token file
    RETURN_IF_ERROR(GeneratedClusterToken(args, &path).status());
    std::printf("moepool: made a cluster token in %s (mode 0600); copy it to each worker PC\n",
                path.c_str());
  }
  ASSIGN_OR_RETURN(std::optional<ClusterOptions> cluster, ClusterOptionsFromArgs(args));
  if (!cluster.has_value() && !device.cuda) {
    *factory = LocalEngineFactory();
    return absl::OkStatus();
  }
  const auto attention = AttentionOnDevice(device);
  if (!cluster.has_value()) {
    ASSIGN_OR_RETURN(std::unique_ptr<ExpertBackend> created,
                     OpenDeviceExperts(config->engine.model_path, {}, device,
                                       /*show_progress=*/true));
    std::shared_ptr<ExpertBackend> experts = std::move(created);
    *factory = [experts, attention](const EngineOptions& options) {
      EngineOptions on_device = options;
      on_device.experts = experts.get();
      on_device.attention = attention;
      return Engine::Load(on_device);
    };
    return absl::OkStatus();
  }
  cluster->local_threads = config->engine.threads;
  ApplyDeviceToCluster(config->engine.model_path, device, &*cluster);
  std::optional<ClusterServerOptions> server_options;
  std::string join_line;
  if (cluster->elastic) {
    ASSIGN_OR_RETURN(server_options, ClusterServerOptionsFromArgs(args, &*cluster, &join_line));
  }
  ASSIGN_OR_RETURN(std::unique_ptr<ClusterExpertBackend> created,
                   ClusterExpertBackend::Create(config->engine.model_path, *cluster));
  std::shared_ptr<ClusterExpertBackend> backend = std::move(created);
  // The control registry (and, with --cluster-listen, its port) live as long as the server.
  ClusterControlOptions control_options;
  ASSIGN_OR_RETURN(control_options.reassign_after_s,
                   args.GetDouble("cluster-reassign-after", control_options.reassign_after_s));
  std::shared_ptr<ClusterControl> control(new ClusterControl(backend.get(), control_options),
                                          [backend](ClusterControl* c) { delete c; });
  std::shared_ptr<ClusterServer> control_server;
  if (server_options.has_value()) {
    ASSIGN_OR_RETURN(control_server, StartControl(control, *server_options, join_line));
  }
  *factory = [backend, attention](const EngineOptions& options) {
    EngineOptions with_workers = options;
    with_workers.experts = backend.get();
    with_workers.attention = attention;
    return Engine::Load(with_workers);
  };
  ASSIGN_OR_RETURN(const RebalancerOptions rebalance_options, RebalancerOptionsFromArgs(args));
  *rebalancer = std::make_shared<Rebalancer>(control.get(), rebalance_options);
  std::shared_ptr<Rebalancer> r = *rebalancer;
  config->http.cluster = [control, control_server, r] {
    nlohmann::json view = control->View();
    view["rebalance"] = r->View();
    return view;
  };
  config->http.rebalance = [r](const RoutingSnapshot& stats, bool dry_run) {
    return r->RunOnce(stats, dry_run);
  };
  config->http.drain_worker = [control](const std::string& id) {
    return control->Drain(id, "drain requested over HTTP");
  };
  config->http.health = [backend] { return HealthOf(*backend); };
  return absl::OkStatus();
}

// Writes the routing statistics to a file every 30 s and when destroyed (write to a temporary
// file, then rename: a reader never sees half a file).
class RoutingStatsWriter {
 public:
  RoutingStatsWriter(const ServerMetrics* metrics, std::string path)
      : metrics_(metrics), path_(std::move(path)), thread_([this] { Loop(); }) {}
  ~RoutingStatsWriter() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
    Write();
  }

 private:
  void Loop() {
    std::unique_lock<std::mutex> lock(mu_);
    while (!cv_.wait_for(lock, std::chrono::seconds(30), [this] { return stop_; })) Write();
  }
  void Write() const {
    const std::string tmp = path_ + ".tmp";
    {
      std::ofstream out(tmp);
      out << RoutingJson(metrics_->routing_window().Snapshot()).dump() << "\n";
      if (!out) {
        std::fprintf(stderr, "moepool: cannot write --routing-stats-file %s\n", path_.c_str());
        return;
      }
    }
    std::rename(tmp.c_str(), path_.c_str());
  }

  const ServerMetrics* metrics_;
  const std::string path_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::thread thread_;
};

absl::Status Serve(const Args& args) {
  signal(SIGPIPE, SIG_IGN);  // a closed stdout or socket is an error to handle, not a death
  ASSIGN_OR_RETURN(ServeConfig config, ParseConfig(args));
  ASSIGN_OR_RETURN(const bool preload, PreloadFromArgs(args));
  ASSIGN_OR_RETURN(const DeviceSpec device, DeviceFromArgs(args));
  // With --device cuda:* the weights this process computes with were copied to the GPU.
  const bool host_weights = !device.cuda;
  EngineFactory factory;
  std::shared_ptr<Rebalancer> rebalancer;  // with a cluster
  RETURN_IF_ERROR(ConfigureExperts(args, &config, &factory, &rebalancer));
  ASSIGN_OR_RETURN(const double drain_timeout, args.GetDouble("drain-timeout", 30));
  if (!(drain_timeout >= 0)) return absl::InvalidArgumentError("--drain-timeout must be >= 0");
  // Block the stop signals in every thread (threads inherit the mask), then wait for them here.
  // SIGUSR2 only wakes the thread that waits for a second stop signal during the drain.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGTERM);
  sigset_t blocked = stop_signals;
  sigaddset(&blocked, SIGUSR2);
  pthread_sigmask(SIG_BLOCK, &blocked, nullptr);

  ASSIGN_OR_RETURN(auto session, ServeSession::Create(config, factory));
  if (!session->notice().empty()) {
    std::fprintf(stderr, "moepool: %s\n", session->notice().c_str());
  }
  if (preload && host_weights) {
    RETURN_IF_ERROR(PreloadWeights(session->engine().model(), "moepool"));
  }
  RETURN_IF_ERROR(session->Start());
  const std::string& host = config.http.host;
  const std::string shown = host.find(':') != std::string::npos ? "[" + host + "]" : host;
  std::printf("moepool: serving on http://%s:%d\n", shown.c_str(), session->port());
  std::fflush(stdout);
  NotifyReady(absl::StrFormat("serving on http://%s:%d", shown, session->port()));
  std::unique_ptr<ResidencyWatch> watch;
  if (preload && host_weights)
    watch = std::make_unique<ResidencyWatch>(&session->engine().model(), "moepool");
  std::unique_ptr<RoutingStatsWriter> stats_writer;
  if (args.Has("routing-stats-file")) {
    stats_writer =
        std::make_unique<RoutingStatsWriter>(&session->metrics(), args.Get("routing-stats-file"));
  }
  if (rebalancer != nullptr) {
    ServeSession* live = session.get();
    rebalancer->Start([live] { return live->metrics().routing_window().Snapshot(); });
  }
  int sig = 0;
  sigwait(&stop_signals, &sig);
  std::fprintf(stderr, "moepool: %s received, stopping\n", sig == SIGINT ? "SIGINT" : "SIGTERM");
  // Graceful stop: no new requests (503, /health "draining"); the admitted ones finish, up to
  // --drain-timeout; a second signal stops at once.
  NotifyStopping("draining: finishing the requests in flight");
  std::thread second([&] {
    int again = 0;
    sigwait(&blocked, &again);
    if (again == SIGUSR2) return;  // the drain ended
    std::fprintf(stderr, "moepool: second signal, stopping now\n");
    session->Stop();
  });
  const bool all = session->Drain(absl::Seconds(drain_timeout));
  std::fprintf(stderr, "moepool: %s\n",
               all ? "every request finished" : "drain timeout: ending the requests left");
  pthread_kill(second.native_handle(), SIGUSR2);
  second.join();
  rebalancer.reset();  // its thread reads the session's statistics
  session->Stop();
  return absl::OkStatus();
}

// The live rebalancer's flags (docs/placement.md).
void AddRebalanceFlags(FlagSpec* spec) {
  for (const char* f : {"rebalance", "rebalance-interval", "rebalance-min-gain",
                        "rebalance-min-rows", "rebalance-colocate", "rebalance-replicas"}) {
    spec->valued.insert(f);
  }
  auto& help = spec->help;
  help["rebalance"] =
      "on|off|dry-run  move joined workers' experts to follow the routing statistics: pairs "
      "chosen together onto one worker (and, with --rebalance-replicas on, replicas of hot "
      "experts); make before break; dry-run only logs the plan; POST /v1/cluster/rebalance "
      "plans on request (default on)";
  help["rebalance-interval"] = "S  seconds between plans, so between changes (default 300)";
  help["rebalance-min-gain"] =
      "F  a layer's experts move only to put at least this share of its rows more on one "
      "worker (default 0.15)";
  help["rebalance-min-rows"] =
      "N  layers with fewer rows in the routing statistics are left as they are (default 1024)";
  help["rebalance-colocate"] = "on|off  the co-location pass (default on)";
  help["rebalance-replicas"] =
      "on|off  the replica pass: a second holder for hot experts where a budget has room; it "
      "evens the workers' compute but splits those experts' rows over two workers (default off)";
}

FlagSpec ServeFlags() {
  FlagSpec spec = {{"listen",
                    "api-key",
                    "api-key-file",
                    "parallel",
                    "ctx",
                    "max-queue",
                    "chat-template",
                    "step-tokens",
                    "kv-block-size",
                    "kv-cache-tokens",
                    "http-threads",
                    "max-body-bytes",
                    "model-name",
                    "micro-batches",
                    "prefix-cache",
                    "cluster-listen",
                    "cluster-tls-cert",
                    "cluster-tls-key",
                    "cluster-token-file",
                    "cluster-reassign-after",
                    "drain-timeout",
                    "routing-stats-file"},
                   {}};
  AddEngineFlags(&spec);
  AddClusterFlags(&spec);
  AddRebalanceFlags(&spec);
  AddPreloadFlag(&spec);
  spec.usage = "moepool serve --model M.gguf [flags]";
  spec.summary = "serve the OpenAI-compatible HTTP API (docs/api.md) with continuous batching";
  std::map<std::string, std::string>& help = spec.help;
  help["listen"] = "HOST:PORT  where to listen; port 0 picks a free one (default 127.0.0.1:8080)";
  help["api-key"] =
      "KEY  require Authorization: Bearer KEY on /v1/...; repeatable (default: no "
      "authentication)";
  help["api-key-file"] =
      "PATH  file of API keys, one per line, # starts a comment line; repeatable";
  help["parallel"] =
      "N  sequences generated at once; more requests wait in the queue, 1..1024 (default 4)";
  help["routing-stats-file"] =
      "PATH  write the routing statistics (per layer: each expert's load and each pair's "
      "co-selection over the latest 65536 rows) there as JSON every 30 s and at exit, for "
      "moepool plan --stats";
  help["drain-timeout"] =
      "S  on SIGTERM/SIGINT, stop taking requests (503, /health \"draining\") and give the ones "
      "in flight up to S seconds to finish before stopping; a second signal stops at once "
      "(default 30)";
  help["ctx"] = "N  positions per sequence, prompt and reply (default min(model context, 4096))";
  help["max-queue"] = "N  requests waiting beyond --parallel; more get 429, 0..100000 (default 64)";
  help["chat-template"] =
      "NAME  mistral or chatml instead of the model's own (default: recognised from the model "
      "file, else mistral)";
  help["step-tokens"] =
      "N  rows per forward pass; decode rows come first, prompt chunks fill the rest "
      "(default 512)";
  help["kv-block-size"] = "N  positions per KV cache block, 1..4096 (default 16)";
  help["kv-cache-tokens"] =
      "N  positions in the shared KV cache pool, at least one --ctx (default parallel x ctx)";
  help["http-threads"] = "N  HTTP threads (default parallel + max-queue + 8)";
  help["max-body-bytes"] = "N  largest request body; larger get 413 (default 8388608, 8 MiB)";
  help["model-name"] =
      "NAME  model id in /v1/models and in responses (default the file name without .gguf)";
  help["micro-batches"] =
      "N  1 or 2; with 2 and --workers, a step with rows of two or more sequences runs as two "
      "pipelined halves (default 2)";
  help["cluster-listen"] =
      "HOST:PORT  open the control port workers join with `moepool worker --join` (no model file "
      "on the workers: they fetch their experts from here); off loopback a cluster token is made "
      "and stored unless one is given or --insecure";
  help["cluster-reassign-after"] =
      "S  a joined worker lost without a drain and not back after S seconds: workers with room "
      "in their memory budget join again to take its experts; < 0: never (default 30)";
  help["cluster-tls-cert"] = "PATH  certificate (PEM) of the control port; with --cluster-tls-key";
  help["cluster-tls-key"] = "PATH  private key (PEM) of --cluster-tls-cert";
  help["prefix-cache"] =
      "on|off  reuse the KV cache of prompt prefixes already computed (default on)";
  return spec;
}

}  // namespace

int RunServe(int argc, char** argv) {
  auto args = Args::Parse(argc, argv, ServeFlags());
  if (!args.ok()) return PrintError(args.status());
  if (!args->positional().empty()) {
    return PrintError(absl::InvalidArgumentError("moepool serve takes no positional arguments"));
  }
  const absl::Status s = Serve(*args);
  return s.ok() ? 0 : PrintError(s);
}

}  // namespace moepool::cli
