// Host API of the CUDA kernels behind the expert backend and the device forward pass: the SwiGLU
// expert FFN (gate and up projections fused into one pass over x), a quantized mat-vec/mat-mat
// for the down projection, RMSNorm, RoPE, the softmax + top-k router and decode attention over
// an f16 KV cache. Plain C++ (no CUDA headers).
//
// Launch* functions take device pointers and a stream (a cudaStream_t passed as void*; nullptr
// is the default stream), return after queueing the work (errors of the launch itself as
// INTERNAL; INVALID_ARGUMENT / UNIMPLEMENTED for shapes or types they do not handle) and never
// synchronize. Run*OnDevice functions take host pointers: they copy in, run on `device`,
// synchronize and copy out (for tests and benchmarks). In a build without CUDA every function
// returns FAILED_PRECONDITION.
//
// The scalar host references beside them (Ref*, engine/cuda/kernel_refs.cc, built everywhere)
// compute the same expressions in f32 on the CPU (weights through block_math.h); the kernels
// agree with them within rounding (summation order, device exp/sin/cos), not bit for bit.
#ifndef MOEPOOL_ENGINE_CUDA_EXPERT_KERNELS_H_
#define MOEPOOL_ENGINE_CUDA_EXPERT_KERNELS_H_

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "engine/quant/types.h"

