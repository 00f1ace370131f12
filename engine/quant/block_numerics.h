// The float steps of the k-quant dot products, shared by every build (scalar, AVX2, AVX512-VNNI,
// the multi-row kernels and the VNNI tiles) so that they all return the same bits.
//
// Per super-block b of 256 elements the integer part is exact and computed any way a kernel
// likes: S_b, the quant dot scaled by the sub-block scales (Q6_K: including its -32 offset), and
// for Q4_K / Q5_K M_b, the mins dot (sum over sub-blocks of min * sum of the activations). Only
// then floats enter, one super-block at a time, in block order, from acc = 0:
//   Q4_K, Q5_K: acc = fma(y.d, fma(d, float(S_b), -(dmin * float(M_b))), acc)
//   Q6_K:       acc = fma(y.d * d, float(S_b), acc)
// Because the integers do not depend on how they were computed, a row's result does not depend on
// the kernel, the instruction set or the batch it was computed in.
#ifndef MOEPOOL_ENGINE_QUANT_BLOCK_NUMERICS_H_
#define MOEPOOL_ENGINE_QUANT_BLOCK_NUMERICS_H_

#include <cmath>
#include <cstdint>

namespace moepool::kernels {

// One Q4_K / Q5_K super-block added to `acc`.
inline float AccumulateK4Block(float acc, float y_d, float d, float dmin, int32_t sumi,
                               int32_t mins) {
  const float block = std::fma(d, static_cast<float>(sumi), -(dmin * static_cast<float>(mins)));
  return std::fma(y_d, block, acc);
}

// One Q6_K super-block added to `acc`.
inline float AccumulateK6Block(float acc, float y_d, float d, int32_t sumi) {
  return std::fma(y_d * d, static_cast<float>(sumi), acc);
}

}  // namespace moepool::kernels

#endif  // MOEPOOL_ENGINE_QUANT_BLOCK_NUMERICS_H_
