#include "coordinator/step_watchdog.h"

namespace moepool {

StepWatchdog::StepWatchdog(std::chrono::microseconds tick)
    : tick_(tick), thread_([this] { Loop(); }) {}

StepWatchdog::~StepWatchdog() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

void StepWatchdog::Arm(uint64_t step, std::chrono::steady_clock::time_point deadline,
                       const std::vector<WorkerLink*>* links) {
  std::lock_guard<std::mutex> lock(mu_);
  step_ = step;
  deadline_ = deadline;
  links_ = links;
}

void StepWatchdog::Disarm() {
  std::lock_guard<std::mutex> lock(mu_);
  step_ = 0;
  links_ = nullptr;
}

void StepWatchdog::Loop() {
  std::unique_lock<std::mutex> lock(mu_);
  while (!stop_) {
    cv_.wait_for(lock, tick_, [&] { return stop_; });
    if (stop_ || step_ == 0 || std::chrono::steady_clock::now() < deadline_) continue;
    // Cancelling under mu_ keeps the links alive: Disarm waits for it.
    for (WorkerLink* link : *links_) link->CancelStep(step_);
    step_ = 0;
  }
}

}  // namespace moepool
