// AVX2 activation quantizers. Each produces exactly the blocks of its scalar counterpart in
// q8_activations.cc: the scale is computed by the same scalar expressions, the products x * id
// are the same IEEE multiplications, and the rounding modes are reproduced exactly (halves away
// from zero for Q8_0 / Q8_1, ties to even for Q8_K).
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "engine/quant/fp16.h"
#include "engine/quant/kernels.h"
#include "engine/quant/types.h"

namespace moepool::kernels {
namespace {

const __m256 kSignMask = _mm256_set1_ps(-0.0f);

float HorizontalMax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

// Largest |x| over 32 values.
float AbsMax32(const float* x) {
  __m256 m = _mm256_andnot_ps(kSignMask, _mm256_loadu_ps(x));
  for (int i = 8; i < 32; i += 8)
    m = _mm256_max_ps(m, _mm256_andnot_ps(kSignMask, _mm256_loadu_ps(x + i)));
  return HorizontalMax(m);
}

// Rounds to the nearest integer with halves away from zero (std::round), exactly: the
// fractional part x - trunc(x) is exact for |x| < 2^23.
__m256i RoundHalfAwayToInt(__m256 x) {
  const __m256 t = _mm256_round_ps(x, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
  const __m256 frac = _mm256_andnot_ps(kSignMask, _mm256_sub_ps(x, t));
  const __m256 away = _mm256_cmp_ps(frac, _mm256_set1_ps(0.5f), _CMP_GE_OQ);
  const __m256 one = _mm256_or_ps(_mm256_set1_ps(1.0f), _mm256_and_ps(kSignMask, x));
  return _mm256_cvttps_epi32(_mm256_add_ps(t, _mm256_and_ps(away, one)));
}

// Packs 4 x 8 int32 (each in int8 range) into 32 int8 in element order.
__m256i PackToInt8(__m256i a, __m256i b, __m256i c, __m256i d) {
  const __m256i ab = _mm256_packs_epi32(a, b);
  const __m256i cd = _mm256_packs_epi32(c, d);
  const __m256i abcd = _mm256_packs_epi16(ab, cd);
  // The packs interleave 128-bit lanes: restore the order of the 32-bit groups.
  return _mm256_permutevar8x32_epi32(abcd, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// Quantizes 32 floats with x * id rounded halves away from zero; returns the sum of the quants.
int QuantizeBlock32(const float* x, float id, int8_t* qs) {
  const __m256 vid = _mm256_set1_ps(id);
  __m256i q[4];
  for (int i = 0; i < 4; ++i) {
    q[i] = RoundHalfAwayToInt(_mm256_mul_ps(_mm256_loadu_ps(x + 8 * i), vid));
  }
  const __m256i packed = PackToInt8(q[0], q[1], q[2], q[3]);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(qs), packed);
  __m256i sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
  s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 1));
  return _mm_cvtsi128_si32(s);
}

}  // namespace

void QuantizeRowQ8_0Avx2(const float* src, void* dst, int64_t n) {
  auto* blocks = static_cast<BlockQ8_0*>(dst);
  for (int64_t b = 0; b < n / kQK8_0; ++b, src += kQK8_0) {
    const float d = AbsMax32(src) / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    blocks[b].d = Fp32ToFp16(d);
    QuantizeBlock32(src, id, blocks[b].qs);
  }
}

void QuantizeRowQ8_1Avx2(const float* src, void* dst, int64_t n) {
  auto* blocks = static_cast<BlockQ8_1*>(dst);
  for (int64_t b = 0; b < n / kQK8_1; ++b, src += kQK8_1) {
    const float d = AbsMax32(src) / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    blocks[b].d = Fp32ToFp16(d);
    const int sum = QuantizeBlock32(src, id, blocks[b].qs);
    blocks[b].s = Fp32ToFp16(static_cast<float>(sum) * d);
  }
}

void QuantizeRowQ8_KAvx2(const float* src, void* dst, int64_t n) {
  auto* blocks = static_cast<BlockQ8_K*>(dst);
  for (int64_t b = 0; b < n / kQK_K; ++b, src += kQK_K) {
    BlockQ8_K& y = blocks[b];
    __m256 m = _mm256_setzero_ps();
    for (int j = 0; j < kQK_K; j += 8) {
      m = _mm256_max_ps(m, _mm256_andnot_ps(kSignMask, _mm256_loadu_ps(src + j)));
    }
    const float amax = HorizontalMax(m);
    if (amax == 0.0f) {
      std::memset(&y, 0, sizeof(y));
      continue;
    }
    // The scalar version keeps the first value of largest magnitude (its sign matters).
    const __m256 vamax = _mm256_set1_ps(amax);
    float max = amax;
    for (int j = 0; j < kQK_K; j += 8) {
      const __m256 ax = _mm256_andnot_ps(kSignMask, _mm256_loadu_ps(src + j));
      const int hits = _mm256_movemask_ps(_mm256_cmp_ps(ax, vamax, _CMP_EQ_OQ));
      if (hits != 0) {
        max = src[j + __builtin_ctz(static_cast<unsigned>(hits))];
        break;
      }
    }
    const float iscale = -127.0f / max;
    const __m256 vscale = _mm256_set1_ps(iscale);
    const __m256i limit = _mm256_set1_epi8(127);
    for (int j = 0; j < kQK_K; j += 32) {
      __m256i q[4];
      for (int i = 0; i < 4; ++i) {
        const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(src + j + 8 * i), vscale);
        q[i] =
            _mm256_cvtps_epi32(_mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      }
      const __m256i packed = _mm256_min_epi8(PackToInt8(q[0], q[1], q[2], q[3]), limit);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y.qs + j), packed);
      // Sums of the two groups of 16: widen to int16 pairs, then fold each 128-bit lane.
      const __m256i pairs = _mm256_maddubs_epi16(_mm256_set1_epi8(1), packed);
      __m128i s = _mm_hadd_epi16(_mm256_castsi256_si128(pairs), _mm256_extracti128_si256(pairs, 1));
      s = _mm_hadd_epi16(s, s);
      s = _mm_hadd_epi16(s, s);
      // s now holds [sum(group 0), sum(group 1), ...] in its first two int16 lanes.
      y.bsums[j / 16] = static_cast<int16_t>(_mm_extract_epi16(s, 0));
      y.bsums[j / 16 + 1] = static_cast<int16_t>(_mm_extract_epi16(s, 1));
    }
    y.d = 1.0f / iscale;
  }
}

}  // namespace moepool::kernels
