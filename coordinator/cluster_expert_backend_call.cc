// ClusterExpertBackend's step path: Dispatch -> Send -> (Finish: wait, retry on replicas,
// Combine). See cluster_expert_backend.h.
#include <algorithm>
#include <chrono>
#include <utility>

#include "absl/strings/str_cat.h"
#include "coordinator/cluster_expert_backend.h"
#include "engine/moe_dispatch.h"
#include "engine/status_macros.h"

namespace moepool {
namespace {

using Clock = std::chrono::steady_clock;

uint64_t MicrosSince(Clock::time_point t0) {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - t0).count());
}

}  // namespace

// The rows of one step that go to one holder, and what came back.
struct ClusterExpertBackend::Bucket {
  int holder = ExpertPlacement::kLocal;  // kLocal, kFallback or a worker index
  int link = 0;                          // which of the worker's links carries it
  std::vector<int64_t> rows;             // ascending rows of the step
  std::vector<int32_t> expert;           // [rows x k], -1 for experts computed elsewhere
  std::vector<float> weight;             // [rows x k]
  std::vector<int32_t> slot;             // [rows x k], the pairs' slots (engine/moe_dispatch.h)
  std::vector<int32_t> first_slot;       // smallest slot of each row in this bucket
  LinkJob job;                           // job.partial [rows x n_embd]: the result (local too)
  bool replaced = false;                 // failed; its rows were re-sent to replicas

  // Adds pair `p` (pairs arrive in row order).
  void Add(const DispatchPair& p, int k) {
    if (rows.empty() || rows.back() != p.row) {
      rows.push_back(p.row);
      expert.resize(expert.size() + static_cast<size_t>(k), -1);
      weight.resize(weight.size() + static_cast<size_t>(k), 0.0f);
      slot.resize(slot.size() + static_cast<size_t>(k), -1);
      first_slot.push_back(p.slot);
    }
    const size_t i = (rows.size() - 1) * static_cast<size_t>(k) + static_cast<size_t>(p.position);
    expert[i] = p.expert;
    weight[i] = p.weight;
    slot[i] = p.slot;
    first_slot.back() = std::min(first_slot.back(), p.slot);
  }
};

// One layer's MoE step in flight.
class ClusterExpertBackend::Call final : public PendingExperts {
 public:
  Call(ClusterExpertBackend* backend, const ExpertRoutes& routes, float* out)
      : backend(backend), routes(routes), out(out) {}
  ~Call() override { backend->FinishCall(this).IgnoreError(); }
  absl::Status Finish() override { return backend->FinishCall(this); }

  ClusterExpertBackend* const backend;
  const ExpertRoutes routes;
  float* const out;
  int link = 0;             // the link of its first round
  absl::Status dispatched;  // an error here: nothing was sent
  std::vector<std::unique_ptr<Bucket>> buckets;
  // The current round of requests: its id, links (for the watchdog) and latch.
  uint64_t round = 0;
  std::vector<WorkerLink*> active;
  std::unique_ptr<RoundLatch> latch;
  bool armed = false;
  bool finished = false;
};

absl::Status ClusterExpertBackend::Fail(absl::Status s) {
  std::lock_guard<std::mutex> lock(stats_mu_);
  ++failed_steps_;
  return s;
}

absl::Status ClusterExpertBackend::Compute(const ExpertRoutes& routes, float* out) {
  std::unique_ptr<Call> s = Begin(routes, out, /*allow_inline=*/true);
  return FinishCall(s.get());
}

std::unique_ptr<PendingExperts> ClusterExpertBackend::Start(const ExpertRoutes& routes,
                                                            float* out) {
  return Begin(routes, out, /*allow_inline=*/false);
}

std::unique_ptr<ClusterExpertBackend::Call> ClusterExpertBackend::Begin(const ExpertRoutes& routes,
                                                                        float* out,
                                                                        bool allow_inline) {
  BeginStep(routes.layer);
  auto s = std::make_unique<Call>(this, routes, out);
  s->link = ChooseLink();
  outstanding_.push_back(s.get());
  {
    std::lock_guard<std::mutex> lock(stats_mu_);
    ++steps_;
  }
  s->dispatched = Dispatch(s.get());
  if (s->dispatched.ok()) Send(s.get(), 0, allow_inline);
  return s;
}

