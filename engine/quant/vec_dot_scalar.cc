// Portable reference dot products: a weight row of each stored type against an activation row of
// its vec_dot_type. Quantized types form the exact integer dot product of each (sub-)block and
// scale it in float, as the GGUF reference does; float types accumulate in double. Q4_K, Q5_K,
// Q6_K and Q8_0 follow block_numerics.h, so the SIMD builds return exactly these bits.
#include <cstdint>
#include <cstring>

#include "engine/quant/block_numerics.h"
#include "engine/quant/fp16.h"
#include "engine/quant/kernels.h"
#include "engine/quant/quantize_internal.h"
#include "engine/quant/types.h"

namespace moepool::kernels {
namespace {

uint16_t LoadU16(const void* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

uint32_t LoadU32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// Sub-block j (0..7) scale and min of a Q4_K / Q5_K super-block's 12 packed bytes.
void ScaleMinK4(int j, const uint8_t* packed, int* scale, int* min) {
  uint8_t s, m;
  internal::UnpackScaleMinK4(j, packed, &s, &m);
  *scale = s;
  *min = m;
}

// Mins term of the k-quants with per-32 mins: sum over sub-blocks of min * (sum of its quants).
int MinsDotK4(const uint8_t* packed, const int16_t* bsums) {
  int total = 0;
  for (int j = 0; j < 8; ++j) {
    int scale, min;
    ScaleMinK4(j, packed, &scale, &min);
    total += min * (bsums[2 * j] + bsums[2 * j + 1]);
  }
  return total;
}

}  // namespace

float VecDotF32Scalar(int64_t n, const void* w, const void* a) {
  const auto* x = static_cast<const float*>(w);
  const auto* y = static_cast<const float*>(a);
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) sum += static_cast<double>(x[i]) * y[i];
  return static_cast<float>(sum);
}

float VecDotF16Scalar(int64_t n, const void* w, const void* a) {
  const auto* x = static_cast<const uint8_t*>(w);
  const auto* y = static_cast<const float*>(a);
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) sum += static_cast<double>(Fp16ToFp32(LoadU16(x + 2 * i))) * y[i];
  return static_cast<float>(sum);
}

float VecDotBF16Scalar(int64_t n, const void* w, const void* a) {
  const auto* x = static_cast<const uint8_t*>(w);
  const auto* y = static_cast<const float*>(a);
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) sum += static_cast<double>(Bf16ToFp32(LoadU16(x + 2 * i))) * y[i];
  return static_cast<float>(sum);
}

float VecDotQ4_0Scalar(int64_t n, const void* w, const void* a) {
  const auto* x = static_cast<const BlockQ4_0*>(w);
  const auto* y = static_cast<const BlockQ8_0*>(a);
  float sum = 0.0f;
  for (int64_t b = 0; b < n / kQK4_0; ++b) {
    int isum = 0;
    for (int j = 0; j < kQK4_0 / 2; ++j) {
      isum += ((x[b].qs[j] & 0xF) - 8) * y[b].qs[j];
      isum += ((x[b].qs[j] >> 4) - 8) * y[b].qs[j + kQK4_0 / 2];
    }
    sum += static_cast<float>(isum) * (Fp16ToFp32(x[b].d) * Fp16ToFp32(y[b].d));
  }
  return sum;
}

float VecDotQ4_1Scalar(int64_t n, const void* w, const void* a) {
  const auto* x = static_cast<const BlockQ4_1*>(w);
  const auto* y = static_cast<const BlockQ8_1*>(a);
  float sum = 0.0f;
  for (int64_t b = 0; b < n / kQK4_1; ++b) {
    int isum = 0;
    for (int j = 0; j < kQK4_1 / 2; ++j) {
      isum += (x[b].qs[j] & 0xF) * y[b].qs[j];
      isum += (x[b].qs[j] >> 4) * y[b].qs[j + kQK4_1 / 2];
    }
    sum += static_cast<float>(isum) * (Fp16ToFp32(x[b].d) * Fp16ToFp32(y[b].d)) +
           Fp16ToFp32(x[b].m) * Fp16ToFp32(y[b].s);
  }
  return sum;
}

