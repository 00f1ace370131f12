// AVX2 + FMA SwiGLU and sampling weights: swiglu::SiluMul and swiglu::Exp on 8 floats at a time,
// one instruction per scalar step.
#include <immintrin.h>

#include "engine/swiglu.h"
#include "engine/swiglu_math.h"

namespace moepool {
namespace {

__m256 Exp8(__m256 z) {
  using namespace swiglu;  // NOLINT(build/namespaces): the constants
  const __m256 zc =
      _mm256_min_ps(_mm256_max_ps(z, _mm256_set1_ps(kMinArg)), _mm256_set1_ps(kMaxArg));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(zc, _mm256_set1_ps(kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(-kLn2Hi), zc);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(-kLn2Lo), r);
  __m256 p = _mm256_set1_ps(kP0);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP1));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP2));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP3));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP4));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP5));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r);
  p = _mm256_add_ps(p, _mm256_set1_ps(1.0f));
  // 2^n built in the exponent field (n in [-126, 127]); the product is exact, as ldexpf.
  const __m256i bits =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 e = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
  const __m256 overflow = _mm256_cmp_ps(z, _mm256_set1_ps(kMaxArg), _CMP_GT_OQ);
  return _mm256_blendv_ps(e, _mm256_set1_ps(INFINITY), overflow);
}

}  // namespace

void SwiGluAvx2(float* g, const float* u, int64_t n) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 gv = _mm256_loadu_ps(g + i);
    const __m256 e = Exp8(_mm256_xor_ps(gv, sign));  // e^-g (negation is exact)
    const __m256 s = _mm256_div_ps(gv, _mm256_add_ps(one, e));
    _mm256_storeu_ps(g + i, _mm256_mul_ps(s, _mm256_loadu_ps(u + i)));
  }
  SwiGluScalar(g + i, u + i, n - i);
}

namespace {

// All-ones lanes where x is finite (|x| < inf; false for NaN).
__m256 FiniteMask(__m256 x) {
  const __m256 abs = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x);
  return _mm256_cmp_ps(abs, _mm256_set1_ps(INFINITY), _CMP_LT_OQ);
}

}  // namespace

float MaxFiniteAvx2(const float* x, int64_t n) {
  __m256 m = _mm256_set1_ps(-INFINITY);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    m = _mm256_max_ps(m, _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), v, FiniteMask(v)));
  }
  // The maximum of a set does not depend on the order it is taken in.
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, m);
  float best = MaxFiniteScalar(x + i, n - i);
  for (float v : lanes) best = v > best ? v : best;
  return best;
}

void SoftmaxWeightsAvx2(const float* x, int64_t n, float max, float temperature, float* w) {
  const __m256 shift = _mm256_set1_ps(max);
  const __m256 t = _mm256_set1_ps(temperature);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    const __m256 e = Exp8(_mm256_div_ps(_mm256_sub_ps(v, shift), t));
    _mm256_storeu_ps(w + i, _mm256_and_ps(e, FiniteMask(v)));
  }
  SoftmaxWeightsScalar(x + i, n - i, max, temperature, w + i);
}

}  // namespace moepool