absl::Status ClusterExpertBackend::Dispatch(Call* s) {
  const ExpertRoutes& routes = s->routes;
  const ModelConfig& c = model_->config();
  if (absl::Status st = CheckRoutes(routes, c); !st.ok()) return st;
  const int64_t n = routes.n_rows;
  const int k = routes.k;
  // A holder per routed expert, rows grouped per holder.
  std::vector<int64_t> rows_per_expert(static_cast<size_t>(c.n_expert), 0);
  for (int64_t i = 0; i < n * k; ++i) {
    const int32_t e = routes.expert[i];
    if (e < 0) continue;
    if (e >= c.n_expert) {
      return absl::InvalidArgumentError(absl::StrCat("expert ", e, " out of range"));
    }
    ++rows_per_expert[static_cast<size_t>(e)];
  }
  std::vector<int> holder_of;
  s->round = ++round_counter_;
  RETURN_IF_ERROR(placement_.ChooseHolders(
      routes.layer, rows_per_expert, [&](int w) { return WorkerUsable(static_cast<size_t>(w)); },
      s->round, &holder_of, HolderPaces(s->round)));
  // One bucket per destination: 0 local (--local-experts), 1 + w worker w, 1 + n_workers the
  // local fallback.
  const size_t n_workers = links_.size();
  std::vector<int> destination_of(holder_of.size());
  for (size_t e = 0; e < holder_of.size(); ++e) destination_of[e] = DestinationOf(holder_of[e]);
  DispatchPlan plan;
  PlanDispatch(routes.expert, routes.weight, n, k, destination_of, static_cast<int>(2 + n_workers),
               &plan);
  s->buckets.resize(2 + n_workers);
  for (size_t b = 0; b < s->buckets.size(); ++b) {
    s->buckets[b] = std::make_unique<Bucket>();
    s->buckets[b]->holder = HolderOf(b);
    s->buckets[b]->link = s->link;
  }
  for (const DispatchPair& p : plan.pairs) {
    s->buckets[static_cast<size_t>(p.destination)]->Add(p, k);
  }
  return absl::OkStatus();
}

int ClusterExpertBackend::DestinationOf(int holder) const {
  if (holder == ExpertPlacement::kLocal) return 0;
  if (holder == ExpertPlacement::kFallback) return 1 + static_cast<int>(links_.size());
  return holder >= 0 ? 1 + holder : -1;  // -1: not routed
}

int ClusterExpertBackend::HolderOf(size_t destination) const {
  if (destination == 0) return ExpertPlacement::kLocal;
  if (destination == 1 + links_.size()) return ExpertPlacement::kFallback;
  return static_cast<int>(destination - 1);
}

int ClusterExpertBackend::ChooseLink() {
  const int n_links_per_worker = options_.links_per_worker;
  std::vector<bool> held(static_cast<size_t>(n_links_per_worker), false);
  for (const Call* other : outstanding_) held[static_cast<size_t>(other->link)] = true;
  for (int link = 0; link < n_links_per_worker; ++link) {
    if (!held[static_cast<size_t>(link)]) return link;
  }
  return outstanding_.front()->link;  // shared with the oldest (Send waits for its answers)
}

void ClusterExpertBackend::WaitForOthers(const Call* s, int link) {
  // A step holds its own link and any link Send moved one of its buckets to (a link was down).
  auto holds = [link](const Call* other) {
    if (link < 0 || other->link == link) return true;
    for (const auto& b : other->buckets) {
      if (b->link == link && !b->rows.empty()) return true;
    }
    return false;
  };
  for (Call* other : outstanding_) {
    if (other == s || other->latch == nullptr || !holds(other)) continue;
    const auto t0 = Clock::now();
    other->latch->Wait();
    blocked_micros_.fetch_add(MicrosSince(t0), std::memory_order_relaxed);
  }
}

