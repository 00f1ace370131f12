// y = x W^T for a (possibly quantized) weight matrix, the hot loop of the CPU engine.
//
// Each output element y[t][r] is one VecDot of weight row r with activation row t (converted to
// the weight type's vec_dot_type), so its value does not depend on how many rows share the
// batch, on their order, or on the number of threads: the batch-invariance the serving and
// distributed paths rely on. Tiling only changes the order in which elements are computed: the
// multi-row kernels and, on AVX512-VNNI, the 16-row matmul tiles used from 8 activation rows up
// return each element's single-row bits (engine/quant/block_numerics.h).
#ifndef MOEPOOL_ENGINE_MATMUL_H_
#define MOEPOOL_ENGINE_MATMUL_H_

#include <cstdint>
#include <vector>

#include "engine/model.h"
#include "engine/thread_pool.h"

namespace moepool {

// A run of `n` converted activation rows, `row_bytes` apart from `data`. Borrowed.
struct RowsView {
  TensorType type = TensorType::kF32;
  const uint8_t* data = nullptr;
  size_t row_bytes = 0;
  int64_t n = 0;
  // Q8_0 rows: each block's Q8_0BlockSum, [n x blocks per row] (ConvertRows; the Q8_0 matmul
  // tiles read them), or null.
  const Q8_0BlockSum* block_sums = nullptr;
  const void* Row(int64_t t) const { return data + static_cast<size_t>(t) * row_bytes; }
};

// Activation rows converted to a vec_dot_type, reusable across several weight matrices of the
// same input width and type (e.g. wq, wk, wv; or an expert's gate and up).
struct ConvertedRows {
  TensorType type = TensorType::kF32;
  int64_t cols = 0;
  int64_t n = 0;
  size_t row_bytes = 0;
  std::vector<uint8_t> bytes;  // [n x row_bytes]; unused when type == kF32 (see f32)
  const float* f32 = nullptr;  // F32 rows point at the caller's data
  // Q8_0 rows for a weight type with tiles: each block's Q8_0BlockSum, [n x cols / 32].
  std::vector<Q8_0BlockSum> block_sums;

  const void* Row(int64_t t) const {
    return type == TensorType::kF32 ? static_cast<const void*>(f32 + t * cols)
                                    : static_cast<const void*>(bytes.data() + t * row_bytes);
  }
  // Rows [t0, t0 + count) as a view; valid while this object and (F32) the caller's data live.
  RowsView Slice(int64_t t0, int64_t count) const;
};

inline RowsView ConvertedRows::Slice(int64_t t0, int64_t count) const {
  const Q8_0BlockSum* sums =
      block_sums.empty() ? nullptr : block_sums.data() + t0 * (cols / kQK8_0);
  return {type, static_cast<const uint8_t*>(Row(t0)), row_bytes, count, sums};
}

// Converts x [n x cols] for dot products with weights of type `weight_type`. `x` must outlive
// `out` when the target type is F32.
void ConvertRows(TensorType weight_type, const float* x, int64_t n, int64_t cols,
                 ConvertedRows* out, ThreadPool* pool);

// y [n x w.rows] = x [n x w.cols] W^T, with x already converted for w's type.
void MatMulConverted(const WeightMatrix& w, const ConvertedRows& x, float* y, ThreadPool* pool);

// y[t * y_stride + r] = dot(weight row r, x row t) for r in [r0, r1) and every row t of x: one
// task's share of a product. Single-threaded; the building block of fused parallel passes.
void MatMulRowRange(const WeightMatrix& w, const RowsView& x, int64_t r0, int64_t r1, float* y,
                    int64_t y_stride);

// Weight rows per parallel task for a matrix of `rows` rows on a pool of `threads`, against
// `activation_rows` rows: enough tasks to balance the threads, few enough to amortise the
// scheduling (and, for the tiles, their first weight rows' trip from memory).
int64_t MatMulRowsPerTask(int64_t rows, int threads, int64_t activation_rows = 1);

// One product of MatMulMany: y [x.n x w.rows] = x W^T.
struct MatMulJob {
  const WeightMatrix* w;
  RowsView x;
  float* y;
};

// Runs every job in a single ParallelFor (one synchronisation for all of them, e.g. q, k and v),
// with the same per-element results as MatMulConverted.
void MatMulMany(const std::vector<MatMulJob>& jobs, ThreadPool* pool);

// Convenience: convert + multiply.
void MatMul(const WeightMatrix& w, const float* x, int64_t n, float* y, ThreadPool* pool);

// Dequantizes row `r` of w into out [w.cols].
void DequantizeRow(const WeightMatrix& w, int64_t r, float* out);

}  // namespace moepool

#endif  // MOEPOOL_ENGINE_MATMUL_H_