namespace moepool::cuda {

// A weight matrix in device (or, for the references, host) memory: `rows` rows of `cols`
// elements of `type`, row r at data + r * row_bytes.
struct MatrixRef {
  TensorType type = TensorType::kF32;
  const void* data = nullptr;
  size_t row_bytes = 0;
  int64_t rows = 0;
  int64_t cols = 0;
};

// h [m x gate.rows] = silu(x gate^T) * (x up^T) for x [m x gate.cols] (dense rows). Gate and
// up of one type: one fused pass over x reading both matrices, for up to 16 rows or any number
// when batch_invariant. Otherwise LaunchMatMulRows for each and a SiLU kernel, with h2
// [m x gate.rows] as scratch (h2 may be nullptr only in the fused case).
// batch_invariant: each row's result is the same bits whatever the other rows of the launch
// (only mat-vec style kernels; weights are re-read once per 8 rows). Otherwise many rows take
// the tiled mat-mul (faster for prompts; a row's bits then depend on the batch size), on tensor
// cores when tensor_cores (QuantMatMulTensorCores: f16 tiles).
absl::Status LaunchExpertGateUp(const MatrixRef& gate, const MatrixRef& up, const float* x,
                                int64_t m, float* h, float* h2, bool batch_invariant, void* stream,
                                bool tensor_cores = false);
// y [m x w.rows] = x [m x w.cols] w^T through QuantMatMul (cuda_ops.h); batch_invariant: in
// groups of at most 8 rows (the mat-vec kernel), as above; tensor_cores as above.
absl::Status LaunchMatMulRows(const MatrixRef& w, const float* x, int64_t m, float* y,
                              bool batch_invariant, void* stream, bool tensor_cores = false);

// y [n x d] = x * rsqrt(mean(x^2) + eps) * w, per row.
absl::Status LaunchRmsNorm(const float* x, const float* w, int64_t n, int64_t d, float eps,
                           float* y, void* stream);
// Rotates the first n_rot elements of each of the n_heads heads of x [n_heads x head_dim] in
// place for position pos (llama pair convention, as ApplyRope).
absl::Status LaunchRope(float* x, int64_t n_heads, int64_t head_dim, int64_t n_rot, int64_t pos,
                        float base, void* stream);
// RouteTopK on the device: logits [n_rows x n_expert] -> expert, weight [n_rows x k];
// n_expert <= 64.
absl::Status LaunchRouteTopK(const float* logits, int64_t n_rows, int n_expert, int k,
                             int32_t* expert, float* weight, void* stream);

// One layer's f16 KV cache of one sequence, paged like KvHeadView: position p of KV head
// h has its K row (head_dim halves) at k + blocks[p / block_size] * block_stride +
// (p % block_size) * stride + h * head_dim, likewise V.
struct KvDeviceView {
  const uint16_t* k = nullptr;
  const uint16_t* v = nullptr;
  const int32_t* blocks = nullptr;
  int64_t block_size = 0;
  size_t block_stride = 0;
  size_t stride = 0;
  int64_t n_kv = 0;
};
// One batch row's place in a paged f16 KV pool with the layout of KvBlockPool (device pointers):
// position p of layer l is the kv_dim-wide row at
// k + blocks[p / block_size] * block_stride + l * layer_stride + (p % block_size) * kv_dim.
struct KvRowRef {
  uint16_t* k = nullptr;            // the pool's K of physical block 0, layer 0, row 0
  uint16_t* v = nullptr;            // likewise V
  const int32_t* blocks = nullptr;  // the row's block table (logical -> physical)
  int64_t block_size = 0;
  size_t block_stride = 0;  // elements between physical blocks
  size_t layer_stride = 0;  // elements between layers within a block (block_size * kv_dim)
  int64_t pos = 0;          // the row's position: its K/V go there, it attends to 0 .. pos
};

// Rotates each of n rows of x (row r at x + r * row_stride, n_heads heads of head_dim) for
// position pos[r] (device array), as LaunchRope does for one.
absl::Status LaunchRopeRows(float* x, int64_t row_stride, int64_t n, int64_t n_heads,
                            int64_t head_dim, int64_t n_rot, float base, const int64_t* pos,
                            void* stream);
// Stores row r of k and v [n x kv_dim] (f32, rounded to half) at rows[r].pos of layer `layer`.
absl::Status LaunchStoreKvRows(const KvRowRef* rows, int64_t n, int64_t layer, int64_t kv_dim,
                               const float* k, const float* v, void* stream);
// Causal attention of a batch's rows, tiled (the coordinator's prompt and decode attention).
// A tile is a run of consecutive batch rows of one sequence (same cache and block table,
// consecutive positions) whose query heads of one KV head are attended together, reading each
// K/V position once for all of them: rows first .. first + count - 1.
struct AttnTile {
  int32_t first = 0;
  int32_t count = 0;
};
// Positions per split: each (tile, KV head, split) is one block, and each query's splits are
// merged in order afterwards. A constant, so that a row's bits never depend on its batch.
inline constexpr int64_t kAttnSplit = 256;
// Queries one block holds and positions it reads per step: a tile's count * group <= this.
inline constexpr int64_t AttnMaxQueries(int64_t head_dim) {
  return head_dim <= 128 ? 32 : 4096 / head_dim;
}
inline constexpr int64_t AttnStepPositions(int64_t head_dim) { return AttnMaxQueries(head_dim); }
inline constexpr int64_t kAttnMaxTileRows = 8;
// Rows per tile for `group` query heads per KV head (0 when a head does not fit).
inline constexpr int64_t AttnTileRows(int64_t group, int64_t head_dim) {
  const int64_t rows = group > 0 ? AttnMaxQueries(head_dim) / group : 0;
  return rows < kAttnMaxTileRows ? rows : kAttnMaxTileRows;
}
// OK when the tiled kernel handles the shape: head_dim <= 256, n_head a multiple of n_head_kv
// and a KV head's query heads fitting one block; INVALID_ARGUMENT naming the shape otherwise.
absl::Status CheckAttentionShape(int64_t n_head, int64_t n_head_kv, int64_t head_dim);
// Attends the rows of tiles[0 .. n_tiles), which cover batch rows r0 .. r0 + n_rows - 1: out row
// r [n_head x head_dim] (at out + r * n_head * head_dim, r counted from the batch's first row)
// attends q row r (same layout) over positions 0 .. rows[r].pos of `layer`. n_splits >= every
// row's rows[r].pos / kAttnSplit + 1; partial holds n_rows * n_head * n_splits * (head_dim + 2)
// floats of scratch.
absl::Status LaunchAttentionTiles(const float* q, const KvRowRef* rows, const AttnTile* tiles,
                                  int64_t n_tiles, int64_t r0, int64_t n_rows, int64_t layer,
                                  int64_t n_head, int64_t n_head_kv, int64_t head_dim, float scale,
                                  int64_t n_splits, float* partial, float* out, void* stream);
// x[i] += y[i] for i < n.
absl::Status LaunchAddInPlace(float* x, const float* y, int64_t n, void* stream);

// ---- Host-pointer forms (copy in, run, synchronize, copy out). `w.data` is a host pointer.
absl::Status RunExpertFfnOnDevice(int device, const MatrixRef& gate, const MatrixRef& up,
                                  const MatrixRef& down, const float* x, int64_t m, float* out);
absl::Status RunRmsNormOnDevice(int device, const float* x, const float* w, int64_t n, int64_t d,
                                float eps, float* y);
absl::Status RunRopeOnDevice(int device, float* x, int64_t n_heads, int64_t head_dim, int64_t n_rot,
                             int64_t pos, float base);
absl::Status RunRouteTopKOnDevice(int device, const float* logits, int64_t n_rows, int n_expert,
                                  int k, int32_t* expert, float* weight);
// out [n_head x head_dim] = softmax(q K^T * scale) V for one token's q [n_head x head_dim] over
// kv (query head h reads KV head h / (n_head / n_head_kv)), through LaunchAttentionTiles.
// kv.k / kv.v / kv.blocks are host pointers; the cache spans n_phys_blocks physical blocks and
// kv.stride must be n_head_kv * head_dim.
absl::Status RunAttentionDecodeOnDevice(int device, const float* q, int64_t n_head,
                                        int64_t n_head_kv, int64_t head_dim, const KvDeviceView& kv,
                                        int64_t n_phys_blocks, float scale, float* out);

// ---- Scalar host references (every build).
// out [m x down.rows] = down(silu(gate x) * up x) with QuantMatMulReference (block_math.h).
// UNIMPLEMENTED for a type without block maths.
absl::Status RefExpertFfn(const MatrixRef& gate, const MatrixRef& up, const MatrixRef& down,
                          const float* x, int64_t m, float* out);
void RefRmsNorm(const float* x, const float* w, int64_t n, int64_t d, float eps, float* y);
void RefRope(float* x, int64_t n_heads, int64_t head_dim, int64_t n_rot, int64_t pos, float base);
void RefRouteTopK(const float* logits, int64_t n_rows, int n_expert, int k, int32_t* expert,
                  float* weight);
void RefAttentionDecode(const float* q, int64_t n_head, int64_t n_head_kv, int64_t head_dim,
                        const KvDeviceView& kv, float scale, float* out);
// The batched forms above on host memory (rows[r].blocks etc. are host pointers).
void RefRopeRows(float* x, int64_t row_stride, int64_t n, int64_t n_heads, int64_t head_dim,
                 int64_t n_rot, float base, const int64_t* pos);
void RefStoreKvRows(const KvRowRef* rows, int64_t n, int64_t layer, int64_t kv_dim, const float* k,
                    const float* v);
// The tiled attention's arithmetic in the same order (host tiles, rows and partial).
void RefAttentionTiles(const float* q, const KvRowRef* rows, const AttnTile* tiles, int64_t n_tiles,
                       int64_t r0, int64_t n_rows, int64_t layer, int64_t n_head, int64_t n_head_kv,
                       int64_t head_dim, float scale, int64_t n_splits, float* partial, float* out);

}  // namespace moepool::cuda

#endif  // MOEPOOL_ENGINE_CUDA_EXPERT_KERNELS_H_
