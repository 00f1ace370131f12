// AVX2 dot products of the k-quant weight types against Q8_K activations. Per super-block the
// integer dot of every sub-block is exact (maddubs / madd), scaled by its integer sub-block
// scale, and only the super-block total is converted to float. Q4_K, Q5_K and Q6_K follow
// block_numerics.h and return vec_dot_scalar.cc's bits; Q2_K and Q3_K match it up to float
// summation order.
//
// Offsets are folded into the activation block sums: a quant stored as u = q + offset gives
// sum(q * a) = sum(u * a) - offset * bsum, so every inner product is one unsigned x signed maddubs.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "engine/quant/block_numerics.h"
#include "engine/quant/kernels.h"
#include "engine/quant/prefetch.h"
#include "engine/quant/types.h"
#include "engine/quant/vec_dot_avx2_internal.h"

namespace moepool::kernels {
namespace {

using avx2::AddScaledDot32;
using avx2::AddScaledDot64;
using avx2::DotU8I8;
using avx2::HalfToFloat;
using avx2::HorizontalSum;
using avx2::Int16PairSelector;
using avx2::PairScales;

MOEPOOL_AVX2_INLINE __m256i Load256(const void* p) {
  return _mm256_loadu_si256(static_cast<const __m256i*>(p));
}

// Unpacks the 12 scale bytes of a Q4_K / Q5_K super-block into 8 scales (bytes 0..7 of the
// result) and 8 mins (bytes 8..15), all 6-bit. With the bytes as 32-bit words w0, w1, w2:
//   scales 0..3 = w0 & 0x3f..,  scales 4..7 = (w2 & 0x0f..) | ((w0 >> 6) & 3..) << 4,
//   mins 0..3 = w1 & 0x3f..,    mins 4..7 = ((w2 >> 4) & 0x0f..) | ((w1 >> 6) & 3..) << 4.
// `packed` must be followed by 4 readable bytes (the scales are never at the end of a block).
MOEPOOL_AVX2_INLINE __m128i UnpackScalesMinsK4(const uint8_t* packed) {
  const __m128i w = _mm_loadu_si128(reinterpret_cast<const __m128i*>(packed));
  const __m128i low =
      _mm_and_si128(_mm_srlv_epi32(_mm_shuffle_epi32(w, 0x98), _mm_setr_epi32(0, 0, 0, 4)),
                    _mm_setr_epi32(0x3f3f3f3f, 0x0f0f0f0f, 0x3f3f3f3f, 0x0f0f0f0f));
  const __m128i top = _mm_and_si128(_mm_srli_epi32(_mm_shuffle_epi32(w, 0x50), 2),
                                    _mm_setr_epi32(0, 0x30303030, 0, 0x30303030));
  return _mm_or_si128(low, top);
}

// [sum(a), sum(b), sum(c), sum(d)]: the exact horizontal sums of four vectors of 8 int32.
MOEPOOL_AVX2_INLINE __m128i HorizontalSums4(__m256i a, __m256i b, __m256i c, __m256i d) {
  const __m256i abcd = _mm256_hadd_epi32(_mm256_hadd_epi32(a, b), _mm256_hadd_epi32(c, d));
  return _mm_add_epi32(_mm256_castsi256_si128(abcd), _mm256_extracti128_si256(abcd, 1));
}

// Adds one Q4_K / Q5_K super-block to two columns' accumulators (lanes 0 and 1 of `acc`),
// following block_numerics.h: the integer sums first, then per column
// acc = fma(y.d, fma(d, S, -(dmin * M)), acc). `sumi1` / `mins1` / y_d1 are zero for a lone column.
MOEPOOL_AVX2_INLINE __m128 AddK4Blocks(__m128 acc, __m256i sumi0, __m256i sumi1, __m256i mins0,
                                       __m256i mins1, __m128 d, __m128 dmin, float y_d0,
                                       float y_d1) {
  const __m128 sm = _mm_cvtepi32_ps(HorizontalSums4(sumi0, sumi1, mins0, mins1));  // S0 S1 M0 M1
  const __m128 block = _mm_fmsub_ps(d, sm, _mm_mul_ps(dmin, _mm_movehl_ps(sm, sm)));
  return _mm_fmadd_ps(_mm_setr_ps(y_d0, y_d1, 0.0f, 0.0f), block, acc);
}

// Q4_K and Q5_K share everything but the fifth bit. Computes kCols dot products of one weight
// row with kCols activation rows (a + c * a_stride bytes): the weight unpacking is shared, and
// each column's integers are exact, so a row's result does not depend on how many columns were
// computed with it (block_numerics.h).
template <bool kHasHighBit, int kCols, typename Block>
MOEPOOL_AVX2_INLINE void DotK4Style(int64_t n, const Block* x, const uint8_t* a, size_t a_stride,
                                    float* out) {
  constexpr int kPairs = (kCols + 1) / 2;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const BlockQ8_K* y[kCols];
  MOEPOOL_UNROLL
  for (int c = 0; c < kCols; ++c) y[c] = reinterpret_cast<const BlockQ8_K*>(a + c * a_stride);
  __m128 acc[kPairs];
  MOEPOOL_UNROLL
  for (int p = 0; p < kPairs; ++p) acc[p] = _mm_setzero_ps();
  const size_t ahead = WeightPrefetchBytes();
  for (int64_t b = 0; b < n / kQK_K; ++b) {
    PrefetchAhead(x + b, ahead, sizeof(Block));
    // d and dmin are adjacent halves: convert both at once.
    uint32_t d_dmin;
    std::memcpy(&d_dmin, &x[b].d, 4);
    const __m128 d_pair = _mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<int>(d_dmin)));
    const __m128i scales_mins = UnpackScalesMinsK4(x[b].scales);
    // Mins: every min twice (one per 16-element activation sum), times bsums.
    const __m128i mins8 = _mm_unpackhi_epi64(scales_mins, scales_mins);
    const __m256i mins16 = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(mins8, mins8));
    __m256i mins_dot[kCols];
    MOEPOOL_UNROLL
    for (int c = 0; c < kCols; ++c) mins_dot[c] = _mm256_madd_epi16(mins16, Load256(y[c][b].bsums));
    const __m256i scales = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(scales_mins));
    __m256i high_bits;
    if constexpr (kHasHighBit) high_bits = Load256(x[b].qh);
    const uint8_t* qs = x[b].qs;
    __m256i sumi[kCols];
    MOEPOOL_UNROLL
    for (int c = 0; c < kCols; ++c) sumi[c] = _mm256_setzero_si256();
    MOEPOOL_UNROLL
    for (int j = 0; j < 4; ++j) {
      const __m256i packed = Load256(qs + 32 * j);
      __m256i lo = _mm256_and_si256(packed, low4);
      __m256i hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low4);
      if constexpr (kHasHighBit) {
        const __m256i one = _mm256_set1_epi8(1);
        lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(high_bits, one), 4));
        hi = _mm256_or_si256(
            hi, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(high_bits, 1), one), 4));
        high_bits = _mm256_srli_epi16(high_bits, 2);
      }
      // lo holds sub-block 2j, hi 2j + 1.
      const __m256i pair_scales = PairScales(scales, 2 * j, 2 * j, 2 * j + 1, 2 * j + 1);
      MOEPOOL_UNROLL
      for (int c = 0; c < kCols; ++c) {
        const int8_t* q8 = y[c][b].qs + 64 * j;
        sumi[c] = AddScaledDot64(sumi[c], lo, Load256(q8), hi, Load256(q8 + 32), pair_scales);
      }
    }
    const __m128 d4 = _mm_broadcastss_ps(d_pair);
    const __m128 dmin4 = _mm_movehdup_ps(d_pair);  // lanes 0 and 1
    MOEPOOL_UNROLL
    for (int p = 0; p < kPairs; ++p) {
      const int c0 = 2 * p, c1 = 2 * p + 1;
      if (c1 < kCols) {
        acc[p] = AddK4Blocks(acc[p], sumi[c0], sumi[c1], mins_dot[c0], mins_dot[c1], d4, dmin4,
                             y[c0][b].d, y[c1][b].d);
      } else {
        const __m256i zero = _mm256_setzero_si256();
        acc[p] =
            AddK4Blocks(acc[p], sumi[c0], zero, mins_dot[c0], zero, d4, dmin4, y[c0][b].d, 0.0f);
      }
    }
  }
  MOEPOOL_UNROLL
  for (int c = 0; c < kCols; ++c) {
    alignas(16) float lanes[4];
    _mm_store_ps(lanes, acc[c / 2]);
    out[c] = lanes[c % 2];
  }
}

