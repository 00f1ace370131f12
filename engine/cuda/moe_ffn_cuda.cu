// CudaExpertBackend: the experts of a Model in GPU memory (CreateCudaExpertBackend of
// cuda_backend.h).
//
// Creation uploads every bound expert once (gate, up and down of one expert together) into one
// allocation per device; experts are cut into contiguous runs of (layer, expert) order with
// about equal bytes per device, so a layer usually lives on one device. Compute, per chunk of
// rows: upload x and the routing (grouped by expert on the host), then per expert gather its
// rows, run the fused gate/up kernel and the down projection, and write weight * y (rounded to
// f32) into the row's slot for that pair; a combine kernel adds each row's slots from 0.0f in
// ascending expert id. When a layer's experts span devices, the slots come back to the host and
// are added there in the same order.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/cuda/cuda_backend.h"
#include "engine/cuda/cuda_check.cuh"
#include "engine/cuda/cuda_ops.h"
#include "engine/cuda/expert_dispatch.h"
#include "engine/cuda/expert_kernels.cuh"
#include "engine/cuda/expert_kernels.h"
#include "engine/cuda/expert_math.h"
#include "engine/cuda/moe_ffn_cuda.h"

namespace moepool {
namespace {

using cuda::CombineSlotsKernel;
using cuda::DeviceBuffer;
using cuda::DeviceDispatch;
using cuda::ExpertGroup;
using cuda::GatherRowsKernel;
using cuda::MatrixRef;
using cuda::PlanExpertDispatch;
using cuda::Ptr;
using cuda::ScaleToSlotsKernel;

#define MOEPOOL_RETURN_IF_NOT_OK(expr)   \
  do {                                   \
    const absl::Status status_ = (expr); \
    if (!status_.ok()) return status_;   \
  } while (false)

constexpr size_t kAlign = 256;
size_t AlignUp(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

struct PlacedExpert {
  int device = -1;           // index into the backend's devices, -1 when not bound
  MatrixRef gate, up, down;  // device pointers
};

struct DeviceState {
  int ordinal = 0;
  cudaStream_t stream = nullptr;
  DeviceBuffer weights;
  DeviceBuffer x;      // [max_rows x n_embd]
  DeviceBuffer xg;     // [slots x n_embd] one expert's gathered rows
  DeviceBuffer h, h2;  // [slots x n_ff]
  DeviceBuffer y;      // [slots x n_embd]
  DeviceBuffer prod;   // [slots x n_embd] weighted products by (row, rank)
  DeviceBuffer out;    // [max_rows x n_embd]
  DeviceBuffer index;  // [3 x slots] gather rows, destination slots, weights
  ~DeviceState() {
    if (stream != nullptr) {
      cudaSetDevice(ordinal);
      cudaStreamDestroy(stream);
    }
  }
};

class CudaExpertBackend : public ExpertBackend {
 public:
  explicit CudaExpertBackend(const CudaExpertOptions& options) : options_(options) {}
  // Uploads the experts bound in `model` (borrowed).
  absl::Status InitFromModel(const Model* model);
  // Uses experts already on one device (borrowed).
  absl::Status InitFromDevice(const DeviceResidentExperts& experts);
  absl::Status Compute(const ExpertRoutes& routes, float* out) override;

 private:
  // Checks free memory for `weight_bytes` plus the buffers and sets up devices_[i].
  absl::Status AddDevice(int ordinal, uint64_t weight_bytes, int64_t n_ff);
  absl::Status ComputeChunk(const ExpertRoutes& routes, int64_t r0, int64_t n, float* out);

  CudaExpertOptions options_;
  int64_t n_embd_ = 0;
  int64_t slots_ = 0;  // (row, pair) slots the device buffers hold
  std::vector<std::unique_ptr<DeviceState>> devices_;
  std::vector<std::vector<PlacedExpert>> experts_;  // [layer][expert]
  // Per-call host scratch.
  std::vector<int> device_of_;
  std::vector<cuda::DeviceDispatch> dispatch_;  // [device]
  std::vector<float> host_slots_;
};

void ShowProgress(int64_t done, int64_t total, uint64_t bytes, uint64_t total_bytes) {
  constexpr int kWidth = 30;
  const int filled = total > 0 ? static_cast<int>(done * kWidth / total) : kWidth;
  std::string bar(static_cast<size_t>(filled), '=');
  bar.resize(kWidth, ' ');
  std::fprintf(stderr, "\rcuda: uploading experts [%s] %lld/%lld (%.2f / %.2f GiB)", bar.c_str(),
               static_cast<long long>(done), static_cast<long long>(total),
               static_cast<double>(bytes) / (1 << 30),
               static_cast<double>(total_bytes) / (1 << 30));
  if (done == total) std::fprintf(stderr, "\n");
}

absl::Status CudaExpertBackend::AddDevice(int ordinal, uint64_t weight_bytes, int64_t n_ff) {
  const uint64_t f = sizeof(float);
  const int64_t d = n_embd_;
  const uint64_t buffers = f * static_cast<uint64_t>(2 * options_.max_rows * d + 3 * slots_ * d +
                                                     2 * slots_ * n_ff + 3 * slots_);
  const uint64_t needed = weight_bytes + buffers;
  MOEPOOL_CUDA_RETURN_IF_ERROR(cudaSetDevice(ordinal));
  size_t free_bytes = 0, device_total = 0;
  MOEPOOL_CUDA_RETURN_IF_ERROR(cudaMemGetInfo(&free_bytes, &device_total));
  if (needed + options_.reserve_bytes > free_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "cuda:", ordinal, " needs ", needed, " bytes (experts ", weight_bytes, ", buffers ",
        buffers, ") plus ", options_.reserve_bytes, " in reserve, but only ", free_bytes,
        " bytes are free (of ", device_total, "); add devices or load fewer experts"));
  }
  auto state = std::make_unique<DeviceState>();
  state->ordinal = ordinal;
  MOEPOOL_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&state->stream, cudaStreamNonBlocking));
  MOEPOOL_RETURN_IF_NOT_OK(cuda::AllocateInto(weight_bytes, &state->weights));
  MOEPOOL_RETURN_IF_NOT_OK(cuda::AllocateInto(f * options_.max_rows * d, &state->x));
  MOEPOOL_RETURN_IF_NOT_OK(cuda::AllocateInto(f * slots_ * d, &state->xg));
  MOEPOOL_RETURN_IF_NOT_OK(cuda::AllocateInto(f * slots_ * n_ff, &state->h));
  MOEPOOL_RETURN_IF_NOT_OK(cuda::AllocateInto(f * slots_ * n_ff, &state->h2));
  MOEPOOL_RETURN_IF_NOT_OK(cuda::AllocateInto(f * slots_ * d, &state->y));
  MOEPOOL_RETURN_IF_NOT_OK(cuda::AllocateInto(f * slots_ * d, &state->prod));
  MOEPOOL_RETURN_IF_NOT_OK(cuda::AllocateInto(f * options_.max_rows * d, &state->out));
  MOEPOOL_RETURN_IF_NOT_OK(cuda::AllocateInto(f * 3 * slots_, &state->index));
  devices_.push_back(std::move(state));
  dispatch_.resize(devices_.size());
  return absl::OkStatus();
}

