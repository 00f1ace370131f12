#include "coordinator/remote_expert_backend.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <chrono>
#include <fstream>
#include <set>
#include <sstream>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/status_macros.h"

namespace moepool {
namespace {

using Clock = std::chrono::steady_clock;

absl::StatusOr<std::string> ReadPem(const std::string& flag, const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(flag, " ", path, ": cannot read"));
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> MakeCredentials(const ClusterOptions& o) {
  if (o.tls_ca_path.empty() && o.tls_cert_path.empty() && o.tls_key_path.empty()) {
    return grpc::InsecureChannelCredentials();
  }
  if (o.tls_cert_path.empty() != o.tls_key_path.empty()) {
    return absl::InvalidArgumentError("--tls-cert and --tls-key go together (mutual TLS)");
  }
  grpc::SslCredentialsOptions ssl;
  if (!o.tls_ca_path.empty()) {
    ASSIGN_OR_RETURN(ssl.pem_root_certs, ReadPem("--tls-ca", o.tls_ca_path));
  }
  if (!o.tls_cert_path.empty()) {
    ASSIGN_OR_RETURN(ssl.pem_cert_chain, ReadPem("--tls-cert", o.tls_cert_path));
    ASSIGN_OR_RETURN(ssl.pem_private_key, ReadPem("--tls-key", o.tls_key_path));
  }
  return grpc::SslCredentials(ssl);
}

grpc::ChannelArguments MakeChannelArgs(const ClusterOptions& o) {
  grpc::ChannelArguments args;
  args.SetMaxSendMessageSize(static_cast<int>(o.max_message_bytes));
  args.SetMaxReceiveMessageSize(
      static_cast<int>(std::max<int64_t>(o.max_message_bytes, int64_t{64} << 20)));
  // Reconnects are paced by the link (fresh channel per attempt); keep gRPC's own short.
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  if (!o.tls_server_name.empty()) args.SetSslTargetNameOverride(o.tls_server_name);
  return args;
}

// Joins the messages of several failures; the code is the first one's.
absl::Status JoinErrors(const std::vector<absl::Status>& errors) {
  std::vector<std::string> parts;
  for (const auto& e : errors) parts.emplace_back(e.message());
  return absl::Status(errors.front().code(), absl::StrJoin(parts, "; "));
}

}  // namespace

absl::StatusOr<std::unique_ptr<ClusterExpertBackend>> ClusterExpertBackend::Create(
    const std::string& model_path, const ClusterOptions& options) {
  auto b = std::unique_ptr<ClusterExpertBackend>(new ClusterExpertBackend);
  b->options_ = options;
  if (options.step_timeout_s <= 0) {
    return absl::InvalidArgumentError("the step timeout must be > 0 seconds");
  }
  if (options.max_message_bytes < 4096 || options.max_message_bytes > (1ll << 30)) {
    return absl::InvalidArgumentError("the maximum message size must be in [4 KiB, 1 GiB]");
  }
  std::set<std::string> seen;
  for (const auto& w : options.workers) {
    if (w.empty()) return absl::InvalidArgumentError("empty worker address in --workers");
    if (!seen.insert(w).second) {
      return absl::InvalidArgumentError(absl::StrCat("worker ", w, " is listed twice"));
    }
  }
  ExpertFilter filter;
  filter.non_expert = false;
  ASSIGN_OR_RETURN(b->model_, Model::Load(model_path, filter));
  const Model* model = b->model_.get();
  const ModelConfig& c = model->config();
  for (const int e : options.local_experts) {
    if (e < 0 || e >= c.n_expert) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--local-experts: expert ", e, " out of range (the model has ", c.n_expert, " experts)"));
    }
  }
  ASSIGN_OR_RETURN(std::shared_ptr<grpc::ChannelCredentials> creds, MakeCredentials(options));
  const grpc::ChannelArguments args = MakeChannelArgs(options);

