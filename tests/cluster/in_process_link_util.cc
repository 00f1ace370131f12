#include "tests/cluster/in_process_link_util.h"

#include <condition_variable>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/status_macros.h"
#include "wire/row_codec.h"
#include "worker/expert_service.h"

namespace moepool::testing {

class InProcessLink final : public WorkerLink {
 public:
  InProcessLink(InProcessWorkers* registry, std::string address, size_t index)
      : registry_(registry), address_(std::move(address)), index_(index) {
    stats_.address = address_;
  }

  const std::string& address() const override { return address_; }

  absl::StatusOr<moepool::v1::DescribeResponse> Describe(double, bool) override {
    worker::WorkerCore* core = nullptr;
    {
      std::lock_guard<std::mutex> lock(registry_->mu_);
      const auto& w = registry_->workers_.at(address_);
      if (w.down) return absl::UnavailableError(absl::StrCat("worker ", address_, " is down"));
      core = w.core;
    }
    absl::StatusOr<worker::WorkerDescription> d = core->Describe();
    if (!d.ok()) return d.status();
    return worker::DescribeResponseOf(*d);
  }

  void Start(const moepool::v1::DescribeResponse&, AcceptWorker accept) override {
    std::lock_guard<std::mutex> lock(mu_);
    accept_ = std::move(accept);
    marked_down_ = false;
  }

  // Down from a failed job until the worker answers Describe and is accepted again (as a real
  // link only learns of a lost worker from a failed exchange, and reconnects).
  bool up() const override {
    std::unique_lock<std::mutex> lock(mu_);
    if (!marked_down_) return true;
    lock.unlock();
    absl::StatusOr<moepool::v1::DescribeResponse> d =
        const_cast<InProcessLink*>(this)->Describe(0, false);
    const absl::Status s = d.ok() ? accept_(*d) : d.status();
    lock.lock();
    if (s.ok() && marked_down_) {
      marked_down_ = false;
      ++stats_.reconnects;
    }
    return !marked_down_;
  }

  void SetRowSession(std::shared_ptr<wire::RowSession>, wire::RowSessionFactory) override {}

  ~InProcessLink() override {
    for (auto& t : stalled_) t.join();
  }

  // Computed right here, except on a stalled worker: there the job waits on a thread of its own
  // (as a real link's would on its I/O thread) for the watchdog.
  void Post(LinkJob* job, RoundLatch* latch) override {
    if (WorkerStalled()) {
      stalled_.emplace_back([this, job, latch] {
        RunInline(job);
        latch->CountDown();
      });
      return;
    }
    RunInline(job);
    latch->CountDown();
  }

  void RunInline(LinkJob* job) override {
    job->status = Run(job);
    std::lock_guard<std::mutex> lock(mu_);
    if (job->status.ok()) {
      ++stats_.requests;
      stats_.rows += job->rows->size();
    } else {
      ++stats_.failures;
      stats_.last_error = std::string(job->status.message());
    }
  }

  void CancelRound(uint64_t step_id) override {
    std::lock_guard<std::mutex> lock(mu_);
    cancelled_step_ = step_id;
    cv_.notify_all();
  }

  WorkerStats Stats() const override {
    std::lock_guard<std::mutex> lock(mu_);
    WorkerStats s = stats_;
    s.up = !marked_down_;
    return s;
  }

  void ResetStats() override {
    std::lock_guard<std::mutex> lock(mu_);
    const uint64_t reconnects = stats_.reconnects;
    stats_ = WorkerStats();
    stats_.address = address_;
    stats_.reconnects = reconnects;
  }

 private:
  bool WorkerStalled() const {
    std::lock_guard<std::mutex> lock(registry_->mu_);
    return registry_->workers_.at(address_).stalled;
  }

  absl::Status MarkDown(absl::Status s) {
    std::lock_guard<std::mutex> lock(mu_);
    marked_down_ = true;
    return s;
  }

  absl::Status Run(LinkJob* job);

