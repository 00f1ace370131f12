// Expert FFN kernels: quantized weight rows times f32 activation rows.
//
// One warp computes one output feature r for R activation rows: its lanes take the row's 32-
// element chunks in turn, dequantize each chunk once into registers (DequantChunk32) and dot it
// with the R activation rows, then the warp sums its lanes. R = 1 is the decode mat-vec; R = 8
// tiles a batch (grid.y runs over the tiles), reading each weight chunk once per tile. The fused
// gate/up kernel reads the gate and up rows of the same feature in one pass over x and writes
// silu(gate x) * up x, so the intermediate projections never reach memory.
#include <cuda_runtime.h>

#include <cstdint>

#include "absl/strings/str_cat.h"
#include "engine/cuda/cuda_check.cuh"
#include "engine/cuda/expert_kernels.h"
#include "engine/cuda/expert_math.h"

namespace moepool::cuda {
namespace {

constexpr int kWarpsPerBlock = 4;
constexpr int kTileRows = 8;

template <TensorType T, int R, bool kFused>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    ChunkMatMulKernel(const uint8_t* __restrict__ w0, const uint8_t* __restrict__ w1,
                      size_t row_bytes, int64_t n_out, int64_t n_in, const float* __restrict__ x,
                      int64_t m, float* __restrict__ y) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (r >= n_out) return;
  const int64_t t0 = static_cast<int64_t>(blockIdx.y) * R;
  const int nr = static_cast<int>(m - t0 < R ? m - t0 : R);
  float acc0[R];
  float acc1[R];
#pragma unroll
  for (int i = 0; i < R; ++i) acc0[i] = acc1[i] = 0.0f;
  const uint8_t* row0 = w0 + static_cast<size_t>(r) * row_bytes;
  const uint8_t* row1 = kFused ? w1 + static_cast<size_t>(r) * row_bytes : nullptr;
  const int64_t n_chunks = n_in / kChunk;
  for (int64_t c = lane; c < n_chunks; c += 32) {
    float wa[kChunk];
    float wb[kFused ? kChunk : 1];
    DequantChunk32<T>(row0, c, wa);
    if constexpr (kFused) DequantChunk32<T>(row1, c, wb);
#pragma unroll
    for (int i = 0; i < R; ++i) {
      if (i < nr) {
        const float4* xp = reinterpret_cast<const float4*>(x + (t0 + i) * n_in + c * kChunk);
#pragma unroll
        for (int q = 0; q < kChunk / 4; ++q) {
          const float4 v = __ldg(xp + q);
          acc0[i] +=
              wa[4 * q] * v.x + wa[4 * q + 1] * v.y + wa[4 * q + 2] * v.z + wa[4 * q + 3] * v.w;
          if constexpr (kFused) {
            acc1[i] +=
                wb[4 * q] * v.x + wb[4 * q + 1] * v.y + wb[4 * q + 2] * v.z + wb[4 * q + 3] * v.w;
          }
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < R; ++i) {
#pragma unroll
    for (int off = 16; off > 0; off /= 2) {
      acc0[i] += __shfl_xor_sync(0xffffffffu, acc0[i], off);
      if constexpr (kFused) acc1[i] += __shfl_xor_sync(0xffffffffu, acc1[i], off);
    }
  }
  if (lane == 0) {
    for (int i = 0; i < nr; ++i) {
      y[(t0 + i) * n_out + r] = kFused ? SiluMul(acc0[i], acc1[i]) : acc0[i];
    }
  }
}

__global__ void SiluMulKernel(float* __restrict__ h, const float* __restrict__ u, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) h[i] = SiluMul(h[i], u[i]);
}

template <int R, bool kFused>
absl::Status LaunchChunk(TensorType type, const uint8_t* w0, const uint8_t* w1, size_t row_bytes,
                         int64_t n_out, int64_t n_in, const float* x, int64_t m, float* y,
                         cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((n_out + kWarpsPerBlock - 1) / kWarpsPerBlock),
                  static_cast<unsigned>((m + R - 1) / R));
  const dim3 block(kWarpsPerBlock * 32);
  switch (type) {
#define MOEPOOL_CHUNK_CASE(NAME)                                               \
  case TensorType::NAME:                                                       \
    ChunkMatMulKernel<TensorType::NAME, R, kFused>                             \
        <<<grid, block, 0, stream>>>(w0, w1, row_bytes, n_out, n_in, x, m, y); \
    break;
    MOEPOOL_CHUNK_CASE(kF32)
    MOEPOOL_CHUNK_CASE(kF16)
    MOEPOOL_CHUNK_CASE(kBF16)
    MOEPOOL_CHUNK_CASE(kQ4_0)
    MOEPOOL_CHUNK_CASE(kQ4_1)
    MOEPOOL_CHUNK_CASE(kQ5_0)
    MOEPOOL_CHUNK_CASE(kQ5_1)
    MOEPOOL_CHUNK_CASE(kQ8_0)
    MOEPOOL_CHUNK_CASE(kQ2_K)
    MOEPOOL_CHUNK_CASE(kQ3_K)
    MOEPOOL_CHUNK_CASE(kQ4_K)
    MOEPOOL_CHUNK_CASE(kQ5_K)
    MOEPOOL_CHUNK_CASE(kQ6_K)
#undef MOEPOOL_CHUNK_CASE
    default:
      return absl::UnimplementedError(
          absl::StrCat("no CUDA kernel for weight type ", static_cast<uint32_t>(type)));
  }
  return LaunchStatus("ChunkMatMulKernel");
}

template <bool kFused>
absl::Status LaunchRows(TensorType type, const uint8_t* w0, const uint8_t* w1, size_t row_bytes,
                        int64_t n_out, int64_t n_in, const float* x, int64_t m, float* y,
                        cudaStream_t stream) {
  if (m == 1) return LaunchChunk<1, kFused>(type, w0, w1, row_bytes, n_out, n_in, x, m, y, stream);
  return LaunchChunk<kTileRows, kFused>(type, w0, w1, row_bytes, n_out, n_in, x, m, y, stream);
}

absl::Status CheckMatrix(const MatrixRef& w, const float* x, int64_t m) {
  if (!ChunkTypeSupported(w.type)) {
    return absl::UnimplementedError(
        absl::StrCat("no CUDA kernel for weight type ", static_cast<uint32_t>(w.type)));
  }
  if (w.cols % kChunk != 0 || w.rows <= 0 || m < 0) {
    return absl::InvalidArgumentError(absl::StrCat("matrix of ", w.rows, " x ", w.cols,
                                                   " elements: columns must be a multiple of 32"));
  }
  if (reinterpret_cast<uintptr_t>(x) % 16 != 0) {
    return absl::InvalidArgumentError("activation rows must be 16-byte aligned");
  }
  if (m > 65535LL * kTileRows) {
    return absl::InvalidArgumentError(absl::StrCat(m, " rows exceed one launch"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status LaunchExpertGateUp(const MatrixRef& gate, const MatrixRef& up, const float* x,
                                int64_t m, float* h, float* h2, void* stream) {
  if (absl::Status s = CheckMatrix(gate, x, m); !s.ok()) return s;
  if (absl::Status s = CheckMatrix(up, x, m); !s.ok()) return s;
  if (gate.rows != up.rows || gate.cols != up.cols) {
    return absl::InvalidArgumentError("gate and up projections differ in shape");
  }
  if (m == 0) return absl::OkStatus();
  const cudaStream_t s = AsStream(stream);
  const auto* g = static_cast<const uint8_t*>(gate.data);
  const auto* u = static_cast<const uint8_t*>(up.data);
  if (gate.type == up.type && gate.row_bytes == up.row_bytes) {
    return LaunchRows<true>(gate.type, g, u, gate.row_bytes, gate.rows, gate.cols, x, m, h, s);
  }
  if (h2 == nullptr) {
    return absl::InvalidArgumentError("gate and up differ in type: scratch rows required");
  }
  if (absl::Status st = LaunchRows<false>(gate.type, g, nullptr, gate.row_bytes, gate.rows,
                                          gate.cols, x, m, h, s);
      !st.ok()) {
    return st;
  }
  if (absl::Status st =
          LaunchRows<false>(up.type, u, nullptr, up.row_bytes, up.rows, up.cols, x, m, h2, s);
      !st.ok()) {
    return st;
  }
  const int64_t n = m * gate.rows;
  SiluMulKernel<<<static_cast<unsigned>((n + 255) / 256), 256, 0, s>>>(h, h2, n);
  return LaunchStatus("SiluMulKernel");
}

absl::Status LaunchQuantMatMul(const MatrixRef& w, const float* x, int64_t m, float* y,
                               void* stream) {
  if (absl::Status s = CheckMatrix(w, x, m); !s.ok()) return s;
  if (m == 0) return absl::OkStatus();
  return LaunchRows<false>(w.type, static_cast<const uint8_t*>(w.data), nullptr, w.row_bytes,
                           w.rows, w.cols, x, m, y, AsStream(stream));
}

}  // namespace moepool::cuda
