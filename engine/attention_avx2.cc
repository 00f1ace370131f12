// AVX2 + F16C attention kernel (compiled with -mavx2 -mfma -mf16c). Same maths as the scalar
// reference in attention.cc, with 8-wide partial sums and a polynomial exp (so results differ
// from it in the last bits, not between runs or batches).
#include <immintrin.h>

#include <algorithm>
#include <cmath>

#include "engine/attention.h"

namespace moepool {
namespace {

inline float HorizontalSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline __m256 LoadHalf8(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// exp(x) for x <= 0 (softmax after subtracting the maximum), within 2 ulp of std::exp; 0 below
// -87 (where exp underflows). x = k ln2 + r with |r| <= ln2 / 2; exp(r) by its Taylor series to
// degree 6 (error < 2e-7 relative), times 2^k built in the exponent bits.
inline __m256 ExpNonPositive(__m256 x) {
  const __m256 min_x = _mm256_set1_ps(-87.0f);
  const __m256 underflow = _mm256_cmp_ps(x, min_x, _CMP_LT_OQ);
  x = _mm256_max_ps(x, min_x);
  const __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // r = x - k ln2, with ln2 split in a high part exact in float and a low correction.
  __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693145751953125f), x);
  r = _mm256_fnmadd_ps(k, _mm256_set1_ps(1.428606765330187e-06f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i bits =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(underflow, _mm256_mul_ps(p, _mm256_castsi256_ps(bits)));
}

// score[0, n) = exp(score - max) / sum, in place.
void Softmax(float* score, int64_t n) {
  float mx = -INFINITY;
  for (int64_t p = 0; p < n; ++p) mx = std::max(mx, score[p]);
  const __m256 mx8 = _mm256_set1_ps(mx);
  __m256 sum8 = _mm256_setzero_ps();
  int64_t p = 0;
  for (; p + 8 <= n; p += 8) {
    const __m256 e = ExpNonPositive(_mm256_sub_ps(_mm256_loadu_ps(score + p), mx8));
    _mm256_storeu_ps(score + p, e);
    sum8 = _mm256_add_ps(sum8, e);
  }
  float sum = HorizontalSum(sum8);
  for (; p < n; ++p) {
    score[p] = std::exp(score[p] - mx);
    sum += score[p];
  }
  const float inv = 1.0f / sum;
  for (p = 0; p < n; ++p) score[p] *= inv;
}

// out [kGroup x hd] = sum over positions p of w[g][p] * V[p], 8 * kChunks columns at a time with
// the partial sums in registers; per element the positions are added in order from 0.
template <int kGroup>
void WeightedSumV(int64_t hd, const KvHeadView& kv, const float* w, float* out) {
  // At most 8 accumulators: AVX2 has 16 vector registers.
  constexpr int kChunks = kGroup >= 8 ? 1 : (8 / kGroup > 4 ? 4 : 8 / kGroup);
  const int64_t n_blocks = kv.n_blocks();
  for (int64_t i = 0; i < hd; i += 8 * kChunks) {
    const int chunks = static_cast<int>(std::min<int64_t>(kChunks, (hd - i) / 8));
    __m256 acc[kGroup][kChunks];
    for (int g = 0; g < kGroup; ++g) {
      for (int c = 0; c < kChunks; ++c) acc[g][c] = _mm256_setzero_ps();
    }
    for (int64_t j = 0, p = 0; j < n_blocks; ++j) {
      const uint16_t* vb = kv.VBlock(j);
      for (int64_t r = 0, m = kv.RowsIn(j); r < m; ++r, ++p) {
        const uint16_t* v = vb + r * kv.stride + i;
        for (int c = 0; c < kChunks; ++c) {
          if (c >= chunks) break;
          const __m256 v8 = LoadHalf8(v + 8 * c);
          for (int g = 0; g < kGroup; ++g) {
            acc[g][c] = _mm256_fmadd_ps(_mm256_broadcast_ss(w + g * kv.n_kv + p), v8, acc[g][c]);
          }
        }
      }
    }
    for (int g = 0; g < kGroup; ++g) {
      for (int c = 0; c < chunks; ++c) _mm256_storeu_ps(out + g * hd + i + 8 * c, acc[g][c]);
    }
  }
}

}  // namespace

void AttendKvHeadAvx2(const float* q, int group, int64_t hd, const KvHeadView& kv, float scale,
                      float* out, float* scratch) {
  constexpr int kMaxGroup = 16;
  if (group > kMaxGroup) {
    // Split very wide groups; each query head is independent.
    for (int g0 = 0; g0 < group; g0 += kMaxGroup) {
      AttendKvHeadAvx2(q + g0 * hd, std::min(kMaxGroup, group - g0), hd, kv, scale, out + g0 * hd,
                       scratch + static_cast<int64_t>(g0) * kv.n_kv);
    }
    return;
  }
  // Scores: each K row is converted once and dotted with every query head of the group.
  const int64_t n_blocks = kv.n_blocks();
  for (int64_t j = 0, p = 0; j < n_blocks; ++j) {
    const uint16_t* kb = kv.KBlock(j);
    for (int64_t r = 0, m = kv.RowsIn(j); r < m; ++r, ++p) {
      const uint16_t* k = kb + r * kv.stride;
      __m256 acc[kMaxGroup];
      for (int g = 0; g < group; ++g) acc[g] = _mm256_setzero_ps();
      for (int64_t i = 0; i < hd; i += 8) {
        const __m256 kv8 = LoadHalf8(k + i);
        for (int g = 0; g < group; ++g) {
          acc[g] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * hd + i), kv8, acc[g]);
        }
      }
      for (int g = 0; g < group; ++g) scratch[g * kv.n_kv + p] = HorizontalSum(acc[g]) * scale;
    }
  }
  for (int g = 0; g < group; ++g) Softmax(scratch + g * kv.n_kv, kv.n_kv);
  // Weighted sum of V, each V row converted once per group of heads.
  switch (group) {
    case 1:
      return WeightedSumV<1>(hd, kv, scratch, out);
    case 2:
      return WeightedSumV<2>(hd, kv, scratch, out);
    case 4:
      return WeightedSumV<4>(hd, kv, scratch, out);
    case 8:
      return WeightedSumV<8>(hd, kv, scratch, out);
    default:
      for (int g = 0; g < group; ++g) WeightedSumV<1>(hd, kv, scratch + g * kv.n_kv, out + g * hd);
  }
}

}  // namespace moepool