absl::Status CudaExpertBackend::InitFromDevice(const DeviceResidentExperts& experts) {
  n_embd_ = experts.n_embd;
  slots_ = std::max<int64_t>(1, options_.max_rows) * std::max(1, experts.max_pairs_per_row);
  int64_t n_ff = 0;
  experts_.assign(experts.layers.size(), {});
  for (size_t l = 0; l < experts.layers.size(); ++l) {
    for (const DeviceExpert& e : experts.layers[l]) {
      PlacedExpert placed;
      if (e.gate.data != nullptr) {
        for (const cuda::MatrixRef* m : {&e.gate, &e.up, &e.down}) {
          if (!cuda::QuantKernelSupports(m->type)) {
            return absl::UnimplementedError(
                absl::StrCat("no CUDA kernel for weight type ", static_cast<uint32_t>(m->type)));
          }
        }
        if (e.gate.cols != n_embd_ || e.down.rows != n_embd_ || e.down.cols != e.gate.rows) {
          return absl::InvalidArgumentError(
              absl::StrCat("expert ", experts_[l].size(), " of layer ", l, " has the wrong shape"));
        }
        placed = PlacedExpert{0, e.gate, e.up, e.down};
        n_ff = std::max(n_ff, e.gate.rows);
      }
      experts_[l].push_back(placed);
    }
  }
  return AddDevice(experts.device, 0, n_ff);
}

