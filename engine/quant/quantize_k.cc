// Reference quantizers of the k-quants (Q2_K .. Q6_K).
//
// Two levels, as the format implies. First each sub-block (16 or 32 elements) gets a float scale
// (and, for the asymmetric types, a min) from a weighted least-squares search over a few
// candidate quantization grids. Then the sub-block scales and mins are themselves quantized
// against a half-float super-block scale, and the elements are re-quantized with the scales as
// stored, so rounding of the scales costs as little as possible. Scales saturate at the half
// range: any finite input yields finite dequantized values. Deterministic and thread-safe.
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
using internal::ScaleToHalf;

// Below this magnitude a sub-block is treated as all zero.
constexpr float kTinyGroupMax = 1e-15f;

// Per-element weights of the least-squares fits (scale-free: computed on normalised values).
enum class Weighting {
  kSquare,     // w = x^2: favours the large elements (Q3_K, Q6_K)
  kAbs,        // w = |x| (Q2_K)
  kRmsPlusAbs  // w = rms(x) + |x| (Q4_K, Q5_K)
};

void ComputeWeights(const float* x, int n, Weighting weighting, float* w) {
  float rms = 0.0f;
  if (weighting == Weighting::kRmsPlusAbs) {
    float sum_x2 = 0.0f;
    for (int i = 0; i < n; ++i) sum_x2 += x[i] * x[i];
    rms = std::sqrt(sum_x2 / static_cast<float>(n));
  }
  for (int i = 0; i < n; ++i) {
    switch (weighting) {
      case Weighting::kSquare:
        w[i] = x[i] * x[i];
        break;
      case Weighting::kAbs:
        w[i] = std::fabs(x[i]);
        break;
      case Weighting::kRmsPlusAbs:
        w[i] = rms + std::fabs(x[i]);
        break;
    }
  }
}

// Largest |x[i]|, and (through max) the element attaining it with its sign; 0 if all are 0.
float AbsMax(const float* x, int n, float* max) {
  float amax = 0.0f;
  *max = 0.0f;
  for (int i = 0; i < n; ++i) {
    if (std::fabs(x[i]) > amax) {
      amax = std::fabs(x[i]);
      *max = x[i];
    }
  }
  return amax;
}

// The fits work on x / amax so that no intermediate sum can overflow whatever the input range.
constexpr int kMaxGroup = 32;

// Fits x[i] ~ scale * (L[i] - nmax) with L[i] in [0, 2 * nmax - 1], minimising
// sum w[i] * (x[i] - scale * (L[i] - nmax))^2 over 19 candidate grids around the one that maps
// the largest-magnitude element exactly to -nmax. Returns the scale (negative when that element
// is positive); 0 with every L[i] = nmax for an all-zero group. n <= kMaxGroup.
float FitSymmetric(const float* x, int n, int nmax, Weighting weighting, uint8_t* L) {
  float max;
  const float amax = AbsMax(x, n, &max);
  if (!(amax >= kTinyGroupMax)) {
    for (int i = 0; i < n; ++i) L[i] = static_cast<uint8_t>(nmax);
    return 0.0f;
  }
  float xn[kMaxGroup];
  float w[kMaxGroup];
  for (int i = 0; i < n; ++i) xn[i] = x[i] / amax;
  ComputeWeights(xn, n, weighting, w);
  const float max_n = max > 0.0f ? 1.0f : -1.0f;

  float best_scale = 0.0f;
  float best_gain = -1.0f;  // sum_wxl^2 / sum_wll: the reduction of the squared error
  uint8_t trial[kMaxGroup];
  for (int step = -9; step <= 9; ++step) {
    const float iscale = -(static_cast<float>(nmax) + 0.1f * static_cast<float>(step)) / max_n;
    float sum_wxl = 0.0f;
    float sum_wll = 0.0f;
    for (int i = 0; i < n; ++i) {
      const int l = RoundClamp(iscale * xn[i], -nmax, nmax - 1);
      trial[i] = static_cast<uint8_t>(l + nmax);
      sum_wxl += w[i] * xn[i] * static_cast<float>(l);
      sum_wll += w[i] * static_cast<float>(l) * static_cast<float>(l);
    }
    if (!(sum_wll > 0.0f)) continue;
    const float gain = sum_wxl * sum_wxl / sum_wll;
    if (gain > best_gain) {
      best_gain = gain;
      best_scale = sum_wxl / sum_wll;
      std::memcpy(L, trial, static_cast<size_t>(n));
    }
  }
  if (best_gain < 0.0f) {
    for (int i = 0; i < n; ++i) L[i] = static_cast<uint8_t>(nmax);
    return 0.0f;
  }
  return best_scale * amax;
}

