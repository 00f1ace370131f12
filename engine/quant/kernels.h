// Per-type row kernels. Implementations:
//   dequantize.cc      DequantizeRow* (scalar; these define the numerics)
//   quantize.cc        QuantizeRow*   (reference quantizers, used by synth and for activations)
//   vec_dot_scalar.cc  VecDot*Scalar  (portable reference dot products)
//   vec_dot_avx2.cc    VecDot*Avx2    (AVX2 + FMA; compiled with -mavx2 -mfma -mf16c)
//   vec_dot_vnni.cc    VecDot*Vnni    (the same source built for AVX512-VNNI; same bits as Avx2)
//   tile_*_vnni.cc     Tile*Vnni      (AVX512-VNNI matmul tiles for many activation rows)
// All functions are thread-safe and take n = number of elements, a multiple of the block size.
// Pointers need no particular alignment.
#ifndef MOEPOOL_ENGINE_QUANT_KERNELS_H_
#define MOEPOOL_ENGINE_QUANT_KERNELS_H_

#include <cstddef>
#include <cstdint>

#include "engine/quant/types.h"

namespace moepool::kernels {

#define MOEPOOL_FOR_EACH_STORED_TYPE(X) \
  X(F32)                                \
  X(F16) X(BF16) X(Q4_0) X(Q4_1) X(Q5_0) X(Q5_1) X(Q8_0) X(Q2_K) X(Q3_K) X(Q4_K) X(Q5_K) X(Q6_K)

#define MOEPOOL_DECLARE_ROW_FNS(T)                               \
  void DequantizeRow##T(const void* src, float* dst, int64_t n); \
  void QuantizeRow##T(const float* src, void* dst, int64_t n);
MOEPOOL_FOR_EACH_STORED_TYPE(MOEPOOL_DECLARE_ROW_FNS)
// Activation-only types.
MOEPOOL_DECLARE_ROW_FNS(Q8_1)
MOEPOOL_DECLARE_ROW_FNS(Q8_K)
#undef MOEPOOL_DECLARE_ROW_FNS

// Activation quantizers used on the hot path; AVX2 versions must produce bit-identical blocks
// to the scalar QuantizeRowQ8_0 / Q8_1 / Q8_K.
void QuantizeRowQ8_0Avx2(const float* src, void* dst, int64_t n);
void QuantizeRowQ8_1Avx2(const float* src, void* dst, int64_t n);
void QuantizeRowQ8_KAvx2(const float* src, void* dst, int64_t n);
// F16C float <-> f16 rows (f16_rows_avx2.cc), bit-identical to QuantizeRowF16 /
// DequantizeRowF16; any n.
void QuantizeRowF16Avx2(const float* src, void* dst, int64_t n);
void DequantizeRowF16Avx2(const void* src, float* dst, int64_t n);

// Dot products: weight row of type W against an activation row of its vec_dot_type:
//   F32, F16, BF16 -> F32 activations
//   Q4_0, Q5_0, Q8_0 -> Q8_0;  Q4_1, Q5_1 -> Q8_1;  Q2_K .. Q6_K -> Q8_K
#define MOEPOOL_DECLARE_DOT_FNS(T)                                  \
  float VecDot##T##Scalar(int64_t n, const void* w, const void* a); \
  float VecDot##T##Avx2(int64_t n, const void* w, const void* a);   \
  float VecDot##T##Vnni(int64_t n, const void* w, const void* a);
MOEPOOL_FOR_EACH_STORED_TYPE(MOEPOOL_DECLARE_DOT_FNS)
#undef MOEPOOL_DECLARE_DOT_FNS

// Dot products of one weight row with c activation rows (a + c * a_stride bytes) for
// c = 2 .. kMultiCols: out[i] bit-identical to the single-row VecDot* of row i (same build); the
// weight unpacking is shared across the rows (batched prompts, and decode rows grouped per expert).
// Table index = c; entries 0 and 1 are nullptr.
inline constexpr int kMultiCols = 8;
using MultiDotKernel = void (*)(int64_t n, const void* w, const void* a, size_t a_stride,
                                float* out);
#define MOEPOOL_DECLARE_MULTI_DOT_TABLES(T)                         \
  extern const MultiDotKernel kVecDot##T##ColsAvx2[kMultiCols + 1]; \
  extern const MultiDotKernel kVecDot##T##ColsVnni[kMultiCols + 1];
MOEPOOL_DECLARE_MULTI_DOT_TABLES(Q4_K)
MOEPOOL_DECLARE_MULTI_DOT_TABLES(Q5_K)
MOEPOOL_DECLARE_MULTI_DOT_TABLES(Q6_K)
MOEPOOL_DECLARE_MULTI_DOT_TABLES(Q8_0)
#undef MOEPOOL_DECLARE_MULTI_DOT_TABLES

// Matmul tiles: out[t * out_stride + r] = dot(weight row r, activation row t) for r < rows
// (w_stride bytes apart) and t < n_act, each bit-identical to VecDot*Scalar (block_numerics.h).
// Every kTileRows weight rows are repacked into `scratch` (TileScratchBytes*(n, n_act) bytes,
// 64-byte aligned, owned by the caller) and swept by up to kMaxTileCols activation rows at a time.
// `a_block_sums` (may be null): for Q8_0 activations, each 32-element block's Q8_0BlockSum
// (types.h), [n_act x n / 32] (ConvertRows computes them once per matmul; without them the Q8_0
// tile computes them per call); the k-quant tiles ignore it.
inline constexpr int kTileRows = 16;
inline constexpr int kMaxTileCols = 8;
using TileKernel = void (*)(int64_t n, const uint8_t* w, size_t w_stride, int64_t rows,
                            const uint8_t* a, size_t a_stride, int64_t n_act, float* out,
                            int64_t out_stride, void* scratch, const Q8_0BlockSum* a_block_sums);
size_t TileScratchBytesK(int64_t n, int64_t n_act);
size_t TileScratchBytesQ8_0(int64_t n, int64_t n_act);
#define MOEPOOL_DECLARE_TILE(T)                                                                    \
  void Tile##T##Vnni(int64_t n, const uint8_t* w, size_t w_stride, int64_t rows, const uint8_t* a, \
                     size_t a_stride, int64_t n_act, float* out, int64_t out_stride,               \
                     void* scratch, const Q8_0BlockSum* a_block_sums);
MOEPOOL_DECLARE_TILE(Q4_K)
MOEPOOL_DECLARE_TILE(Q5_K)
MOEPOOL_DECLARE_TILE(Q6_K)
MOEPOOL_DECLARE_TILE(Q8_0)
#undef MOEPOOL_DECLARE_TILE

// The Vnni functions, tables and tiles exist only where MOEPOOL_HAVE_VNNI_KERNELS is defined; call
// them only where CpuHasAvx512Vnni() (types.h).

}  // namespace moepool::kernels

#endif  // MOEPOOL_ENGINE_QUANT_KERNELS_H_
