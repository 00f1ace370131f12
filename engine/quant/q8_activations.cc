// Scalar Q8_0 / Q8_1 / Q8_K quantizers and dequantizers. These are the reference numerics of the
// activation formats: q8_activations_avx2.cc reproduces them bit for bit. Q8_0 is also a stored
// weight type and QuantizeRowQ8_0 is its weight quantizer.
//
//   Q8_0: d = amax / 127 stored as half, q = round(x / d) (halves away from zero, computed as
//         x * (1 / d)).
//   Q8_1: as Q8_0, plus s = d * sum(q) stored as half.
//   Q8_K: float d; the signed value of largest magnitude `max` maps to -127
//         (iscale = -127 / max), q = nearest (ties to even) clamped to 127, d = 1 / iscale, and
//         bsums[g] = sum of the 16 quants of group g.
// Inputs must be finite (a NaN or infinity in an activation row is already a broken model).
#include <cmath>
#include <cstdint>
#include <cstring>

#include "engine/quant/fp16.h"
#include "engine/quant/kernels.h"
#include "engine/quant/types.h"

namespace moepool::kernels {
namespace {

float AbsMaxOf(const float* x, int count) {
  float amax = 0.0f;
  for (int j = 0; j < count; ++j) amax = std::fmax(amax, std::fabs(x[j]));
  return amax;
}

// Nearest integer, ties to even, for |v| < 2^22 (adding 1.5 * 2^23 leaves the rounded integer in
// the low mantissa bits).
int NearestInt(float v) {
  const float shifted = v + 12582912.0f;
  int32_t bits;
  std::memcpy(&bits, &shifted, 4);
  return (bits & 0x007fffff) - 0x00400000;
}

}  // namespace

void QuantizeRowQ8_0(const float* src, void* dst, int64_t n) {
  auto* blocks = static_cast<BlockQ8_0*>(dst);
  for (int64_t b = 0; b < n / kQK8_0; ++b, src += kQK8_0) {
    const float d = AbsMaxOf(src, kQK8_0) / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    blocks[b].d = Fp32ToFp16(d);
    for (int j = 0; j < kQK8_0; ++j) {
      blocks[b].qs[j] = static_cast<int8_t>(std::round(src[j] * id));
    }
  }
}

void QuantizeRowQ8_1(const float* src, void* dst, int64_t n) {
  auto* blocks = static_cast<BlockQ8_1*>(dst);
  for (int64_t b = 0; b < n / kQK8_1; ++b, src += kQK8_1) {
    const float d = AbsMaxOf(src, kQK8_1) / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    blocks[b].d = Fp32ToFp16(d);
    int sum = 0;
    for (int j = 0; j < kQK8_1; ++j) {
      const int q = static_cast<int>(std::round(src[j] * id));
      blocks[b].qs[j] = static_cast<int8_t>(q);
      sum += q;
    }
    blocks[b].s = Fp32ToFp16(static_cast<float>(sum) * d);
  }
}

void QuantizeRowQ8_K(const float* src, void* dst, int64_t n) {
  auto* blocks = static_cast<BlockQ8_K*>(dst);
  for (int64_t b = 0; b < n / kQK_K; ++b, src += kQK_K) {
    BlockQ8_K& y = blocks[b];
    float amax = 0.0f;
    float max = 0.0f;  // the first value of largest magnitude, with its sign
    for (int j = 0; j < kQK_K; ++j) {
      const float ax = std::fabs(src[j]);
      if (ax > amax) {
        amax = ax;
        max = src[j];
      }
    }
    if (amax == 0.0f) {
      std::memset(&y, 0, sizeof(y));
      continue;
    }
    const float iscale = -127.0f / max;
    for (int j = 0; j < kQK_K; ++j) {
      const int q = NearestInt(iscale * src[j]);
      y.qs[j] = static_cast<int8_t>(q < 127 ? q : 127);
    }
    for (int g = 0; g < kQK_K / 16; ++g) {
      int sum = 0;
      for (int l = 0; l < 16; ++l) sum += y.qs[16 * g + l];
      y.bsums[g] = static_cast<int16_t>(sum);
    }
    y.d = 1.0f / iscale;
  }
}

void DequantizeRowQ8_0(const void* src, float* dst, int64_t n) {
  const auto* blocks = static_cast<const BlockQ8_0*>(src);
  for (int64_t b = 0; b < n / kQK8_0; ++b, dst += kQK8_0) {
    const float d = Fp16ToFp32(blocks[b].d);
    for (int j = 0; j < kQK8_0; ++j) dst[j] = static_cast<float>(blocks[b].qs[j]) * d;
  }
}

void DequantizeRowQ8_1(const void* src, float* dst, int64_t n) {
  const auto* blocks = static_cast<const BlockQ8_1*>(src);
  for (int64_t b = 0; b < n / kQK8_1; ++b, dst += kQK8_1) {
    const float d = Fp16ToFp32(blocks[b].d);
    for (int j = 0; j < kQK8_1; ++j) dst[j] = static_cast<float>(blocks[b].qs[j]) * d;
  }
}

void DequantizeRowQ8_K(const void* src, float* dst, int64_t n) {
  const auto* blocks = static_cast<const BlockQ8_K*>(src);
  for (int64_t b = 0; b < n / kQK_K; ++b, dst += kQK_K) {
    for (int j = 0; j < kQK_K; ++j) dst[j] = blocks[b].d * static_cast<float>(blocks[b].qs[j]);
  }
}

}  // namespace moepool::kernels
