// Key/value cache of one sequence: IEEE half rows [n_layer][n_ctx][kv_dim] for K and for V
// (half precision, as the reference implementation keeps it; half the memory of f32).
//
// Memory is reserved for n_ctx positions but only touched pages become resident, so a large
// context costs address space, not RAM, until it is used.
// Not thread-safe: one sequence is advanced by one forward pass at a time.
#ifndef MOEPOOL_ENGINE_KV_CACHE_H_
#define MOEPOOL_ENGINE_KV_CACHE_H_

#include <cstdint>
#include <memory>

#include "engine/model.h"

namespace moepool {

class KvCache {
 public:
  KvCache(const ModelConfig& config, int64_t n_ctx);

  int64_t n_ctx() const { return n_ctx_; }
  int64_t kv_dim() const { return kv_dim_; }
  // Number of positions already filled (the next token's position).
  int64_t n_past() const { return n_past_; }
  void set_n_past(int64_t n) { n_past_ = n; }

  // Rows of kv_dim half values.
  uint16_t* K(int64_t layer, int64_t pos) { return k_.get() + Offset(layer, pos); }
  uint16_t* V(int64_t layer, int64_t pos) { return v_.get() + Offset(layer, pos); }
  const uint16_t* K(int64_t layer, int64_t pos) const { return k_.get() + Offset(layer, pos); }
  const uint16_t* V(int64_t layer, int64_t pos) const { return v_.get() + Offset(layer, pos); }

  // Stores f32 rows [kv_dim] rounded to half.
  void Store(int64_t layer, int64_t pos, const float* k, const float* v);

  // Bytes reserved (both K and V).
  uint64_t ReservedBytes() const;

 private:
  size_t Offset(int64_t layer, int64_t pos) const {
    return static_cast<size_t>((layer * n_ctx_ + pos) * kv_dim_);
  }
  int64_t n_layer_;
  int64_t n_ctx_;
  int64_t kv_dim_;
  int64_t n_past_ = 0;
  std::unique_ptr<uint16_t[]> k_;  // [n_layer x n_ctx x kv_dim]
  std::unique_ptr<uint16_t[]> v_;  // [n_layer x n_ctx x kv_dim]
};

// Half -> float through a 64K-entry table (exact).
float HalfToFloat(uint16_t h);

}  // namespace moepool

#endif  // MOEPOOL_ENGINE_KV_CACHE_H_
