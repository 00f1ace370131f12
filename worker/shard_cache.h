// The worker's shard cache: the expert tensors a coordinator assigned to this worker, kept as a
// valid GGUF file per (model, set of pairs) under --cache-dir, so a worker needs no model file
// and a restart fetches nothing.
//
// A shard file holds the scalar metadata the coordinator sent (architecture, hyperparameters,
// general.name, llama.vocab_size), the key `moepool.shard.model_fingerprint` and, for each
// assigned (layer, expert) pair, its three matrices in the per-expert layout
// (`blk.L.ffn_gate.E.weight`, `ffn_up`, `ffn_down`), whatever the coordinator's file layout is.
// Model::Load reads it like any per-expert Mixtral file (ExpertFilter::non_expert = false).
//
// Names and safety: a file is named `<model fingerprint>-<16 hex digits of a hash of its tensor
// index>.gguf` (`.gguf.partial` while being written). Every part of the name comes from data
// that ValidateManifest checked (a fingerprint of 32 hex digits), so nothing the coordinator
// sends can name a path outside the cache directory. Files that do not parse as shard files
// are skipped by Inventory and never deleted.
//
// Integrity: every tensor carries a 128-bit XXH3 checksum from the coordinator (libxxhash).
// Materialize verifies a complete file's tensors before using it, refetches the tensors that do
// not match (a truncated or altered file), and verifies each fetched tensor as it arrives.
// A transfer interrupted half-way leaves the `.partial` file: the next Materialize for the same
// manifest keeps its tensors that verify and fetches the others (resume at tensor granularity).
// A complete, matching file is not written to at all (same inode, same mtime).
//
// Threading: a ShardCache is used from one thread at a time. Errors: INVALID_ARGUMENT for a bad
// manifest (naming the field), DATA_LOSS for a tensor that does not verify after a retry,
// INTERNAL / the OS error text for I/O failures; the fetcher's errors are returned as they are.
#ifndef MOEPOOL_WORKER_SHARD_CACHE_H_
#define MOEPOOL_WORKER_SHARD_CACHE_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/gguf.h"
#include "engine/quant/types.h"

namespace moepool::worker {

// The metadata key that names the model a shard file belongs to.
inline constexpr char kShardFingerprintKey[] = "moepool.shard.model_fingerprint";

// A 128-bit XXH3 digest.
struct Checksum {
  uint64_t high = 0;
  uint64_t low = 0;
  bool operator==(const Checksum& o) const { return high == o.high && low == o.low; }
  bool operator!=(const Checksum& o) const { return !(*this == o); }
  std::string Hex() const;  // 32 hex digits
};

Checksum ChecksumOf(const void* data, size_t bytes);

// Incremental form of ChecksumOf (same digest for the same bytes, however they are split).
class ChecksumStream {
 public:
  ChecksumStream();
  ~ChecksumStream();
  ChecksumStream(const ChecksumStream&) = delete;
  ChecksumStream& operator=(const ChecksumStream&) = delete;
  void Update(const void* data, size_t bytes);
  Checksum Digest() const;

 private:
  void* state_;  // XXH3_state_t
};

// One tensor of a shard file.
struct ShardTensor {
  std::string name;  // blk.L.ffn_{gate,up,down}.E.weight
  TensorType type = TensorType::kF32;
  std::vector<int64_t> dims;  // dims[0] is the row length; 1..4 dimensions
  uint64_t bytes = 0;         // RowBytes(type, dims[0]) * rows
  Checksum checksum;
  int layer = 0;
  int expert = 0;
};

// What a coordinator assigned: the model, the shard header's metadata, the tensors in file order.
struct ShardManifest {
  std::string model_fingerprint;  // 32 lowercase hex digits
  // Scalar values only (no arrays); the fingerprint key is added by the cache.
  std::vector<std::pair<std::string, GgufValue>> metadata;
  std::vector<ShardTensor> tensors;
};

// Bounds on what a manifest may ask for (a hostile coordinator cannot make the worker allocate
// or write without limit).
struct ShardLimits {
  size_t max_tensors = 3 * 1024 * 64;            // 3 matrices x 1024 layers x 64 experts
  size_t max_metadata = 256;                     // entries
  size_t max_string_bytes = 4096;                // per metadata string / key
  uint64_t max_total_bytes = uint64_t{1} << 42;  // 4 TiB
};

// Checks every field: the fingerprint's form, metadata keys (printable, <= max_string_bytes,
// unique, not the fingerprint key) and scalar types, each tensor's name against its layer and
// expert, its dims (1..4, each >= 1), type (a known type) and byte size, unique names, and the
// totals against `limits`. INVALID_ARGUMENT naming the first problem.
absl::Status ValidateManifest(const ShardManifest& manifest, const ShardLimits& limits = {});

// A shard file found in the cache.
struct CachedShard {
  std::string path;
  std::string model_fingerprint;
  std::vector<std::pair<int, int>> pairs;  // (layer, expert) with all three matrices, ascending
  bool complete = false;                   // false: a `.partial` file (its tensors unverified)
};

struct FetchProgress {
  uint64_t bytes_done = 0;   // fetched so far in this Materialize (reused bytes not counted)
  uint64_t bytes_total = 0;  // to fetch in this Materialize
  double seconds = 0;        // since fetching started
};

// Delivers the bytes of `tensor` from `offset` to its end, in order, by calling `sink` (any
// number of times). An error from `sink` must be returned as is (the fetch is abandoned).
using TensorFetcher = std::function<absl::Status(
    const ShardTensor& tensor, uint64_t offset,
    const std::function<absl::Status(const char* data, size_t bytes)>& sink)>;

struct MaterializeResult {
  std::string path;            // the complete shard file
  uint64_t bytes_fetched = 0;  // through the fetcher
  uint64_t bytes_reused = 0;   // verified bytes already on disk (this or another shard file)
  int tensors_fetched = 0;
  bool untouched = false;  // a complete matching file was used as it was
};

class ShardCache {
 public:
  // Creates `dir` (mode 0700) if it does not exist. INVALID_ARGUMENT for an empty path,
  // the OS error if it cannot be created or is not a directory.
  static absl::StatusOr<ShardCache> Open(const std::string& dir, ShardLimits limits = {});

  const std::string& dir() const { return dir_; }

  // The shard files under dir() (complete and partial), sorted by path. Files that are not
  // shard files (another GGUF, garbage, a truncated header) are left out.
  std::vector<CachedShard> Inventory() const;

  // Makes the complete shard file for `manifest` (see the file comment): uses a matching complete
  // file untouched when all its tensors verify; otherwise resumes or creates the `.partial`
  // file, copies tensors that verify from other shard files of the same model, fetches the rest
  // with `fetch` (each verified; a mismatch is fetched once more, then DATA_LOSS), and renames
  // it into place. On success, other shard files of the same model are deleted (the disk holds
  // one share per model). `progress` (may be empty) is called after each fetched chunk, at most
  // every 100 ms, and once at the end.
  absl::StatusOr<MaterializeResult> Materialize(
      const ShardManifest& manifest, const TensorFetcher& fetch,
      const std::function<void(const FetchProgress&)>& progress = {});

  // The file name Materialize uses for `manifest` (no directory), for messages and tests.
  static std::string FileNameFor(const ShardManifest& manifest);

 private:
  ShardCache(std::string dir, ShardLimits limits) : dir_(std::move(dir)), limits_(limits) {}
  std::string dir_;
  ShardLimits limits_;
};

}  // namespace moepool::worker

#endif  // MOEPOOL_WORKER_SHARD_CACHE_H_
