// Per-element maths of the CUDA expert, norm, rope and router kernels, shared by the device
// kernels and their scalar host references (and tested on the CPU in every build).
//
// Weights are read in chunks of 32 consecutive elements of a row: every supported type's layout
// splits at multiples of 32 (a Q*_0/Q*_1 block, an eighth of a k-quant super-block, or 32 plain
// values), so a kernel can hand chunks to threads without knowing the type's block size.
// DequantChunk32 evaluates the same f32 expressions in the same order as the CPU dequantizers of
// engine/quant/dequantize.cc, so on the host it reproduces them bit for bit (on the device the
// compiler may contract a multiply-add into one rounding: within 1 ulp).
//
// Plain header: compiles as C++ (host only) and as CUDA (MOEPOOL_HD = __host__ __device__).
// Everything here is a pure function of its arguments (thread-safe).
#ifndef MOEPOOL_ENGINE_CUDA_EXPERT_MATH_H_
#define MOEPOOL_ENGINE_CUDA_EXPERT_MATH_H_

#include <cmath>
#include <cstdint>
#include <cstring>

#include "engine/quant/types.h"

#ifndef MOEPOOL_HD
#if defined(__CUDACC__)
#define MOEPOOL_HD __host__ __device__
#else
#define MOEPOOL_HD
#endif
#endif

namespace moepool::cuda {

inline constexpr int kChunk = 32;      // elements per weight chunk
inline constexpr int kMaxRouted = 64;  // router kernels handle up to this many experts

// True for the weight types the expert kernels read.
MOEPOOL_HD inline bool ChunkTypeSupported(TensorType t) {
  switch (t) {
    case TensorType::kF32:
    case TensorType::kF16:
    case TensorType::kBF16:
    case TensorType::kQ4_0:
    case TensorType::kQ4_1:
    case TensorType::kQ5_0:
    case TensorType::kQ5_1:
    case TensorType::kQ8_0:
    case TensorType::kQ2_K:
    case TensorType::kQ3_K:
    case TensorType::kQ4_K:
    case TensorType::kQ5_K:
    case TensorType::kQ6_K:
      return true;
    default:
      return false;
  }
}

MOEPOOL_HD inline float F32FromBits(uint32_t w) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(w);
#else
  float f;
  std::memcpy(&f, &w, 4);
  return f;
#endif
}

MOEPOOL_HD inline uint16_t LoadU16(const uint8_t* p) {
  return static_cast<uint16_t>(p[0] | (p[1] << 8));
}

// Exact IEEE binary16 -> f32 (subnormals, inf and NaN kept).
MOEPOOL_HD inline float HalfBitsToF32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0) {
    if (mant == 0) return F32FromBits(sign);
    uint32_t e = 0;
    while ((mant & 0x400u) == 0) {
      mant <<= 1;
      ++e;
    }
    mant &= 0x3ffu;
    return F32FromBits(sign | ((127u - 15u + 1u - e) << 23) | (mant << 13));
  }
  if (exp == 31) return F32FromBits(sign | 0x7f800000u | (mant << 13));
  return F32FromBits(sign | ((exp + 127u - 15u) << 23) | (mant << 13));
}

MOEPOOL_HD inline float Bf16BitsToF32(uint16_t h) {
  return F32FromBits(static_cast<uint32_t>(h) << 16);
}

// 6-bit scale and min of sub-block j (0..7) of a Q4_K / Q5_K super-block.
MOEPOOL_HD inline void ScaleMinK4(int j, const uint8_t* packed, int* scale, int* min) {
  if (j < 4) {
    *scale = packed[j] & 63;
    *min = packed[j + 4] & 63;
  } else {
    *scale = (packed[j + 4] & 0xF) | ((packed[j - 4] >> 6) << 4);
    *min = (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4);
  }
}

// Signed 6-bit scale of sub-block i (0..15) of a Q3_K super-block.
MOEPOOL_HD inline int ScaleQ3K(int i, const uint8_t* packed) {
  const int low = i < 8 ? (packed[i] & 0xF) : (packed[i - 8] >> 4);
  const int high = (packed[8 + i % 4] >> (2 * (i / 4))) & 3;
  return (low | (high << 4)) - 32;
}

