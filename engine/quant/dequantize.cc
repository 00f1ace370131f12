// Scalar dequantizers of the stored weight types. These define moepool's numerics: each one
// evaluates, in f32 and in the same order, the expression the GGUF reference dequantizer uses,
// so results agree with it bit for bit (up to multiply-add contraction, i.e. within 1 ulp).
//
// Q8_0, Q8_1 and Q8_K live with the activation quantizers (not in this file).
#include <cstdint>
#include <cstring>

#include "engine/quant/fp16.h"
#include "engine/quant/kernels.h"
#include "engine/quant/quantize_internal.h"
#include "engine/quant/types.h"

namespace moepool::kernels {
namespace {

uint32_t LoadU32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// Signed 6-bit scale of sub-block i (0..15) of a Q3_K super-block: low 4 bits in the nibbles of
// bytes 0..7 (low nibbles for 0..7, high nibbles for 8..15), top 2 bits in bytes 8..11.
int Q3KScale(int i, const uint8_t* packed) {
  const int low = i < 8 ? (packed[i] & 0xF) : (packed[i - 8] >> 4);
  const int high = (packed[8 + i % 4] >> (2 * (i / 4))) & 3;
  return (low | (high << 4)) - 32;
}

}  // namespace

void DequantizeRowF32(const void* src, float* dst, int64_t n) {
  std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
}

void DequantizeRowF16(const void* src, float* dst, int64_t n) {
  const auto* h = static_cast<const uint8_t*>(src);
  for (int64_t i = 0; i < n; ++i) {
    uint16_t bits;
    std::memcpy(&bits, h + 2 * i, 2);
    dst[i] = Fp16ToFp32(bits);
  }
}

void DequantizeRowBF16(const void* src, float* dst, int64_t n) {
  const auto* h = static_cast<const uint8_t*>(src);
  for (int64_t i = 0; i < n; ++i) {
    uint16_t bits;
    std::memcpy(&bits, h + 2 * i, 2);
    dst[i] = Bf16ToFp32(bits);
  }
}

void DequantizeRowQ4_0(const void* src, float* dst, int64_t n) {
  const auto* blocks = static_cast<const BlockQ4_0*>(src);
  for (int64_t b = 0; b < n / kQK4_0; ++b, dst += kQK4_0) {
    const BlockQ4_0& blk = blocks[b];
    const float d = Fp16ToFp32(blk.d);
    for (int j = 0; j < kQK4_0 / 2; ++j) {
      const int lo = (blk.qs[j] & 0xF) - 8;
      const int hi = (blk.qs[j] >> 4) - 8;
      dst[j] = static_cast<float>(lo) * d;
      dst[j + kQK4_0 / 2] = static_cast<float>(hi) * d;
    }
  }
}

void DequantizeRowQ4_1(const void* src, float* dst, int64_t n) {
  const auto* blocks = static_cast<const BlockQ4_1*>(src);
  for (int64_t b = 0; b < n / kQK4_1; ++b, dst += kQK4_1) {
    const BlockQ4_1& blk = blocks[b];
    const float d = Fp16ToFp32(blk.d);
    const float m = Fp16ToFp32(blk.m);
    for (int j = 0; j < kQK4_1 / 2; ++j) {
      const int lo = blk.qs[j] & 0xF;
      const int hi = blk.qs[j] >> 4;
      dst[j] = static_cast<float>(lo) * d + m;
      dst[j + kQK4_1 / 2] = static_cast<float>(hi) * d + m;
    }
  }
}

void DequantizeRowQ5_0(const void* src, float* dst, int64_t n) {
  const auto* blocks = static_cast<const BlockQ5_0*>(src);
  for (int64_t b = 0; b < n / kQK5_0; ++b, dst += kQK5_0) {
    const BlockQ5_0& blk = blocks[b];
    const float d = Fp16ToFp32(blk.d);
    const uint32_t qh = LoadU32(blk.qh);
    for (int j = 0; j < kQK5_0 / 2; ++j) {
      const int hbit_lo = static_cast<int>((qh >> j) & 1u) << 4;
      const int hbit_hi = static_cast<int>((qh >> (j + kQK5_0 / 2)) & 1u) << 4;
      const int lo = ((blk.qs[j] & 0xF) | hbit_lo) - 16;
      const int hi = ((blk.qs[j] >> 4) | hbit_hi) - 16;
      dst[j] = static_cast<float>(lo) * d;
      dst[j + kQK5_0 / 2] = static_cast<float>(hi) * d;
    }
  }
}

void DequantizeRowQ5_1(const void* src, float* dst, int64_t n) {
  const auto* blocks = static_cast<const BlockQ5_1*>(src);
  for (int64_t b = 0; b < n / kQK5_1; ++b, dst += kQK5_1) {
    const BlockQ5_1& blk = blocks[b];
    const float d = Fp16ToFp32(blk.d);
    const float m = Fp16ToFp32(blk.m);
    const uint32_t qh = LoadU32(blk.qh);
    for (int j = 0; j < kQK5_1 / 2; ++j) {
      const int hbit_lo = static_cast<int>((qh >> j) & 1u) << 4;
      const int hbit_hi = static_cast<int>((qh >> (j + kQK5_1 / 2)) & 1u) << 4;
      const int lo = (blk.qs[j] & 0xF) | hbit_lo;
      const int hi = (blk.qs[j] >> 4) | hbit_hi;
      dst[j] = static_cast<float>(lo) * d + m;
      dst[j + kQK5_1 / 2] = static_cast<float>(hi) * d + m;
    }
  }
}

// Q2_K: 16 sub-blocks of 16; element e uses scale byte e / 16 and 2-bit quant
// (qs[32 * (e / 128) + e % 32] >> (2 * ((e % 128) / 32))) & 3.
void DequantizeRowQ2_K(const void* src, float* dst, int64_t n) {
  const auto* blocks = static_cast<const BlockQ2_K*>(src);
  for (int64_t b = 0; b < n / kQK_K; ++b) {
    const BlockQ2_K& blk = blocks[b];
    const float d = Fp16ToFp32(blk.d);
    const float dmin = Fp16ToFp32(blk.dmin);
    for (int sub = 0; sub < kQK_K / 16; ++sub) {
      const uint8_t sc = blk.scales[sub];
      const float dl = d * static_cast<float>(sc & 0xF);
      const float ml = dmin * static_cast<float>(sc >> 4);
      for (int l = 0; l < 16; ++l) {
        const int e = sub * 16 + l;
        const uint8_t q = blk.qs[32 * (e / 128) + e % 32];
        const int v = (q >> (2 * ((e % 128) / 32))) & 3;
        *dst++ = dl * static_cast<float>(v) - ml;
      }
    }
  }
}

// Q3_K: like Q2_K's layout for the low 2 bits; the third bit of element e is bit
// (e / 32) of hmask[e % 32], and a clear bit means "subtract 4".
void DequantizeRowQ3_K(const void* src, float* dst, int64_t n) {
  const auto* blocks = static_cast<const BlockQ3_K*>(src);
  for (int64_t b = 0; b < n / kQK_K; ++b) {
    const BlockQ3_K& blk = blocks[b];
    const float d_all = Fp16ToFp32(blk.d);
    for (int sub = 0; sub < kQK_K / 16; ++sub) {
      const float dl = d_all * static_cast<float>(Q3KScale(sub, blk.scales));
      for (int l = 0; l < 16; ++l) {
        const int e = sub * 16 + l;
        const uint8_t q = blk.qs[32 * (e / 128) + e % 32];
        const int low = (q >> (2 * ((e % 128) / 32))) & 3;
        const int high_set = (blk.hmask[e % 32] >> (e / 32)) & 1;
        *dst++ = dl * static_cast<float>(low - (high_set ? 0 : 4));
      }
    }
  }
}

// Q4_K: 4 chunks of 64; chunk c holds sub-blocks 2c (low nibbles of qs[32c..32c+31]) and 2c+1
// (high nibbles).
void DequantizeRowQ4_K(const void* src, float* dst, int64_t n) {
  const auto* blocks = static_cast<const BlockQ4_K*>(src);
  for (int64_t b = 0; b < n / kQK_K; ++b) {
    const BlockQ4_K& blk = blocks[b];
    const float d = Fp16ToFp32(blk.d);
    const float dmin = Fp16ToFp32(blk.dmin);
    for (int c = 0; c < kQK_K / 64; ++c) {
      const uint8_t* q = blk.qs + 32 * c;
      uint8_t sc, m;
      internal::UnpackScaleMinK4(2 * c, blk.scales, &sc, &m);
      const float d1 = d * static_cast<float>(sc);
      const float m1 = dmin * static_cast<float>(m);
      internal::UnpackScaleMinK4(2 * c + 1, blk.scales, &sc, &m);
      const float d2 = d * static_cast<float>(sc);
      const float m2 = dmin * static_cast<float>(m);
      for (int l = 0; l < 32; ++l) *dst++ = d1 * static_cast<float>(q[l] & 0xF) - m1;
      for (int l = 0; l < 32; ++l) *dst++ = d2 * static_cast<float>(q[l] >> 4) - m2;
    }
  }
}

// Q5_K: Q4_K plus a fifth bit: for chunk c, bit 2c of qh[l] for the low-nibble half and bit
// 2c + 1 for the high-nibble half.
void DequantizeRowQ5_K(const void* src, float* dst, int64_t n) {
  const auto* blocks = static_cast<const BlockQ5_K*>(src);
  for (int64_t b = 0; b < n / kQK_K; ++b) {
    const BlockQ5_K& blk = blocks[b];
    const float d = Fp16ToFp32(blk.d);
    const float dmin = Fp16ToFp32(blk.dmin);
    for (int c = 0; c < kQK_K / 64; ++c) {
      const uint8_t* ql = blk.qs + 32 * c;
      const uint8_t bit_lo = static_cast<uint8_t>(1u << (2 * c));
      const uint8_t bit_hi = static_cast<uint8_t>(2u << (2 * c));
      uint8_t sc, m;
      internal::UnpackScaleMinK4(2 * c, blk.scales, &sc, &m);
      const float d1 = d * static_cast<float>(sc);
      const float m1 = dmin * static_cast<float>(m);
      internal::UnpackScaleMinK4(2 * c + 1, blk.scales, &sc, &m);
      const float d2 = d * static_cast<float>(sc);
      const float m2 = dmin * static_cast<float>(m);
      for (int l = 0; l < 32; ++l) {
        const int v = (ql[l] & 0xF) + ((blk.qh[l] & bit_lo) ? 16 : 0);
        *dst++ = d1 * static_cast<float>(v) - m1;
      }
      for (int l = 0; l < 32; ++l) {
        const int v = (ql[l] >> 4) + ((blk.qh[l] & bit_hi) ? 16 : 0);
        *dst++ = d2 * static_cast<float>(v) - m2;
      }
    }
  }
}

// Q6_K: two halves of 128. In half h, for l < 32, the four elements l, l+32, l+64, l+96 take
// their low 4 bits from ql[64h+l] (lo, hi nibble for +0, +64) and ql[64h+l+32] (for +32, +96),
// and their top 2 bits from qh[32h+l] bits 0-1, 2-3, 4-5, 6-7 (for +0, +32, +64, +96).
void DequantizeRowQ6_K(const void* src, float* dst, int64_t n) {
  const auto* blocks = static_cast<const BlockQ6_K*>(src);
  for (int64_t b = 0; b < n / kQK_K; ++b) {
    const BlockQ6_K& blk = blocks[b];
    const float d = Fp16ToFp32(blk.d);
    for (int h = 0; h < 2; ++h) {
      const uint8_t* ql = blk.ql + 64 * h;
      const uint8_t* qh = blk.qh + 32 * h;
      const int8_t* sc = blk.scales + 8 * h;
      float* y = dst + 128 * h;
      for (int l = 0; l < 32; ++l) {
        const int is = l / 16;
        const int q0 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
        const int q1 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
        const int q2 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
        const int q3 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
        y[l] = d * static_cast<float>(sc[is + 0]) * static_cast<float>(q0);
        y[l + 32] = d * static_cast<float>(sc[is + 2]) * static_cast<float>(q1);
        y[l + 64] = d * static_cast<float>(sc[is + 4]) * static_cast<float>(q2);
        y[l + 96] = d * static_cast<float>(sc[is + 6]) * static_cast<float>(q3);
      }
    }
    dst += kQK_K;
  }
}

}  // namespace moepool::kernels
