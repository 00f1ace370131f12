// Key/value cache: IEEE half rows of kv_dim values for K and for V (half precision, as the
// reference implementation keeps it; half the memory of f32), stored in fixed-size blocks.
//
// A KvBlockPool owns the storage of n_blocks blocks of block_size positions (all layers, K and
// V). A KvCache is one sequence's block table: logical block j (positions j*block_size ..
// (j+1)*block_size-1) lives in physical block table[j]. A cache either shares a pool with other
// sequences and takes blocks on demand (continuous batching: no sequence reserves its whole
// context), or owns a private pool of one block spanning its whole context (the single-sequence
// form used by the CLI).
//
// Pool memory is reserved up front but only touched pages become resident, so a large pool costs
// address space, not RAM, until it is used. Freed blocks are reused most-recent-first, so reuse
// touches pages that are already resident.
//
// Threading: KvBlockPool's Allocate/Free/counters are thread-safe. A KvCache is not: one sequence
// is advanced by one forward pass at a time, and Reserve/Release are called by its owner only.
#ifndef MOEPOOL_ENGINE_KV_CACHE_H_
#define MOEPOOL_ENGINE_KV_CACHE_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "absl/status/status.h"
#include "engine/attention.h"
#include "engine/model.h"

namespace moepool {

class KvBlockPool {
 public:
  // block_size >= 1 positions per block, n_blocks >= 1.
  KvBlockPool(const ModelConfig& config, int64_t block_size, int64_t n_blocks);

  int64_t block_size() const { return block_size_; }
  int64_t n_blocks() const { return n_blocks_; }
  int64_t kv_dim() const { return kv_dim_; }

  // A free block's id, or -1 if every block is in use.
  int32_t Allocate();
  // Returns a block obtained from Allocate (each exactly once).
  void Free(int32_t block);
  int64_t free_blocks() const { return n_free_.load(std::memory_order_relaxed); }
  int64_t used_blocks() const { return n_blocks_ - free_blocks(); }

  // Row of position `i` (< block_size) of `block` in `layer`: kv_dim halves.
  uint16_t* K(int32_t block, int64_t layer, int64_t i) {
    return k_.get() + Offset(block, layer, i);
  }
  uint16_t* V(int32_t block, int64_t layer, int64_t i) {
    return v_.get() + Offset(block, layer, i);
  }
  const uint16_t* K(int32_t block, int64_t layer, int64_t i) const {
    return k_.get() + Offset(block, layer, i);
  }
  const uint16_t* V(int32_t block, int64_t layer, int64_t i) const {
    return v_.get() + Offset(block, layer, i);
  }
  // Elements between the same row of consecutive physical blocks.
  size_t block_stride() const { return static_cast<size_t>(n_layer_ * block_size_ * kv_dim_); }

  // Bytes reserved (both K and V).
  uint64_t ReservedBytes() const;

 private:
  size_t Offset(int32_t block, int64_t layer, int64_t i) const {
    return static_cast<size_t>(((block * n_layer_ + layer) * block_size_ + i) * kv_dim_);
  }
  int64_t n_layer_;
  int64_t kv_dim_;
  int64_t block_size_;
  int64_t n_blocks_;
  std::unique_ptr<uint16_t[]> k_;  // [n_blocks x n_layer x block_size x kv_dim]
  std::unique_ptr<uint16_t[]> v_;
  std::mutex mu_;
  std::vector<int32_t> free_;  // guarded by mu_; the back is handed out first
  std::atomic<int64_t> n_free_;
};

class KvCache {
 public:
  // Single-sequence form: a private pool of one block of n_ctx positions, reserved now.
  KvCache(const ModelConfig& config, int64_t n_ctx);
  // Paged form: blocks come from `pool` (borrowed; must outlive this cache) as Reserve asks.
  KvCache(KvBlockPool* pool, int64_t n_ctx);
  ~KvCache();  // returns the blocks to the pool
  KvCache(const KvCache&) = delete;
  KvCache& operator=(const KvCache&) = delete;

  int64_t n_ctx() const { return n_ctx_; }
  int64_t kv_dim() const { return pool_->kv_dim(); }
  // Number of positions already filled (the next token's position).
  int64_t n_past() const { return n_past_; }
  void set_n_past(int64_t n) { n_past_ = n; }

  // Positions that have storage now (a multiple of the block size, or n_ctx).
  int64_t capacity() const;
  int64_t n_blocks() const { return static_cast<int64_t>(table_.size()); }
  const KvBlockPool& pool() const { return *pool_; }

  // Makes positions 0 .. n-1 storable, taking blocks from the pool. INVALID_ARGUMENT if
  // n > n_ctx; RESOURCE_EXHAUSTED if the pool runs out (blocks taken so far are kept).
  absl::Status Reserve(int64_t n);
  // Returns every block to the pool and sets n_past to 0 (paged form; the single-sequence form
  // keeps its private block and only resets n_past).
  void Release();

  // Rows of kv_dim half values; pos < capacity().
  uint16_t* K(int64_t layer, int64_t pos) { return pool_->K(Block(pos), layer, InBlock(pos)); }
  uint16_t* V(int64_t layer, int64_t pos) { return pool_->V(Block(pos), layer, InBlock(pos)); }
  const uint16_t* K(int64_t layer, int64_t pos) const {
    return pool_->K(Block(pos), layer, InBlock(pos));
  }
  const uint16_t* V(int64_t layer, int64_t pos) const {
    return pool_->V(Block(pos), layer, InBlock(pos));
  }

  // Stores f32 rows [kv_dim] rounded to half; pos < capacity().
  void Store(int64_t layer, int64_t pos, const float* k, const float* v);

  // The attention view of KV head `kv_head` (head_dim wide) of `layer` over positions
  // 0 .. n_kv-1 (n_kv <= capacity()). Valid until the next Reserve/Release.
  KvHeadView HeadView(int64_t layer, int64_t kv_head, int64_t head_dim, int64_t n_kv) const;

  // Bytes of the blocks this cache holds (both K and V).
  uint64_t ReservedBytes() const;

 private:
  int32_t Block(int64_t pos) const { return table_[static_cast<size_t>(pos / block_size_)]; }
  int64_t InBlock(int64_t pos) const { return pos % block_size_; }

  std::unique_ptr<KvBlockPool> own_pool_;  // single-sequence form only
  KvBlockPool* pool_;
  int64_t n_ctx_;
  int64_t block_size_;
  int64_t n_past_ = 0;
  std::vector<int32_t> table_;  // logical block -> physical block
};

// Half -> float through a 64K-entry table (exact).
float HalfToFloat(uint16_t h);

}  // namespace moepool

#endif  // MOEPOOL_ENGINE_KV_CACHE_H_