absl::Status CudaExpertBackend::InitFromModel(const Model* model) {
  const ModelConfig& c = model->config();
  const int64_t k_used = std::max<int64_t>(1, c.n_expert_used);
  n_embd_ = c.n_embd;
  slots_ = std::max<int64_t>(1, options_.max_rows) * k_used;

  // Which experts, their sizes, and whether kernels exist for them.
  struct Item {
    int layer, expert;
    uint64_t bytes;
  };
  std::vector<Item> items;
  uint64_t total_bytes = 0;
  int64_t n_ff = 0;
  experts_.assign(static_cast<size_t>(c.n_layer), {});
  for (int64_t l = 0; l < c.n_layer; ++l) {
    const LayerWeights& L = model->layer(l);
    experts_[static_cast<size_t>(l)].resize(L.experts.size());
    for (size_t e = 0; e < L.experts.size(); ++e) {
      const ExpertWeights& w = L.experts[e];
      if (!w.present()) continue;
      for (const WeightMatrix* m : {&w.gate, &w.up, &w.down}) {
        if (!cuda::QuantKernelSupports(m->type)) {
          return absl::UnimplementedError(
              absl::StrCat("no CUDA kernel for ", m->name == nullptr ? "?" : m->name, " (type ",
                           static_cast<uint32_t>(m->type), ", ", m->cols, " columns)"));
        }
      }
      n_ff = std::max(n_ff, w.gate.rows);
      const uint64_t bytes =
          AlignUp(w.gate.SizeBytes()) + AlignUp(w.up.SizeBytes()) + AlignUp(w.down.SizeBytes());
      items.push_back({static_cast<int>(l), static_cast<int>(e), bytes});
      total_bytes += bytes;
    }
  }

  // Contiguous runs of about equal bytes per device.
  const size_t n_dev = options_.devices.size();
  std::vector<int> owner(items.size());
  std::vector<uint64_t> dev_bytes(n_dev, 0);
  uint64_t before = 0;
  for (size_t i = 0; i < items.size(); ++i) {
    // The device whose share contains the middle of this expert's bytes.
    const uint64_t mid = before + items[i].bytes / 2;
    const size_t dev =
        std::min(n_dev - 1, static_cast<size_t>(mid * n_dev / std::max<uint64_t>(1, total_bytes)));
    owner[i] = static_cast<int>(dev);
    dev_bytes[dev] += items[i].bytes;
    before += items[i].bytes;
  }

  // Per device: check free memory, then allocate weights and buffers; all before any upload.
  for (size_t i = 0; i < n_dev; ++i) {
    MOEPOOL_RETURN_IF_NOT_OK(AddDevice(options_.devices[i], dev_bytes[i], n_ff));
  }

  // Upload, by expert.
  std::vector<size_t> offset(n_dev, 0);
  uint64_t uploaded = 0;
  for (size_t i = 0; i < items.size(); ++i) {
    DeviceState& dev = *devices_[static_cast<size_t>(owner[i])];
    MOEPOOL_CUDA_RETURN_IF_ERROR(cudaSetDevice(dev.ordinal));
    const ExpertWeights& w = model->layer(items[i].layer).experts[items[i].expert];
    PlacedExpert& placed = experts_[items[i].layer][items[i].expert];
    placed.device = owner[i];
    MatrixRef* dst[3] = {&placed.gate, &placed.up, &placed.down};
    const WeightMatrix* src[3] = {&w.gate, &w.up, &w.down};
    for (int j = 0; j < 3; ++j) {
      uint8_t* p = Ptr<uint8_t>(dev.weights) + offset[owner[i]];
      MOEPOOL_CUDA_RETURN_IF_ERROR(
          cudaMemcpy(p, src[j]->data, src[j]->SizeBytes(), cudaMemcpyHostToDevice));
      *dst[j] = MatrixRef{src[j]->type, p, src[j]->row_bytes, src[j]->rows, src[j]->cols};
      offset[owner[i]] += AlignUp(src[j]->SizeBytes());
    }
    uploaded += items[i].bytes;
    if (options_.show_progress) {
      ShowProgress(static_cast<int64_t>(i + 1), static_cast<int64_t>(items.size()), uploaded,
                   total_bytes);
    }
  }
  return absl::OkStatus();
}

