// Inline AVX2 helpers shared by the *_avx2.cc dot-product files. Include only from files compiled
// with -mavx2 -mfma -mf16c (the *_avx2.cc files) or from their AVX512-VNNI builds (the *_vnni.cc
// wrappers); internal to engine/quant.
//
// Each dot-product file is compiled twice: as itself (exported names end in Avx2) and, through its
// *_vnni.cc wrapper, with -mavx512f -mavx512vl -mavx512bw -mavx512vnni (names end in Vnni). The
// VNNI build keeps 256-bit vectors but gets 32 of them and fused multiply-accumulates (vpdpbusd,
// vpdpwssd) that produce the same int32 lanes as the AVX2 instruction pairs they replace, so both
// builds return the same bits; types.cc picks the build the CPU runs.
#ifndef MOEPOOL_ENGINE_QUANT_VEC_DOT_AVX2_INTERNAL_H_
#define MOEPOOL_ENGINE_QUANT_VEC_DOT_AVX2_INTERNAL_H_

#include <immintrin.h>

#include <cstdint>
#include <cstring>

// Forces inlining of small helpers into the hot loops (the compiler otherwise may emit calls).
#define MOEPOOL_AVX2_INLINE inline __attribute__((always_inline))
// Fully unrolls a short constant-trip loop so per-iteration constants fold.
#define MOEPOOL_UNROLL _Pragma("GCC unroll 8")

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define MOEPOOL_KERNELS_VNNI 1
#define MOEPOOL_ISA(name) name##Vnni
#else
#define MOEPOOL_ISA(name) name##Avx2
#endif

// The helpers have internal linkage: each build of a kernel file gets its own copies, compiled
// for that build's instruction set.
namespace moepool::kernels::avx2 {
namespace {

MOEPOOL_AVX2_INLINE float HalfToFloat(uint16_t h) { return _cvtsh_ss(h); }

MOEPOOL_AVX2_INLINE float HorizontalSum(__m128 v) {
  v = _mm_add_ps(v, _mm_movehl_ps(v, v));
  v = _mm_add_ss(v, _mm_movehdup_ps(v));
  return _mm_cvtss_f32(v);
}

MOEPOOL_AVX2_INLINE float HorizontalSum(__m256 v) {
  return HorizontalSum(_mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1)));
}

// 8 int32 sums of 4 adjacent products u[i] * s[i] (u unsigned, s signed bytes). The int16
// pair sums saturate unless |u * s| <= 16383 per product; callers keep u <= 128 and |s| <= 127
// (or u <= 63).
MOEPOOL_AVX2_INLINE __m256i DotU8I8(__m256i u, __m256i s) {
#ifdef MOEPOOL_KERNELS_VNNI
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);  // same sums, never saturating
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

// acc + 8 int32 sums over 32 elements of u * a with int16 scales: `scales` holds the scale of
// the first 16 elements in its low 128-bit lane and that of the last 16 in its high lane
// (lane l of the sum: scale * (4 adjacent products)). Products must satisfy DotU8I8's bound.
MOEPOOL_AVX2_INLINE __m256i AddScaledDot32(__m256i acc, __m256i u, __m256i a, __m256i scales) {
#ifdef MOEPOOL_KERNELS_VNNI
  return _mm256_dpwssd_epi32(acc, _mm256_maddubs_epi16(u, a), scales);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, a), scales));
#endif
}

// As DotU8I8 for two signed vectors; `y` must not contain -128.
MOEPOOL_AVX2_INLINE __m256i DotI8I8(__m256i x, __m256i y) {
  return DotU8I8(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x));
}

// 16 packed bytes of nibbles -> 32 bytes: the low nibbles (elements 0..15) then the high
// nibbles (elements 16..31).
MOEPOOL_AVX2_INLINE __m256i UnpackNibbles16(const uint8_t* p) {
  const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256i both = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
  return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
}

// 32 bits (little-endian at p) -> 32 bytes, byte i = 0xFF when bit i is set, else 0.
MOEPOOL_AVX2_INLINE __m256i SpreadBits32(const uint8_t* p) {
  uint32_t bits;
  std::memcpy(&bits, p, 4);
  const __m256i byte_of_bit =
      _mm256_setr_epi64x(0, 0x0101010101010101, 0x0202020202020202, 0x0303030303030303);
  const __m256i spread =
      _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(bits)), byte_of_bit);
  const __m256i bit_of_byte = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ull));
  return _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit_of_byte), bit_of_byte);
}

// Shuffle control that fills the low 128-bit lane with int16 element k0 and the high lane with
// element k1 of a register whose two lanes hold the same 8 int16 values.
MOEPOOL_AVX2_INLINE __m256i Int16PairSelector(int k0, int k1) {
  return _mm256_set_m128i(_mm_set1_epi16(static_cast<int16_t>(0x0100 + 0x0202 * k1)),
                          _mm_set1_epi16(static_cast<int16_t>(0x0100 + 0x0202 * k0)));
}

// int16 scales for AddScaledDot64, from a register holding 8 int16 scales in both 128-bit halves:
// u0's products take scale u0_low in the low half and u0_high in the high half, u1's likewise.
// Layout: int16 elements 0..3 of a half hold u0's scale, elements 4..7 u1's.
MOEPOOL_AVX2_INLINE __m256i PairScales(__m256i scales, int u0_low, int u0_high, int u1_low,
                                       int u1_high) {
  const auto sel = [](int k) { return 0x01000100 + 0x02020202 * k; };  // int16 k, twice
  return _mm256_shuffle_epi8(
      scales, _mm256_setr_epi32(sel(u0_low), sel(u0_low), sel(u1_low), sel(u1_low), sel(u0_high),
                                sel(u0_high), sel(u1_high), sel(u1_high)));
}

// acc + the products u0 * a0 and u1 * a1 (64 elements in all) times their PairScales, in the
// "paired" lane layout: int32 lanes 0 and 1 of each 128-bit half take the sums of elements 0..7
// and 8..15 of u0's half, lanes 2 and 3 those of u1's. Exact when every 4-element sum fits int16
// (u <= 63, |a| <= 128). Both builds give the same int32 lanes from the 4-element sums:
//   AVX2: maddubs (2-element sums) and one horizontal add of the two (4-element sums, int16);
//   VNNI: vpdpbusd (4-element sums, int32), packed to int16;
// then one multiply-add of the int16 pairs by the scales.
MOEPOOL_AVX2_INLINE __m256i AddScaledDot64(__m256i acc, __m256i u0, __m256i a0, __m256i u1,
                                           __m256i a1, __m256i pair_scales) {
#ifdef MOEPOOL_KERNELS_VNNI
  const __m256i t0 = _mm256_dpbusd_epi32(_mm256_setzero_si256(), u0, a0);
  const __m256i t1 = _mm256_dpbusd_epi32(_mm256_setzero_si256(), u1, a1);
  return _mm256_dpwssd_epi32(acc, _mm256_packs_epi32(t0, t1), pair_scales);
#else
  const __m256i sums4 =
      _mm256_hadd_epi16(_mm256_maddubs_epi16(u0, a0), _mm256_maddubs_epi16(u1, a1));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(sums4, pair_scales));
#endif
}

}  // namespace
}  // namespace moepool::kernels::avx2

#endif  // MOEPOOL_ENGINE_QUANT_VEC_DOT_AVX2_INTERNAL_H_