  const size_t n_workers = options.workers.size();
  for (size_t i = 0; i < n_workers; ++i) {
    WorkerLinkConfig lc;
    lc.address = options.workers[i];
    lc.credentials = creds;
    lc.channel_args = args;
    lc.token = options.cluster_token;
    lc.max_message_bytes = options.max_message_bytes;
    lc.step_timeout_s = options.step_timeout_s;
    lc.describe_timeout_s = std::min(5.0, options.connect_timeout_s);
    lc.backoff_initial_s = options.reconnect_initial_s;
    lc.backoff_max_s = options.reconnect_max_s;
    lc.max_samples = options.max_samples;
    b->links_.push_back(std::make_unique<WorkerLink>(std::move(lc)));
  }
  // Startup Describe, all workers at once.
  std::vector<absl::StatusOr<moepool::v1::DescribeResponse>> answers(
      n_workers, absl::UnknownError("not asked"));
  {
    std::vector<std::thread> threads;
    for (size_t i = 0; i < n_workers; ++i) {
      threads.emplace_back([&, i] {
        answers[i] = b->links_[i]->Describe(options.connect_timeout_s, /*wait_for_ready=*/true);
      });
    }
    for (auto& t : threads) t.join();
  }
  std::vector<absl::Status> errors;
  std::vector<std::vector<std::pair<int, int>>> pairs(n_workers);
  for (size_t i = 0; i < n_workers; ++i) {
    const std::string& name = options.workers[i];
    absl::Status s = answers[i].status();
    if (s.ok()) s = ValidateWorker(name, *answers[i], *model);
    if (s.ok()) {
      auto p = WorkerExpertPairs(name, *answers[i], c);
      if (p.ok()) {
        pairs[i] = *std::move(p);
      } else {
        s = p.status();
      }
    }
    if (!s.ok()) errors.push_back(s);
  }
  if (!errors.empty()) return JoinErrors(errors);
  ASSIGN_OR_RETURN(b->placement_, ExpertPlacement::Build(c.n_layer, c.n_expert, options.workers,
                                                         pairs, options.local_experts));
  if (!options.local_experts.empty()) {
    b->local_pool_ = std::make_unique<ThreadPool>(options.local_threads);
    b->local_ = std::make_unique<LocalExpertBackend>(model, b->local_pool_.get());
  }
  for (size_t i = 0; i < n_workers; ++i) {
    b->describes_.push_back(*answers[i]);
  }
  // Steps time out between their deadline and one tick later.
  const double tick_s = std::clamp(options.step_timeout_s / 10, 0.001, 0.05);
  b->watchdog_ =
      std::make_unique<StepWatchdog>(std::chrono::microseconds(static_cast<int64_t>(tick_s * 1e6)));
  // A reconnected worker is used again only if it still serves the same model and experts.
  for (size_t i = 0; i < n_workers; ++i) {
    // The hook reads only immutable state (the model outlives the links).
    const moepool::v1::DescribeResponse startup = *answers[i];
    const std::string name = options.workers[i];
    auto accept = [model, startup, name](const moepool::v1::DescribeResponse& d) -> absl::Status {
      RETURN_IF_ERROR(ValidateWorker(name, d, *model));
      const auto& a = d.experts().packed();
      const auto& s = startup.experts().packed();
      if (!std::equal(a.begin(), a.end(), s.begin(), s.end())) {
        return absl::FailedPreconditionError(absl::StrCat(
            "worker ", name, " came back with other experts than at startup; not using it"));
      }
      return absl::OkStatus();
    };
    b->links_[i]->Start(*answers[i], std::move(accept));
  }
  return b;
}

ClusterExpertBackend::~ClusterExpertBackend() {
  watchdog_.reset();
  links_.clear();
}

// The rows of one step that go to one holder, and what came back.
struct ClusterExpertBackend::Bucket {
  int holder = ExpertPlacement::kLocal;  // kLocal or a worker index
  std::vector<int64_t> rows;             // ascending rows of the step
  std::vector<int32_t> expert;           // [rows x k], -1 for experts computed elsewhere
  std::vector<float> weight;             // [rows x k]
  std::vector<int32_t> first_expert;     // smallest expert of each row in this bucket
  LinkJob job;                           // job.partial [rows x n_embd]: the result (local too)
  bool replaced = false;                 // failed; its rows were re-sent to replicas

