// Causal attention of the query heads that share one KV head, over a half-precision KV cache.
// Device-neutral front: AttendKvHead dispatches to the AVX-512 kernel (attention_avx512.cc) with
// the avx512-vnni kernels selected, to the AVX2 kernel (attention_avx2.cc, the same bits) with
// avx2, else to the scalar reference (attention.cc). Each call's result depends only on its
// inputs, so a row's attention is independent of the batch it is part of. Positions are visited
// in ascending order whatever the block layout, so paged and contiguous caches holding the same
// values give bit-identical results.
#ifndef MOEPOOL_ENGINE_ATTENTION_H_
#define MOEPOOL_ENGINE_ATTENTION_H_

#include <cstddef>
#include <cstdint>

namespace moepool {

// One KV head's keys and values in a paged cache. Position p lives in logical block
// j = p / block_size at row i = p % block_size: its K row (head_dim halves) starts at
// k + blocks[j] * block_stride + i * stride, and likewise for V. A contiguous cache is one block
// of block_size >= n_kv positions with blocks = {0}.
struct KvHeadView {
  const uint16_t* k = nullptr;      // K of row 0 of physical block 0 for this layer and head
  const uint16_t* v = nullptr;      // likewise for V
  const int32_t* blocks = nullptr;  // logical -> physical block, ceil(n_kv / block_size) entries
  int64_t block_size = 0;           // positions per block
  size_t block_stride = 0;          // elements between physical blocks
  size_t stride = 0;                // elements between consecutive positions within a block
  int64_t n_kv = 0;                 // positions 0 .. n_kv-1 are attended

  // Rows of logical block j and how many of its positions are attended.
  const uint16_t* KBlock(int64_t j) const { return k + blocks[j] * block_stride; }
  const uint16_t* VBlock(int64_t j) const { return v + blocks[j] * block_stride; }
  int64_t RowsIn(int64_t j) const {
    const int64_t left = n_kv - j * block_size;
    return left < block_size ? left : block_size;
  }
  int64_t n_blocks() const { return (n_kv + block_size - 1) / block_size; }
};

// out [group x head_dim] = softmax(q K^T * scale) V for `group` query heads q [group x head_dim].
// `scratch` holds at least group * n_kv floats.
void AttendKvHead(const float* q, int group, int64_t head_dim, const KvHeadView& kv, float scale,
                  float* out, float* scratch);

// The portable reference and the AVX2 + F16C version (callable only where CpuHasAvx2()).
void AttendKvHeadScalar(const float* q, int group, int64_t head_dim, const KvHeadView& kv,
                        float scale, float* out, float* scratch);
void AttendKvHeadAvx2(const float* q, int group, int64_t head_dim, const KvHeadView& kv,
                      float scale, float* out, float* scratch);
// The AVX2 kernel at 512 bits with the same bits (callable only where UseAvx512Kernels()).
void AttendKvHeadAvx512(const float* q, int group, int64_t head_dim, const KvHeadView& kv,
                        float scale, float* out, float* scratch);

}  // namespace moepool

#endif  // MOEPOOL_ENGINE_ATTENTION_H_
