// The float steps of the k-quant dot products, shared by every build (scalar, AVX2, AVX512-VNNI,
// the multi-row kernels and the VNNI tiles) so that they all return the same bits.
//
// Per super-block b of 256 elements the integer part is exact and computed any way a kernel
// likes: S_b, the quant dot scaled by the sub-block scales (Q6_K: including its -32 offset), and
// for Q4_K / Q5_K M_b, the mins dot (sum over sub-blocks of min * sum of the activations). Only
// then floats enter, one super-block at a time, in block order, from acc = 0:
//   Q4_K, Q5_K: acc = fma(y.d, fma(d, float(S_b), -(dmin * float(M_b))), acc)
//   Q6_K:       acc = fma(y.d * d, float(S_b), acc)
// (Q8_0 below keeps eight such accumulators.)
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

// Q8_0 (32-element blocks): S_b is the exact integer dot of block b, and block b goes to lane
// b % 8 of eight float accumulators (so vector kernels keep 8 independent chains):
//   lane[b % 8] = fma(d_w * d_a, float(S_b), lane[b % 8]), all lanes from 0, and at the end
//   ((lane0 + lane4) + (lane2 + lane6)) + ((lane1 + lane5) + (lane3 + lane7)).
inline constexpr int kQ8_0Lanes = 8;

inline float AccumulateQ8_0Block(float lane, float d_w, float d_a, int32_t sumi) {
  return std::fma(d_w * d_a, static_cast<float>(sumi), lane);
}

inline float SumQ8_0Lanes(const float* lane) {
  return ((lane[0] + lane[4]) + (lane[2] + lane[6])) + ((lane[1] + lane[5]) + (lane[3] + lane[7]));
}

}  // namespace moepool::kernels

#endif  // MOEPOOL_ENGINE_QUANT_BLOCK_NUMERICS_H_