  // Adds expert slot `j` of row `r` (rows arrive in ascending order).
  void Add(int64_t r, int j, int k, int32_t e, float w) {
    if (rows.empty() || rows.back() != r) {
      rows.push_back(r);
      expert.resize(expert.size() + static_cast<size_t>(k), -1);
      weight.resize(weight.size() + static_cast<size_t>(k), 0.0f);
      first_expert.push_back(e);
    }
    const size_t slot = (rows.size() - 1) * static_cast<size_t>(k) + static_cast<size_t>(j);
    expert[slot] = e;
    weight[slot] = w;
    first_expert.back() = std::min(first_expert.back(), e);
  }
};

// One layer's MoE step in flight.
class ClusterExpertBackend::Step final : public PendingExperts {
 public:
  Step(ClusterExpertBackend* backend, const ExpertRoutes& routes, float* out)
      : backend_(backend), routes(routes), out(out) {}
  ~Step() override { backend_->FinishStep(this).IgnoreError(); }
  absl::Status Finish() override { return backend_->FinishStep(this); }

  ClusterExpertBackend* const backend_;
  const ExpertRoutes routes;
  float* const out;
  absl::Status dispatched;  // an error here: nothing was sent
  std::vector<std::unique_ptr<Bucket>> buckets;
  // The current round of requests: its id, links (for the watchdog) and latch.
  uint64_t round = 0;
  std::vector<WorkerLink*> active;
  std::unique_ptr<StepLatch> latch;
  bool armed = false;
  bool finished = false;
};

absl::Status ClusterExpertBackend::Fail(absl::Status s) {
  std::lock_guard<std::mutex> lock(stats_mu_);
  ++failed_steps_;
  return s;
}

absl::Status ClusterExpertBackend::Compute(const ExpertRoutes& routes, float* out) {
  std::unique_ptr<Step> s = Begin(routes, out, /*allow_inline=*/true);
  return FinishStep(s.get());
}

std::unique_ptr<PendingExperts> ClusterExpertBackend::Start(const ExpertRoutes& routes,
                                                            float* out) {
  return Begin(routes, out, /*allow_inline=*/false);
}

std::unique_ptr<ClusterExpertBackend::Step> ClusterExpertBackend::Begin(const ExpertRoutes& routes,
                                                                        float* out,
                                                                        bool allow_inline) {
  auto s = std::make_unique<Step>(this, routes, out);
  outstanding_.push_back(s.get());
  {
    std::lock_guard<std::mutex> lock(stats_mu_);
    ++steps_;
  }
  s->dispatched = Dispatch(s.get());
  if (s->dispatched.ok()) Send(s.get(), 0, allow_inline);
  return s;
}

absl::Status ClusterExpertBackend::Dispatch(Step* s) {
  const ExpertRoutes& routes = s->routes;
  const ModelConfig& c = model_->config();
  if (routes.layer < 0 || routes.layer >= c.n_layer) {
    return absl::InvalidArgumentError(absl::StrCat("layer ", routes.layer, " out of range"));
  }
  if (routes.n_embd != c.n_embd) {
    return absl::InvalidArgumentError(
        absl::StrCat("row width ", routes.n_embd, " != model embedding length ", c.n_embd));
  }
  if (routes.k < 1 || routes.k > c.n_expert) {
    return absl::InvalidArgumentError(absl::StrCat("k = ", routes.k, " out of range"));
  }
  const int64_t n = routes.n_rows;
  const int k = routes.k;
  // A holder per routed expert, rows grouped per holder.
  std::vector<int64_t> rows_per_expert(static_cast<size_t>(c.n_expert), 0);
  for (int64_t i = 0; i < n * k; ++i) {
    const int32_t e = routes.expert[i];
    if (e < 0) continue;
    if (e >= c.n_expert)
      return absl::InvalidArgumentError(absl::StrCat("expert ", e, " out of range"));
    ++rows_per_expert[static_cast<size_t>(e)];
  }
  std::vector<int> holder_of;
  s->round = ++step_counter_;
  RETURN_IF_ERROR(placement_.ChooseHolders(
      routes.layer, rows_per_expert, [&](int w) { return links_[static_cast<size_t>(w)]->up(); },
      s->round, &holder_of));
  // Bucket 0: local; 1 + w: worker w.
  const size_t n_links = links_.size();
  s->buckets.resize(1 + n_links);
  for (size_t b = 0; b < s->buckets.size(); ++b) {
    s->buckets[b] = std::make_unique<Bucket>();
    s->buckets[b]->holder = b == 0 ? ExpertPlacement::kLocal : static_cast<int>(b - 1);
  }
  for (int64_t r = 0; r < n; ++r) {
    for (int j = 0; j < k; ++j) {
      const int32_t e = routes.expert[r * k + j];
      if (e < 0) continue;
      const int h = holder_of[static_cast<size_t>(e)];
      s->buckets[h == ExpertPlacement::kLocal ? 0 : 1 + static_cast<size_t>(h)]->Add(
          r, j, k, e, routes.weight[r * k + j]);
    }
  }
  return absl::OkStatus();
}

