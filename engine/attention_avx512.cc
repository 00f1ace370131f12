// AVX-512 attention kernel (compiled with the VNNI flags, engine/CMakeLists.txt; called only
// where the avx512-vnni kernels are selected). The AVX2 kernel's arithmetic (attention_avx2.cc)
// at twice the width, with the same bits:
// - scores: two positions per 512-bit vector, each half accumulating its position's 8-lane
//   partial sums exactly as the AVX2 kernel does, then summed in the AVX2 kernel's order;
// - softmax: the same polynomial exp on 16 lanes (elementwise, so the same values), the sum of
//   the exps added 8 lanes at a time in the AVX2 order;
// - the weighted sum of V: elementwise fused multiply-adds over positions in order, 16 columns
//   per vector and up to 24 accumulators (the AVX2 kernel holds 8 of 8 columns).
// tests/engine/attention_test.cc checks the bits against the AVX2 kernel.
#include <immintrin.h>
// GCC 12's avx512fintrin.h builds its "undefined" vectors by self-initialisation, which
// -Wmaybe-uninitialized reports at every inlined conversion (a GCC false positive; see
// engine/quant/tile_vnni_internal.h).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include <algorithm>
#include <cmath>

#include "engine/attention.h"

namespace moepool {
namespace {

// The AVX2 kernel's horizontal sum: (l0 + l4) + (l2 + l6) and (l1 + l5) + (l3 + l7), in that
// order of additions.
inline float HorizontalSum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline __m256 LowHalf(__m512 v) { return _mm512_castps512_ps256(v); }
inline __m256 HighHalf(__m512 v) {
  return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
}

// 8 floats at p in both halves.
inline __m512 Broadcast8(const float* p) {
  return _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_castps_pd(_mm256_loadu_ps(p))));
}

// Two rows of 8 halves converted: a in the low half, b in the high half.
inline __m512 LoadHalf8x2(const uint16_t* a, const uint16_t* b) {
  const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(a));
  const __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b));
  return _mm512_cvtph_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1));
}

// The AVX2 kernel's ExpNonPositive on 16 lanes (the same operations per lane).
inline __m512 ExpNonPositive16(__m512 x) {
  const __m512 min_x = _mm512_set1_ps(-87.0f);
  const __mmask16 underflow = _mm512_cmp_ps_mask(x, min_x, _CMP_LT_OQ);
  x = _mm512_max_ps(x, min_x);
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  const __m512i bits =
      _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(k), _mm512_set1_epi32(127)), 23);
  return _mm512_maskz_mul_ps(static_cast<__mmask16>(~underflow), p, _mm512_castsi512_ps(bits));
}

// The AVX2 kernel's ExpNonPositive on 8 lanes, through the 16-lane one.
inline __m256 ExpNonPositive8(__m256 x) {
  return LowHalf(ExpNonPositive16(_mm512_castps256_ps512(x)));
}

// score[0, n) = exp(score - max) / sum, in place.
void Softmax(float* score, int64_t n) {
  float mx = -INFINITY;
  for (int64_t p = 0; p < n; ++p) mx = std::max(mx, score[p]);
  const __m512 mx16 = _mm512_set1_ps(mx);
  __m256 sum8 = _mm256_setzero_ps();
  int64_t p = 0;
  for (; p + 16 <= n; p += 16) {
    const __m512 e = ExpNonPositive16(_mm512_sub_ps(_mm512_loadu_ps(score + p), mx16));
    _mm512_storeu_ps(score + p, e);
    sum8 = _mm256_add_ps(_mm256_add_ps(sum8, LowHalf(e)), HighHalf(e));
  }
  for (; p + 8 <= n; p += 8) {
    const __m256 e = ExpNonPositive8(_mm256_sub_ps(_mm256_loadu_ps(score + p), LowHalf(mx16)));
    _mm256_storeu_ps(score + p, e);
    sum8 = _mm256_add_ps(sum8, e);
  }
  float sum = HorizontalSum8(sum8);
  for (; p < n; ++p) {
    score[p] = std::exp(score[p] - mx);
    sum += score[p];
  }
  const float inv = 1.0f / sum;
  for (p = 0; p < n; ++p) score[p] *= inv;
}