// Fits x[i] ~ scale * L[i] - min_out with L[i] in [0, nmax] and min_out >= 0, minimising the
// w-weighted squared error. Candidate grids map [min(x, 0), max(x)] onto
// [0, nmax + rmin + rdelta * k] for k = 0..nstep (plus the plain [0, nmax] grid); for each, the
// scale and min are solved by 2x2 least squares (min clipped at 0). Returns the scale.
// n <= kMaxGroup.
float FitAsymmetric(const float* x, int n, int nmax, Weighting weighting, float rmin, float rdelta,
                    int nstep, uint8_t* L, float* min_out) {
  float unused;
  const float amax = AbsMax(x, n, &unused);
  if (!(amax >= kTinyGroupMax)) {
    for (int i = 0; i < n; ++i) L[i] = 0;
    *min_out = 0.0f;
    return 0.0f;
  }
  float xn[kMaxGroup];
  float w[kMaxGroup];
  for (int i = 0; i < n; ++i) xn[i] = x[i] / amax;
  ComputeWeights(xn, n, weighting, w);

  float min = xn[0];
  float max = xn[0];
  for (int i = 1; i < n; ++i) {
    if (xn[i] < min) min = xn[i];
    if (xn[i] > max) max = xn[i];
  }
  if (min > 0.0f) min = 0.0f;
  const float range = max - min;
  if (!(range > 0.0f)) {  // constant non-positive group: x = min exactly
    for (int i = 0; i < n; ++i) L[i] = 0;
    *min_out = -min * amax;
    return 0.0f;
  }

  auto error_of = [&](const uint8_t* q, float scale, float offset) {
    float err = 0.0f;
    for (int i = 0; i < n; ++i) {
      const float diff = scale * static_cast<float>(q[i]) + offset - xn[i];
      err += w[i] * diff * diff;
    }
    return err;
  };

  float iscale = static_cast<float>(nmax) / range;
  float best_scale = 1.0f / iscale;
  float best_offset = min;  // xn ~ scale * L + offset, offset <= 0
  for (int i = 0; i < n; ++i) {
    L[i] = static_cast<uint8_t>(RoundClamp(iscale * (xn[i] - min), 0, nmax));
  }
  float best_error = error_of(L, best_scale, best_offset);

  float sum_w = 0.0f;
  float sum_wx = 0.0f;
  for (int i = 0; i < n; ++i) {
    sum_w += w[i];
    sum_wx += w[i] * xn[i];
  }
  uint8_t trial[kMaxGroup];
  for (int k = 0; k <= nstep; ++k) {
    iscale = (rmin + rdelta * static_cast<float>(k) + static_cast<float>(nmax)) / range;
    float sum_wl = 0.0f;
    float sum_wll = 0.0f;
    float sum_wxl = 0.0f;
    for (int i = 0; i < n; ++i) {
      const int l = RoundClamp(iscale * (xn[i] - min), 0, nmax);
      trial[i] = static_cast<uint8_t>(l);
      const float fl = static_cast<float>(l);
      sum_wl += w[i] * fl;
      sum_wll += w[i] * fl * fl;
      sum_wxl += w[i] * xn[i] * fl;
    }
    const float det = sum_w * sum_wll - sum_wl * sum_wl;
    if (!(det > 0.0f)) continue;
    float scale = (sum_w * sum_wxl - sum_wx * sum_wl) / det;
    float offset = (sum_wll * sum_wx - sum_wl * sum_wxl) / det;
    if (offset > 0.0f) {
      offset = 0.0f;
      scale = sum_wxl / sum_wll;
    }
    const float err = error_of(trial, scale, offset);
    if (err < best_error) {
      best_error = err;
      best_scale = scale;
      best_offset = offset;
      std::memcpy(L, trial, static_cast<size_t>(n));
    }
  }
  *min_out = -best_offset * amax;
  return best_scale * amax;
}

