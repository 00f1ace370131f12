#include "engine/swiglu.h"

#include "engine/quant/types.h"
#include "engine/swiglu_math.h"

namespace moepool {

void SwiGluScalar(float* g, const float* u, int64_t n) {
  for (int64_t i = 0; i < n; ++i) g[i] = swiglu::SiluMul(g[i], u[i]);
}

void SwiGlu(float* g, const float* u, int64_t n) {
#ifdef MOEPOOL_HAVE_AVX2_KERNELS
  if (CpuHasAvx2()) {
    SwiGluAvx2(g, u, n);
    return;
  }
#endif
  SwiGluScalar(g, u, n);
}

}  // namespace moepool