void ClusterExpertBackend::WaitForOthers(const Step* s) {
  for (Step* other : outstanding_) {
    if (other == s || other->latch == nullptr) continue;
    const auto t0 = Clock::now();
    other->latch->Wait();
    blocked_micros_.fetch_add(
        static_cast<uint64_t>(
            std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - t0).count()),
        std::memory_order_relaxed);
  }
}

void ClusterExpertBackend::Send(Step* s, size_t first, bool allow_inline) {
  const ExpertRoutes& routes = s->routes;
  const int64_t d = routes.n_embd;
  // A link carries one request at a time: earlier steps' requests must be answered first.
  WaitForOthers(s);
  std::vector<LinkJob*> jobs;
  Bucket* local = nullptr;
  s->active.clear();
  for (size_t b = first; b < s->buckets.size(); ++b) {
    Bucket& bucket = *s->buckets[b];
    if (bucket.rows.empty()) continue;
    if (bucket.holder == ExpertPlacement::kLocal) {
      local = &bucket;
      continue;
    }
    LinkJob& job = bucket.job;
    job.step_id = s->round;
    job.layer = routes.layer;
    job.dtype = options_.wire_dtype;
    job.n_embd = d;
    job.k = routes.k;
    job.x = routes.x;
    job.rows = &bucket.rows;
    job.expert = &bucket.expert;
    job.weight = &bucket.weight;
    s->active.push_back(links_[static_cast<size_t>(bucket.holder)].get());
    jobs.push_back(&job);
  }
  // Without local rows the calling thread runs one worker's exchange itself (Compute only).
  const bool run_inline = allow_inline && local == nullptr && !jobs.empty();
  s->latch = std::make_unique<StepLatch>(static_cast<int>(jobs.size()) - (run_inline ? 1 : 0));
  watchdog_->Arm(
      s->round,
      Clock::now() + std::chrono::microseconds(static_cast<int64_t>(options_.step_timeout_s * 1e6)),
      &s->active);
  s->armed = true;
  for (size_t i = run_inline ? 1 : 0; i < jobs.size(); ++i) {
    s->active[i]->Post(jobs[i], s->latch.get());
  }
  if (run_inline) {
    const auto t0 = Clock::now();
    s->active[0]->RunInline(jobs[0]);
    blocked_micros_.fetch_add(
        static_cast<uint64_t>(
            std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - t0).count()),
        std::memory_order_relaxed);
  } else if (local != nullptr) {
    const auto t0 = Clock::now();
    const int64_t m = static_cast<int64_t>(local->rows.size());
    std::vector<float> xg(static_cast<size_t>(m * d));
    for (int64_t i = 0; i < m; ++i) {
      std::copy_n(routes.x + local->rows[static_cast<size_t>(i)] * d, d, xg.data() + i * d);
    }
    ExpertRoutes sub;
    sub.layer = routes.layer;
    sub.n_rows = m;
    sub.n_embd = d;
    sub.k = routes.k;
    sub.x = xg.data();
    sub.expert = local->expert.data();
    sub.weight = local->weight.data();
    local->job.partial.resize(static_cast<size_t>(m * d));
    local->job.status = local_->Compute(sub, local->job.partial.data());
    const auto us = std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - t0);
    std::lock_guard<std::mutex> lock(stats_mu_);
    local_rows_ += static_cast<uint64_t>(m);
    local_micros_ += static_cast<uint64_t>(us.count());
  }
}

