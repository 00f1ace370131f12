// Host-pointer forms of the kernels (expert_kernels.h): copy in, run, synchronize, copy out.
// For tests and benchmarks; every call allocates its own device memory.
#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "engine/cuda/cuda_check.cuh"
#include "engine/cuda/expert_kernels.h"

namespace moepool::cuda {
namespace {

absl::Status UploadMatrix(const MatrixRef& host, DeviceBuffer* mem, MatrixRef* dev) {
  if (absl::Status s = UploadInto(host.data, host.row_bytes * static_cast<size_t>(host.rows), mem);
      !s.ok()) {
    return s;
  }
  *dev = host;
  dev->data = mem->data();
  return absl::OkStatus();
}

absl::Status Download(const DeviceBuffer& mem, void* host, size_t bytes) {
  MOEPOOL_CUDA_RETURN_IF_ERROR(cudaDeviceSynchronize());
  return mem.Download(host, bytes);
}

#define MOEPOOL_RETURN_IF_NOT_OK(expr)   \
  do {                                   \
    const absl::Status status_ = (expr); \
    if (!status_.ok()) return status_;   \
  } while (false)

}  // namespace

absl::Status RunExpertFfnOnDevice(int device, const MatrixRef& gate, const MatrixRef& up,
                                  const MatrixRef& down, const float* x, int64_t m, float* out) {
  MOEPOOL_CUDA_RETURN_IF_ERROR(cudaSetDevice(device));
  DeviceBuffer g, u, dn, dx, dh, dh2, dy;
  MatrixRef gd, ud, dd;
  MOEPOOL_RETURN_IF_NOT_OK(UploadMatrix(gate, &g, &gd));
  MOEPOOL_RETURN_IF_NOT_OK(UploadMatrix(up, &u, &ud));
  MOEPOOL_RETURN_IF_NOT_OK(UploadMatrix(down, &dn, &dd));
  MOEPOOL_RETURN_IF_NOT_OK(UploadInto(x, sizeof(float) * static_cast<size_t>(m * gate.cols), &dx));
  MOEPOOL_RETURN_IF_NOT_OK(AllocateInto(sizeof(float) * static_cast<size_t>(m * gate.rows), &dh));
  MOEPOOL_RETURN_IF_NOT_OK(AllocateInto(sizeof(float) * static_cast<size_t>(m * gate.rows), &dh2));
  MOEPOOL_RETURN_IF_NOT_OK(AllocateInto(sizeof(float) * static_cast<size_t>(m * down.rows), &dy));
  MOEPOOL_RETURN_IF_NOT_OK(LaunchExpertGateUp(gd, ud, Ptr<float>(dx), m, Ptr<float>(dh),
                                              Ptr<float>(dh2),
                                              /*batch_invariant=*/false, nullptr));
  MOEPOOL_RETURN_IF_NOT_OK(
      QuantMatMul(dd.type, dd.data, dd.rows, dd.cols, Ptr<float>(dh), Ptr<float>(dy), m, nullptr));
  return Download(dy, out, dy.bytes());
}

absl::Status RunRmsNormOnDevice(int device, const float* x, const float* w, int64_t n, int64_t d,
                                float eps, float* y) {
  MOEPOOL_CUDA_RETURN_IF_ERROR(cudaSetDevice(device));
  DeviceBuffer dx, dw, dy;
  const size_t bytes = sizeof(float) * static_cast<size_t>(n * d);
  MOEPOOL_RETURN_IF_NOT_OK(UploadInto(x, bytes, &dx));
  MOEPOOL_RETURN_IF_NOT_OK(UploadInto(w, sizeof(float) * static_cast<size_t>(d), &dw));
  MOEPOOL_RETURN_IF_NOT_OK(AllocateInto(bytes, &dy));
  MOEPOOL_RETURN_IF_NOT_OK(
      LaunchRmsNorm(Ptr<float>(dx), Ptr<float>(dw), n, d, eps, Ptr<float>(dy), nullptr));
  return Download(dy, y, bytes);
}

absl::Status RunRopeOnDevice(int device, float* x, int64_t n_heads, int64_t head_dim, int64_t n_rot,
                             int64_t pos, float base) {
  MOEPOOL_CUDA_RETURN_IF_ERROR(cudaSetDevice(device));
  DeviceBuffer dx;
  const size_t bytes = sizeof(float) * static_cast<size_t>(n_heads * head_dim);
  MOEPOOL_RETURN_IF_NOT_OK(UploadInto(x, bytes, &dx));
  MOEPOOL_RETURN_IF_NOT_OK(
      LaunchRope(Ptr<float>(dx), n_heads, head_dim, n_rot, pos, base, nullptr));
  return Download(dx, x, bytes);
}

absl::Status RunRouteTopKOnDevice(int device, const float* logits, int64_t n_rows, int n_expert,
                                  int k, int32_t* expert, float* weight) {
  MOEPOOL_CUDA_RETURN_IF_ERROR(cudaSetDevice(device));
  DeviceBuffer dl, de, dw;
  MOEPOOL_RETURN_IF_NOT_OK(
      UploadInto(logits, sizeof(float) * static_cast<size_t>(n_rows * n_expert), &dl));
  const size_t pairs = static_cast<size_t>(n_rows * k);
  MOEPOOL_RETURN_IF_NOT_OK(AllocateInto(sizeof(int32_t) * pairs, &de));
  MOEPOOL_RETURN_IF_NOT_OK(AllocateInto(sizeof(float) * pairs, &dw));
  MOEPOOL_RETURN_IF_NOT_OK(LaunchRouteTopK(Ptr<float>(dl), n_rows, n_expert, k, Ptr<int32_t>(de),
                                           Ptr<float>(dw), nullptr));
  MOEPOOL_RETURN_IF_NOT_OK(Download(de, expert, sizeof(int32_t) * pairs));
  return Download(dw, weight, sizeof(float) * pairs);
}

absl::Status RunAttentionDecodeOnDevice(int device, const float* q, int64_t n_head,
                                        int64_t n_head_kv, int64_t head_dim, const KvDeviceView& kv,
                                        int64_t n_phys_blocks, float scale, float* out) {
  MOEPOOL_CUDA_RETURN_IF_ERROR(cudaSetDevice(device));
  if (kv.block_size <= 0 || kv.n_kv <= 0) {
    return absl::InvalidArgumentError("empty KV cache");
  }
  if (kv.stride != static_cast<size_t>(n_head_kv * head_dim)) {
    return absl::InvalidArgumentError("the KV rows must be n_head_kv * head_dim wide");
  }
  DeviceBuffer dq, dk, dv, db, dout, drow, dtile, dpartial;
  const size_t cache = kv.block_stride * static_cast<size_t>(n_phys_blocks) * sizeof(uint16_t);
  const int64_t n_logical = (kv.n_kv + kv.block_size - 1) / kv.block_size;
  const size_t qbytes = sizeof(float) * static_cast<size_t>(n_head * head_dim);
  MOEPOOL_RETURN_IF_NOT_OK(UploadInto(q, qbytes, &dq));
  MOEPOOL_RETURN_IF_NOT_OK(UploadInto(kv.k, cache, &dk));
  MOEPOOL_RETURN_IF_NOT_OK(UploadInto(kv.v, cache, &dv));
  MOEPOOL_RETURN_IF_NOT_OK(
      UploadInto(kv.blocks, sizeof(int32_t) * static_cast<size_t>(n_logical), &db));
  MOEPOOL_RETURN_IF_NOT_OK(AllocateInto(qbytes, &dout));
  // One row at position n_kv - 1 (layer 0) in one tile, through the batched tiled kernel.
  KvRowRef row;
  row.k = Ptr<uint16_t>(dk);
  row.v = Ptr<uint16_t>(dv);
  row.blocks = Ptr<int32_t>(db);
  row.block_size = kv.block_size;
  row.block_stride = kv.block_stride;
  row.pos = kv.n_kv - 1;
  const AttnTile tile{0, 1};
  const int64_t splits = (kv.n_kv - 1) / kAttnSplit + 1;
  MOEPOOL_RETURN_IF_NOT_OK(UploadInto(&row, sizeof(row), &drow));
  MOEPOOL_RETURN_IF_NOT_OK(UploadInto(&tile, sizeof(tile), &dtile));
  MOEPOOL_RETURN_IF_NOT_OK(AllocateInto(
      sizeof(float) * static_cast<size_t>(n_head * splits * (head_dim + 2)), &dpartial));
  MOEPOOL_RETURN_IF_NOT_OK(LaunchAttentionTiles(
      Ptr<float>(dq), Ptr<KvRowRef>(drow), Ptr<AttnTile>(dtile), 1, 0, 1, 0, n_head, n_head_kv,
      head_dim, scale, splits, Ptr<float>(dpartial), Ptr<float>(dout), nullptr));
  return Download(dout, out, qbytes);
}

}  // namespace moepool::cuda