// The 16 int16 scales of a super-block with 16-element sub-blocks; `half` picks sub-blocks
// 8 * half .. 8 * half + 7, broadcast to both 128-bit lanes.
MOEPOOL_AVX2_INLINE __m256i HalfScales(__m256i scales16, int half) {
  return half == 0 ? _mm256_permute2x128_si256(scales16, scales16, 0x00)
                   : _mm256_permute2x128_si256(scales16, scales16, 0x11);
}

// Sum over 16 sub-blocks of scale * bsum as 8 int32 lanes.
MOEPOOL_AVX2_INLINE __m256i ScaleBsumDot(__m256i scales16, const int16_t* bsums) {
  return _mm256_madd_epi16(scales16, Load256(bsums));
}

}  // namespace

float MOEPOOL_ISA(VecDotQ4_K)(int64_t n, const void* w, const void* a) {
  float out;
  DotK4Style<false, 1>(n, static_cast<const BlockQ4_K*>(w), static_cast<const uint8_t*>(a), 0,
                       &out);
  return out;
}

float MOEPOOL_ISA(VecDotQ5_K)(int64_t n, const void* w, const void* a) {
  float out;
  DotK4Style<true, 1>(n, static_cast<const BlockQ5_K*>(w), static_cast<const uint8_t*>(a), 0, &out);
  return out;
}

