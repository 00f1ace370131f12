// Helpers shared by the reference quantizers (quantize.cc, quantize_k.cc), the dequantizers and the
// dot products. Internal to engine/quant; not part of the public kernel interface.
#ifndef MOEPOOL_ENGINE_QUANT_QUANTIZE_INTERNAL_H_
#define MOEPOOL_ENGINE_QUANT_QUANTIZE_INTERNAL_H_

#include <cmath>
#include <cstdint>

#include "engine/quant/fp16.h"

namespace moepool::kernels::internal {

inline constexpr float kMaxHalf = 65504.0f;

// Nearest integer to v (ties to even) clamped to [lo, hi]. Infinities clamp; NaN gives the
// value nearest to zero in range. Never undefined behaviour, whatever v is.
inline int RoundClamp(float v, int lo, int hi) {
  if (std::isnan(v)) return lo > 0 ? lo : (hi < 0 ? hi : 0);
  if (v <= static_cast<float>(lo)) return lo;
  if (v >= static_cast<float>(hi)) return hi;
  return static_cast<int>(std::nearbyint(v));
}

// A block scale (or min) as a finite half: NaN becomes 0 and magnitudes beyond the half range
// saturate, so a stored block can never dequantize to NaN or infinity.
inline uint16_t ScaleToHalf(float s) {
  if (std::isnan(s)) return 0;
  if (s > kMaxHalf) s = kMaxHalf;
  if (s < -kMaxHalf) s = -kMaxHalf;
  return Fp32ToFp16(s);
}

// 1 / d, or 0 when d is 0 (an all-zero block) or so small that the reciprocal overflows.
inline float SafeInverse(float d) {
  if (d == 0.0f) return 0.0f;
  const float id = 1.0f / d;
  return std::isfinite(id) ? id : 0.0f;
}

// 6-bit scale and min of sub-block j (0..7) of a Q4_K / Q5_K super-block. Bytes 0..3 hold the
// scales of sub-blocks 0..3 in their low 6 bits, bytes 4..7 the mins of 0..3; sub-blocks 4..7
// keep their low 4 bits in the nibbles of bytes 8..11 and their top 2 bits in the top 2 bits of
// bytes 0..7.
inline void UnpackScaleMinK4(int j, const uint8_t* packed, uint8_t* scale, uint8_t* min) {
  if (j < 4) {
    *scale = packed[j] & 63;
    *min = packed[j + 4] & 63;
  } else {
    *scale = static_cast<uint8_t>((packed[j + 4] & 0xF) | ((packed[j - 4] >> 6) << 4));
    *min = static_cast<uint8_t>((packed[j + 4] >> 4) | ((packed[j] >> 6) << 4));
  }
}

}  // namespace moepool::kernels::internal

#endif  // MOEPOOL_ENGINE_QUANT_QUANTIZE_INTERNAL_H_
