#include "engine/attention.h"

#include <algorithm>
#include <cmath>

#include "engine/kv_cache.h"
#include "engine/quant/types.h"

namespace moepool {

void AttendKvHeadScalar(const float* q, int group, int64_t hd, const KvHeadView& kv, float scale,
                        float* out, float* scratch) {
  const int64_t n_blocks = kv.n_blocks();
  for (int g = 0; g < group; ++g) {
    const float* qh = q + g * hd;
    float* score = scratch + g * kv.n_kv;
    float mx = -INFINITY;
    for (int64_t j = 0, p = 0; j < n_blocks; ++j) {
      const uint16_t* kb = kv.KBlock(j);
      for (int64_t r = 0, m = kv.RowsIn(j); r < m; ++r, ++p) {
        const uint16_t* k = kb + r * kv.stride;
        float dot = 0.0f;
        for (int64_t i = 0; i < hd; ++i) dot += qh[i] * HalfToFloat(k[i]);
        score[p] = dot * scale;
        mx = std::max(mx, score[p]);
      }
    }
    float sum = 0.0f;
    for (int64_t p = 0; p < kv.n_kv; ++p) {
      score[p] = std::exp(score[p] - mx);
      sum += score[p];
    }
    const float inv = 1.0f / sum;
    float* o = out + g * hd;
    std::fill(o, o + hd, 0.0f);
    for (int64_t j = 0, p = 0; j < n_blocks; ++j) {
      const uint16_t* vb = kv.VBlock(j);
      for (int64_t r = 0, m = kv.RowsIn(j); r < m; ++r, ++p) {
        const uint16_t* v = vb + r * kv.stride;
        const float w = score[p] * inv;
        for (int64_t i = 0; i < hd; ++i) o[i] += w * HalfToFloat(v[i]);
      }
    }
  }
}

void AttendKvHead(const float* q, int group, int64_t head_dim, const KvHeadView& kv, float scale,
                  float* out, float* scratch) {
#if defined(MOEPOOL_HAVE_VNNI_KERNELS)
  if (UseAvx512Kernels() && head_dim % 8 == 0) {
    AttendKvHeadAvx512(q, group, head_dim, kv, scale, out, scratch);
    return;
  }
#endif
#if defined(MOEPOOL_HAVE_AVX2_KERNELS)
  if (UseAvx2Kernels() && head_dim % 8 == 0) {
    AttendKvHeadAvx2(q, group, head_dim, kv, scale, out, scratch);
    return;
  }
#endif
  AttendKvHeadScalar(q, group, head_dim, kv, scale, out, scratch);
}

}  // namespace moepool