// Largest value of v[0..n) (0 if all are <= 0).
float MaxOf(const float* v, int n) {
  float m = 0.0f;
  for (int i = 0; i < n; ++i) {
    if (v[i] > m) m = v[i];
  }
  return m;
}

// Quantizes non-negative sub-block values v against a super-block scale so that the largest maps
// to `top`. Writes the half super-block scale and the integer levels.
void QuantizeUnsignedScales(const float* v, int n, int top, uint16_t* d_out, uint8_t* levels) {
  const float max = MaxOf(v, n);
  if (!(max > 0.0f)) {
    *d_out = 0;
    for (int i = 0; i < n; ++i) levels[i] = 0;
    return;
  }
  const float inv = static_cast<float>(top) / max;
  for (int i = 0; i < n; ++i) levels[i] = static_cast<uint8_t>(RoundClamp(inv * v[i], 0, top));
  *d_out = ScaleToHalf(max / static_cast<float>(top));
}

// Quantizes signed sub-block scales so that the largest-magnitude one maps to -half_levels.
// Writes the half super-block scale and levels in [-half_levels, half_levels - 1].
void QuantizeSignedScales(const float* v, int n, int half_levels, uint16_t* d_out, int* levels) {
  float amax = 0.0f;
  float max = 0.0f;
  for (int i = 0; i < n; ++i) {
    if (std::fabs(v[i]) > amax) {
      amax = std::fabs(v[i]);
      max = v[i];
    }
  }
  if (!(amax > 0.0f)) {
    *d_out = 0;
    for (int i = 0; i < n; ++i) levels[i] = 0;
    return;
  }
  const float iscale = -static_cast<float>(half_levels) / max;
  for (int i = 0; i < n; ++i) levels[i] = RoundClamp(iscale * v[i], -half_levels, half_levels - 1);
  *d_out = ScaleToHalf(max / -static_cast<float>(half_levels));
}

// Re-quantizes n elements to x ~ dl * L - ml with L in [0, top]; all 0 if dl is 0.
void RequantizeAsymmetric(const float* x, int n, float dl, float ml, int top, uint8_t* L) {
  for (int i = 0; i < n; ++i) {
    L[i] = dl == 0.0f ? 0 : static_cast<uint8_t>(RoundClamp((x[i] + ml) / dl, 0, top));
  }
}

// Re-quantizes n elements to x ~ dl * (L - half) with L in [0, 2 * half); all `half` if dl is 0.
void RequantizeSymmetric(const float* x, int n, float dl, int half, uint8_t* L) {
  for (int i = 0; i < n; ++i) {
    const int l = dl == 0.0f ? 0 : RoundClamp(x[i] / dl, -half, half - 1);
    L[i] = static_cast<uint8_t>(l + half);
  }
}

// Packs 2-bit quants in the Q2_K / Q3_K order: element e goes to byte 32 * (e / 128) + e % 32 at
// bit 2 * ((e % 128) / 32).
void Pack2Bit(const uint8_t* L, uint8_t* qs) {
  std::memset(qs, 0, kQK_K / 4);
  for (int e = 0; e < kQK_K; ++e) {
    qs[32 * (e / 128) + e % 32] |= static_cast<uint8_t>((L[e] & 3) << (2 * ((e % 128) / 32)));
  }
}

// Q4_K / Q5_K packing of 8 six-bit scales and mins (inverse of the dequantizer's unpacking).
void PackScaleMinK4(const uint8_t* ls, const uint8_t* lm, uint8_t* packed) {
  for (int j = 0; j < 4; ++j) {
    packed[j] = ls[j] & 63;
    packed[j + 4] = lm[j] & 63;
  }
  for (int j = 4; j < 8; ++j) {
    packed[j + 4] = static_cast<uint8_t>((ls[j] & 0xF) | ((lm[j] & 0xF) << 4));
    packed[j - 4] |= static_cast<uint8_t>((ls[j] >> 4) << 6);
    packed[j] |= static_cast<uint8_t>((lm[j] >> 4) << 6);
  }
}

