#include "engine/kv_cache.h"

#include <algorithm>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/quant/fp16.h"

namespace moepool {

KvBlockPool::KvBlockPool(const ModelConfig& config, int64_t block_size, int64_t n_blocks)
    : n_layer_(config.n_layer),
      kv_dim_(config.kv_dim()),
      block_size_(std::max<int64_t>(block_size, 1)),
      n_blocks_(std::max<int64_t>(n_blocks, 1)),
      n_free_(n_blocks_) {
  const size_t n = static_cast<size_t>(n_blocks_) * block_stride();
  // Default-initialised (not zeroed): pages stay untouched until written.
  k_.reset(new uint16_t[n]);
  v_.reset(new uint16_t[n]);
  free_.reserve(static_cast<size_t>(n_blocks_));
  // Block 0 on top, so a fresh pool hands out blocks in ascending address order.
  for (int64_t b = n_blocks_ - 1; b >= 0; --b) free_.push_back(static_cast<int32_t>(b));
}

int32_t KvBlockPool::Allocate() {
  std::lock_guard<std::mutex> lock(mu_);
  if (free_.empty()) return -1;
  const int32_t b = free_.back();
  free_.pop_back();
  n_free_.store(static_cast<int64_t>(free_.size()), std::memory_order_relaxed);
  return b;
}

void KvBlockPool::Free(int32_t block) {
  std::lock_guard<std::mutex> lock(mu_);
  free_.push_back(block);
  n_free_.store(static_cast<int64_t>(free_.size()), std::memory_order_relaxed);
}

uint64_t KvBlockPool::ReservedBytes() const {
  return 2ull * static_cast<uint64_t>(n_blocks_) * block_stride() * sizeof(uint16_t);
}

KvCache::KvCache(const ModelConfig& config, int64_t n_ctx)
    : own_pool_(std::make_unique<KvBlockPool>(config, n_ctx, 1)),
      pool_(own_pool_.get()),
      n_ctx_(n_ctx),
      block_size_(pool_->block_size()) {
  table_.push_back(pool_->Allocate());
}

KvCache::KvCache(KvBlockPool* pool, int64_t n_ctx)
    : pool_(pool), n_ctx_(n_ctx), block_size_(pool->block_size()) {}

KvCache::~KvCache() {
  if (own_pool_ == nullptr) Release();
}

int64_t KvCache::capacity() const {
  return std::min<int64_t>(static_cast<int64_t>(table_.size()) * block_size_, n_ctx_);
}

absl::Status KvCache::Reserve(int64_t n) {
  if (n > n_ctx_) {
    return absl::InvalidArgumentError(
        absl::StrCat("position ", n - 1, " exceeds the context of ", n_ctx_, " tokens"));
  }
  while (static_cast<int64_t>(table_.size()) * block_size_ < n) {
    const int32_t b = pool_->Allocate();
    if (b < 0) {
      return absl::ResourceExhaustedError(absl::StrCat("KV cache pool exhausted (",
                                                       pool_->n_blocks(), " blocks of ",
                                                       block_size_, " positions in use)"));
    }
    table_.push_back(b);
  }
  return absl::OkStatus();
}

void KvCache::Release() {
  n_past_ = 0;
  if (own_pool_ != nullptr) return;
  for (int32_t b : table_) pool_->Free(b);
  table_.clear();
}

void KvCache::Store(int64_t layer, int64_t pos, const float* k, const float* v) {
  uint16_t* kd = K(layer, pos);
  uint16_t* vd = V(layer, pos);
  const int64_t kv_dim = pool_->kv_dim();
  for (int64_t i = 0; i < kv_dim; ++i) {
    kd[i] = Fp32ToFp16(k[i]);
    vd[i] = Fp32ToFp16(v[i]);
  }
}

KvHeadView KvCache::HeadView(int64_t layer, int64_t kv_head, int64_t head_dim, int64_t n_kv) const {
  KvHeadView view;
  // Block 0's row 0 of this layer, offset to the head; blocks[j] then selects the block.
  view.k = pool_->K(0, layer, 0) + kv_head * head_dim;
  view.v = pool_->V(0, layer, 0) + kv_head * head_dim;
  view.blocks = table_.data();
  view.block_size = block_size_;
  view.block_stride = pool_->block_stride();
  view.stride = static_cast<size_t>(pool_->kv_dim());
  view.n_kv = n_kv;
  return view;
}

uint64_t KvCache::ReservedBytes() const {
  return 2ull * table_.size() * pool_->block_stride() * sizeof(uint16_t);
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
