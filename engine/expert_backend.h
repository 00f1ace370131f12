// The seam between the forward pass and wherever experts run (this process's CPU, a GPU, or a
// remote worker). The forward pass routes rows to experts and hands them to an ExpertBackend;
// it never knows where an expert lives.
#ifndef MOEPOOL_ENGINE_EXPERT_BACKEND_H_
#define MOEPOOL_ENGINE_EXPERT_BACKEND_H_

#include <cstdint>
#include <memory>
#include <utility>

#include "absl/status/status.h"

namespace moepool {

// The rows of one layer's MoE step and their routing. Borrowed pointers, valid for the call.
struct ExpertRoutes {
  int layer = 0;
  int64_t n_rows = 0;
  int64_t n_embd = 0;
  int k = 0;                        // (expert, weight) pairs per row
  const float* x = nullptr;         // [n_rows x n_embd] normalised FFN input
  const int32_t* expert = nullptr;  // [n_rows x k] ascending within a row; -1 = no expert
  const float* weight = nullptr;    // [n_rows x k] routing weights
};

// An expert computation started by ExpertBackend::Start and not yet collected.
// Ownership: returned to the caller of Start. Destroying it without Finish waits for the work
// (the borrowed buffers are in use until then) and drops its status.
class PendingExperts {
 public:
  virtual ~PendingExperts() = default;
  // Waits until `out` of its Start is written, or the work failed, and returns the status (the
  // same errors as ExpertBackend::Compute). Call at most once.
  virtual absl::Status Finish() = 0;
};

// A computation that was done in Start: Finish only returns its status.
class FinishedExperts final : public PendingExperts {
 public:
  explicit FinishedExperts(absl::Status status) : status_(std::move(status)) {}
  absl::Status Finish() override { return status_; }

 private:
  absl::Status status_;
};

class ExpertBackend {
 public:
  virtual ~ExpertBackend() = default;

  // out [n_rows x n_embd] = for each row, the sum over its (expert, weight) pairs, added in
  // ascending expert id starting from 0.0f, of weight * SwiGLU-FFN_expert(x_row).
  // For each pair the product is rounded to f32 before it is added, so partial sums computed
  // elsewhere (on several workers) combine to the same bits for k <= 2.
  // Errors: INVALID_ARGUMENT for an expert or layer this backend does not hold, UNAVAILABLE /
  // DEADLINE_EXCEEDED for a backend that cannot be reached. Thread-safety: per implementation;
  // the forward pass calls one Compute at a time.
  virtual absl::Status Compute(const ExpertRoutes& routes, float* out) = 0;

  // The asynchronous form of Compute, for pipelining micro-batches: starts the work and returns
  // while it may still run elsewhere (on remote workers), so the caller can compute something
  // else meanwhile; PendingExperts::Finish collects it (same bits and errors as Compute). The
  // buffers of `routes` and `out` are borrowed until Finish returns (or the pending object is
  // destroyed). Several computations may be outstanding; they are finished in the order they
  // were started, all on one thread, and no Compute runs while any is outstanding.
  // The default computes synchronously here (Finish only reports the status).
  virtual std::unique_ptr<PendingExperts> Start(const ExpertRoutes& routes, float* out) {
    return std::make_unique<FinishedExperts>(Compute(routes, out));
  }

  // True when Start returns before the work is done (experts elsewhere), i.e. when overlapping
  // two micro-batches can hide the experts' latency. The default (synchronous Start): false.
  virtual bool overlaps() const { return false; }

  // Total time the calling (forward) thread has spent blocked waiting for experts computed
  // elsewhere (in Compute or Finish), in microseconds since creation; 0 for backends that
  // compute on the calling thread. Readable from any thread.
  virtual uint64_t blocked_micros() const { return 0; }
};

}  // namespace moepool

#endif  // MOEPOOL_ENGINE_EXPERT_BACKEND_H_
