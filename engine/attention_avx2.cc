// AVX2 + F16C attention kernel (compiled with -mavx2 -mfma -mf16c). Same maths as the scalar
// reference in attention.cc, with 8-wide partial sums (so results differ from it in the last
// bits, not between runs or batches).
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
  // Softmax per head.
  for (int g = 0; g < group; ++g) {
    float* score = scratch + g * kv.n_kv;
    float mx = -INFINITY;
    for (int64_t p = 0; p < kv.n_kv; ++p) mx = std::max(mx, score[p]);
    float sum = 0.0f;
    for (int64_t p = 0; p < kv.n_kv; ++p) {
      score[p] = std::exp(score[p] - mx);
      sum += score[p];
    }
    const float inv = 1.0f / sum;
    for (int64_t p = 0; p < kv.n_kv; ++p) score[p] *= inv;
    std::fill(out + g * hd, out + (g + 1) * hd, 0.0f);
  }
  // Weighted sum of V: each V row is converted once per 8 elements and used by every head.
  for (int64_t j = 0, p = 0; j < n_blocks; ++j) {
    const uint16_t* vb = kv.VBlock(j);
    for (int64_t r = 0, m = kv.RowsIn(j); r < m; ++r, ++p) {
      const uint16_t* v = vb + r * kv.stride;
      for (int64_t i = 0; i < hd; i += 8) {
        const __m256 v8 = LoadHalf8(v + i);
        for (int g = 0; g < group; ++g) {
          float* o = out + g * hd + i;
          const __m256 w = _mm256_set1_ps(scratch[g * kv.n_kv + p]);
          _mm256_storeu_ps(o, _mm256_fmadd_ps(w, v8, _mm256_loadu_ps(o)));
        }
      }
    }
  }
}

}  // namespace moepool
