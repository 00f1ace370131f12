// The engine side of a worker: the experts it holds and the checked computation it offers.
//
// WorkerCore binds only its (layer, expert) pairs of a GGUF file (no attention, router,
// embedding or head; the mapping is lazy, so pages of experts held elsewhere are never read) and
// runs them with LocalExpertBackend on its own ThreadPool, or, given CUDA devices, with the CUDA
// expert backend (engine/cuda/cuda_backend.h), the pairs spread over those devices. It knows
// nothing about gRPC: the service (expert_service.h) translates protocol messages into
// ComputeRequest.
//
// Contract of Compute: every field of the request is checked before anything is computed; a bad
// request returns INVALID_ARGUMENT (malformed: sizes, ids outside the model, non-finite
// weights, too many rows) or FAILED_PRECONDITION (a well-formed request for an expert this worker
// does not hold) with a message, and leaves `out` empty. Input activations are not checked for
// finiteness (a NaN input yields NaN output for that row, as in single-process execution).
//
// Threading: Describe may be called from any thread at any time. Compute calls are serialised
// by an internal mutex (the pool parallelises inside one call), so any number of threads may call
// it. Ownership: WorkerCore owns its Model, ThreadPool and backend.
#ifndef MOEPOOL_WORKER_WORKER_CORE_H_
#define MOEPOOL_WORKER_WORKER_CORE_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "engine/model.h"
#include "engine/moe_ffn.h"
#include "engine/thread_pool.h"
#include "worker/expert_set.h"

namespace moepool::worker {

struct WorkerCoreOptions {
  std::string model_path;
  ExpertSet experts;         // must be non-empty and inside the model (see expert_set.h)
  int threads = 0;           // <= 0: one per hardware thread
  int64_t max_rows = 65536;  // the most rows one Compute accepts
  std::string worker_id;     // reported by Describe (host:port or a name)
  // CUDA device ordinals the experts live on (resolved, see ResolveDeviceSpec); empty: the CPU.
  // Create fails with the CUDA backend's error (FAILED_PRECONDITION in a build without CUDA).
  std::vector<int> cuda_devices;
  // Reported by Describe instead of the fingerprint of `model_path` over the pairs: a joined
  // worker serving a shard file (shard_cache.h) reports the coordinator's whole-model
  // fingerprint, every tensor of the shard having been verified against its checksum.
  std::string reported_fingerprint;
};

// What Describe reports (mirrors moepool.v1.DescribeResponse without protobuf types).
struct WorkerDescription {
  std::string fingerprint;  // ModelFingerprint over the pairs held
  std::string model_name;   // general.name
  uint64_t file_bytes = 0;
  int64_t n_embd = 0, n_ff = 0, n_layer = 0, n_expert = 0, n_expert_used = 0;
  std::vector<uint32_t> experts;  // packed (PackExpert), ascending
  std::string device;             // "cpu", "cuda:0", "cuda:0,1"
  uint64_t expert_bytes = 0;
  // CPU: resident set of this process and MemAvailable of the machine, now. CUDA: used (total
  // less free) and free memory summed over the worker's devices, now.
  uint64_t memory_used_bytes = 0;
  uint64_t memory_free_bytes = 0;
  std::string worker_id;
  int threads = 0;
};

// One layer's rows routed to this worker, in f32 (the wire's rows are decoded by
// wire::RequestAssembler before they get here). Borrowed pointers, valid for the call.
struct ComputeRequest {
  int layer = 0;
  const float* x = nullptr;  // n_rows x n_embd
  int64_t n_rows = 0;
  int64_t n_embd = 0;
  int k = 0;                        // (expert, weight) pairs per row
  const int32_t* expert = nullptr;  // expert_count ids; ascending per row, -1 = none
  size_t expert_count = 0;
  const float* weight = nullptr;  // weight_count routing weights
  size_t weight_count = 0;
};

class WorkerCore {
 public:
  // Opens the model, checks the pairs against it, binds them and starts the pool.
  // Errors: the GGUF reader's / model binder's, INVALID_ARGUMENT for an empty or out-of-range
  // expert set or a bad option.
  static absl::StatusOr<std::unique_ptr<WorkerCore>> Create(const WorkerCoreOptions& options);

  WorkerCore(const WorkerCore&) = delete;
  WorkerCore& operator=(const WorkerCore&) = delete;

  const ModelConfig& config() const { return config_; }
  // The model with this worker's experts bound (for preloading and residency checks); valid
  // until the next Adopt, which only the caller's own thread may call meanwhile.
  const Model& model() const { return *model_; }
  ExpertSet experts() const;  // what it serves now (Release narrows it)
  int64_t max_rows() const { return max_rows_; }
  uint64_t expert_bytes() const;

  // Identity, hyperparameters, the pairs held and current memory figures.
  absl::StatusOr<WorkerDescription> Describe() const;

  // Checks `request` (see the contract above) and sets `out` to n_rows x n_embd values: per
  // row, the sum over its (expert, weight) pairs in ascending expert id, starting from 0, of
  // weight * FFN_expert(row), computed in f32. The bits equal LocalExpertBackend on the same rows.
  absl::Status Compute(const ComputeRequest& request, std::vector<float>* out);

  // Stops serving `pairs` (a coordinator moved them to another worker): requests for them are
  // refused from now on, Describe no longer lists them, and on the CPU their pages are dropped
  // from this process (madvise), so its memory follows its share. Waits for a running Compute.
  // Pairs it does not hold are ignored.
  void Release(const std::vector<std::pair<int, int>>& pairs);

  // Serves `experts` of `model_path` from now on (a placement change: the joined worker's new
  // shard file): opens and binds them (and, on CUDA, uploads them) beside what it serves, then
  // swaps between two Compute calls, so no request fails. INVALID_ARGUMENT when the file is
  // another model shape or a pair is outside it; the GGUF reader's / binder's errors; on error
  // it keeps serving what it had.
  absl::Status Adopt(const std::string& model_path, const ExpertSet& experts);

 private:
  WorkerCore() = default;
  absl::Status Validate(const ComputeRequest& request) const;
  // LocalExpertBackend on the pool, or the CUDA backend on cuda_devices_.
  absl::StatusOr<std::unique_ptr<ExpertBackend>> NewBackend(Model* model) const;

  ModelConfig config_;  // the same over Adopt
  // model_ and backend_ change only in Adopt, holding compute_mu_ and experts_mu_.
  std::unique_ptr<Model> model_;
  mutable absl::Mutex experts_mu_;
  ExpertSet experts_ ABSL_GUARDED_BY(experts_mu_);
  std::string fingerprint_;
  std::string worker_id_;
  std::string device_;
  std::vector<int> cuda_devices_;
  int64_t max_rows_ = 0;
  std::unique_ptr<ThreadPool> pool_;
  std::unique_ptr<ExpertBackend> backend_;  // LocalExpertBackend or the CUDA backend

  absl::Mutex compute_mu_;  // one Compute at a time (the pool parallelises inside it)
};

}  // namespace moepool::worker

#endif  // MOEPOOL_WORKER_WORKER_CORE_H_