absl::Status CudaExpertBackend::Compute(const ExpertRoutes& routes, float* out) {
  if (routes.layer < 0 || routes.layer >= static_cast<int64_t>(experts_.size())) {
    return absl::InvalidArgumentError(absl::StrCat("layer ", routes.layer, " out of range"));
  }
  if (routes.n_embd != n_embd_) {
    return absl::InvalidArgumentError(
        absl::StrCat("row width ", routes.n_embd, " != model embedding length ", n_embd_));
  }
  if (routes.n_rows < 0 || routes.k < 0) {
    return absl::InvalidArgumentError("negative row or pair count");
  }
  const std::vector<PlacedExpert>& held = experts_[static_cast<size_t>(routes.layer)];
  for (int64_t i = 0; i < routes.n_rows * routes.k; ++i) {
    const int32_t e = routes.expert[i];
    if (e < 0) continue;
    if (e >= static_cast<int32_t>(held.size()) || held[static_cast<size_t>(e)].device < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("expert ", e, " of layer ", routes.layer, " is not held here"));
    }
  }
  if (routes.k == 0) {
    std::fill(out, out + routes.n_rows * routes.n_embd, 0.0f);
    return absl::OkStatus();
  }
  const int64_t chunk = std::max<int64_t>(1, std::min(options_.max_rows, slots_ / routes.k));
  for (int64_t r0 = 0; r0 < routes.n_rows; r0 += chunk) {
    const int64_t n = std::min(chunk, routes.n_rows - r0);
    MOEPOOL_RETURN_IF_NOT_OK(ComputeChunk(routes, r0, n, out + r0 * routes.n_embd));
  }
  return absl::OkStatus();
}

