// The expert FFN's input projections: silu(gate x) * up x.
//
// Few rows (decode, small batches): one fused kernel. A warp computes one feature r for up to
// kMaxVecRows activation rows; lane l unpacks part l % kParts of every (32 / kParts)-th block of
// the gate row and of the up row (block_math.h, the same coalesced walk as the mat-vec kernel of
// quant_matmul.cuh), so one pass over x reads both matrices and the two projections never reach
// memory. Many rows: the tiled QuantMatMul for each projection, then an element-wise SiLU.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "absl/strings/str_cat.h"
#include "engine/cuda/cuda_check.cuh"
#include "engine/cuda/cuda_ops.h"
#include "engine/cuda/expert_kernels.cuh"
#include "engine/cuda/expert_kernels.h"
#include "engine/cuda/expert_math.h"

namespace moepool::cuda {
namespace {

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

absl::Status LaunchMatMulRows(const MatrixRef& w, const float* x, int64_t m, float* y,
                              bool batch_invariant, void* stream, bool tensor_cores) {
  if (absl::Status s = CheckMatrix(w); !s.ok()) return s;
  if (!batch_invariant && tensor_cores) {
    return QuantMatMulTensorCores(w.type, w.data, w.rows, w.cols, x, w.cols, y, w.rows, m, stream);
  }
  if (!batch_invariant) return QuantMatMul(w.type, w.data, w.rows, w.cols, x, y, m, stream);
  // QuantMatMul runs groups of at most 8 rows with the mat-vec kernel, whose per-row result
  // does not depend on how many rows share the launch (moe_ffn_cuda_test checks it on a GPU).
  constexpr int64_t kGroup = 8;
  for (int64_t t = 0; t < m; t += kGroup) {
    const int64_t n = std::min<int64_t>(kGroup, m - t);
    if (absl::Status s =
            QuantMatMul(w.type, w.data, w.rows, w.cols, x + t * w.cols, y + t * w.rows, n, stream);
        !s.ok()) {
      return s;
    }
  }
  return absl::OkStatus();
}

absl::Status LaunchExpertGateUp(const MatrixRef& gate, const MatrixRef& up, const float* x,
                                int64_t m, float* h, float* h2, bool batch_invariant, void* stream,
                                bool tensor_cores) {
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
  if (gate.type == up.type && (m <= kFusedMaxRows || batch_invariant)) {
    absl::Status status = absl::OkStatus();
    const bool found = DispatchBlockMath(gate.type, [&](auto tag) {
      using M = typename decltype(tag)::type;
      if (gate.cols % M::kBlockElems != 0) {
        status.Update(absl::InvalidArgumentError("row length is not a multiple of the block size"));
        return;
      }
      const unsigned ctas =
          static_cast<unsigned>((gate.rows + kGateUpWarpsPerCta - 1) / kGateUpWarpsPerCta);
      const auto* g = static_cast<const uint8_t*>(gate.data);
      const auto* u = static_cast<const uint8_t*>(up.data);
      const int64_t bpr = gate.cols / M::kBlockElems;
      if (m == 1) {
        GateUpKernel<M, 1>
            <<<ctas, 32 * kGateUpWarpsPerCta, 0, s>>>(g, u, gate.rows, bpr, x, gate.cols, m, h);
      } else {
        const dim3 grid(ctas, static_cast<unsigned>((m + kFusedTileRows - 1) / kFusedTileRows));
        GateUpKernel<M, kFusedTileRows>
            <<<grid, 32 * kGateUpWarpsPerCta, 0, s>>>(g, u, gate.rows, bpr, x, gate.cols, m, h);
      }
      status.Update(LaunchStatus("GateUpKernel"));
    });
    if (!found) return absl::UnimplementedError("no block maths for the gate/up weight type");
    return status;
  }
  if (h2 == nullptr) return absl::InvalidArgumentError("gate/up over many rows needs scratch h2");
  if (absl::Status st = LaunchMatMulRows(gate, x, m, h, batch_invariant, stream, tensor_cores);
      !st.ok()) {
    return st;
  }
  if (absl::Status st = LaunchMatMulRows(up, x, m, h2, batch_invariant, stream, tensor_cores);
      !st.ok()) {
    return st;
  }
  const int64_t n = m * gate.rows;
  SiluMulKernel<<<static_cast<unsigned>((n + 255) / 256), 256, 0, s>>>(h, h2, n);
  return LaunchStatus("SiluMulKernel");
}

}  // namespace moepool::cuda