void ClusterExpertBackend::WaitRound(Step* s) {
  if (s->latch != nullptr) {
    const auto t0 = Clock::now();
    s->latch->Wait();
    blocked_micros_.fetch_add(
        static_cast<uint64_t>(
            std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - t0).count()),
        std::memory_order_relaxed);
  }
  if (s->armed) watchdog_->Disarm(s->round);
  s->armed = false;
}

absl::Status ClusterExpertBackend::Resend(Step* s, const std::vector<size_t>& failed) {
  const ExpertRoutes& routes = s->routes;
  const int k = routes.k;
  std::vector<bool> excluded(links_.size(), false);
  std::vector<int64_t> rows_per_expert(static_cast<size_t>(model_->config().n_expert), 0);
  // (row, slot, expert, weight) of every failed request, in row then slot order.
  struct Entry {
    int64_t row;
    int slot;
    int32_t expert;
    float weight;
  };
  std::vector<Entry> entries;
  for (const size_t b : failed) {
    const Bucket& bucket = *s->buckets[b];
    excluded[static_cast<size_t>(bucket.holder)] = true;
    for (size_t i = 0; i < bucket.rows.size(); ++i) {
      for (int j = 0; j < k; ++j) {
        const size_t slot = i * static_cast<size_t>(k) + static_cast<size_t>(j);
        const int32_t e = bucket.expert[slot];
        if (e < 0) continue;
        ++rows_per_expert[static_cast<size_t>(e)];
        entries.push_back({bucket.rows[i], j, e, bucket.weight[slot]});
      }
    }
  }
  std::stable_sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) {
    return a.row != b.row ? a.row < b.row : a.slot < b.slot;
  });
  std::vector<int> holder_of;
  const uint64_t round = ++step_counter_;
  RETURN_IF_ERROR(placement_.ChooseHolders(
      routes.layer, rows_per_expert,
      [&](int w) {
        return !excluded[static_cast<size_t>(w)] && links_[static_cast<size_t>(w)]->up();
      },
      round, &holder_of));
  const size_t first = s->buckets.size();
  std::vector<size_t> bucket_of(links_.size(), 0);  // 0: none yet
  for (const Entry& en : entries) {
    const int h = holder_of[static_cast<size_t>(en.expert)];
    size_t& b = bucket_of[static_cast<size_t>(h)];
    if (b == 0) {
      b = s->buckets.size();
      s->buckets.push_back(std::make_unique<Bucket>());
      s->buckets.back()->holder = h;
    }
    s->buckets[b]->Add(en.row, en.slot, k, en.expert, en.weight);
  }
  uint64_t rows = 0;
  for (const size_t b : failed) {
    s->buckets[b]->replaced = true;
    rows += s->buckets[b]->rows.size();
  }
  {
    std::lock_guard<std::mutex> lock(stats_mu_);
    ++retried_steps_;
    retried_rows_ += rows;
  }
  s->round = round;
  Send(s, first, /*allow_inline=*/false);
  return absl::OkStatus();
}

