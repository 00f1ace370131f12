// AVX2 + FMA dot products of the float and 32-element block types. Quantized blocks form their
// exact integer dot with maddubs / madd and are scaled in float, so results match
// vec_dot_scalar.cc up to float summation order. The k-quants are in vec_dot_k_avx2.cc.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "engine/quant/block_numerics.h"
#include "engine/quant/kernels.h"
#include "engine/quant/prefetch.h"
#include "engine/quant/types.h"
#include "engine/quant/vec_dot_avx2_internal.h"

namespace moepool::kernels {
namespace {

using avx2::DotI8I8;
using avx2::DotU8I8;
using avx2::HalfToFloat;
using avx2::HorizontalSum;
using avx2::SpreadBits32;
using avx2::UnpackNibbles16;

MOEPOOL_AVX2_INLINE __m256i Load256(const void* p) {
  return _mm256_loadu_si256(static_cast<const __m256i*>(p));
}

MOEPOOL_AVX2_INLINE __m256 LoadHalf8(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

MOEPOOL_AVX2_INLINE __m256 LoadBf16x8(const uint16_t* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

// Float-row dot product with four independent accumulators; LoadW converts 8 weights.
template <typename W, __m256 (*LoadW)(const W*), float (*ScalarW)(W)>
MOEPOOL_AVX2_INLINE float DotFloatRow(int64_t n, const W* x, const float* y) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    acc0 = _mm256_fmadd_ps(LoadW(x + i), _mm256_loadu_ps(y + i), acc0);
    acc1 = _mm256_fmadd_ps(LoadW(x + i + 8), _mm256_loadu_ps(y + i + 8), acc1);
    acc2 = _mm256_fmadd_ps(LoadW(x + i + 16), _mm256_loadu_ps(y + i + 16), acc2);
    acc3 = _mm256_fmadd_ps(LoadW(x + i + 24), _mm256_loadu_ps(y + i + 24), acc3);
  }
  for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(LoadW(x + i), _mm256_loadu_ps(y + i), acc0);
  float sum = HorizontalSum(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
  for (; i < n; ++i) sum += ScalarW(x[i]) * y[i];
  return sum;
}

MOEPOOL_AVX2_INLINE __m256 LoadF32x8(const float* p) { return _mm256_loadu_ps(p); }
MOEPOOL_AVX2_INLINE float F32Value(float v) { return v; }
MOEPOOL_AVX2_INLINE float F16Value(uint16_t h) { return HalfToFloat(h); }
MOEPOOL_AVX2_INLINE float Bf16Value(uint16_t h) {
  return _mm_cvtss_f32(
      _mm_castsi128_ps(_mm_cvtsi32_si128(static_cast<int>(static_cast<uint32_t>(h) << 16))));
}

MOEPOOL_AVX2_INLINE __m256 ScaleOf(uint16_t dx, uint16_t dy) {
  return _mm256_set1_ps(HalfToFloat(dx) * HalfToFloat(dy));
}

}  // namespace

float MOEPOOL_ISA(VecDotF32)(int64_t n, const void* w, const void* a) {
  return DotFloatRow<float, LoadF32x8, F32Value>(n, static_cast<const float*>(w),
                                                 static_cast<const float*>(a));
}

float MOEPOOL_ISA(VecDotF16)(int64_t n, const void* w, const void* a) {
  return DotFloatRow<uint16_t, LoadHalf8, F16Value>(n, static_cast<const uint16_t*>(w),
                                                    static_cast<const float*>(a));
}

float MOEPOOL_ISA(VecDotBF16)(int64_t n, const void* w, const void* a) {
  return DotFloatRow<uint16_t, LoadBf16x8, Bf16Value>(n, static_cast<const uint16_t*>(w),
                                                      static_cast<const float*>(a));
}

namespace {

// [sum(a) sum(b) sum(c) sum(d) | ...]: per 128-bit half the sums of that half of four vectors of
// 8 int32 (adding the two halves gives the four full sums).
MOEPOOL_AVX2_INLINE __m256i HalfSums4(__m256i a, __m256i b, __m256i c, __m256i d) {
  return _mm256_hadd_epi32(_mm256_hadd_epi32(a, b), _mm256_hadd_epi32(c, d));
}

// The half scales d of up to 8 consecutive Q8_0 blocks as floats (absent ones 0), gathered in
// general registers (building the vector element by element is several times slower).
MOEPOOL_AVX2_INLINE __m256 BlockScales8(const BlockQ8_0* x, int count) {
  uint64_t halves[2] = {0, 0};
  MOEPOOL_UNROLL
  for (int k = 0; k < kQ8_0Lanes; ++k) {
    if (k < count) halves[k / 4] |= static_cast<uint64_t>(x[k].d) << (16 * (k % 4));
  }
  return _mm256_cvtph_ps(
      _mm_set_epi64x(static_cast<int64_t>(halves[1]), static_cast<int64_t>(halves[0])));
}

// Q8_0 against kCols activation rows, following block_numerics.h: per block the exact integer
// dot, eight blocks at a time reduced to one vector whose lane k accumulates the blocks with
// index k mod 8. The blocks go in two halves of 4 so that a half's weights (8 registers) stay in
// registers across the columns.
template <int kCols>
MOEPOOL_AVX2_INLINE void DotQ8_0(int64_t n, const BlockQ8_0* x, const uint8_t* a, size_t a_stride,
                                 float* out) {
  const BlockQ8_0* y[kCols];
  __m256 acc[kCols];
  MOEPOOL_UNROLL
  for (int c = 0; c < kCols; ++c) {
    y[c] = reinterpret_cast<const BlockQ8_0*>(a + c * a_stride);
    acc[c] = _mm256_setzero_ps();
  }
  const int64_t nb = n / kQK8_0;
  const size_t ahead = WeightPrefetchBytes();
  for (int64_t b0 = 0; b0 < nb; b0 += kQ8_0Lanes) {
    const int count = static_cast<int>(std::min<int64_t>(kQ8_0Lanes, nb - b0));
    PrefetchAhead(x + b0, ahead, sizeof(BlockQ8_0) * kQ8_0Lanes);
    __m256i halves[2][kCols];
    MOEPOOL_UNROLL
    for (int h = 0; h < 2; ++h) {
      __m256i xq[4], ax[4];
      MOEPOOL_UNROLL
      for (int k = 0; k < 4; ++k) {
        xq[k] = 4 * h + k < count ? Load256(x[b0 + 4 * h + k].qs) : _mm256_setzero_si256();
        ax[k] = _mm256_sign_epi8(xq[k], xq[k]);
      }
      MOEPOOL_UNROLL
      for (int c = 0; c < kCols; ++c) {
        __m256i p[4];
        MOEPOOL_UNROLL
        for (int k = 0; k < 4; ++k) {
          p[k] = 4 * h + k < count
                     ? DotU8I8(ax[k], _mm256_sign_epi8(Load256(y[c][b0 + 4 * h + k].qs), xq[k]))
                     : _mm256_setzero_si256();
        }
        halves[h][c] = HalfSums4(p[0], p[1], p[2], p[3]);
      }
    }
    const __m256 dx = BlockScales8(x + b0, count);
    MOEPOOL_UNROLL
    for (int c = 0; c < kCols; ++c) {
      // [S_0 .. S_3 | S_4 .. S_7]
      const __m256i sums =
          _mm256_add_epi32(_mm256_permute2x128_si256(halves[0][c], halves[1][c], 0x20),
                           _mm256_permute2x128_si256(halves[0][c], halves[1][c], 0x31));
      const __m256 scale = _mm256_mul_ps(dx, BlockScales8(y[c] + b0, count));
      acc[c] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(sums), acc[c]);
    }
  }
  MOEPOOL_UNROLL
  for (int c = 0; c < kCols; ++c) {
    alignas(32) float lanes[kQ8_0Lanes];
    _mm256_store_ps(lanes, acc[c]);
    out[c] = SumQ8_0Lanes(lanes);
  }
}

}  // namespace

float MOEPOOL_ISA(VecDotQ8_0)(int64_t n, const void* w, const void* a) {
  float out;
  DotQ8_0<1>(n, static_cast<const BlockQ8_0*>(w), static_cast<const uint8_t*>(a), 0, &out);
  return out;
}

float MOEPOOL_ISA(VecDotQ4_0)(int64_t n, const void* w, const void* a) {
  const auto* x = static_cast<const BlockQ4_0*>(w);
  const auto* y = static_cast<const BlockQ8_0*>(a);
  const __m256i eight = _mm256_set1_epi8(8);
  __m256 acc = _mm256_setzero_ps();
  const size_t ahead = WeightPrefetchBytes();
  for (int64_t b = 0; b < n / kQK4_0; ++b) {
    PrefetchAhead(x + b, ahead, sizeof(BlockQ4_0));
    const __m256i q = _mm256_sub_epi8(UnpackNibbles16(x[b].qs), eight);
    const __m256i p = DotI8I8(q, Load256(y[b].qs));
    acc = _mm256_fmadd_ps(ScaleOf(x[b].d, y[b].d), _mm256_cvtepi32_ps(p), acc);
  }
  return HorizontalSum(acc);
}

float MOEPOOL_ISA(VecDotQ4_1)(int64_t n, const void* w, const void* a) {
  const auto* x = static_cast<const BlockQ4_1*>(w);
  const auto* y = static_cast<const BlockQ8_1*>(a);
  __m256 acc = _mm256_setzero_ps();
  float mins = 0.0f;
  const size_t ahead = WeightPrefetchBytes();
  for (int64_t b = 0; b < n / kQK4_1; ++b) {
    PrefetchAhead(x + b, ahead, sizeof(BlockQ4_1));
    const __m256i p = DotU8I8(UnpackNibbles16(x[b].qs), Load256(y[b].qs));
    acc = _mm256_fmadd_ps(ScaleOf(x[b].d, y[b].d), _mm256_cvtepi32_ps(p), acc);
    mins += HalfToFloat(x[b].m) * HalfToFloat(y[b].s);
  }
  return HorizontalSum(acc) + mins;
}

float MOEPOOL_ISA(VecDotQ5_0)(int64_t n, const void* w, const void* a) {
  const auto* x = static_cast<const BlockQ5_0*>(w);
  const auto* y = static_cast<const BlockQ8_0*>(a);
  const __m256i high_nibble = _mm256_set1_epi8(static_cast<char>(0xF0));
  __m256 acc = _mm256_setzero_ps();
  const size_t ahead = WeightPrefetchBytes();
  for (int64_t b = 0; b < n / kQK5_0; ++b) {
    PrefetchAhead(x + b, ahead, sizeof(BlockQ5_0));
    // q - 16 as a signed byte: the nibble, with 0xF0 added when the fifth bit is clear.
    const __m256i offset = _mm256_andnot_si256(SpreadBits32(x[b].qh), high_nibble);
    const __m256i q = _mm256_or_si256(UnpackNibbles16(x[b].qs), offset);
    const __m256i p = DotI8I8(q, Load256(y[b].qs));
    acc = _mm256_fmadd_ps(ScaleOf(x[b].d, y[b].d), _mm256_cvtepi32_ps(p), acc);
  }
  return HorizontalSum(acc);
}

float MOEPOOL_ISA(VecDotQ5_1)(int64_t n, const void* w, const void* a) {
  const auto* x = static_cast<const BlockQ5_1*>(w);
  const auto* y = static_cast<const BlockQ8_1*>(a);
  const __m256i bit4 = _mm256_set1_epi8(0x10);
  __m256 acc = _mm256_setzero_ps();
  float mins = 0.0f;
  const size_t ahead = WeightPrefetchBytes();
  for (int64_t b = 0; b < n / kQK5_1; ++b) {
    PrefetchAhead(x + b, ahead, sizeof(BlockQ5_1));
    const __m256i high = _mm256_and_si256(SpreadBits32(x[b].qh), bit4);
    const __m256i q = _mm256_or_si256(UnpackNibbles16(x[b].qs), high);
    const __m256i p = DotU8I8(q, Load256(y[b].qs));
    acc = _mm256_fmadd_ps(ScaleOf(x[b].d, y[b].d), _mm256_cvtepi32_ps(p), acc);
    mins += HalfToFloat(x[b].m) * HalfToFloat(y[b].s);
  }
  return HorizontalSum(acc) + mins;
}

namespace {

template <int kCols>
void DotQ8_0Cols(int64_t n, const void* w, const void* a, size_t a_stride, float* out) {
  DotQ8_0<kCols>(n, static_cast<const BlockQ8_0*>(w), static_cast<const uint8_t*>(a), a_stride,
                 out);
}

}  // namespace

static_assert(kMultiCols == 8, "the table below lists 2..8 columns");
const MultiDotKernel MOEPOOL_ISA(kVecDotQ8_0Cols)[kMultiCols + 1] = {
    nullptr,         nullptr,         &DotQ8_0Cols<2>, &DotQ8_0Cols<3>, &DotQ8_0Cols<4>,
    &DotQ8_0Cols<5>, &DotQ8_0Cols<6>, &DotQ8_0Cols<7>, &DotQ8_0Cols<8>};

}  // namespace moepool::kernels
