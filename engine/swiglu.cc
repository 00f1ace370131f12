#include "engine/swiglu.h"

#include <cmath>

#include "engine/quant/types.h"
#include "engine/swiglu_math.h"

namespace moepool {

void SwiGluScalar(float* g, const float* u, int64_t n) {
  for (int64_t i = 0; i < n; ++i) g[i] = swiglu::SiluMul(g[i], u[i]);
}

void SwiGlu(float* g, const float* u, int64_t n) {
#ifdef MOEPOOL_HAVE_AVX2_KERNELS
  if (UseAvx2Kernels()) {
    SwiGluAvx2(g, u, n);
    return;
  }
#endif
  SwiGluScalar(g, u, n);
}

float MaxFiniteScalar(const float* x, int64_t n) {
  float m = -INFINITY;
  for (int64_t i = 0; i < n; ++i) {
    if (std::isfinite(x[i]) && x[i] > m) m = x[i];
  }
  return m;
}

void SoftmaxWeightsScalar(const float* x, int64_t n, float max, float temperature, float* w) {
  for (int64_t i = 0; i < n; ++i) {
    w[i] = std::isfinite(x[i]) ? swiglu::Exp((x[i] - max) / temperature) : 0.0f;
  }
}

float MaxFinite(const float* x, int64_t n) {
#ifdef MOEPOOL_HAVE_AVX2_KERNELS
  if (UseAvx2Kernels()) return MaxFiniteAvx2(x, n);
#endif
  return MaxFiniteScalar(x, n);
}

void SoftmaxWeights(const float* x, int64_t n, float max, float temperature, float* w) {
#ifdef MOEPOOL_HAVE_AVX2_KERNELS
  if (UseAvx2Kernels()) {
    SoftmaxWeightsAvx2(x, n, max, temperature, w);
    return;
  }
#endif
  SoftmaxWeightsScalar(x, n, max, temperature, w);
}

}  // namespace moepool