namespace {

// Q6_K against kCols activation rows: exact integers per column, then block_numerics.h.
template <int kCols>
MOEPOOL_AVX2_INLINE void DotQ6K(int64_t n, const BlockQ6_K* x, const uint8_t* a, size_t a_stride,
                                float* out) {
  constexpr int kQuads = (kCols + 3) / 4;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const BlockQ8_K* y[kCols];
  MOEPOOL_UNROLL
  for (int c = 0; c < kCols; ++c) y[c] = reinterpret_cast<const BlockQ8_K*>(a + c * a_stride);
  __m128 acc[kQuads];
  MOEPOOL_UNROLL
  for (int q = 0; q < kQuads; ++q) acc[q] = _mm_setzero_ps();
  const size_t ahead = WeightPrefetchBytes();
  for (int64_t b = 0; b < n / kQK_K; ++b) {
    PrefetchAhead(x + b, ahead, sizeof(BlockQ6_K));
    const float dx = HalfToFloat(x[b].d);
    const __m256i scales16 =
        _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x[b].scales)));
    __m256i sumi[kCols];
    MOEPOOL_UNROLL
    for (int c = 0; c < kCols; ++c) {
      // Quants are stored as q + 32.
      sumi[c] = _mm256_slli_epi32(ScaleBsumDot(scales16, y[c][b].bsums), 5);
      sumi[c] = _mm256_sub_epi32(_mm256_setzero_si256(), sumi[c]);
    }
    MOEPOOL_UNROLL
    for (int h = 0; h < 2; ++h) {
      const __m256i scales = HalfScales(scales16, h);
      const __m256i ql0 = Load256(x[b].ql + 64 * h);
      const __m256i ql1 = Load256(x[b].ql + 64 * h + 32);
      const __m256i qh = Load256(x[b].qh + 32 * h);
      const __m256i u0 =
          _mm256_or_si256(_mm256_and_si256(ql0, low4),
                          _mm256_slli_epi16(_mm256_and_si256(qh, _mm256_set1_epi8(0x03)), 4));
      const __m256i u1 =
          _mm256_or_si256(_mm256_and_si256(ql1, low4),
                          _mm256_slli_epi16(_mm256_and_si256(qh, _mm256_set1_epi8(0x0C)), 2));
      const __m256i u2 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), low4),
                                         _mm256_and_si256(qh, _mm256_set1_epi8(0x30)));
      const __m256i u3 = _mm256_or_si256(
          _mm256_and_si256(_mm256_srli_epi16(ql1, 4), low4),
          _mm256_srli_epi16(_mm256_and_si256(qh, _mm256_set1_epi8(static_cast<char>(0xC0))), 2));
      // u0 holds sub-blocks 0 (low 128-bit half) and 1 (high half) of this half-block, u1 2 and
      // 3, u2 4 and 5, u3 6 and 7.
      const __m256i s01 = PairScales(scales, 0, 1, 2, 3);
      const __m256i s23 = PairScales(scales, 4, 5, 6, 7);
      MOEPOOL_UNROLL
      for (int c = 0; c < kCols; ++c) {
        const int8_t* q8 = y[c][b].qs + 128 * h;
        sumi[c] = AddScaledDot64(sumi[c], u0, Load256(q8), u1, Load256(q8 + 32), s01);
        sumi[c] = AddScaledDot64(sumi[c], u2, Load256(q8 + 64), u3, Load256(q8 + 96), s23);
      }
    }
    // Per column acc = fma(y.d * d, S, acc), four columns per vector (absent ones zero).
    const __m128 dx4 = _mm_set1_ps(dx);
    MOEPOOL_UNROLL
    for (int q = 0; q < kQuads; ++q) {
      const auto column = [&](int c) { return c < kCols ? sumi[c] : _mm256_setzero_si256(); };
      const auto y_d = [&](int c) { return c < kCols ? y[c][b].d : 0.0f; };
      const __m128 sums = _mm_cvtepi32_ps(
          HorizontalSums4(column(4 * q), column(4 * q + 1), column(4 * q + 2), column(4 * q + 3)));
      const __m128 scale =
          _mm_mul_ps(_mm_setr_ps(y_d(4 * q), y_d(4 * q + 1), y_d(4 * q + 2), y_d(4 * q + 3)), dx4);
      acc[q] = _mm_fmadd_ps(scale, sums, acc[q]);
    }
  }
  MOEPOOL_UNROLL
  for (int c = 0; c < kCols; ++c) {
    alignas(16) float lanes[4];
    _mm_store_ps(lanes, acc[c / 4]);
    out[c] = lanes[c % 4];
  }
}

}  // namespace