absl::Status ClusterExpertBackend::FinishStep(Step* s) {
  if (s->finished) return absl::OkStatus();
  s->finished = true;
  // Leaves the outstanding list however this ends.
  struct Leave {
    ClusterExpertBackend* b;
    Step* s;
    ~Leave() {
      b->outstanding_.erase(std::find(b->outstanding_.begin(), b->outstanding_.end(), s));
    }
  } leave{this, s};
  if (!s->dispatched.ok()) return Fail(s->dispatched);
  WaitRound(s);

  // Failed requests: retried on replicas (once) when the worker is unreachable.
  auto collect = [&](size_t from, std::vector<absl::Status>* hard, std::vector<size_t>* soft) {
    for (size_t b = from; b < s->buckets.size(); ++b) {
      const Bucket& bucket = *s->buckets[b];
      if (bucket.rows.empty() || bucket.job.status.ok()) continue;
      const absl::StatusCode code = bucket.job.status.code();
      const bool retryable =
          options_.retry_on_replica && soft != nullptr &&
          bucket.holder != ExpertPlacement::kLocal &&
          (code == absl::StatusCode::kUnavailable || code == absl::StatusCode::kDeadlineExceeded);
      if (retryable) {
        soft->push_back(b);
      } else {
        hard->push_back(bucket.job.status);
      }
    }
  };
  std::vector<absl::Status> errors;
  std::vector<size_t> failed;
  collect(0, &errors, &failed);
  if (!errors.empty()) {
    for (const size_t b : failed) errors.push_back(s->buckets[b]->job.status);
    return Fail(JoinErrors(errors));
  }
  if (!failed.empty()) {
    std::vector<absl::Status> first_errors;
    for (const size_t b : failed) first_errors.push_back(s->buckets[b]->job.status);
    const size_t first_retry = s->buckets.size();
    const absl::Status resent = Resend(s, failed);
    if (!resent.ok()) {
      const absl::Status e = JoinErrors(first_errors);
      return Fail(absl::Status(e.code(), absl::StrCat(e.message(), "; no replica to retry on (",
                                                      resent.message(), ")")));
    }
    WaitRound(s);
    std::vector<absl::Status> retry_errors;
    collect(first_retry, &retry_errors, nullptr);
    if (!retry_errors.empty()) {
      const absl::Status e = JoinErrors(first_errors);
      return Fail(
          absl::Status(e.code(), absl::StrCat(e.message(), "; the retry on a replica failed too: ",
                                              JoinErrors(retry_errors).message())));
    }
  }

  // Combine: per row, partials in ascending order of their smallest expert, from 0.0f.
  const int64_t n = s->routes.n_rows;
  const int64_t d = s->routes.n_embd;
  std::vector<size_t> cursor(s->buckets.size(), 0);
  std::vector<std::pair<int32_t, const float*>> parts;
  for (int64_t r = 0; r < n; ++r) {
    parts.clear();
    for (size_t h = 0; h < s->buckets.size(); ++h) {
      const Bucket& b = *s->buckets[h];
      const size_t i = cursor[h];
      if (b.replaced || i >= b.rows.size() || b.rows[i] != r) continue;
      parts.emplace_back(b.first_expert[i], b.job.partial.data() + static_cast<int64_t>(i) * d);
      ++cursor[h];
    }
    std::sort(parts.begin(), parts.end(),
              [](const auto& a, const auto& b) { return a.first < b.first; });
    float* o = s->out + r * d;
    std::fill(o, o + d, 0.0f);
    for (const auto& [first, p] : parts) {
      for (int64_t j = 0; j < d; ++j) o[j] += p[j];
    }
  }
  return absl::OkStatus();
}

ClusterStats ClusterExpertBackend::Stats() const {
  ClusterStats s;
  {
    std::lock_guard<std::mutex> lock(stats_mu_);
    s.steps = steps_;
    s.failed_steps = failed_steps_;
    s.local_rows = local_rows_;
    s.local_compute_micros = local_micros_;
    s.retried_steps = retried_steps_;
    s.retried_rows = retried_rows_;
  }
  s.blocked_micros = blocked_micros();
  for (const auto& l : links_) s.workers.push_back(l->Stats());
  return s;
}

std::vector<std::pair<int, int>> ClusterExpertBackend::UncoveredPairs() const {
  std::vector<bool> up(links_.size());
  for (size_t w = 0; w < links_.size(); ++w) up[w] = links_[w]->up();
  std::vector<std::pair<int, int>> uncovered;
  for (int l = 0; l < placement_.n_layer(); ++l) {
    for (int e = 0; e < placement_.n_expert(); ++e) {
      bool covered = false;
      for (const int h : placement_.holders(l, e)) {
        covered = covered || h == ExpertPlacement::kLocal || up[static_cast<size_t>(h)];
      }
      if (!covered) uncovered.emplace_back(l, e);
    }
  }
  return uncovered;
}

void ClusterExpertBackend::ResetStats() {
  {
    std::lock_guard<std::mutex> lock(stats_mu_);
    steps_ = failed_steps_ = local_rows_ = local_micros_ = 0;
    retried_steps_ = retried_rows_ = 0;
  }
  for (const auto& l : links_) l->ResetStats();
}

}  // namespace moepool