absl::Status CudaExpertBackend::ComputeChunk(const ExpertRoutes& routes, int64_t r0, int64_t n,
                                             float* out) {
  const int k = routes.k;
  const int64_t d = routes.n_embd;
  const std::vector<PlacedExpert>& held = experts_[static_cast<size_t>(routes.layer)];
  const int32_t* ex = routes.expert + r0 * k;
  const float* wt = routes.weight + r0 * k;
  device_of_.assign(held.size(), -1);
  for (size_t e = 0; e < held.size(); ++e) device_of_[e] = held[e].device;
  PlanExpertDispatch(ex, wt, n, k, device_of_, &dispatch_);
  std::vector<bool> used(devices_.size(), false);
  for (size_t di = 0; di < devices_.size(); ++di) {
    const DeviceDispatch& plan = dispatch_[di];
    if (plan.groups.empty()) continue;
    const int64_t m = plan.m();
    used[di] = true;
    DeviceState& dev = *devices_[di];
    const cudaStream_t s = dev.stream;
    MOEPOOL_CUDA_RETURN_IF_ERROR(cudaSetDevice(dev.ordinal));
    const size_t f = sizeof(float);
    MOEPOOL_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(dev.x.data(), routes.x + r0 * d, f * n * d, cudaMemcpyHostToDevice, s));
    MOEPOOL_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dev.index.data(), plan.packed.data(), f * 3 * m,
                                                 cudaMemcpyHostToDevice, s));
    MOEPOOL_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(dev.prod.data(), 0, f * n * k * d, s));
    const int32_t* d_rows = Ptr<int32_t>(dev.index);
    const int32_t* d_slots = d_rows + m;
    const float* d_weights = reinterpret_cast<const float*>(d_slots + m);
    for (const ExpertGroup& g : plan.groups) {
      const PlacedExpert& expert = held[static_cast<size_t>(g.expert)];
      const unsigned count = static_cast<unsigned>(g.count);
      GatherRowsKernel<<<count, 256, 0, s>>>(Ptr<float>(dev.x), d_rows + g.begin, d,
                                             Ptr<float>(dev.xg));
      MOEPOOL_RETURN_IF_NOT_OK(cuda::LaunchStatus("GatherRowsKernel"));
      MOEPOOL_RETURN_IF_NOT_OK(cuda::LaunchExpertGateUp(
          expert.gate, expert.up, Ptr<float>(dev.xg), g.count, Ptr<float>(dev.h),
          Ptr<float>(dev.h2), options_.batch_invariant, s, options_.tensor_cores));
      const MatrixRef& down = expert.down;
      MOEPOOL_RETURN_IF_NOT_OK(cuda::LaunchMatMulRows(down, Ptr<float>(dev.h), g.count,
                                                      Ptr<float>(dev.y), options_.batch_invariant,
                                                      s, options_.tensor_cores));
      ScaleToSlotsKernel<<<count, 256, 0, s>>>(Ptr<float>(dev.y), d_slots + g.begin,
                                               d_weights + g.begin, d, Ptr<float>(dev.prod));
      MOEPOOL_RETURN_IF_NOT_OK(cuda::LaunchStatus("ScaleToSlotsKernel"));
    }
    // dispatch_ (the copy's source) stays untouched until this device's stream is synchronized.
  }
  const int n_used = static_cast<int>(std::count(used.begin(), used.end(), true));
  if (n_used == 0) {
    std::fill(out, out + n * d, 0.0f);
    return absl::OkStatus();
  }
  if (n_used == 1) {
    DeviceState& dev =
        *devices_[static_cast<size_t>(std::find(used.begin(), used.end(), true) - used.begin())];
    MOEPOOL_CUDA_RETURN_IF_ERROR(cudaSetDevice(dev.ordinal));
    const int64_t total = n * d;
    CombineSlotsKernel<<<static_cast<unsigned>((total + 255) / 256), 256, 0, dev.stream>>>(
        Ptr<float>(dev.prod), n, k, d, Ptr<float>(dev.out));
    MOEPOOL_RETURN_IF_NOT_OK(cuda::LaunchStatus("CombineSlotsKernel"));
    MOEPOOL_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(out, dev.out.data(), sizeof(float) * total,
                                                 cudaMemcpyDeviceToHost, dev.stream));
    MOEPOOL_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(dev.stream));
    return absl::OkStatus();
  }
  // Experts on several devices: bring every device's slots back and add them here, by slot.
  const size_t per_dev = static_cast<size_t>(n * k * d);
  host_slots_.assign(per_dev, 0.0f);
  std::vector<float> part(per_dev);
  for (size_t di = 0; di < devices_.size(); ++di) {
    if (!used[di]) continue;
    DeviceState& dev = *devices_[di];
    MOEPOOL_CUDA_RETURN_IF_ERROR(cudaSetDevice(dev.ordinal));
    MOEPOOL_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(
        part.data(), dev.prod.data(), sizeof(float) * per_dev, cudaMemcpyDeviceToHost, dev.stream));
    MOEPOOL_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(dev.stream));
    // Slots are disjoint between devices; unused ones hold +0.0f.
    for (size_t i = 0; i < per_dev; ++i) host_slots_[i] += part[i];
  }
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t c = 0; c < d; ++c) {
      float sum = 0.0f;
      for (int j = 0; j < k; ++j) sum += host_slots_[static_cast<size_t>((r * k + j) * d + c)];
      out[r * d + c] = sum;
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<ExpertBackend>> CreateCudaExpertBackend(
    const Model* model, const CudaExpertOptions& options) {
  if (model == nullptr) return absl::InvalidArgumentError("no model given");
  if (options.devices.empty()) return absl::InvalidArgumentError("no CUDA device given");
  if (options.max_rows < 1) {
    return absl::InvalidArgumentError(absl::StrCat("max_rows ", options.max_rows, " < 1"));
  }
  absl::StatusOr<std::vector<CudaDeviceInfo>> present = ListCudaDevices();
  if (!present.ok()) return present.status();
  for (size_t i = 0; i < options.devices.size(); ++i) {
    const int ordinal = options.devices[i];
    const bool found = std::any_of(present->begin(), present->end(),
                                   [&](const CudaDeviceInfo& d) { return d.ordinal == ordinal; });
    if (!found) {
      return absl::InvalidArgumentError(
          absl::StrCat("cuda:", ordinal, " does not exist (", present->size(), " CUDA devices)"));
    }
    for (size_t j = 0; j < i; ++j) {
      if (options.devices[j] == ordinal) {
        return absl::InvalidArgumentError(absl::StrCat("cuda:", ordinal, " listed twice"));
      }
    }
  }
  auto backend = std::make_unique<CudaExpertBackend>(options);
  MOEPOOL_RETURN_IF_NOT_OK(backend->InitFromModel(model));
  return std::unique_ptr<ExpertBackend>(std::move(backend));
}

absl::StatusOr<std::unique_ptr<ExpertBackend>> CreateCudaExpertBackendOnDeviceExperts(
    const DeviceResidentExperts& experts, const CudaExpertOptions& options) {
  if (experts.n_embd <= 0 || experts.layers.empty()) {
    return absl::InvalidArgumentError("no experts or no row width given");
  }
  if (options.max_rows < 1) {
    return absl::InvalidArgumentError(absl::StrCat("max_rows ", options.max_rows, " < 1"));
  }
  absl::StatusOr<std::vector<CudaDeviceInfo>> present = ListCudaDevices();
  if (!present.ok()) return present.status();
  auto backend = std::make_unique<CudaExpertBackend>(options);
  MOEPOOL_RETURN_IF_NOT_OK(backend->InitFromDevice(experts));
  return std::unique_ptr<ExpertBackend>(std::move(backend));
}

}  // namespace moepool