// Shared body of Q4_K and Q5_K: 8 sub-blocks of 32, quants in [0, top]. Fills d, dmin, the
// packed scales and the 256 quants L.
void QuantizeK4Style(const float* x, int top, float rmin, int nstep, uint16_t* d, uint16_t* dmin,
                     uint8_t* packed_scales, uint8_t* L) {
  float scales[8];
  float mins[8];
  for (int j = 0; j < 8; ++j) {
    scales[j] = FitAsymmetric(x + 32 * j, 32, top, Weighting::kRmsPlusAbs, rmin, 0.1f, nstep,
                              L + 32 * j, &mins[j]);
  }
  uint8_t ls[8];
  uint8_t lm[8];
  QuantizeUnsignedScales(scales, 8, 63, d, ls);
  QuantizeUnsignedScales(mins, 8, 63, dmin, lm);
  PackScaleMinK4(ls, lm, packed_scales);
  const float df = Fp16ToFp32(*d);
  const float dminf = Fp16ToFp32(*dmin);
  for (int j = 0; j < 8; ++j) {
    RequantizeAsymmetric(x + 32 * j, 32, df * static_cast<float>(ls[j]),
                         dminf * static_cast<float>(lm[j]), top, L + 32 * j);
  }
}

}  // namespace

void QuantizeRowQ2_K(const float* src, void* dst, int64_t n) {
  auto* blocks = static_cast<BlockQ2_K*>(dst);
  for (int64_t b = 0; b < n / kQK_K; ++b, src += kQK_K) {
    BlockQ2_K& blk = blocks[b];
    uint8_t L[kQK_K];
    float scales[16];
    float mins[16];
    for (int j = 0; j < 16; ++j) {
      scales[j] = FitAsymmetric(src + 16 * j, 16, 3, Weighting::kAbs, -0.5f, 0.1f, 15, L + 16 * j,
                                &mins[j]);
    }
    uint8_t ls[16];
    uint8_t lm[16];
    QuantizeUnsignedScales(scales, 16, 15, &blk.d, ls);
    QuantizeUnsignedScales(mins, 16, 15, &blk.dmin, lm);
    const float d = Fp16ToFp32(blk.d);
    const float dmin = Fp16ToFp32(blk.dmin);
    for (int j = 0; j < 16; ++j) {
      blk.scales[j] = static_cast<uint8_t>(ls[j] | (lm[j] << 4));
      RequantizeAsymmetric(src + 16 * j, 16, d * static_cast<float>(ls[j]),
                           dmin * static_cast<float>(lm[j]), 3, L + 16 * j);
    }
    Pack2Bit(L, blk.qs);
  }
}

void QuantizeRowQ3_K(const float* src, void* dst, int64_t n) {
  auto* blocks = static_cast<BlockQ3_K*>(dst);
  for (int64_t b = 0; b < n / kQK_K; ++b, src += kQK_K) {
    BlockQ3_K& blk = blocks[b];
    uint8_t L[kQK_K];
    float scales[16];
    for (int j = 0; j < 16; ++j) {
      scales[j] = FitSymmetric(src + 16 * j, 16, 4, Weighting::kSquare, L + 16 * j);
    }
    int levels[16];
    QuantizeSignedScales(scales, 16, 32, &blk.d, levels);
    const float d = Fp16ToFp32(blk.d);
    std::memset(blk.scales, 0, sizeof(blk.scales));
    for (int j = 0; j < 16; ++j) {
      const int stored = levels[j] + 32;  // 6 bits
      if (j < 8) {
        blk.scales[j] |= static_cast<uint8_t>(stored & 0xF);
      } else {
        blk.scales[j - 8] |= static_cast<uint8_t>((stored & 0xF) << 4);
      }
      blk.scales[8 + j % 4] |= static_cast<uint8_t>((stored >> 4) << (2 * (j / 4)));
      RequantizeSymmetric(src + 16 * j, 16, d * static_cast<float>(levels[j]), 4, L + 16 * j);
    }
    // Third bit of element e: bit e / 32 of hmask[e % 32].
    std::memset(blk.hmask, 0, sizeof(blk.hmask));
    for (int e = 0; e < kQK_K; ++e) {
      if (L[e] & 4) blk.hmask[e % 32] |= static_cast<uint8_t>(1u << (e / 32));
    }
    Pack2Bit(L, blk.qs);
  }
}