// out[0..31] = elements 32 c .. 32 c + 31 of a row of type T starting at `row`.
template <TensorType T>
MOEPOOL_HD inline void DequantChunk32(const uint8_t* row, int64_t c, float* out) {
  if constexpr (T == TensorType::kF32) {
    const float* p = reinterpret_cast<const float*>(row) + c * kChunk;
    for (int l = 0; l < kChunk; ++l) out[l] = p[l];
  } else if constexpr (T == TensorType::kF16 || T == TensorType::kBF16) {
    const uint16_t* p = reinterpret_cast<const uint16_t*>(row) + c * kChunk;
    for (int l = 0; l < kChunk; ++l) {
      out[l] = T == TensorType::kF16 ? HalfBitsToF32(p[l]) : Bf16BitsToF32(p[l]);
    }
  } else if constexpr (T == TensorType::kQ4_0) {
    const uint8_t* b = row + c * sizeof(BlockQ4_0);
    const float d = HalfBitsToF32(LoadU16(b));
    const uint8_t* qs = b + 2;
    for (int j = 0; j < 16; ++j) {
      out[j] = static_cast<float>((qs[j] & 0xF) - 8) * d;
      out[j + 16] = static_cast<float>((qs[j] >> 4) - 8) * d;
    }
  } else if constexpr (T == TensorType::kQ4_1) {
    const uint8_t* b = row + c * sizeof(BlockQ4_1);
    const float d = HalfBitsToF32(LoadU16(b));
    const float m = HalfBitsToF32(LoadU16(b + 2));
    const uint8_t* qs = b + 4;
    for (int j = 0; j < 16; ++j) {
      out[j] = static_cast<float>(qs[j] & 0xF) * d + m;
      out[j + 16] = static_cast<float>(qs[j] >> 4) * d + m;
    }
  } else if constexpr (T == TensorType::kQ5_0 || T == TensorType::kQ5_1) {
    constexpr bool kMin = T == TensorType::kQ5_1;
    const uint8_t* b = row + c * (kMin ? sizeof(BlockQ5_1) : sizeof(BlockQ5_0));
    const float d = HalfBitsToF32(LoadU16(b));
    const float m = kMin ? HalfBitsToF32(LoadU16(b + 2)) : 0.0f;
    const uint8_t* qhp = b + (kMin ? 4 : 2);
    const uint32_t qh = static_cast<uint32_t>(qhp[0]) | (static_cast<uint32_t>(qhp[1]) << 8) |
                        (static_cast<uint32_t>(qhp[2]) << 16) |
                        (static_cast<uint32_t>(qhp[3]) << 24);
    const uint8_t* qs = qhp + 4;
    for (int j = 0; j < 16; ++j) {
      const int lo = (qs[j] & 0xF) | (static_cast<int>((qh >> j) & 1u) << 4);
      const int hi = (qs[j] >> 4) | (static_cast<int>((qh >> (j + 16)) & 1u) << 4);
      if constexpr (kMin) {
        out[j] = static_cast<float>(lo) * d + m;
        out[j + 16] = static_cast<float>(hi) * d + m;
      } else {
        out[j] = static_cast<float>(lo - 16) * d;
        out[j + 16] = static_cast<float>(hi - 16) * d;
      }
    }
  } else if constexpr (T == TensorType::kQ8_0) {
    const uint8_t* b = row + c * sizeof(BlockQ8_0);
    const float d = HalfBitsToF32(LoadU16(b));
    const int8_t* qs = reinterpret_cast<const int8_t*>(b + 2);
    for (int j = 0; j < kChunk; ++j) out[j] = static_cast<float>(qs[j]) * d;
  } else if constexpr (T == TensorType::kQ2_K) {
    const auto* b = reinterpret_cast<const BlockQ2_K*>(row + (c / 8) * sizeof(BlockQ2_K));
    const int s = static_cast<int>(c % 8);  // chunk within the super-block: sub-blocks 2s, 2s+1
    const float d = HalfBitsToF32(b->d);
    const float dmin = HalfBitsToF32(b->dmin);
    const uint8_t* q = b->qs + 32 * (s / 4);
    const int shift = 2 * (s % 4);
    for (int half = 0; half < 2; ++half) {
      const uint8_t sc = b->scales[2 * s + half];
      const float dl = d * static_cast<float>(sc & 0xF);
      const float ml = dmin * static_cast<float>(sc >> 4);
      for (int l = 16 * half; l < 16 * half + 16; ++l) {
        out[l] = dl * static_cast<float>((q[l] >> shift) & 3) - ml;
      }
    }
  } else if constexpr (T == TensorType::kQ3_K) {
    const auto* b = reinterpret_cast<const BlockQ3_K*>(row + (c / 8) * sizeof(BlockQ3_K));
    const int s = static_cast<int>(c % 8);
    const float d_all = HalfBitsToF32(b->d);
    const uint8_t* q = b->qs + 32 * (s / 4);
    const int shift = 2 * (s % 4);
    for (int half = 0; half < 2; ++half) {
      const float dl = d_all * static_cast<float>(ScaleQ3K(2 * s + half, b->scales));
      for (int l = 16 * half; l < 16 * half + 16; ++l) {
        const int low = (q[l] >> shift) & 3;
        const int high_set = (b->hmask[l] >> s) & 1;
        out[l] = dl * static_cast<float>(low - (high_set ? 0 : 4));
      }
    }
  } else if constexpr (T == TensorType::kQ4_K || T == TensorType::kQ5_K) {
    constexpr bool k5 = T == TensorType::kQ5_K;
    constexpr size_t kBlockBytes = k5 ? sizeof(BlockQ5_K) : sizeof(BlockQ4_K);
    const uint8_t* b = row + (c / 8) * kBlockBytes;
    const int s = static_cast<int>(c % 8);  // sub-block
    const float d = HalfBitsToF32(LoadU16(b));
    const float dmin = HalfBitsToF32(LoadU16(b + 2));
    const uint8_t* scales = b + 4;
    const uint8_t* qh = b + 4 + kKScaleSize;  // Q5_K only
    const uint8_t* qs = b + 4 + kKScaleSize + (k5 ? kQK_K / 8 : 0) + 32 * (s / 2);
    int sc, m;
    ScaleMinK4(s, scales, &sc, &m);
    const float d1 = d * static_cast<float>(sc);
    const float m1 = dmin * static_cast<float>(m);
    const int shift = 4 * (s % 2);
    for (int l = 0; l < kChunk; ++l) {
      int v = (qs[l] >> shift) & 0xF;
      if constexpr (k5) v += (qh[l] >> s) & 1 ? 16 : 0;
      out[l] = d1 * static_cast<float>(v) - m1;
    }
  } else if constexpr (T == TensorType::kQ6_K) {
    const auto* b = reinterpret_cast<const BlockQ6_K*>(row + (c / 8) * sizeof(BlockQ6_K));
    const int s = static_cast<int>(c % 8);
    const int h = s / 4;     // half of 128
    const int part = s % 4;  // elements 32 part .. 32 part + 31 of the half
    const float d = HalfBitsToF32(b->d);
    const uint8_t* ql = b->ql + 64 * h + (part % 2) * 32;
    const uint8_t* qh = b->qh + 32 * h;
    const int8_t* sc = b->scales + 8 * h + 2 * part;
    const int lshift = 4 * (part / 2);
    for (int l = 0; l < kChunk; ++l) {
      const int q = (((ql[l] >> lshift) & 0xF) | (((qh[l] >> (2 * part)) & 3) << 4)) - 32;
      out[l] = d * static_cast<float>(sc[l / 16]) * static_cast<float>(q);
    }
  }
}

