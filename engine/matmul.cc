#include "engine/matmul.h"

#include <algorithm>
#include <memory>
#include <new>

#include "engine/quant/fp16.h"
#include "engine/quant/kernels.h"

namespace moepool {
namespace {

// Fewest activation rows for which a tile's repacking of its weight rows pays (the tile kernels,
// kernels.h).
constexpr int64_t kTileMinActivationRows = 8;
constexpr int64_t kTileMaxRowsPerTask = 256;

}  // namespace

void ConvertRows(TensorType weight_type, const float* x, int64_t n, int64_t cols,
                 ConvertedRows* out, ThreadPool* pool) {
  const TypeTraits& wt = GetTypeTraits(weight_type);
  out->type = wt.vec_dot_type;
  out->cols = cols;
  out->n = n;
  if (out->type == TensorType::kF32) {
    out->f32 = x;
    out->row_bytes = static_cast<size_t>(cols) * sizeof(float);
    return;
  }
  const TypeTraits& at = GetTypeTraits(out->type);
  out->row_bytes = RowBytes(out->type, cols);
  out->bytes.resize(out->row_bytes * static_cast<size_t>(n));
  // Block sums for the Q8_0 tiles, computed once here rather than by every task of every matmul
  // (not for fewer rows than the tiles take: decode).
  const bool sums =
      out->type == TensorType::kQ8_0 && wt.tile != nullptr && n >= kTileMinActivationRows;
  const int64_t nb = cols / kQK8_0;
  out->block_sums.resize(sums ? static_cast<size_t>(n * nb) : 0);
  auto convert = [&](int64_t t) {
    uint8_t* row = out->bytes.data() + t * out->row_bytes;
    at.quantize(x + t * cols, row, cols);
    if (!sums) return;
    const auto* blocks = reinterpret_cast<const BlockQ8_0*>(row);
    for (int64_t b = 0; b < nb; ++b) {
      int32_t s = 0;
      for (const int8_t q : blocks[b].qs) s += q;
      out->block_sums[static_cast<size_t>(t * nb + b)] = {-128 * s, Fp16ToFp32(blocks[b].d)};
    }
  };
  if (n >= 4 && pool != nullptr) {
    pool->ParallelFor(n, convert);
  } else {
    for (int64_t t = 0; t < n; ++t) convert(t);
  }
}

int64_t MatMulRowsPerTask(int64_t rows, int threads, int64_t activation_rows) {
  const int64_t per_task = std::max<int64_t>(1, rows / (std::max(threads, 1) * 8));
  // The tiles' first 16 weight rows of a task come cold from memory (each later tile's rows are
  // prefetched while the one before computes): longer tasks for them.
  const int64_t most = activation_rows >= kTileMinActivationRows ? kTileMaxRowsPerTask : 64;
  return std::min<int64_t>(per_task, most);
}

namespace {

// Per-thread scratch for the tiles' repacked weight rows, 64-byte aligned.
void* TileScratch(size_t bytes) {
  struct Buffer {
    std::unique_ptr<uint8_t[]> data;
    size_t size = 0;
  };
  thread_local Buffer buffer;
  if (buffer.size < bytes) {
    buffer.data.reset(new (std::align_val_t(64)) uint8_t[bytes]);
    buffer.size = bytes;
  }
  return buffer.data.get();
}

// y for rows [r0, r1) through the tile kernel.
void TileRowRange(const TypeTraits& traits, const WeightMatrix& w, const RowsView& x, int64_t r0,
                  int64_t r1, float* y, int64_t y_stride) {
  void* scratch = TileScratch(traits.tile_scratch_bytes(w.cols, x.n));
  traits.tile(w.cols, w.Row(r0), w.row_bytes, r1 - r0, x.data, x.row_bytes, x.n, y + r0, y_stride,
              scratch, x.block_sums);
}

}  // namespace

void MatMulRowRange(const WeightMatrix& w, const RowsView& x, int64_t r0, int64_t r1, float* y,
                    int64_t y_stride) {
  const TypeTraits& traits = GetTypeTraits(w.type);
  if (traits.tile != nullptr && x.type != TensorType::kF32 && x.n >= kTileMinActivationRows) {
    TileRowRange(traits, w, x, r0, r1, y, y_stride);
    return;
  }
  const VecDotFn dot = traits.vec_dot;
  // Multi-row kernels by row count (see TypeTraits::vec_dot_cols); none for f32 activations.
  const VecDotMultiFn* dot_cols = x.type == TensorType::kF32 ? nullptr : traits.vec_dot_cols;
  const int64_t n = x.n;
  const int64_t cols = w.cols;
  // Activation rows in groups of at most kMultiDotCols, as even as possible (9 rows run as 5 + 4,
  // not 8 + a single-row dot), each group against every weight row of the range: the group's
  // rows stay in L1 while the range's weight rows (at most MatMulRowsPerTask of them, in L2 after
  // the first group) stream past. A lone row takes the single-row kernel.
  int64_t t = 0;
  while (t < n) {
    const int64_t left = n - t;
    const int64_t groups = (left + kMultiDotCols - 1) / kMultiDotCols;
    const int c = dot_cols == nullptr ? 1 : static_cast<int>((left + groups - 1) / groups);
    if (c >= 2) {
      float out[kMultiDotCols];
      for (int64_t r = r0; r < r1; ++r) {
        dot_cols[c](cols, w.Row(r), x.Row(t), x.row_bytes, out);
        for (int i = 0; i < c; ++i) y[(t + i) * y_stride + r] = out[i];
      }
    } else {
      for (int64_t r = r0; r < r1; ++r) y[t * y_stride + r] = dot(cols, w.Row(r), x.Row(t));
    }
    t += c;
  }
}

void MatMulMany(const std::vector<MatMulJob>& jobs, ThreadPool* pool) {
  const int threads = pool ? pool->size() : 1;
  struct Task {
    const MatMulJob* job;
    int64_t r0, r1;
  };
  std::vector<Task> tasks;
  for (const MatMulJob& job : jobs) {
    if (job.x.n == 0) continue;
    const int64_t rows = job.w->rows;
    const int64_t per_task = MatMulRowsPerTask(rows, threads, job.x.n);
    for (int64_t r0 = 0; r0 < rows; r0 += per_task) {
      tasks.push_back({&job, r0, std::min(rows, r0 + per_task)});
    }
  }
  auto run = [&](int64_t i) {
    const Task& t = tasks[static_cast<size_t>(i)];
    MatMulRowRange(*t.job->w, t.job->x, t.r0, t.r1, t.job->y, t.job->w->rows);
  };
  const int64_t n_tasks = static_cast<int64_t>(tasks.size());
  if (pool != nullptr) {
    pool->ParallelFor(n_tasks, run);
  } else {
    for (int64_t i = 0; i < n_tasks; ++i) run(i);
  }
}

void MatMulConverted(const WeightMatrix& w, const ConvertedRows& x, float* y, ThreadPool* pool) {
  MatMulMany({{&w, x.Slice(0, x.n), y}}, pool);
}

void MatMul(const WeightMatrix& w, const float* x, int64_t n, float* y, ThreadPool* pool) {
  ConvertedRows cx;
  ConvertRows(w.type, x, n, w.cols, &cx, pool);
  MatMulConverted(w, cx, y, pool);
}

void DequantizeRow(const WeightMatrix& w, int64_t r, float* out) {
  GetTypeTraits(w.type).dequantize(w.Row(r), out, w.cols);
}

}  // namespace moepool
