// The engine's vectorised uses of its own exponential (swiglu_math.h), with the same bits on every
// path: the SwiGLU gate of the CPU experts, and the softmax weights of temperature sampling.
#ifndef MOEPOOL_ENGINE_SWIGLU_H_
#define MOEPOOL_ENGINE_SWIGLU_H_

#include <cstdint>

namespace moepool {

// g [n] = SiLU(g) * u [n], in place. Thread-safe; picks AVX2 + FMA when UseAvx2Kernels().
void SwiGlu(float* g, const float* u, int64_t n);

// The portable reference and the AVX2 + FMA version (callable only where CpuHasAvx2());
// bit-identical for every input.
void SwiGluScalar(float* g, const float* u, int64_t n);
void SwiGluAvx2(float* g, const float* u, int64_t n);

// The largest finite value of x [n]; -inf when there is none. Thread-safe.
float MaxFinite(const float* x, int64_t n);

// w [n] = swiglu::Exp((x - max) / temperature) for finite x, 0 for infinite or NaN x: the
// unnormalised softmax weights of a sampler. Thread-safe; AVX2 + FMA when UseAvx2Kernels().
void SoftmaxWeights(const float* x, int64_t n, float max, float temperature, float* w);

// The reference and AVX2 versions of the two (bit-identical results).
float MaxFiniteScalar(const float* x, int64_t n);
float MaxFiniteAvx2(const float* x, int64_t n);
void SoftmaxWeightsScalar(const float* x, int64_t n, float max, float temperature, float* w);
void SoftmaxWeightsAvx2(const float* x, int64_t n, float max, float temperature, float* w);

}  // namespace moepool

#endif  // MOEPOOL_ENGINE_SWIGLU_H_