void ClusterExpertBackend::Send(Call* s, size_t first, bool allow_inline) {
  ChooseLinks(s, first);
  std::vector<LinkJob*> jobs;
  std::vector<Bucket*> here;  // computed in this process: local experts, the local fallback
  s->active.clear();
  for (size_t b = first; b < s->buckets.size(); ++b) {
    Bucket& bucket = *s->buckets[b];
    if (bucket.rows.empty()) continue;
    if (bucket.holder < 0) {
      here.push_back(&bucket);
      continue;
    }
    LinkJob& job = bucket.job;
    job.round = s->round;
    job.layer = s->routes.layer;
    job.dtype = options_.wire_dtype;
    job.return_dtype = ReturnDType(options_);
    job.n_embd = s->routes.n_embd;
    job.k = s->routes.k;
    job.x = s->routes.x;
    job.rows = &bucket.rows;
    job.expert = &bucket.expert;
    job.weight = &bucket.weight;
    s->active.push_back(
        links_[static_cast<size_t>(bucket.holder)][static_cast<size_t>(bucket.link)].get());
    jobs.push_back(&job);
  }
  // Without local rows the calling thread runs one worker's exchange itself (Compute only).
  const bool run_inline = allow_inline && here.empty() && !jobs.empty();
  s->latch = std::make_unique<RoundLatch>(static_cast<int>(jobs.size()) - (run_inline ? 1 : 0));
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
    blocked_micros_.fetch_add(MicrosSince(t0), std::memory_order_relaxed);
  }
  for (Bucket* bucket : here) ComputeHere(s->routes, bucket);
}

void ClusterExpertBackend::ChooseLinks(Call* s, size_t first) {
  // A request goes on its bucket's link, or on another link of the worker if that link is down
  // (reconnecting) and another is up.
  std::vector<bool> links(static_cast<size_t>(options_.links_per_worker), false);
  for (size_t b = first; b < s->buckets.size(); ++b) {
    Bucket& bucket = *s->buckets[b];
    if (bucket.rows.empty() || bucket.holder < 0) continue;
    const auto& worker = links_[static_cast<size_t>(bucket.holder)];
    if (!worker[static_cast<size_t>(bucket.link)]->up()) {
      for (size_t link = 0; link < worker.size(); ++link) {
        if (worker[link]->up()) {
          bucket.link = static_cast<int>(link);
          break;
        }
      }
    }
    links[static_cast<size_t>(bucket.link)] = true;
  }
  // A link carries one request at a time: earlier steps on those links must have their answers
  // (a retry waits for all of them).
  if (first > 0) {
    WaitForOthers(s, -1);
    return;
  }
  for (size_t link = 0; link < links.size(); ++link) {
    if (links[link]) WaitForOthers(s, static_cast<int>(link));
  }
}

void ClusterExpertBackend::ComputeHere(const ExpertRoutes& routes, Bucket* local) {
  const auto t0 = Clock::now();
  const int64_t d = routes.n_embd;
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
  const bool fallback = local->holder == ExpertPlacement::kFallback;
  ExpertBackend* backend = fallback ? fallback_.get() : local_.get();
  local->job.status = backend->Compute(sub, local->job.partial.data());
  const auto us = std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - t0);
  std::lock_guard<std::mutex> lock(stats_mu_);
  (fallback ? fallback_rows_ : local_rows_) += static_cast<uint64_t>(m);
  local_micros_ += static_cast<uint64_t>(us.count());
}

void ClusterExpertBackend::WaitRound(Call* s) {
  if (s->latch != nullptr) {
    const auto t0 = Clock::now();
    s->latch->Wait();
    blocked_micros_.fetch_add(MicrosSince(t0), std::memory_order_relaxed);
  }
  if (s->armed) watchdog_->Disarm(s->round);
  s->armed = false;
}

// What a retry needs to know about the failed requests of a round.
struct ClusterExpertBackend::Retry {
  std::vector<bool> excluded;     // [worker] failed in this round
  std::vector<bool> unavailable;  // [worker] failed as unreachable (may work on another link)
  std::vector<int> failed_link;   // [worker] the link it failed on, or -1
  std::vector<int64_t> rows_per_expert;
  std::vector<DispatchPair> pairs;  // of every failed request, in row then position order
};