float MOEPOOL_ISA(VecDotQ6_K)(int64_t n, const void* w, const void* a) {
  float out;
  DotQ6K<1>(n, static_cast<const BlockQ6_K*>(w), static_cast<const uint8_t*>(a), 0, &out);
  return out;
}

float MOEPOOL_ISA(VecDotQ2_K)(int64_t n, const void* w, const void* a) {
  const auto* x = static_cast<const BlockQ2_K*>(w);
  const auto* y = static_cast<const BlockQ8_K*>(a);
  const __m256i low2 = _mm256_set1_epi8(3);
  __m256 acc = _mm256_setzero_ps();
  const size_t ahead = WeightPrefetchBytes();
  for (int64_t b = 0; b < n / kQK_K; ++b) {
    PrefetchAhead(x + b, ahead, sizeof(BlockQ2_K));
    const float d = y[b].d * HalfToFloat(x[b].d);
    const float dmin = y[b].d * HalfToFloat(x[b].dmin);
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x[b].scales));
    const __m128i low4 = _mm_set1_epi8(0x0F);
    const __m256i scales16 = _mm256_cvtepu8_epi16(_mm_and_si128(packed, low4));
    const __m256i mins16 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(packed, 4), low4));
    acc = _mm256_fnmadd_ps(_mm256_set1_ps(dmin),
                           _mm256_cvtepi32_ps(ScaleBsumDot(mins16, y[b].bsums)), acc);
    __m256i sumi = _mm256_setzero_si256();
    MOEPOOL_UNROLL
    for (int h = 0; h < 2; ++h) {
      const __m256i scales = HalfScales(scales16, h);
      const __m256i q2 = Load256(x[b].qs + 32 * h);
      const int8_t* q8 = y[b].qs + 128 * h;
      MOEPOOL_UNROLL
      for (int j = 0; j < 4; ++j) {
        const __m256i u = _mm256_and_si256(_mm256_srli_epi16(q2, 2 * j), low2);
        const __m256i sel = Int16PairSelector(2 * j, 2 * j + 1);
        sumi = AddScaledDot32(sumi, u, Load256(q8 + 32 * j), _mm256_shuffle_epi8(scales, sel));
      }
    }
    acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
  }
  return HorizontalSum(acc);
}

