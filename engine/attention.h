// Causal attention of the query heads that share one KV head, over a half-precision KV cache.
// Device-neutral front: AttendKvHead dispatches to the AVX2 kernel (attention_avx2.cc) where the
// CPU has it, else to the scalar reference (attention.cc). Each call's result depends only on its
// inputs, so a row's attention is independent of the batch it is part of.
#ifndef MOEPOOL_ENGINE_ATTENTION_H_
#define MOEPOOL_ENGINE_ATTENTION_H_

#include <cstddef>
#include <cstdint>

namespace moepool {

struct KvHeadView {
  const uint16_t* k = nullptr;  // K of position 0 for this KV head; position p at k + p * stride
  const uint16_t* v = nullptr;  // likewise for V
  size_t stride = 0;            // elements between consecutive positions
  int64_t n_kv = 0;             // positions 0 .. n_kv-1 are attended
};

// out [group x head_dim] = softmax(q K^T * scale) V for `group` query heads q [group x head_dim].
// `scratch` holds at least group * n_kv floats.
void AttendKvHead(const float* q, int group, int64_t head_dim, const KvHeadView& kv, float scale,
                  float* out, float* scratch);

// The portable reference and the AVX2 + F16C version (callable only where CpuHasAvx2()).
void AttendKvHeadScalar(const float* q, int group, int64_t head_dim, const KvHeadView& kv,
                        float scale, float* out, float* scratch);
void AttendKvHeadAvx2(const float* q, int group, int64_t head_dim, const KvHeadView& kv,
                      float scale, float* out, float* scratch);

}  // namespace moepool

#endif  // MOEPOOL_ENGINE_ATTENTION_H_