// scratch[g * n_kv + p] = (q_g . K[p]) * scale for the `group` heads, two positions at a time.
void Scores(const float* q, int group, int64_t hd, const KvHeadView& kv, float scale,
            float* scratch) {
  constexpr int kMaxGroup = 16;
  const int64_t n_blocks = kv.n_blocks();
  for (int64_t j = 0, p = 0; j < n_blocks; ++j) {
    const uint16_t* kb = kv.KBlock(j);
    const int64_t m = kv.RowsIn(j);
    int64_t r = 0;
    for (; r + 2 <= m; r += 2, p += 2) {
      const uint16_t* k0 = kb + r * kv.stride;
      const uint16_t* k1 = k0 + kv.stride;
      __m512 acc[kMaxGroup];
      for (int g = 0; g < group; ++g) acc[g] = _mm512_setzero_ps();
      for (int64_t i = 0; i < hd; i += 8) {
        const __m512 k16 = LoadHalf8x2(k0 + i, k1 + i);
        for (int g = 0; g < group; ++g) {
          acc[g] = _mm512_fmadd_ps(Broadcast8(q + g * hd + i), k16, acc[g]);
        }
      }
      for (int g = 0; g < group; ++g) {
        scratch[g * kv.n_kv + p] = HorizontalSum8(LowHalf(acc[g])) * scale;
        scratch[g * kv.n_kv + p + 1] = HorizontalSum8(HighHalf(acc[g])) * scale;
      }
    }
    if (r < m) {  // the block's last, single position: the AVX2 kernel's loop itself
      const uint16_t* k = kb + r * kv.stride;
      __m256 acc[kMaxGroup];
      for (int g = 0; g < group; ++g) acc[g] = _mm256_setzero_ps();
      for (int64_t i = 0; i < hd; i += 8) {
        const __m256 k8 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(k + i)));
        for (int g = 0; g < group; ++g) {
          acc[g] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * hd + i), k8, acc[g]);
        }
      }
      for (int g = 0; g < group; ++g) scratch[g * kv.n_kv + p] = HorizontalSum8(acc[g]) * scale;
      ++p;
    }
  }
}

// out [kGroup x hd] = sum over positions p of w[g][p] * V[p], 16 * kChunks columns at a time
// with the partial sums in registers; per element the positions are added in order from 0.
template <int kGroup>
void WeightedSumV(int64_t hd, const KvHeadView& kv, const float* w, float* out) {
  constexpr int kChunks = kGroup >= 24 ? 1 : (24 / kGroup > 8 ? 8 : 24 / kGroup);
  const int64_t n_blocks = kv.n_blocks();
  for (int64_t i = 0; i < hd; i += 16 * kChunks) {
    const int64_t width = std::min<int64_t>(16 * kChunks, hd - i);
    const int chunks = static_cast<int>((width + 15) / 16);
    // hd is a multiple of 8: the last chunk may hold 8 columns.
    const __mmask16 last = width % 16 == 0 ? 0xFFFF : 0x00FF;
    __m512 acc[kGroup][kChunks];
    for (int g = 0; g < kGroup; ++g) {
      for (int c = 0; c < kChunks; ++c) acc[g][c] = _mm512_setzero_ps();
    }
    for (int64_t j = 0, p = 0; j < n_blocks; ++j) {
      const uint16_t* vb = kv.VBlock(j);
      for (int64_t r = 0, m = kv.RowsIn(j); r < m; ++r, ++p) {
        const uint16_t* v = vb + r * kv.stride + i;
        for (int c = 0; c < kChunks; ++c) {
          if (c >= chunks) break;
          const __mmask16 mask = c + 1 == chunks ? last : 0xFFFF;
          const __m512 v16 = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, v + 16 * c));
          for (int g = 0; g < kGroup; ++g) {
            acc[g][c] = _mm512_fmadd_ps(_mm512_set1_ps(w[g * kv.n_kv + p]), v16, acc[g][c]);
          }
        }
      }
    }
    for (int g = 0; g < kGroup; ++g) {
      for (int c = 0; c < chunks; ++c) {
        const __mmask16 mask = c + 1 == chunks ? last : 0xFFFF;
        _mm512_mask_storeu_ps(out + g * hd + i + 16 * c, mask, acc[g][c]);
      }
    }
  }
}

}  // namespace

void AttendKvHeadAvx512(const float* q, int group, int64_t hd, const KvHeadView& kv, float scale,
                        float* out, float* scratch) {
  constexpr int kMaxGroup = 16;
  if (group > kMaxGroup) {  // as the AVX2 kernel: each query head is independent
    for (int g0 = 0; g0 < group; g0 += kMaxGroup) {
      AttendKvHeadAvx512(q + g0 * hd, std::min(kMaxGroup, group - g0), hd, kv, scale, out + g0 * hd,
                         scratch + static_cast<int64_t>(g0) * kv.n_kv);
    }
    return;
  }
  Scores(q, group, hd, kv, scale, scratch);
  for (int g = 0; g < group; ++g) Softmax(scratch + g * kv.n_kv, kv.n_kv);
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
