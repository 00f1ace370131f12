// The step watchdog of ClusterExpertBackend: cancels the streams of the workers of a step that
// have not answered by the step's deadline (the long-lived streams never carry a deadline).
//
// Its thread checks the armed steps every `tick`, so arming and disarming take a mutex but never
// wake a thread (they run once per layer on the forward path); a step times out between its
// deadline and one tick later. Several steps may be armed at once (pipelined micro-batches).
// Threading: Arm/Disarm from any thread; cancellation runs on the watchdog's thread. The links
// passed to Arm must stay alive until the step's Disarm returns.
#ifndef MOEPOOL_COORDINATOR_ROUND_WATCHDOG_H_
#define MOEPOOL_COORDINATOR_ROUND_WATCHDOG_H_

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

#include "coordinator/worker_link.h"

namespace moepool {

class RoundWatchdog {
 public:
  explicit RoundWatchdog(std::chrono::microseconds tick);
  ~RoundWatchdog();
  RoundWatchdog(const RoundWatchdog&) = delete;
  RoundWatchdog& operator=(const RoundWatchdog&) = delete;

  // Until Disarm(step): once `deadline` passes, calls CancelRound(step) on each of `links`
  // (once). `step` must be non-zero and not armed already.
  void Arm(uint64_t step, std::chrono::steady_clock::time_point deadline,
           const std::vector<WorkerLink*>* links);
  void Disarm(uint64_t step);

 private:
  void Loop();

  const std::chrono::microseconds tick_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  struct Armed {
    uint64_t step;
    std::chrono::steady_clock::time_point deadline;
    const std::vector<WorkerLink*>* links;
  };
  std::vector<Armed> armed_;  // guarded by mu_; a handful at most
  std::thread thread_;
};

}  // namespace moepool

#endif  // MOEPOOL_COORDINATOR_ROUND_WATCHDOG_H_