  InProcessWorkers* const registry_;
  const std::string address_;
  const size_t index_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  AcceptWorker accept_;
  mutable bool marked_down_ = false;
  uint64_t cancelled_step_ = 0;
  mutable WorkerStats stats_;
  std::vector<std::thread> stalled_;  // jobs posted to a stalled worker
};

absl::Status InProcessLink::Run(LinkJob* job) {
  worker::WorkerCore* core = nullptr;
  bool stalled = false;
  double compute_per_row = 0, link_micros = 0;
  {
    std::lock_guard<std::mutex> lock(registry_->mu_);
    InProcessWorkers::Worker& w = registry_->workers_.at(address_);
    if (w.down) {
      return MarkDown(absl::UnavailableError(
          absl::StrCat("worker ", address_, ": connection lost while sending layer ", job->layer,
                       "; marked down, reconnecting in the background")));
    }
    core = w.core;
    stalled = w.stalled;
    compute_per_row = w.compute_micros_per_row;
    link_micros = w.link_micros;
    if (w.jobs.size() <= index_) w.jobs.resize(index_ + 1, 0);
    ++w.jobs[index_];
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (marked_down_) {
      return absl::UnavailableError(absl::StrCat("worker ", address_, " is down"));
    }
  }
  if (stalled) {  // no answer until the watchdog gives up on the step
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return cancelled_step_ == job->round; });
    marked_down_ = true;
    return absl::DeadlineExceededError(absl::StrCat("worker ", address_, " did not answer layer ",
                                                    job->layer, " within the step timeout"));
  }
  // The rows as the worker would decode them, computed, and the result as the coordinator would
  // decode it.
  const int64_t n = static_cast<int64_t>(job->rows->size());
  const int64_t d = job->n_embd;
  std::string bytes;
  wire::EncodeGatheredRows(job->dtype, job->x, d, *job->rows, &bytes);
  std::vector<float> x(static_cast<size_t>(n * d));
  RETURN_IF_ERROR(wire::DecodeRows(job->dtype, bytes, n * d, x.data()));
  worker::ComputeRequest request;
  request.layer = job->layer;
  request.x = x.data();
  request.n_rows = n;
  request.n_embd = d;
  request.k = job->k;
  request.expert = job->expert->data();
  request.expert_count = job->expert->size();
  request.weight = job->weight->data();
  request.weight_count = job->weight->size();
  std::vector<float> y;
  if (absl::Status s = core->Compute(request, &y); !s.ok()) {
    return absl::Status(s.code(), absl::StrCat("worker ", address_, " refused layer ", job->layer,
                                               ": ", s.message()));
  }
  bytes.clear();
  wire::EncodeRows(job->dtype, y.data(), n * d, &bytes);
  job->partial.resize(static_cast<size_t>(n * d));
  RETURN_IF_ERROR(wire::DecodeRows(job->dtype, bytes, n * d, job->partial.data()));
  const auto compute = static_cast<uint64_t>(compute_per_row * static_cast<double>(n));
  const uint64_t round_trip =
      compute_per_row > 0 ? compute + static_cast<uint64_t>(link_micros) : 0;
  job->sample = RoundTripSample{job->layer, n, round_trip, compute, 0, 0};
  return absl::OkStatus();
}

void InProcessWorkers::Add(const std::string& address, worker::WorkerCore* core) {
  std::lock_guard<std::mutex> lock(mu_);
  workers_[address].core = core;
}

void InProcessWorkers::SetDown(const std::string& address, bool down) {
  std::lock_guard<std::mutex> lock(mu_);
  workers_.at(address).down = down;
}

void InProcessWorkers::SetStalled(const std::string& address, bool stalled) {
  std::lock_guard<std::mutex> lock(mu_);
  workers_.at(address).stalled = stalled;
}

void InProcessWorkers::SetPace(const std::string& address, double compute_micros_per_row,
                               double link_micros) {
  std::lock_guard<std::mutex> lock(mu_);
  Worker& w = workers_.at(address);
  w.compute_micros_per_row = compute_micros_per_row;
  w.link_micros = link_micros;
}

std::vector<int> InProcessWorkers::JobsPerLink(const std::string& address) const {
  std::lock_guard<std::mutex> lock(mu_);
  return workers_.at(address).jobs;
}

WorkerLinkFactory InProcessWorkers::Factory() {
  return [this](const WorkerLinkConfig& config) -> std::unique_ptr<WorkerLink> {
    size_t index;
    {
      std::lock_guard<std::mutex> lock(mu_);
      Worker& w = workers_.at(config.address);
      index = w.jobs.size();
      w.jobs.push_back(0);
    }
    return std::make_unique<InProcessLink>(this, config.address, index);
  };
}

}  // namespace moepool::testing