ClusterExpertBackend::Retry ClusterExpertBackend::CollectFailed(
    const Call& s, const std::vector<size_t>& failed) const {
  const int k = s.routes.k;
  const size_t n_workers = links_.size();
  Retry r;
  r.excluded.assign(n_workers, false);
  r.unavailable.assign(n_workers, false);
  r.failed_link.assign(n_workers, -1);
  r.rows_per_expert.assign(static_cast<size_t>(model_->config().n_expert), 0);
  for (const size_t b : failed) {
    const Bucket& bucket = *s.buckets[b];
    const size_t w = static_cast<size_t>(bucket.holder);
    r.excluded[w] = true;
    r.unavailable[w] = bucket.job.status.code() == absl::StatusCode::kUnavailable;
    r.failed_link[w] = bucket.link;
    for (size_t i = 0; i < bucket.rows.size(); ++i) {
      for (int j = 0; j < k; ++j) {
        const size_t at = i * static_cast<size_t>(k) + static_cast<size_t>(j);
        const int32_t e = bucket.expert[at];
        if (e < 0) continue;
        ++r.rows_per_expert[static_cast<size_t>(e)];
        r.pairs.push_back({bucket.rows[i], j, bucket.slot[at], e, bucket.weight[at], 0});
      }
    }
  }
  std::stable_sort(r.pairs.begin(), r.pairs.end(),
                   [](const DispatchPair& a, const DispatchPair& b) {
                     return a.row != b.row ? a.row < b.row : a.position < b.position;
                   });
  return r;
}

int ClusterExpertBackend::OtherLink(const Retry& r, size_t w) const {
  for (size_t link = 0; link < links_[w].size(); ++link) {
    if (static_cast<int>(link) != r.failed_link[w] && links_[w][link]->up()) {
      return static_cast<int>(link);
    }
  }
  return -1;
}

