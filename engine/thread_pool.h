// A fixed-size pool for data-parallel loops on the forward pass.
//
// ParallelFor(n, fn) runs fn(i) for i in [0, n) across the pool's threads plus the calling
// thread and returns when all are done. Work is handed out in order from an atomic counter, so
// which thread runs which index varies, but callers must make each index's result depend only on
// the index (never on the thread), which keeps results independent of the thread count.
// Threading: one ParallelFor at a time per pool (calls from several threads are serialised).
// Workers spin briefly between loops (decode issues thousands of small loops per second) and then
// sleep.
#ifndef MOEPOOL_ENGINE_THREAD_POOL_H_
#define MOEPOOL_ENGINE_THREAD_POOL_H_

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace moepool {

class ThreadPool {
 public:
  // n_threads <= 0 means one per hardware thread. The calling thread counts as one.
  explicit ThreadPool(int n_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return n_threads_; }

  void ParallelFor(int64_t n, const std::function<void(int64_t)>& fn);

 private:
  void WorkerLoop();
  void RunTasks();

  int n_threads_;
  std::vector<std::thread> workers_;
  std::mutex call_mu_;  // serialises ParallelFor callers

  std::mutex mu_;
  std::condition_variable wake_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<bool> stop_{false};
  const std::function<void(int64_t)>* fn_ = nullptr;
  std::atomic<int64_t> next_{0};
  int64_t n_ = 0;
  std::atomic<int> active_{0};
};

}  // namespace moepool

#endif  // MOEPOOL_ENGINE_THREAD_POOL_H_
