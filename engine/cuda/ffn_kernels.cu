// The expert FFN's input projections: silu(gate x) * up x.
//
// Few rows (decode, small batches): one fused kernel. A warp computes one feature r for up to
// kMaxVecRows activation rows; lane l unpacks part l % kParts of every (32 / kParts)-th block of
// the gate row and of the up row (block_math.h, the same coalesced walk as the mat-vec kernel of
// quant_matmul.cuh), so one pass over x reads both matrices and the two projections never reach
// memory. Many rows: the tiled QuantMatMul for each projection, then an element-wise SiLU.
#include <cuda_runtime.h>

#include <cstdint>

#include "absl/strings/str_cat.h"
#include "engine/cuda/cuda_check.cuh"
#include "engine/cuda/cuda_ops.h"
#include "engine/cuda/expert_kernels.h"
#include "engine/cuda/expert_math.h"

namespace moepool::cuda {
namespace {

constexpr int kWarpsPerCta = 4;
constexpr int kFusedTileRows = 8;      // activation rows per warp in the fused kernel
constexpr int64_t kFusedMaxRows = 16;  // above this, two tiled mat-muls are faster

template <class M>
__global__ void __launch_bounds__(32 * kWarpsPerCta)
    GateUpKernel(const uint8_t* __restrict__ gate, const uint8_t* __restrict__ up, int64_t n_ff,
                 int64_t blocks_per_row, const float* __restrict__ x, int64_t n_embd, int64_t m,
                 float* __restrict__ h) {
  static_assert(32 % M::kParts == 0, "a warp covers whole blocks");
  constexpr int kBlocksPerStep = 32 / M::kParts;
  const int lane = static_cast<int>(threadIdx.x % 32);
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerCta + threadIdx.x / 32;
  if (row >= n_ff) return;  // whole warps leave together
  const int64_t t0 = static_cast<int64_t>(blockIdx.y) * kFusedTileRows;
  const int nx = static_cast<int>(m - t0 < kFusedTileRows ? m - t0 : kFusedTileRows);
  const int part = lane % M::kParts;
  const size_t row_bytes = static_cast<size_t>(blocks_per_row) * M::kBlockBytes;
  const uint8_t* grow = gate + row * row_bytes;
  const uint8_t* urow = up + row * row_bytes;
  const float* xt = x + t0 * n_embd;
  float ag[kFusedTileRows];
  float au[kFusedTileRows];
#pragma unroll
  for (int t = 0; t < kFusedTileRows; ++t) ag[t] = au[t] = 0.0f;
  for (int64_t b = lane / M::kParts; b < blocks_per_row; b += kBlocksPerStep) {
    float g[M::kPartElems];
    float u[M::kPartElems];
    M::DequantPart(grow + b * M::kBlockBytes, part, g);
    M::DequantPart(urow + b * M::kBlockBytes, part, u);
    const float* xb = xt + b * M::kBlockElems;
#pragma unroll
    for (int t = 0; t < kFusedTileRows; ++t) {
      if (t < nx) {
#pragma unroll
        for (int i = 0; i < M::kPartElems; ++i) {
          const float xv = __ldg(xb + t * n_embd + M::Element(part, i));
          ag[t] = fmaf(g[i], xv, ag[t]);
          au[t] = fmaf(u[i], xv, au[t]);
        }
      }
    }
  }
#pragma unroll
  for (int t = 0; t < kFusedTileRows; ++t) {
    if (t < nx) {
      float sg = ag[t];
      float su = au[t];
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) {
        sg += __shfl_xor_sync(0xffffffffu, sg, offset);
        su += __shfl_xor_sync(0xffffffffu, su, offset);
      }
      if (lane == 0) h[(t0 + t) * n_ff + row] = SiluMul(sg, su);
    }
  }
}

__global__ void SiluMulKernel(float* __restrict__ h, const float* __restrict__ u, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) h[i] = SiluMul(h[i], u[i]);
}

absl::Status CheckMatrix(const MatrixRef& w) {
  if (!QuantKernelSupports(w.type)) {
    return absl::UnimplementedError(
        absl::StrCat("no CUDA kernel for weight type ", static_cast<uint32_t>(w.type)));
  }
  if (w.rows <= 0 || w.cols <= 0 || w.row_bytes != RowBytes(w.type, w.cols)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "matrix of ", w.rows, " x ", w.cols, " elements and ", w.row_bytes, " bytes per row"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status LaunchExpertGateUp(const MatrixRef& gate, const MatrixRef& up, const float* x,
                                int64_t m, float* h, float* h2, void* stream) {
  if (absl::Status s = CheckMatrix(gate); !s.ok()) return s;
  if (absl::Status s = CheckMatrix(up); !s.ok()) return s;
  if (gate.rows != up.rows || gate.cols != up.cols) {
    return absl::InvalidArgumentError("gate and up projections differ in shape");
  }
  if (m < 0 || x == nullptr || h == nullptr) {
    return absl::InvalidArgumentError("gate/up: bad rows or null pointer");
  }
  if (m == 0) return absl::OkStatus();
  const cudaStream_t s = AsStream(stream);
  if (gate.type == up.type && m <= kFusedMaxRows) {
    absl::Status status = absl::OkStatus();
    const bool found = DispatchBlockMath(gate.type, [&](auto tag) {
      using M = typename decltype(tag)::type;
      if (gate.cols % M::kBlockElems != 0) {
        status.Update(absl::InvalidArgumentError("row length is not a multiple of the block size"));
        return;
      }
      const dim3 grid(static_cast<unsigned>((gate.rows + kWarpsPerCta - 1) / kWarpsPerCta),
                      static_cast<unsigned>((m + kFusedTileRows - 1) / kFusedTileRows));
      GateUpKernel<M><<<grid, 32 * kWarpsPerCta, 0, s>>>(
          static_cast<const uint8_t*>(gate.data), static_cast<const uint8_t*>(up.data), gate.rows,
          gate.cols / M::kBlockElems, x, gate.cols, m, h);
      status.Update(LaunchStatus("GateUpKernel"));
    });
    if (!found) return absl::UnimplementedError("no block maths for the gate/up weight type");
    return status;
  }
  if (h2 == nullptr) return absl::InvalidArgumentError("gate/up over many rows needs scratch h2");
  if (absl::Status st = QuantMatMul(gate.type, gate.data, gate.rows, gate.cols, x, h, m, stream);
      !st.ok()) {
    return st;
  }
  if (absl::Status st = QuantMatMul(up.type, up.data, up.rows, up.cols, x, h2, m, stream);
      !st.ok()) {
    return st;
  }
  const int64_t n = m * gate.rows;
  SiluMulKernel<<<static_cast<unsigned>((n + 255) / 256), 256, 0, s>>>(h, h2, n);
  return LaunchStatus("SiluMulKernel");
}

}  // namespace moepool::cuda
