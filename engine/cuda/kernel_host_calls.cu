// Host-pointer forms of the kernels (expert_kernels.h): copy in, run, synchronize, copy out.
// For tests and benchmarks; every call allocates its own device memory.
#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "engine/cuda/cuda_check.cuh"
#include "engine/cuda/expert_kernels.h"

namespace moepool::cuda {
namespace {

absl::Status UploadMatrix(const MatrixRef& host, DeviceMem* mem, MatrixRef* dev) {
  if (absl::Status s = mem->Upload(host.data, host.row_bytes * static_cast<size_t>(host.rows));
      !s.ok()) {
    return s;
  }
  *dev = host;
  dev->data = mem->get();
  return absl::OkStatus();
}

absl::Status Download(const DeviceMem& mem, void* host, size_t bytes) {
  MOEPOOL_CUDA_RETURN_IF_ERROR(cudaDeviceSynchronize());
  MOEPOOL_CUDA_RETURN_IF_ERROR(cudaMemcpy(host, mem.get(), bytes, cudaMemcpyDeviceToHost));
  return absl::OkStatus();
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
  DeviceMem g, u, dn, dx, dh, dh2, dy;
  MatrixRef gd, ud, dd;
  MOEPOOL_RETURN_IF_NOT_OK(UploadMatrix(gate, &g, &gd));
  MOEPOOL_RETURN_IF_NOT_OK(UploadMatrix(up, &u, &ud));
  MOEPOOL_RETURN_IF_NOT_OK(UploadMatrix(down, &dn, &dd));
  MOEPOOL_RETURN_IF_NOT_OK(dx.Upload(x, sizeof(float) * static_cast<size_t>(m * gate.cols)));
  MOEPOOL_RETURN_IF_NOT_OK(dh.Allocate(sizeof(float) * static_cast<size_t>(m * gate.rows)));
  MOEPOOL_RETURN_IF_NOT_OK(dh2.Allocate(sizeof(float) * static_cast<size_t>(m * gate.rows)));
  MOEPOOL_RETURN_IF_NOT_OK(dy.Allocate(sizeof(float) * static_cast<size_t>(m * down.rows)));
  MOEPOOL_RETURN_IF_NOT_OK(
      LaunchExpertGateUp(gd, ud, dx.get<float>(), m, dh.get<float>(), dh2.get<float>(), nullptr));
  MOEPOOL_RETURN_IF_NOT_OK(LaunchQuantMatMul(dd, dh.get<float>(), m, dy.get<float>(), nullptr));
  return Download(dy, out, dy.bytes());
}

absl::Status RunRmsNormOnDevice(int device, const float* x, const float* w, int64_t n, int64_t d,
                                float eps, float* y) {
  MOEPOOL_CUDA_RETURN_IF_ERROR(cudaSetDevice(device));
  DeviceMem dx, dw, dy;
  const size_t bytes = sizeof(float) * static_cast<size_t>(n * d);
  MOEPOOL_RETURN_IF_NOT_OK(dx.Upload(x, bytes));
  MOEPOOL_RETURN_IF_NOT_OK(dw.Upload(w, sizeof(float) * static_cast<size_t>(d)));
  MOEPOOL_RETURN_IF_NOT_OK(dy.Allocate(bytes));
  MOEPOOL_RETURN_IF_NOT_OK(
      LaunchRmsNorm(dx.get<float>(), dw.get<float>(), n, d, eps, dy.get<float>(), nullptr));
  return Download(dy, y, bytes);
}

absl::Status RunRopeOnDevice(int device, float* x, int64_t n_heads, int64_t head_dim, int64_t n_rot,
                             int64_t pos, float base) {
  MOEPOOL_CUDA_RETURN_IF_ERROR(cudaSetDevice(device));
  DeviceMem dx;
  const size_t bytes = sizeof(float) * static_cast<size_t>(n_heads * head_dim);
  MOEPOOL_RETURN_IF_NOT_OK(dx.Upload(x, bytes));
  MOEPOOL_RETURN_IF_NOT_OK(
      LaunchRope(dx.get<float>(), n_heads, head_dim, n_rot, pos, base, nullptr));
  return Download(dx, x, bytes);
}

absl::Status RunRouteTopKOnDevice(int device, const float* logits, int64_t n_rows, int n_expert,
                                  int k, int32_t* expert, float* weight) {
  MOEPOOL_CUDA_RETURN_IF_ERROR(cudaSetDevice(device));
  DeviceMem dl, de, dw;
  MOEPOOL_RETURN_IF_NOT_OK(
      dl.Upload(logits, sizeof(float) * static_cast<size_t>(n_rows * n_expert)));
  const size_t pairs = static_cast<size_t>(n_rows * k);
  MOEPOOL_RETURN_IF_NOT_OK(de.Allocate(sizeof(int32_t) * pairs));
  MOEPOOL_RETURN_IF_NOT_OK(dw.Allocate(sizeof(float) * pairs));
  MOEPOOL_RETURN_IF_NOT_OK(LaunchRouteTopK(dl.get<float>(), n_rows, n_expert, k, de.get<int32_t>(),
                                           dw.get<float>(), nullptr));
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
  DeviceMem dq, dk, dv, db, dout, dscratch;
  const size_t cache = kv.block_stride * static_cast<size_t>(n_phys_blocks) * sizeof(uint16_t);
  const int64_t n_logical = (kv.n_kv + kv.block_size - 1) / kv.block_size;
  const size_t qbytes = sizeof(float) * static_cast<size_t>(n_head * head_dim);
  MOEPOOL_RETURN_IF_NOT_OK(dq.Upload(q, qbytes));
  MOEPOOL_RETURN_IF_NOT_OK(dk.Upload(kv.k, cache));
  MOEPOOL_RETURN_IF_NOT_OK(dv.Upload(kv.v, cache));
  MOEPOOL_RETURN_IF_NOT_OK(db.Upload(kv.blocks, sizeof(int32_t) * static_cast<size_t>(n_logical)));
  MOEPOOL_RETURN_IF_NOT_OK(dout.Allocate(qbytes));
  MOEPOOL_RETURN_IF_NOT_OK(
      dscratch.Allocate(sizeof(float) * static_cast<size_t>(n_head * kv.n_kv)));
  KvDeviceView dkv = kv;
  dkv.k = dk.get<uint16_t>();
  dkv.v = dv.get<uint16_t>();
  dkv.blocks = db.get<int32_t>();
  MOEPOOL_RETURN_IF_NOT_OK(LaunchAttentionDecode(dq.get<float>(), n_head, n_head_kv, head_dim, dkv,
                                                 scale, dout.get<float>(), dscratch.get<float>(),
                                                 nullptr));
  return Download(dout, out, qbytes);
}

}  // namespace moepool::cuda