// SiLU(g) * u, the SwiGLU gate (as ExpertFfnCpu writes it).
MOEPOOL_HD inline float SiluMul(float g, float u) { return g / (1.0f + expf(-g)) * u; }

// RoPE angle of pair `pair` (elements 2 pair, 2 pair + 1) at position `pos`: theta starts at
// pos and is multiplied by theta_scale = base^(-2 / n_rot) once per pair, in the same order as
// ApplyRope, so host and device see the same angle.
MOEPOOL_HD inline float RopeTheta(int64_t pos, float theta_scale, int64_t pair) {
  float theta = static_cast<float>(pos);
  for (int64_t i = 0; i < pair; ++i) theta *= theta_scale;
  return theta;
}

// Rotates (a, b) by theta (llama / GGUF convention: adjacent pairs).
MOEPOOL_HD inline void RopeRotate(float theta, float* a, float* b) {
  const float c = cosf(theta);
  const float s = sinf(theta);
  const float x = *a;
  const float y = *b;
  *a = x * c - y * s;
  *b = x * s + y * c;
}

// Mixtral routing of one row (RouteTopK's algorithm and evaluation order): softmax over
// n_expert <= kMaxRouted logits (f32 exp, f64 sum), the k largest (ties: lower id), renormalised,
// in ascending expert id.
MOEPOOL_HD inline void RouteRow(const float* logits, int n_expert, int k, int32_t* expert,
                                float* weight) {
  float prob[kMaxRouted];
  bool taken[kMaxRouted];
  float mx = logits[0];
  for (int e = 1; e < n_expert; ++e) mx = logits[e] > mx ? logits[e] : mx;
  double sum = 0.0;
  for (int e = 0; e < n_expert; ++e) {
    prob[e] = expf(logits[e] - mx);
    sum += prob[e];
    taken[e] = false;
  }
  const float inv = static_cast<float>(1.0 / sum);
  for (int e = 0; e < n_expert; ++e) prob[e] *= inv;
  for (int j = 0; j < k; ++j) {
    int best = -1;
    for (int e = 0; e < n_expert; ++e) {
      if (!taken[e] && (best < 0 || prob[e] > prob[best])) best = e;
    }
    taken[best] = true;
  }
  float wsum = 0.0f;
  for (int e = 0; e < n_expert; ++e) {
    if (taken[e]) wsum += prob[e];
  }
  int j = 0;
  for (int e = 0; e < n_expert; ++e) {
    if (!taken[e]) continue;
    expert[j] = e;
    weight[j] = prob[e] / wsum;
    ++j;
  }
}

}  // namespace moepool::cuda

#endif  // MOEPOOL_ENGINE_CUDA_EXPERT_MATH_H_
