// F16C row conversions: float <-> IEEE binary16, bit-identical to the scalar Fp32ToFp16 /
// Fp16ToFp32 (engine/quant/fp16.h) that define the numerics. The hardware rounds to nearest
// even and handles subnormals, infinities and overflow as the scalar code does; only NaNs
// differ (the hardware keeps the payload and quiets the value), so any group of 8 holding a NaN
// goes through the scalar code.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "engine/quant/fp16.h"
#include "engine/quant/kernels.h"

namespace moepool::kernels {

void QuantizeRowF16Avx2(const float* src, void* dst, int64_t n) {
  auto* out = static_cast<uint16_t*>(dst);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(src + i);
    if (_mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)) != 0) {
      for (int j = 0; j < 8; ++j) out[i + j] = Fp32ToFp16(src[i + j]);
      continue;
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i),
                     _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  for (; i < n; ++i) out[i] = Fp32ToFp16(src[i]);
}

void DequantizeRowF16Avx2(const void* src, float* dst, int64_t n) {
  const auto* in = static_cast<const uint16_t*>(src);
  const __m128i exp_mask = _mm_set1_epi16(0x7c00);
  const __m128i abs_mask = _mm_set1_epi16(0x7fff);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i));
    // NaN: |h| > 0x7c00 (signed compare is fine: |h| <= 0x7fff).
    if (_mm_movemask_epi8(_mm_cmpgt_epi16(_mm_and_si128(h, abs_mask), exp_mask)) != 0) {
      for (int j = 0; j < 8; ++j) dst[i + j] = Fp16ToFp32(in[i + j]);
      continue;
    }
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
  for (; i < n; ++i) dst[i] = Fp16ToFp32(in[i]);
}

}  // namespace moepool::kernels
