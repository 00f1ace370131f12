// The step watchdog of ClusterExpertBackend: cancels the streams of the workers of a step that
// have not answered by the step's deadline (the long-lived streams never carry a deadline).
//
// Its thread checks the armed step every `tick`, so arming and disarming take a mutex but never
// wake a thread (they run once per layer on the forward path); a step times out between its
// deadline and one tick later.
// Threading: Arm/Disarm from one thread at a time (the step's); cancellation runs on the
// watchdog's thread. The links passed to Arm must stay alive until Disarm returns.
#ifndef MOEPOOL_COORDINATOR_STEP_WATCHDOG_H_
#define MOEPOOL_COORDINATOR_STEP_WATCHDOG_H_

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

#include "coordinator/worker_link.h"

namespace moepool {

class StepWatchdog {
 public:
  explicit StepWatchdog(std::chrono::microseconds tick);
  ~StepWatchdog();
  StepWatchdog(const StepWatchdog&) = delete;
  StepWatchdog& operator=(const StepWatchdog&) = delete;

  // Until Disarm: once `deadline` passes, calls CancelStep(step) on each of `links`.
  void Arm(uint64_t step, std::chrono::steady_clock::time_point deadline,
           const std::vector<WorkerLink*>* links);
  void Disarm();

 private:
  void Loop();

  const std::chrono::microseconds tick_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  uint64_t step_ = 0;  // 0: not armed
  std::chrono::steady_clock::time_point deadline_;
  const std::vector<WorkerLink*>* links_ = nullptr;
  std::thread thread_;
};

}  // namespace moepool

#endif  // MOEPOOL_COORDINATOR_STEP_WATCHDOG_H_
