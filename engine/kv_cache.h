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
// Prefix caching (a pool built with prefix_cache = true): a full block is *published* with the
// tokens it was computed from and the key of the prefix before it, so a later sequence whose
// tokens start the same way attaches the block instead of recomputing it. A block's KV depends
// only on its tokens, their positions and everything before them, and every row of a forward
// pass is computed independently of its batch, so an attached block holds exactly the values the
// sequence would have computed itself: outputs do not change, only the prefill work does.
// Published blocks are shared read-only (a sequence writes only at positions >= its n_past, which
// lie past every full block) and reference counted. A published block that no sequence holds
// stays cached but counts as free: Allocate takes a truly free block first, and otherwise evicts
// the least recently released cached block.
//
// Threading: KvBlockPool is thread-safe. A KvCache is not: one sequence is advanced by one
// forward pass at a time, and its methods are called by its owner only.
#ifndef MOEPOOL_ENGINE_KV_CACHE_H_
#define MOEPOOL_ENGINE_KV_CACHE_H_

#include <atomic>
#include <cstdint>
#include <list>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/types/span.h"
#include "engine/attention.h"
#include "engine/model.h"

namespace moepool {

// A backend's own copy of a pool's K/V storage (for example in GPU memory), with the same block
// ids. The pool owns it and destroys it with itself, so the copy never outlives the blocks it
// mirrors. What it holds is the backend's business.
class KvPoolMirror {
 public:
  virtual ~KvPoolMirror() = default;
};

class KvBlockPool {
 public:
  // block_size >= 1 positions per block, n_blocks >= 1.
  KvBlockPool(const ModelConfig& config, int64_t block_size, int64_t n_blocks,
              bool prefix_cache = false);

  int64_t block_size() const { return block_size_; }
  int64_t n_blocks() const { return n_blocks_; }
  int64_t kv_dim() const { return kv_dim_; }
  bool prefix_cache() const { return prefix_cache_; }

  // A block for the caller (who then holds it), or -1 if every block is held. May evict the
  // least recently released cached block.
  int32_t Allocate();
  // Drops the caller's hold on a block it got from Allocate or Acquire (once per hold).
  void Free(int32_t block);
  // Blocks no sequence holds: free ones plus cached ones that Allocate may evict.
  int64_t free_blocks() const { return n_free_.load(std::memory_order_relaxed); }
  int64_t used_blocks() const { return n_blocks_ - free_blocks(); }

  // Key of the empty prefix: the parent of a sequence's first block.
  static constexpr uint64_t kEmptyPrefix = 0;
  // Publishes `block` (held by the caller, full) as holding the KV of `tokens` (block_size of
  // them) at the positions that follow the prefix `parent`. Returns the key of the prefix that
  // ends with this block, or 0 if it could not be published (prefix caching off, or a hash
  // collision); the caller's hold is unchanged. If an equal block is already published, that one
  // stays and its key is returned.
  uint64_t Publish(uint64_t parent, absl::Span<const int32_t> tokens, int32_t block);
  // The published block holding `tokens` after prefix `parent`, now also held by the caller (drop
  // it with Free), and its key in *key; -1 if there is none.
  int32_t Acquire(uint64_t parent, absl::Span<const int32_t> tokens, uint64_t* key);
  // Published blocks (held or not).
  int64_t cached_blocks() const;

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
  int64_t n_layer() const { return n_layer_; }

  // The mirror an AttentionBackend attached (nullptr if none). Set and read only by the thread
  // that runs forward passes over this pool's caches.
  KvPoolMirror* mirror() const { return mirror_.get(); }
  void set_mirror(std::unique_ptr<KvPoolMirror> mirror) { mirror_ = std::move(mirror); }

 private:
  size_t Offset(int32_t block, int64_t layer, int64_t i) const {
    return static_cast<size_t>(((block * n_layer_ + layer) * block_size_ + i) * kv_dim_);
  }
  struct Published {
    uint64_t parent;
    std::vector<int32_t> tokens;  // [block_size]
    int32_t block;
  };
  // With mu_ held.
  void Unpublish(int32_t block);
  void CountFree();

  int64_t n_layer_;
  int64_t kv_dim_;
  int64_t block_size_;
  int64_t n_blocks_;
  bool prefix_cache_;
  std::unique_ptr<uint16_t[]> k_;  // [n_blocks x n_layer x block_size x kv_dim]
  std::unique_ptr<uint16_t[]> v_;
  mutable std::mutex mu_;
  // Guarded by mu_:
  std::vector<int32_t> free_;   // the back is handed out first
  std::vector<int32_t> holds_;  // [n_blocks] caches holding each block, +1 while published
  std::vector<uint64_t> key_;   // [n_blocks] the block's prefix key while published, else 0
  absl::flat_hash_map<uint64_t, Published> published_;  // by key
  absl::flat_hash_map<size_t, uint64_t> by_content_;    // hash of (parent, tokens) -> key
  // Published blocks that no cache holds, least recently released first; evictable_at_[b] is
  // b's place in the list.
  std::list<int32_t> evictable_;
  std::vector<std::list<int32_t>::iterator> evictable_at_;
  uint64_t next_key_ = 1;
  std::atomic<int64_t> n_free_;
  std::unique_ptr<KvPoolMirror> mirror_;
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
  KvBlockPool* mutable_pool() { return pool_; }
  // Physical block of each logical block, in order (n_blocks() entries).
  const std::vector<int32_t>& block_table() const { return table_; }

  // Makes positions 0 .. n-1 storable, taking blocks from the pool. INVALID_ARGUMENT if
  // n > n_ctx; RESOURCE_EXHAUSTED if the pool runs out (blocks taken so far are kept).
  absl::Status Reserve(int64_t n);
  // Returns every block to the pool and sets n_past to 0 (paged form; the single-sequence form
  // keeps its private block and only resets n_past). Blocks go back last first, so a cached
  // prefix loses its tail before its head.
  void Release();

  // Prefix caching (paged form on a prefix-caching pool; otherwise both do nothing).
  // While the cache holds nothing but published blocks (empty, or only attached and published
  // ones, n_past at their end): attaches further published blocks so that it holds
  // tokens[0 .. k * block_size) for the largest k with k * block_size <= max_positions, and sets
  // n_past to k * block_size. Returns the positions attached by this call.
  int64_t AttachCachedPrefix(absl::Span<const int32_t> tokens, int64_t max_positions);
  // Publishes the full blocks below n_past() not yet published; tokens[0 .. n_past()) are the
  // tokens those positions were computed from.
  void PublishFullBlocks(absl::Span<const int32_t> tokens);

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
  // Prefix caching: table_[0 .. published_) are published (or attached), and prefix_key_ is the
  // key of the prefix they hold; publishing stops for good if a block cannot be published.
  int64_t published_ = 0;
  uint64_t prefix_key_ = KvBlockPool::kEmptyPrefix;
  bool publishing_ = true;
};

// Half -> float through a 64K-entry table (exact).
float HalfToFloat(uint16_t h);

}  // namespace moepool

#endif  // MOEPOOL_ENGINE_KV_CACHE_H_
