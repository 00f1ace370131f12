// The SwiGLU gate of the CPU experts: g[i] = SiLU(g[i]) * u[i], vectorised where the CPU allows,
// with the same bits on every path (see swiglu_math.h).
#ifndef MOEPOOL_ENGINE_SWIGLU_H_
#define MOEPOOL_ENGINE_SWIGLU_H_

#include <cstdint>

namespace moepool {

// g [n] = SiLU(g) * u [n], in place. Thread-safe; picks AVX2 + FMA when CpuHasAvx2().
void SwiGlu(float* g, const float* u, int64_t n);

// The portable reference and the AVX2 + FMA version (callable only where CpuHasAvx2());
// bit-identical for every input.
void SwiGluScalar(float* g, const float* u, int64_t n);
void SwiGluAvx2(float* g, const float* u, int64_t n);

}  // namespace moepool

#endif  // MOEPOOL_ENGINE_SWIGLU_H_