float VecDotQ5_0Scalar(int64_t n, const void* w, const void* a) {
  const auto* x = static_cast<const BlockQ5_0*>(w);
  const auto* y = static_cast<const BlockQ8_0*>(a);
  float sum = 0.0f;
  for (int64_t b = 0; b < n / kQK5_0; ++b) {
    const uint32_t qh = LoadU32(x[b].qh);
    int isum = 0;
    for (int j = 0; j < kQK5_0 / 2; ++j) {
      const int lo = (x[b].qs[j] & 0xF) | (((qh >> j) & 1) << 4);
      const int hi = (x[b].qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
      isum += (lo - 16) * y[b].qs[j] + (hi - 16) * y[b].qs[j + kQK5_0 / 2];
    }
    sum += static_cast<float>(isum) * (Fp16ToFp32(x[b].d) * Fp16ToFp32(y[b].d));
  }
  return sum;
}

float VecDotQ5_1Scalar(int64_t n, const void* w, const void* a) {
  const auto* x = static_cast<const BlockQ5_1*>(w);
  const auto* y = static_cast<const BlockQ8_1*>(a);
  float sum = 0.0f;
  for (int64_t b = 0; b < n / kQK5_1; ++b) {
    const uint32_t qh = LoadU32(x[b].qh);
    int isum = 0;
    for (int j = 0; j < kQK5_1 / 2; ++j) {
      const int lo = (x[b].qs[j] & 0xF) | (((qh >> j) & 1) << 4);
      const int hi = (x[b].qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
      isum += lo * y[b].qs[j] + hi * y[b].qs[j + kQK5_1 / 2];
    }
    sum += static_cast<float>(isum) * (Fp16ToFp32(x[b].d) * Fp16ToFp32(y[b].d)) +
           Fp16ToFp32(x[b].m) * Fp16ToFp32(y[b].s);
  }
  return sum;
}

float VecDotQ8_0Scalar(int64_t n, const void* w, const void* a) {
  const auto* x = static_cast<const BlockQ8_0*>(w);
  const auto* y = static_cast<const BlockQ8_0*>(a);
  float lanes[kQ8_0Lanes] = {};
  for (int64_t b = 0; b < n / kQK8_0; ++b) {
    int isum = 0;
    for (int j = 0; j < kQK8_0; ++j) isum += x[b].qs[j] * y[b].qs[j];
    float& lane = lanes[b % kQ8_0Lanes];
    lane = AccumulateQ8_0Block(lane, Fp16ToFp32(x[b].d), Fp16ToFp32(y[b].d), isum);
  }
  return SumQ8_0Lanes(lanes);
}

// Q2_K: 16 sub-blocks of 16; byte scales[i] = scale (low nibble) | min (high nibble). Element
// 128 * h + 32 * j + l is bits 2j..2j+1 of qs[32 * h + l]; its sub-block is 8h + 2j + l / 16.
float VecDotQ2_KScalar(int64_t n, const void* w, const void* a) {
  const auto* x = static_cast<const BlockQ2_K*>(w);
  const auto* y = static_cast<const BlockQ8_K*>(a);
  float sum = 0.0f;
  for (int64_t b = 0; b < n / kQK_K; ++b) {
    int mins = 0;
    for (int i = 0; i < 16; ++i) mins += (x[b].scales[i] >> 4) * y[b].bsums[i];
    int isum = 0;
    for (int h = 0; h < 2; ++h) {
      for (int j = 0; j < 4; ++j) {
        for (int half = 0; half < 2; ++half) {
          const int sub = 8 * h + 2 * j + half;
          const int8_t* q8 = y[b].qs + 128 * h + 32 * j + 16 * half;
          const uint8_t* q2 = x[b].qs + 32 * h + 16 * half;
          int part = 0;
          for (int l = 0; l < 16; ++l) part += ((q2[l] >> (2 * j)) & 3) * q8[l];
          isum += (x[b].scales[sub] & 0xF) * part;
        }
      }
    }
    sum += y[b].d * Fp16ToFp32(x[b].d) * static_cast<float>(isum) -
           y[b].d * Fp16ToFp32(x[b].dmin) * static_cast<float>(mins);
  }
  return sum;
}

// Q3_K: like Q2_K's layout for the low 2 bits; the high bit of element e (0..255) is bit e / 32
// of hmask[e % 32], and a clear high bit subtracts 4. 16 signed 6-bit scales (offset 32).
float VecDotQ3_KScalar(int64_t n, const void* w, const void* a) {
  const auto* x = static_cast<const BlockQ3_K*>(w);
  const auto* y = static_cast<const BlockQ8_K*>(a);
  float sum = 0.0f;
  for (int64_t b = 0; b < n / kQK_K; ++b) {
    const uint8_t* packed = x[b].scales;
    int isum = 0;
    for (int sub = 0; sub < 16; ++sub) {
      const int low = sub < 8 ? (packed[sub] & 0xF) : (packed[sub - 8] >> 4);
      const int high = (packed[8 + sub % 4] >> (2 * (sub / 4))) & 3;
      const int scale = (low | (high << 4)) - 32;
      const int h = sub / 8, j = (sub % 8) / 2, half = sub % 2;
      const int8_t* q8 = y[b].qs + 128 * h + 32 * j + 16 * half;
      const uint8_t* q2 = x[b].qs + 32 * h + 16 * half;
      const uint8_t* hm = x[b].hmask + 16 * half;
      const int hbit = 4 * h + j;
      int part = 0;
      for (int l = 0; l < 16; ++l) {
        const int q = ((q2[l] >> (2 * j)) & 3) - (((hm[l] >> hbit) & 1) ? 0 : 4);
        part += q * q8[l];
      }
      isum += scale * part;
    }
    sum += Fp16ToFp32(x[b].d) * y[b].d * static_cast<float>(isum);
  }
  return sum;
}

// Q4_K: 8 sub-blocks of 32. Element 64 * j + l (l < 32) is the low nibble of qs[32 * j + l],
// element 64 * j + 32 + l its high nibble; sub-blocks 2j and 2j + 1.
float VecDotQ4_KScalar(int64_t n, const void* w, const void* a) {
  const auto* x = static_cast<const BlockQ4_K*>(w);
  const auto* y = static_cast<const BlockQ8_K*>(a);
  float sum = 0.0f;
  for (int64_t b = 0; b < n / kQK_K; ++b) {
    int isum = 0;
    for (int j = 0; j < 4; ++j) {
      const uint8_t* q4 = x[b].qs + 32 * j;
      const int8_t* q8 = y[b].qs + 64 * j;
      int lo = 0, hi = 0;
      for (int l = 0; l < 32; ++l) {
        lo += (q4[l] & 0xF) * q8[l];
        hi += (q4[l] >> 4) * q8[l + 32];
      }
      int scale_lo, scale_hi, min;
      ScaleMinK4(2 * j, x[b].scales, &scale_lo, &min);
      ScaleMinK4(2 * j + 1, x[b].scales, &scale_hi, &min);
      isum += scale_lo * lo + scale_hi * hi;
    }
    const int mins = MinsDotK4(x[b].scales, y[b].bsums);
    sum = AccumulateK4Block(sum, y[b].d, Fp16ToFp32(x[b].d), Fp16ToFp32(x[b].dmin), isum, mins);
  }
  return sum;
}

// Q5_K: Q4_K plus a fifth bit: element 64 * j + l has bit 2j of qh[l], element 64 * j + 32 + l
// bit 2j + 1.
float VecDotQ5_KScalar(int64_t n, const void* w, const void* a) {
  const auto* x = static_cast<const BlockQ5_K*>(w);
  const auto* y = static_cast<const BlockQ8_K*>(a);
  float sum = 0.0f;
  for (int64_t b = 0; b < n / kQK_K; ++b) {
    int isum = 0;
    for (int j = 0; j < 4; ++j) {
      const uint8_t* q4 = x[b].qs + 32 * j;
      const int8_t* q8 = y[b].qs + 64 * j;
      int lo = 0, hi = 0;
      for (int l = 0; l < 32; ++l) {
        lo += ((q4[l] & 0xF) | (((x[b].qh[l] >> (2 * j)) & 1) << 4)) * q8[l];
        hi += ((q4[l] >> 4) | (((x[b].qh[l] >> (2 * j + 1)) & 1) << 4)) * q8[l + 32];
      }
      int scale_lo, scale_hi, min;
      ScaleMinK4(2 * j, x[b].scales, &scale_lo, &min);
      ScaleMinK4(2 * j + 1, x[b].scales, &scale_hi, &min);
      isum += scale_lo * lo + scale_hi * hi;
    }
    const int mins = MinsDotK4(x[b].scales, y[b].bsums);
    sum = AccumulateK4Block(sum, y[b].d, Fp16ToFp32(x[b].d), Fp16ToFp32(x[b].dmin), isum, mins);
  }
  return sum;
}

// Q6_K: per half h (128 elements), element 128h + 32g + l (g < 4, l < 32) takes its low 4 bits
// from ql[64h + l + 32 * (g % 2)] (low nibble for g < 2, high for g >= 2) and its top 2 bits from
// bits 2g..2g+1 of qh[32h + l]; value - 32. Sub-block (16 elements) scales are int8.
float VecDotQ6_KScalar(int64_t n, const void* w, const void* a) {
  const auto* x = static_cast<const BlockQ6_K*>(w);
  const auto* y = static_cast<const BlockQ8_K*>(a);
  float sum = 0.0f;
  for (int64_t b = 0; b < n / kQK_K; ++b) {
    int isum = 0;
    for (int h = 0; h < 2; ++h) {
      for (int g = 0; g < 4; ++g) {
        const uint8_t* ql = x[b].ql + 64 * h + 32 * (g % 2);
        const uint8_t* qh = x[b].qh + 32 * h;
        const int8_t* q8 = y[b].qs + 128 * h + 32 * g;
        for (int half = 0; half < 2; ++half) {
          int part = 0;
          for (int l = 16 * half; l < 16 * half + 16; ++l) {
            const int low = g < 2 ? (ql[l] & 0xF) : (ql[l] >> 4);
            const int q = (low | (((qh[l] >> (2 * g)) & 3) << 4)) - 32;
            part += q * q8[l];
          }
          isum += x[b].scales[8 * h + 2 * g + half] * part;
        }
      }
    }
    sum = AccumulateK6Block(sum, y[b].d, Fp16ToFp32(x[b].d), isum);
  }
  return sum;
}

}  // namespace moepool::kernels
