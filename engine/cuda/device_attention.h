// The AttentionBackend that runs the coordinator's attention, router and output head on a device
// (engine/attention_backend.h), written against DeviceOps so that the same code runs on a CUDA
// GPU and, in tests, on the scalar host reference.
//
// Creation uploads the non-expert weights the Transformer needs per layer (attention norm, Q, K,
// V and output projections, FFN norm, router) and the output norm and head, once. Each pass
// keeps a device copy of every KvBlockPool its rows use (attached to the pool as its
// KvPoolMirror, same block ids, f16), so paging and the prefix cache work unchanged; the host
// pool's own storage is then never written. Per layer, x goes up, and x, h and the routing come
// back (the experts may be anywhere); all rows of a pass run in batched launches.
//
// Results agree with the CPU forward pass within rounding: the kernels use f32 activations where
// the CPU quantizes them to q8 for quantized weights (docs/gpu.md gives the measured gaps). Each
// row's result is independent of the other rows of its pass (mat-vec kernels in groups of rows),
// so serving stays deterministic, and a prefix-cached block gives the bits its sequence would
// have computed.
#ifndef MOEPOOL_ENGINE_CUDA_DEVICE_ATTENTION_H_
#define MOEPOOL_ENGINE_CUDA_DEVICE_ATTENTION_H_

#include <cstdint>
#include <memory>

#include "absl/status/statusor.h"
#include "engine/attention_backend.h"
#include "engine/cuda/device_ops.h"
#include "engine/model.h"

namespace moepool {

struct DeviceAttentionOptions {
  // Upper bound of the attention scratch (floats: per row, head and split of kAttnSplit
  // positions, head_dim + 2); rows are attended in chunks that fit.
  int64_t max_scratch_floats = int64_t{64} << 20;
  bool show_progress = false;  // one line on stderr with the uploaded bytes
};

// `model` is borrowed (must outlive the backend) and must bind the non-expert weights; `ops` is
// owned. Errors: RESOURCE_EXHAUSTED when the weights do not fit, UNIMPLEMENTED for a weight type
// without a kernel, INVALID_ARGUMENT for a model the kernels cannot run (head size over 256, more
// query heads per KV head than the attention kernel holds, more than 64 experts), the ops' errors
// otherwise.
absl::StatusOr<std::unique_ptr<AttentionBackend>> CreateDeviceAttentionBackend(
    const Model* model, std::unique_ptr<cuda::DeviceOps> ops,
    const DeviceAttentionOptions& options = {});

// The backend on CUDA device `device` (CreateCudaDeviceOps). FAILED_PRECONDITION in a build
// without CUDA; otherwise as above.
absl::StatusOr<std::unique_ptr<AttentionBackend>> CreateCudaAttentionBackend(
    const Model* model, int device, const DeviceAttentionOptions& options = {});

}  // namespace moepool

#endif  // MOEPOOL_ENGINE_CUDA_DEVICE_ATTENTION_H_
