#include "engine/kv_cache.h"

#include <algorithm>
#include <tuple>
#include <vector>

#include "absl/hash/hash.h"
#include "absl/strings/str_cat.h"
#include "engine/quant/fp16.h"

namespace moepool {

namespace {

size_t ContentHash(uint64_t parent, absl::Span<const int32_t> tokens) {
  return absl::Hash<std::tuple<uint64_t, absl::Span<const int32_t>>>{}(
      std::make_tuple(parent, tokens));
}

}  // namespace

KvBlockPool::KvBlockPool(const ModelConfig& config, int64_t block_size, int64_t n_blocks,
                         bool prefix_cache)
    : n_layer_(config.n_layer),
      kv_dim_(config.kv_dim()),
      block_size_(std::max<int64_t>(block_size, 1)),
      n_blocks_(std::max<int64_t>(n_blocks, 1)),
      prefix_cache_(prefix_cache),
      holds_(static_cast<size_t>(n_blocks_), 0),
      key_(static_cast<size_t>(n_blocks_), 0),
      evictable_at_(static_cast<size_t>(n_blocks_)),
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
  int32_t b = -1;
  if (!free_.empty()) {
    b = free_.back();
    free_.pop_back();
  } else if (!evictable_.empty()) {
    b = evictable_.front();
    Unpublish(b);  // drops the cache's hold
  } else {
    return -1;
  }
  holds_[static_cast<size_t>(b)] = 1;
  CountFree();
  return b;
}

void KvBlockPool::Free(int32_t block) {
  std::lock_guard<std::mutex> lock(mu_);
  const size_t b = static_cast<size_t>(block);
  if (--holds_[b] == 0) {
    free_.push_back(block);
  } else if (holds_[b] == 1 && key_[b] != 0) {
    // Only the prefix cache holds it now: evictable, most recently released last.
    evictable_at_[b] = evictable_.insert(evictable_.end(), block);
  }
  CountFree();
}

uint64_t KvBlockPool::Publish(uint64_t parent, absl::Span<const int32_t> tokens, int32_t block) {
  if (!prefix_cache_ || static_cast<int64_t>(tokens.size()) != block_size_) return 0;
  std::lock_guard<std::mutex> lock(mu_);
  const size_t b = static_cast<size_t>(block);
  if (key_[b] != 0) return key_[b];
  const size_t hash = ContentHash(parent, tokens);
  if (const auto it = by_content_.find(hash); it != by_content_.end()) {
    const Published& p = published_.at(it->second);
    const bool same = p.parent == parent && absl::MakeConstSpan(p.tokens) == tokens;
    return same ? it->second : 0;  // an equal block is cached already; else a collision
  }
  const uint64_t key = next_key_++;
  published_.emplace(key, Published{parent, {tokens.begin(), tokens.end()}, block});
  by_content_.emplace(hash, key);
  key_[b] = key;
  ++holds_[b];
  return key;
}

int32_t KvBlockPool::Acquire(uint64_t parent, absl::Span<const int32_t> tokens, uint64_t* key) {
  if (!prefix_cache_) return -1;
  std::lock_guard<std::mutex> lock(mu_);
  const auto it = by_content_.find(ContentHash(parent, tokens));
  if (it == by_content_.end()) return -1;
  const Published& p = published_.at(it->second);
  if (p.parent != parent || absl::MakeConstSpan(p.tokens) != tokens) return -1;
  const size_t b = static_cast<size_t>(p.block);
  if (holds_[b]++ == 1) {
    evictable_.erase(evictable_at_[b]);  // held again
    CountFree();
  }
  *key = it->second;
  return p.block;
}

int64_t KvBlockPool::cached_blocks() const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int64_t>(published_.size());
}

void KvBlockPool::Unpublish(int32_t block) {
  const size_t b = static_cast<size_t>(block);
  const auto it = published_.find(key_[b]);
  by_content_.erase(ContentHash(it->second.parent, it->second.tokens));
  published_.erase(it);
  key_[b] = 0;
  if (--holds_[b] == 0) evictable_.erase(evictable_at_[b]);
}

void KvBlockPool::CountFree() {
  n_free_.store(static_cast<int64_t>(free_.size() + evictable_.size()), std::memory_order_relaxed);
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
  for (auto b = table_.rbegin(); b != table_.rend(); ++b) pool_->Free(*b);
  table_.clear();
  published_ = 0;
  prefix_key_ = KvBlockPool::kEmptyPrefix;
  publishing_ = true;
}

int64_t KvCache::AttachCachedPrefix(absl::Span<const int32_t> tokens, int64_t max_positions) {
  const int64_t before = n_past_;
  if (own_pool_ != nullptr || !pool_->prefix_cache() || !publishing_ ||
      published_ != static_cast<int64_t>(table_.size()) || n_past_ != published_ * block_size_) {
    return 0;
  }
  const int64_t limit = std::min({max_positions, n_ctx_, static_cast<int64_t>(tokens.size())});
  for (int64_t end = n_past_ + block_size_; end <= limit; end += block_size_) {
    uint64_t key = 0;
    const int32_t b = pool_->Acquire(
        prefix_key_, tokens.subspan(static_cast<size_t>(end - block_size_), block_size_), &key);
    if (b < 0) break;
    table_.push_back(b);
    prefix_key_ = key;
  }
  published_ = static_cast<int64_t>(table_.size());
  n_past_ = published_ * block_size_;
  return n_past_ - before;
}

void KvCache::PublishFullBlocks(absl::Span<const int32_t> tokens) {
  if (own_pool_ != nullptr || !pool_->prefix_cache()) return;
  while (publishing_ && (published_ + 1) * block_size_ <= n_past_) {
    const uint64_t key = pool_->Publish(
        prefix_key_, tokens.subspan(static_cast<size_t>(published_ * block_size_), block_size_),
        table_[static_cast<size_t>(published_)]);
    if (key == 0) {
      publishing_ = false;
      break;
    }
    prefix_key_ = key;
    ++published_;
  }
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
