#include "worker/worker_core.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <memory>
#include <sstream>
#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/cuda/cuda_backend.h"
#include "engine/fingerprint.h"
#include "engine/gguf.h"
#include "engine/host_memory.h"
#include "engine/status_macros.h"

namespace moepool::worker {

absl::StatusOr<std::unique_ptr<WorkerCore>> WorkerCore::Create(const WorkerCoreOptions& options) {
  if (options.experts.empty()) {
    return absl::InvalidArgumentError("a worker needs at least one (layer, expert) pair");
  }
  if (options.max_rows < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_rows must be >= 1, got ", options.max_rows));
  }
  ASSIGN_OR_RETURN(std::unique_ptr<GgufFile> file, GgufFile::Open(options.model_path));
  std::shared_ptr<GgufFile> shared(std::move(file));
  ASSIGN_OR_RETURN(ModelConfig config, ReadModelConfig(*shared));
  for (const auto& [layer, expert] : options.experts.pairs()) {
    if (layer < 0 || layer >= config.n_layer || expert < 0 || expert >= config.n_expert) {
      return absl::InvalidArgumentError(
          absl::StrCat("(layer ", layer, ", expert ", expert, ") is outside ", options.model_path,
                       " (", config.n_layer, " layers of ", config.n_expert, " experts)"));
    }
  }
  auto core = std::unique_ptr<WorkerCore>(new WorkerCore);
  core->config_ = config;
  ASSIGN_OR_RETURN(core->model_, Model::FromFile(shared, options.experts.Filter()));
  {
    absl::MutexLock lock(&core->experts_mu_);
    core->experts_ = options.experts;
  }
  core->fingerprint_ = options.reported_fingerprint.empty()
                           ? ModelFingerprint(*core->model_, options.experts.pairs())
                           : options.reported_fingerprint;
  core->worker_id_ = options.worker_id;
  core->max_rows_ = options.max_rows;
  core->pool_ = std::make_unique<ThreadPool>(options.threads);
  core->cuda_devices_ = options.cuda_devices;
  if (options.cuda_devices.empty()) {
    core->device_ = "cpu";
  } else {
    DeviceSpec spec;
    spec.cuda = true;
    spec.ordinals = options.cuda_devices;
    core->device_ = spec.ToString();
  }
  ASSIGN_OR_RETURN(core->backend_, core->NewBackend(core->model_.get()));
  return core;
}

absl::StatusOr<std::unique_ptr<ExpertBackend>> WorkerCore::NewBackend(Model* model) const {
  if (cuda_devices_.empty()) return std::make_unique<LocalExpertBackend>(model, pool_.get());
  CudaExpertOptions cuda;
  cuda.devices = cuda_devices_;
  return CreateCudaExpertBackend(model, cuda);
}

absl::Status WorkerCore::Adopt(const std::string& model_path, const ExpertSet& experts) {
  if (experts.empty()) return absl::InvalidArgumentError("a worker needs at least one pair");
  ASSIGN_OR_RETURN(std::unique_ptr<GgufFile> file, GgufFile::Open(model_path));
  std::shared_ptr<GgufFile> shared(std::move(file));
  ASSIGN_OR_RETURN(ModelConfig config, ReadModelConfig(*shared));
  if (config.n_embd != config_.n_embd || config.n_ff != config_.n_ff ||
      config.n_layer != config_.n_layer || config.n_expert != config_.n_expert ||
      config.n_expert_used != config_.n_expert_used) {
    return absl::InvalidArgumentError(
        absl::StrCat(model_path, " has another shape than the model this worker serves"));
  }
  for (const auto& [layer, expert] : experts.pairs()) {
    if (layer < 0 || layer >= config.n_layer || expert < 0 || expert >= config.n_expert) {
      return absl::InvalidArgumentError(
          absl::StrCat("(layer ", layer, ", expert ", expert, ") is outside ", model_path));
    }
  }
  ASSIGN_OR_RETURN(std::unique_ptr<Model> model, Model::FromFile(shared, experts.Filter()));
  ASSIGN_OR_RETURN(std::unique_ptr<ExpertBackend> backend, NewBackend(model.get()));
  {
    absl::MutexLock compute(&compute_mu_);
    absl::MutexLock lock(&experts_mu_);
    std::swap(model_, model);
    std::swap(backend_, backend);
    experts_ = experts;
  }
  backend.reset();  // the old ones, after no Compute uses them
  model.reset();
  return absl::OkStatus();
}

uint64_t WorkerCore::expert_bytes() const {
  absl::ReaderMutexLock lock(&experts_mu_);
  return model_->ExpertBytes();
}

absl::StatusOr<WorkerDescription> WorkerCore::Describe() const {
  const ModelConfig& c = config_;
  absl::ReaderMutexLock lock(&experts_mu_);  // model_ too (Adopt)
  WorkerDescription d;
  d.fingerprint = fingerprint_;
  d.model_name = c.name;
  d.file_bytes = model_->file().file_size();
  d.n_embd = c.n_embd;
  d.n_ff = c.n_ff;
  d.n_layer = c.n_layer;
  d.n_expert = c.n_expert;
  d.n_expert_used = c.n_expert_used;
  d.experts = experts_.Packed();
  d.device = device_;
  d.expert_bytes = model_->ExpertBytes();
  if (cuda_devices_.empty()) {
    d.memory_used_bytes = ProcessResidentBytes();
    d.memory_free_bytes = ReadHostMemory().available;
  } else {
    ASSIGN_OR_RETURN(const std::vector<CudaDeviceInfo> devices, ListCudaDevices());
    for (const CudaDeviceInfo& info : devices) {
      if (std::find(cuda_devices_.begin(), cuda_devices_.end(), info.ordinal) ==
          cuda_devices_.end()) {
        continue;
      }
      d.memory_used_bytes += info.total_bytes - std::min(info.free_bytes, info.total_bytes);
      d.memory_free_bytes += info.free_bytes;
    }
  }
  d.worker_id = worker_id_;
  d.threads = pool_->size();
  return d;
}

absl::Status WorkerCore::Validate(const ComputeRequest& r) const {
  const ModelConfig& c = config_;
  if (r.layer < 0 || r.layer >= c.n_layer) {
    return absl::InvalidArgumentError(
        absl::StrCat("layer ", r.layer, " is out of range (the model has ", c.n_layer, ")"));
  }
  if (r.n_embd != c.n_embd) {
    return absl::InvalidArgumentError(
        absl::StrCat("n_embd ", r.n_embd, " != the model's embedding length ", c.n_embd));
  }
  if (r.n_rows < 0 || r.n_rows > max_rows_) {
    return absl::InvalidArgumentError(
        absl::StrCat("n_rows ", r.n_rows, " is outside [0, ", max_rows_, "]"));
  }
  if (r.k < 1 || r.k > c.n_expert) {
    return absl::InvalidArgumentError(absl::StrCat("k ", r.k, " is outside [1, ", c.n_expert, "]"));
  }
  if (r.n_rows > 0 && r.x == nullptr) return absl::InvalidArgumentError("rows are missing");
  const uint64_t pairs = static_cast<uint64_t>(r.n_rows) * static_cast<uint64_t>(r.k);
  if (r.expert_count != pairs || r.weight_count != pairs ||
      (pairs > 0 && (r.expert == nullptr || r.weight == nullptr))) {
    return absl::InvalidArgumentError(
        absl::StrCat("got ", r.expert_count, " expert ids and ", r.weight_count,
                     " weights, expected n_rows x k = ", pairs, " of each"));
  }
  for (int64_t row = 0; row < r.n_rows; ++row) {
    int32_t previous = -1;
    for (int j = 0; j < r.k; ++j) {
      const size_t i = static_cast<size_t>(row * r.k + j);
      const int32_t e = r.expert[i];
      const float w = r.weight[i];
      if (!std::isfinite(w)) {
        return absl::InvalidArgumentError(
            absl::StrCat("row ", row, ": weight ", j, " is not finite (", w, ")"));
      }
      if (e == -1) continue;
      if (e < -1 || e >= c.n_expert) {
        return absl::InvalidArgumentError(
            absl::StrCat("row ", row, ": expert id ", e, " is outside [-1, ", c.n_expert, ")"));
      }
      if (e <= previous) {
        return absl::InvalidArgumentError(
            absl::StrCat("row ", row, ": expert ids must be ascending without repeats (", e,
                         " after ", previous, ")"));
      }
      previous = e;
      absl::ReaderMutexLock lock(&experts_mu_);
      if (!experts_.Contains(r.layer, e)) {
        return absl::FailedPreconditionError(absl::StrCat(
            "expert ", e, " of layer ", r.layer, " is not held by this worker (",
            worker_id_.empty() ? "unnamed" : worker_id_, " holds ", experts_.Summary(), ")"));
      }
    }
  }
  return absl::OkStatus();
}

absl::Status WorkerCore::Compute(const ComputeRequest& r, std::vector<float>* out) {
  out->clear();
  absl::MutexLock lock(&compute_mu_);  // before Validate: Adopt and Release change the pairs
  RETURN_IF_ERROR(Validate(r));
  out->resize(static_cast<size_t>(r.n_rows * r.n_embd));
  if (r.n_rows == 0) return absl::OkStatus();
  ExpertRoutes routes;
  routes.layer = r.layer;
  routes.n_rows = r.n_rows;
  routes.n_embd = r.n_embd;
  routes.k = r.k;
  routes.x = r.x;
  routes.expert = r.expert;
  routes.weight = r.weight;
  if (absl::Status s = backend_->Compute(routes, out->data()); !s.ok()) {
    out->clear();
    return s;
  }
  return absl::OkStatus();
}

ExpertSet WorkerCore::experts() const {
  absl::ReaderMutexLock lock(&experts_mu_);
  return experts_;
}

void WorkerCore::Release(const std::vector<std::pair<int, int>>& pairs) {
  absl::MutexLock compute(&compute_mu_);
  std::vector<std::pair<int, int>> kept;
  {
    absl::MutexLock lock(&experts_mu_);
    for (const auto& p : experts_.pairs()) {
      if (std::find(pairs.begin(), pairs.end(), p) == pairs.end()) kept.push_back(p);
    }
    experts_ = ExpertSet(kept);
  }
  if (!cuda_devices_.empty()) return;  // the device copy stays until the worker restarts
  const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  for (const auto& [layer, expert] : pairs) {
    if (layer < 0 || layer >= config().n_layer || expert < 0 || expert >= config().n_expert) {
      continue;
    }
    const ExpertWeights& E = model_->layer(layer).experts[static_cast<size_t>(expert)];
    if (!E.present()) continue;
    for (const WeightMatrix* m : {&E.gate, &E.up, &E.down}) {
      // Only whole pages inside the tensor: a neighbour's bytes stay where they are.
      const uintptr_t begin = (reinterpret_cast<uintptr_t>(m->data) + page - 1) & ~(page - 1);
      const uintptr_t end = (reinterpret_cast<uintptr_t>(m->data) + m->SizeBytes()) & ~(page - 1);
      if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_DONTNEED);
    }
  }
}

}  // namespace moepool::worker
