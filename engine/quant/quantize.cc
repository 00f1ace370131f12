// Reference quantizers of the float and 32-element block types (k-quants: quantize_k.cc).
//
// Round-to-nearest with one scale per block, chosen from the block's extreme values. Quants are
// computed against the scale as stored (after rounding to half), so the stored block is the best
// round-to-nearest encoding for that scale. Scales saturate at the half range: any finite input
// yields finite dequantized values. Deterministic and thread-safe.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "engine/quant/fp16.h"
#include "engine/quant/kernels.h"
#include "engine/quant/quantize_internal.h"
#include "engine/quant/types.h"

namespace moepool::kernels {
namespace {

using internal::RoundClamp;
using internal::SafeInverse;
using internal::ScaleToHalf;

// The element of largest magnitude (sign kept); the first one on ties.
float SignedAbsMax(const float* x, int n) {
  float amax = 0.0f;
  float max = 0.0f;
  for (int j = 0; j < n; ++j) {
    const float a = std::fabs(x[j]);
    if (a > amax) {
      amax = a;
      max = x[j];
    }
  }
  return max;
}

void MinMax(const float* x, int n, float* min, float* max) {
  *min = x[0];
  *max = x[0];
  for (int j = 1; j < n; ++j) {
    if (x[j] < *min) *min = x[j];
    if (x[j] > *max) *max = x[j];
  }
}

// Symmetric 2^bits-level block: the largest-magnitude element maps to -2^(bits-1) exactly, so
// both signs use the full range. Writes the half scale and quants in [0, 2^bits).
void QuantizeSymmetricBlock(const float* x, int n, int bits, uint16_t* d_out, uint8_t* q) {
  const int half_levels = 1 << (bits - 1);
  const float max = SignedAbsMax(x, n);
  *d_out = ScaleToHalf(max / static_cast<float>(-half_levels));
  const float id = SafeInverse(Fp16ToFp32(*d_out));
  for (int j = 0; j < n; ++j) {
    q[j] = static_cast<uint8_t>(RoundClamp(x[j] * id, -half_levels, half_levels - 1) + half_levels);
  }
}

// Asymmetric block: x ~ d * q + m with q in [0, 2^bits - 1], m the block minimum.
void QuantizeAsymmetricBlock(const float* x, int n, int bits, uint16_t* d_out, uint16_t* m_out,
                             uint8_t* q) {
  const int top = (1 << bits) - 1;
  float min, max;
  MinMax(x, n, &min, &max);
  *d_out = ScaleToHalf((max - min) / static_cast<float>(top));
  *m_out = ScaleToHalf(min);
  const float id = SafeInverse(Fp16ToFp32(*d_out));
  const float m = Fp16ToFp32(*m_out);
  for (int j = 0; j < n; ++j) q[j] = static_cast<uint8_t>(RoundClamp((x[j] - m) * id, 0, top));
}

// Packs 32 quants of 4 bits: byte j = q[j] | q[j + 16] << 4.
void PackNibbles(const uint8_t* q, uint8_t* qs) {
  for (int j = 0; j < 16; ++j)
    qs[j] = static_cast<uint8_t>((q[j] & 0xF) | ((q[j + 16] & 0xF) << 4));
}

// Bit j of the result is bit 4 of q[j].
void PackFifthBits(const uint8_t* q, uint8_t* qh) {
  uint32_t bits = 0;
  for (int j = 0; j < 32; ++j) bits |= static_cast<uint32_t>((q[j] >> 4) & 1) << j;
  std::memcpy(qh, &bits, 4);
}

}  // namespace

void QuantizeRowF32(const float* src, void* dst, int64_t n) {
  std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
}

void QuantizeRowF16(const float* src, void* dst, int64_t n) {
  auto* out = static_cast<uint8_t*>(dst);
  for (int64_t i = 0; i < n; ++i) {
    const uint16_t h = Fp32ToFp16(src[i]);
    std::memcpy(out + 2 * i, &h, 2);
  }
}

void QuantizeRowBF16(const float* src, void* dst, int64_t n) {
  auto* out = static_cast<uint8_t*>(dst);
  for (int64_t i = 0; i < n; ++i) {
    const uint16_t h = Fp32ToBf16(src[i]);
    std::memcpy(out + 2 * i, &h, 2);
  }
}

void QuantizeRowQ4_0(const float* src, void* dst, int64_t n) {
  auto* blocks = static_cast<BlockQ4_0*>(dst);
  for (int64_t b = 0; b < n / kQK4_0; ++b) {
    uint8_t q[kQK4_0];
    QuantizeSymmetricBlock(src + b * kQK4_0, kQK4_0, 4, &blocks[b].d, q);
    PackNibbles(q, blocks[b].qs);
  }
}

void QuantizeRowQ4_1(const float* src, void* dst, int64_t n) {
  auto* blocks = static_cast<BlockQ4_1*>(dst);
  for (int64_t b = 0; b < n / kQK4_1; ++b) {
    uint8_t q[kQK4_1];
    QuantizeAsymmetricBlock(src + b * kQK4_1, kQK4_1, 4, &blocks[b].d, &blocks[b].m, q);
    PackNibbles(q, blocks[b].qs);
  }
}

void QuantizeRowQ5_0(const float* src, void* dst, int64_t n) {
  auto* blocks = static_cast<BlockQ5_0*>(dst);
  for (int64_t b = 0; b < n / kQK5_0; ++b) {
    uint8_t q[kQK5_0];
    QuantizeSymmetricBlock(src + b * kQK5_0, kQK5_0, 5, &blocks[b].d, q);
    PackNibbles(q, blocks[b].qs);
    PackFifthBits(q, blocks[b].qh);
  }
}

void QuantizeRowQ5_1(const float* src, void* dst, int64_t n) {
  auto* blocks = static_cast<BlockQ5_1*>(dst);
  for (int64_t b = 0; b < n / kQK5_1; ++b) {
    uint8_t q[kQK5_1];
    QuantizeAsymmetricBlock(src + b * kQK5_1, kQK5_1, 5, &blocks[b].d, &blocks[b].m, q);
    PackNibbles(q, blocks[b].qs);
    PackFifthBits(q, blocks[b].qh);
  }
}

}  // namespace moepool::kernels