float MOEPOOL_ISA(VecDotQ3_K)(int64_t n, const void* w, const void* a) {
  const auto* x = static_cast<const BlockQ3_K*>(w);
  const auto* y = static_cast<const BlockQ8_K*>(a);
  const __m256i low2 = _mm256_set1_epi8(3);
  const __m256i four = _mm256_set1_epi8(4);
  __m256 acc = _mm256_setzero_ps();
  const size_t ahead = WeightPrefetchBytes();
  for (int64_t b = 0; b < n / kQK_K; ++b) {
    PrefetchAhead(x + b, ahead, sizeof(BlockQ3_K));
    const float d = y[b].d * HalfToFloat(x[b].d);
    // 16 signed 6-bit scales: low nibbles in bytes 0..7 (sub-blocks 0..7 low, 8..15 high
    // nibble), top 2 bits in bytes 8..11 (sub-block i uses bits 2 * (i / 4) of byte 8 + i % 4).
    uint32_t w3[3];
    std::memcpy(w3, x[b].scales, 12);
    constexpr uint32_t kLow4 = 0x0f0f0f0f, kLow2 = 0x03030303;
    const __m128i scales8 = _mm_sub_epi8(
        _mm_setr_epi32(static_cast<int>((w3[0] & kLow4) | ((w3[2] & kLow2) << 4)),
                       static_cast<int>((w3[1] & kLow4) | (((w3[2] >> 2) & kLow2) << 4)),
                       static_cast<int>(((w3[0] >> 4) & kLow4) | (((w3[2] >> 4) & kLow2) << 4)),
                       static_cast<int>(((w3[1] >> 4) & kLow4) | (((w3[2] >> 6) & kLow2) << 4))),
        _mm_set1_epi8(32));
    const __m256i scales16 = _mm256_cvtepi8_epi16(scales8);
    // Quants are stored as q + 4 (low 2 bits plus 4 when the high bit is set).
    __m256i sumi = _mm256_slli_epi32(ScaleBsumDot(scales16, y[b].bsums), 2);
    sumi = _mm256_sub_epi32(_mm256_setzero_si256(), sumi);
    __m256i hmask = Load256(x[b].hmask);
    MOEPOOL_UNROLL
    for (int h = 0; h < 2; ++h) {
      const __m256i scales = HalfScales(scales16, h);
      const __m256i q2 = Load256(x[b].qs + 32 * h);
      const int8_t* q8 = y[b].qs + 128 * h;
      MOEPOOL_UNROLL
      for (int j = 0; j < 4; ++j) {
        // Bit 4h + j of each hmask byte, moved to bit 2 (hmask is shifted right once per step;
        // bits leaking in from the neighbouring byte stay above bit 2).
        const __m256i high = _mm256_and_si256(_mm256_slli_epi16(hmask, 2), four);
        hmask = _mm256_srli_epi16(hmask, 1);
        const __m256i u =
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q2, 2 * j), low2), high);
        const __m256i sel = Int16PairSelector(2 * j, 2 * j + 1);
        sumi = AddScaledDot32(sumi, u, Load256(q8 + 32 * j), _mm256_shuffle_epi8(scales, sel));
      }
    }
    acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
  }
  return HorizontalSum(acc);
}

namespace {

template <bool kHasHighBit, typename Block, int kCols>
void DotK4StyleCols(int64_t n, const void* w, const void* a, size_t a_stride, float* out) {
  DotK4Style<kHasHighBit, kCols>(n, static_cast<const Block*>(w), static_cast<const uint8_t*>(a),
                                 a_stride, out);
}

template <int kCols>
void DotQ6KCols(int64_t n, const void* w, const void* a, size_t a_stride, float* out) {
  DotQ6K<kCols>(n, static_cast<const BlockQ6_K*>(w), static_cast<const uint8_t*>(a), a_stride, out);
}

}  // namespace

static_assert(kMultiCols == 8, "the tables below list 2..8 columns");
const MultiDotKernel MOEPOOL_ISA(kVecDotQ4_KCols)[kMultiCols + 1] = {
    nullptr,
    nullptr,
    &DotK4StyleCols<false, BlockQ4_K, 2>,
    &DotK4StyleCols<false, BlockQ4_K, 3>,
    &DotK4StyleCols<false, BlockQ4_K, 4>,
    &DotK4StyleCols<false, BlockQ4_K, 5>,
    &DotK4StyleCols<false, BlockQ4_K, 6>,
    &DotK4StyleCols<false, BlockQ4_K, 7>,
    &DotK4StyleCols<false, BlockQ4_K, 8>};
const MultiDotKernel MOEPOOL_ISA(kVecDotQ5_KCols)[kMultiCols + 1] = {
    nullptr,
    nullptr,
    &DotK4StyleCols<true, BlockQ5_K, 2>,
    &DotK4StyleCols<true, BlockQ5_K, 3>,
    &DotK4StyleCols<true, BlockQ5_K, 4>,
    &DotK4StyleCols<true, BlockQ5_K, 5>,
    &DotK4StyleCols<true, BlockQ5_K, 6>,
    &DotK4StyleCols<true, BlockQ5_K, 7>,
    &DotK4StyleCols<true, BlockQ5_K, 8>};
const MultiDotKernel MOEPOOL_ISA(kVecDotQ6_KCols)[kMultiCols + 1] = {
    nullptr,        nullptr,        &DotQ6KCols<2>, &DotQ6KCols<3>, &DotQ6KCols<4>,
    &DotQ6KCols<5>, &DotQ6KCols<6>, &DotQ6KCols<7>, &DotQ6KCols<8>};

}  // namespace moepool::kernels
