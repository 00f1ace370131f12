#include "coordinator/worker_link.h"

namespace moepool {

void RoundLatch::CountDown() {
  std::lock_guard<std::mutex> lock(mu_);
  if (--count_ == 0) cv_.notify_all();
}

void RoundLatch::Wait() {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [&] { return count_ == 0; });
}

}  // namespace moepool
