#include "coordinator/round_watchdog.h"

#include <algorithm>

namespace moepool {

RoundWatchdog::RoundWatchdog(std::chrono::microseconds tick)
    : tick_(tick), thread_([this] { Loop(); }) {}

RoundWatchdog::~RoundWatchdog() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

void RoundWatchdog::Arm(uint64_t step, std::chrono::steady_clock::time_point deadline,
                        const std::vector<WorkerLink*>* links) {
  std::lock_guard<std::mutex> lock(mu_);
  armed_.push_back({step, deadline, links});
}

void RoundWatchdog::Disarm(uint64_t step) {
  std::lock_guard<std::mutex> lock(mu_);
  armed_.erase(std::remove_if(armed_.begin(), armed_.end(),
                              [step](const Armed& a) { return a.step == step; }),
               armed_.end());
}

void RoundWatchdog::Loop() {
  std::unique_lock<std::mutex> lock(mu_);
  while (!stop_) {
    cv_.wait_for(lock, tick_, [&] { return stop_; });
    if (stop_ || armed_.empty()) continue;
    const auto now = std::chrono::steady_clock::now();
    // Cancelling under mu_ keeps the links alive: Disarm waits for it.
    for (auto it = armed_.begin(); it != armed_.end();) {
      if (now < it->deadline) {
        ++it;
        continue;
      }
      for (WorkerLink* link : *it->links) link->CancelRound(it->step);
      it = armed_.erase(it);
    }
  }
}

}  // namespace moepool
