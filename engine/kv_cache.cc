#include "engine/kv_cache.h"

#include <vector>

#include "engine/quant/fp16.h"

namespace moepool {

KvCache::KvCache(const ModelConfig& config, int64_t n_ctx)
    : n_layer_(config.n_layer), n_ctx_(n_ctx), kv_dim_(config.kv_dim()) {
  const size_t n = static_cast<size_t>(n_layer_ * n_ctx_ * kv_dim_);
  // Default-initialised (not zeroed): pages stay untouched until written.
  k_.reset(new uint16_t[n]);
  v_.reset(new uint16_t[n]);
}

void KvCache::Store(int64_t layer, int64_t pos, const float* k, const float* v) {
  uint16_t* kd = K(layer, pos);
  uint16_t* vd = V(layer, pos);
  for (int64_t i = 0; i < kv_dim_; ++i) {
    kd[i] = Fp32ToFp16(k[i]);
    vd[i] = Fp32ToFp16(v[i]);
  }
}

uint64_t KvCache::ReservedBytes() const {
  return 2ull * static_cast<uint64_t>(n_layer_ * n_ctx_ * kv_dim_) * sizeof(uint16_t);
}

float HalfToFloat(uint16_t h) {
  static const std::vector<float>* table = [] {
    auto* t = new std::vector<float>(65536);
    for (uint32_t i = 0; i < 65536; ++i) (*t)[i] = Fp16ToFp32(static_cast<uint16_t>(i));
    return t;
  }();
  return (*table)[h];
}

}  // namespace moepool