void QuantizeRowQ4_K(const float* src, void* dst, int64_t n) {
  auto* blocks = static_cast<BlockQ4_K*>(dst);
  for (int64_t b = 0; b < n / kQK_K; ++b, src += kQK_K) {
    BlockQ4_K& blk = blocks[b];
    uint8_t L[kQK_K];
    QuantizeK4Style(src, 15, -1.0f, 20, &blk.d, &blk.dmin, blk.scales, L);
    for (int c = 0; c < 4; ++c) {
      for (int l = 0; l < 32; ++l) {
        blk.qs[32 * c + l] = static_cast<uint8_t>(L[64 * c + l] | (L[64 * c + 32 + l] << 4));
      }
    }
  }
}

void QuantizeRowQ5_K(const float* src, void* dst, int64_t n) {
  auto* blocks = static_cast<BlockQ5_K*>(dst);
  for (int64_t b = 0; b < n / kQK_K; ++b, src += kQK_K) {
    BlockQ5_K& blk = blocks[b];
    uint8_t L[kQK_K];
    QuantizeK4Style(src, 31, -0.5f, 15, &blk.d, &blk.dmin, blk.scales, L);
    std::memset(blk.qh, 0, sizeof(blk.qh));
    for (int c = 0; c < 4; ++c) {
      for (int l = 0; l < 32; ++l) {
        const uint8_t lo = L[64 * c + l];
        const uint8_t hi = L[64 * c + 32 + l];
        blk.qs[32 * c + l] = static_cast<uint8_t>((lo & 0xF) | ((hi & 0xF) << 4));
        if (lo & 16) blk.qh[l] |= static_cast<uint8_t>(1u << (2 * c));
        if (hi & 16) blk.qh[l] |= static_cast<uint8_t>(2u << (2 * c));
      }
    }
  }
}

void QuantizeRowQ6_K(const float* src, void* dst, int64_t n) {
  auto* blocks = static_cast<BlockQ6_K*>(dst);
  for (int64_t b = 0; b < n / kQK_K; ++b, src += kQK_K) {
    BlockQ6_K& blk = blocks[b];
    uint8_t L[kQK_K];
    float scales[16];
    for (int j = 0; j < 16; ++j) {
      scales[j] = FitSymmetric(src + 16 * j, 16, 32, Weighting::kSquare, L + 16 * j);
    }
    int levels[16];
    QuantizeSignedScales(scales, 16, 128, &blk.d, levels);
    const float d = Fp16ToFp32(blk.d);
    for (int j = 0; j < 16; ++j) {
      blk.scales[j] = static_cast<int8_t>(levels[j]);
      RequantizeSymmetric(src + 16 * j, 16, d * static_cast<float>(levels[j]), 32, L + 16 * j);
    }
    // Element 128h + 32k + l: low nibble in ql[64h + l + 32 * (k & 1)] (high nibble for k >= 2),
    // top 2 bits in qh[32h + l] at bit 2k.
    std::memset(blk.qh, 0, sizeof(blk.qh));
    for (int h = 0; h < 2; ++h) {
      for (int l = 0; l < 32; ++l) {
        const uint8_t* q = L + 128 * h + l;
        blk.ql[64 * h + l] = static_cast<uint8_t>((q[0] & 0xF) | ((q[64] & 0xF) << 4));
        blk.ql[64 * h + l + 32] = static_cast<uint8_t>((q[32] & 0xF) | ((q[96] & 0xF) << 4));
        blk.qh[32 * h + l] = static_cast<uint8_t>((q[0] >> 4) | ((q[32] >> 4) << 2) |
                                                  ((q[64] >> 4) << 4) | ((q[96] >> 4) << 6));
      }
    }
  }
}

}  // namespace moepool::kernels
