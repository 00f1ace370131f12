#include "engine/kv_cache.h"

namespace moepool {

KvCache::KvCache(const ModelConfig& config, int64_t n_ctx)
    : n_layer_(config.n_layer), n_ctx_(n_ctx), kv_dim_(config.kv_dim()) {
  const size_t n = static_cast<size_t>(n_layer_ * n_ctx_ * kv_dim_);
  // Default-initialised (not zeroed): pages stay untouched until written.
  k_.reset(new float[n]);
  v_.reset(new float[n]);
}

uint64_t KvCache::ReservedBytes() const {
  return 2ull * static_cast<uint64_t>(n_layer_ * n_ctx_ * kv_dim_) * sizeof(float);
}

}  // namespace moepool
