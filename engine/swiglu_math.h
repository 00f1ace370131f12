// SwiGLU's per-element maths, shared by the CPU engine (scalar and AVX2, engine/swiglu.h) and the
// CUDA kernels (engine/cuda/expert_math.h), so every device computes the same bits.
//
// The exponential is moepool's own: a fixed sequence of IEEE-754 operations (multiply, fused
// multiply-add, round to nearest, exact power-of-two scaling, divide), each correctly rounded on
// every conforming CPU and GPU. Its results therefore do not depend on the C library, the
// instruction set or the device (libm's expf differs between versions and vendors). Accuracy:
// within 2 ulp of exp on the range used (max relative error ~1.2e-7, tested).
//
// Plain header: compiles as C++ and as CUDA (__host__ __device__); pure functions.
#ifndef MOEPOOL_ENGINE_SWIGLU_MATH_H_
#define MOEPOOL_ENGINE_SWIGLU_MATH_H_

#include <cmath>

#if defined(__CUDACC__)
#define MOEPOOL_SWIGLU_HD __host__ __device__ __forceinline__
#else
#define MOEPOOL_SWIGLU_HD inline
#endif

namespace moepool::swiglu {

// Range reduction and polynomial constants: z = n ln2 + r with ln2 split in two (Cody-Waite),
// e^r on [-ln2/2, ln2/2] by a degree-6 polynomial (Cephes' expf coefficients).
inline constexpr float kLog2e = 1.44269504088896341f;
inline constexpr float kLn2Hi = 0.693359375f;
inline constexpr float kLn2Lo = -2.12194440e-4f;
inline constexpr float kP0 = 1.9875691500e-4f;
inline constexpr float kP1 = 1.3981999507e-3f;
inline constexpr float kP2 = 8.3334519073e-3f;
inline constexpr float kP3 = 4.1665795894e-2f;
inline constexpr float kP4 = 1.6666665459e-1f;
inline constexpr float kP5 = 5.0000001201e-1f;
// Inputs are clamped to [kMinArg, kMaxArg] so that 2^n stays a normal float; above kMaxArg the
// result is +inf (e^88.72 overflows), below kMinArg it is e^kMinArg (~1.6e-38: 1 + e == 1).
inline constexpr float kMinArg = -87.0f;
inline constexpr float kMaxArg = 88.0f;

// max/min with the SIMD semantics (the second operand when either is NaN).
MOEPOOL_SWIGLU_HD float MaxLikeSimd(float a, float b) { return a > b ? a : b; }
MOEPOOL_SWIGLU_HD float MinLikeSimd(float a, float b) { return a < b ? a : b; }

// e^z. Every step is a single correctly rounded IEEE operation.
MOEPOOL_SWIGLU_HD float Exp(float z) {
  const float zc = MinLikeSimd(MaxLikeSimd(z, kMinArg), kMaxArg);
  const float n = rintf(zc * kLog2e);  // round to nearest even (the default mode)
  float r = fmaf(n, -kLn2Hi, zc);
  r = fmaf(n, -kLn2Lo, r);
  float p = kP0;
  p = fmaf(p, r, kP1);
  p = fmaf(p, r, kP2);
  p = fmaf(p, r, kP3);
  p = fmaf(p, r, kP4);
  p = fmaf(p, r, kP5);
  p = fmaf(p, r * r, r);
  p = p + 1.0f;
  const float e = ldexpf(p, static_cast<int>(n));  // exact: n in [-126, 127]
  return z > kMaxArg ? INFINITY : e;
}

// SiLU(g) * u = g / (1 + e^-g) * u, in this order.
MOEPOOL_SWIGLU_HD float SiluMul(float g, float u) { return g / (1.0f + Exp(-g)) * u; }

}  // namespace moepool::swiglu

#endif  // MOEPOOL_ENGINE_SWIGLU_MATH_H_