absl::Status ClusterExpertBackend::Resend(Call* s, const std::vector<size_t>& failed) {
  const Retry r = CollectFailed(*s, failed);
  std::vector<int> holder_of;
  const uint64_t round = ++round_counter_;
  absl::Status chosen = placement_.ChooseHolders(
      s->routes.layer, r.rows_per_expert,
      [&](int w) {
        return !r.excluded[static_cast<size_t>(w)] && WorkerUsable(static_cast<size_t>(w));
      },
      round, &holder_of);
  if (!chosen.ok()) {
    // No replica for some expert: an unreachable worker once more on another link.
    const absl::Status again = placement_.ChooseHolders(
        s->routes.layer, r.rows_per_expert,
        [&](int w) {
          const size_t i = static_cast<size_t>(w);
          return r.excluded[i] ? r.unavailable[i] && OtherLink(r, i) >= 0 : WorkerUsable(i);
        },
        round, &holder_of);
    if (!again.ok()) return chosen;
  }
  // The retry may use any link: wait until no other step has requests in flight.
  WaitForOthers(s, -1);
  const size_t first = s->buckets.size();
  std::vector<size_t> bucket_of(2 + links_.size(), 0);  // by destination; 0: none yet
  for (const DispatchPair& p : r.pairs) {
    const int h = holder_of[static_cast<size_t>(p.expert)];
    size_t& b = bucket_of[static_cast<size_t>(DestinationOf(h))];
    if (b == 0) {
      b = s->buckets.size();
      s->buckets.push_back(std::make_unique<Bucket>());
      s->buckets.back()->holder = h;
      if (h >= 0) {
        // (Should the other link have gone down meanwhile, the request fails as UNAVAILABLE.)
        const size_t w = static_cast<size_t>(h);
        const int link = r.excluded[w] ? OtherLink(r, w) : s->link;
        s->buckets.back()->link = link >= 0 ? link : std::max(r.failed_link[w], 0);
      }
    }
    s->buckets[b]->Add(p, s->routes.k);
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

absl::Status ClusterExpertBackend::FinishCall(Call* s) {
  if (s->finished) return absl::OkStatus();
  s->finished = true;
  // Leaves the outstanding list however this ends.
  struct Leave {
    ClusterExpertBackend* b;
    Call* s;
    ~Leave() {
      b->outstanding_.erase(std::find(b->outstanding_.begin(), b->outstanding_.end(), s));
      b->EndStep(s->routes.layer);
    }
  } leave{this, s};
  if (!s->dispatched.ok()) return Fail(s->dispatched);
  WaitRound(s);
  NotePace(*s);

  // Failed requests: retried on replicas (once) when the worker is unreachable.
  auto collect = [&](size_t from, std::vector<absl::Status>* hard, std::vector<size_t>* soft) {
    for (size_t b = from; b < s->buckets.size(); ++b) {
      const Bucket& bucket = *s->buckets[b];
      if (bucket.rows.empty() || bucket.job.status.ok()) continue;
      const absl::StatusCode code = bucket.job.status.code();
      const bool retryable =
          options_.retry_on_replica && soft != nullptr && bucket.holder >= 0 &&
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
      return Fail(absl::Status(e.code(), absl::StrCat(e.message(), "; the retry failed too: ",
                                                      JoinErrors(retry_errors).message())));
    }
  }

  // Combine: per row, the partial sums in ascending order of their smallest slot, from 0.0f.
  std::vector<DispatchPartial> partials;
  for (const auto& bucket : s->buckets) {
    if (bucket->replaced) continue;
    for (size_t i = 0; i < bucket->rows.size(); ++i) {
      partials.push_back({bucket->rows[i], bucket->first_slot[i], 1.0f,
                          bucket->job.partial.data() + static_cast<int64_t>(i) * s->routes.n_embd});
    }
  }
  Combine(&partials, s->routes.n_rows, s->routes.n_embd, s->out);
  return absl::OkStatus();
}

void ClusterExpertBackend::NotePace(const Call& s) {
  constexpr double kWeight = 0.05;  // of the newest exchange: about the latest 20 count
  if (pace_version_ != placement_version_) {
    measured_pace_.clear();
    pace_version_ = placement_version_;
  }
  measured_pace_.resize(links_.size());
  for (const auto& bucket : s.buckets) {
    const RoundTripSample& sample = bucket->job.sample;
    if (bucket->holder < 0 || bucket->rows.empty() || !bucket->job.status.ok() ||
        sample.rows <= 0 || sample.round_trip_micros == 0) {
      continue;  // local, failed, or a link that does not time its exchanges
    }
    MeasuredPace& m = measured_pace_[static_cast<size_t>(bucket->holder)];
    const double per_row =
        static_cast<double>(sample.compute_micros) / static_cast<double>(sample.rows);
    const double link = static_cast<double>(sample.round_trip_micros) -
                        std::min<double>(sample.compute_micros, sample.round_trip_micros);
    const double w = m.samples == 0 ? 1.0 : kWeight;
    m.pace.micros_per_row += w * (per_row - m.pace.micros_per_row);
    m.pace.round_trip_micros += w * (link - m.pace.round_trip_micros);
    ++m.samples;
  }
}

const std::vector<ExpertPlacement::HolderPace>* ClusterExpertBackend::HolderPaces(uint64_t round) {
  if (pace_version_ != placement_version_) return nullptr;  // none measured since the change
  if (round % kRemeasureEvery == 0) return nullptr;         // the rows spread by count
  std::vector<double> per_row, link;
  for (const MeasuredPace& m : measured_pace_) {
    if (m.samples == 0) continue;
    per_row.push_back(m.pace.micros_per_row);
    link.push_back(m.pace.round_trip_micros);
  }
  if (per_row.empty()) return nullptr;
  std::sort(per_row.begin(), per_row.end());
  std::sort(link.begin(), link.end());
  const ExpertPlacement::HolderPace median = {per_row[per_row.size() / 2], link[link.size() / 2]};
  holder_paces_.assign(links_.size(), median);
  for (size_t w = 0; w < measured_pace_.size() && w < holder_paces_.size(); ++w) {
    if (measured_pace_[w].samples > 0) holder_paces_[w] = measured_pace_[w].pace;
  }
  MergeNearPaces(&holder_paces_);
  return &holder_paces_;
}

}  // namespace moepool
