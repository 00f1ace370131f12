// What the shard cache tests (shard_cache_test.cc, shard_cache_repair_test.cc) share: a small
// merged-layout model holding only expert tensors, written into a temporary directory; manifests
// of its per-expert slices; an in-memory fetcher of their bytes that can fail or misbehave; and a
// fixture with a cache over an empty directory.
#ifndef MOEPOOL_TESTS_WORKER_SHARD_CACHE_TEST_UTIL_H_
#define MOEPOOL_TESTS_WORKER_SHARD_CACHE_TEST_UTIL_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "engine/gguf.h"
#include "gtest/gtest.h"
#include "worker/shard_cache.h"

namespace moepool::testing {

using Pairs = std::vector<std::pair<int, int>>;

inline constexpr int64_t kEmbd = 64;
inline constexpr int64_t kFf = 96;
inline constexpr int kLayers = 2;
inline constexpr int kExperts = 4;
inline constexpr char kFingerprint[] = "0123456789abcdef0123456789abcdef";
inline constexpr char kOtherFingerprint[] = "fedcba9876543210fedcba9876543210";

// A directory under TempDir(), removed with everything in it at the end; path() is empty if it
// could not be created.
class TempDirectory {
 public:
  TempDirectory();
  ~TempDirectory();
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// The names in `dir`, sorted.
std::vector<std::string> ListNames(const std::string& dir);

std::string ReadAll(const std::string& path);

// The expert matrices of each layer of the source model ({cols, rows} per expert) and their types.
struct MatrixKind {
  const char* name;
  TensorType type;
  int64_t cols;
  int64_t rows;
};
inline constexpr MatrixKind kMatrices[] = {{"gate", TensorType::kQ8_0, kEmbd, kFf},
                                           {"up", TensorType::kF16, kEmbd, kFf},
                                           {"down", TensorType::kQ4_0, kFf, kEmbd}};

// Writes a merged-layout Mixtral-architecture file holding only the expert tensors (what a
// coordinator would serve them from) and opens it.
std::unique_ptr<GgufFile> WriteSourceModel(const std::string& path);

// Serves tensor bytes from memory, counting what it is asked for; can fail or misbehave.
struct FakeServer {
  std::map<std::string, std::string> bytes;
  int calls = 0;
  uint64_t sent = 0;
  std::vector<std::string> fetched;  // names, one per call
  int fail_on_call = -1;             // this call (0-based) sends half and fails UNAVAILABLE
  int corrupt_calls = 0;             // the first this many calls send one byte flipped
  int extra_bytes = 0;               // sent after the tensor
  int missing_bytes = 0;             // left off the end
  bool ignore_sink_errors = false;
  int sink_errors = 0;  // refusals by the sink
  size_t chunk = 1000;

  worker::TensorFetcher Fetcher();
};

// The manifest of `pairs` (in this order) from the merged source file; the per-expert slices'
// bytes go to `server`.
worker::ShardManifest ManifestFor(const GgufFile& src, const Pairs& pairs, FakeServer* server,
                                  const std::string& fingerprint = kFingerprint);

uint64_t TotalBytes(const worker::ShardManifest& m);

// A cache over an empty directory, and the source model in another.
class ShardCacheTest : public ::testing::Test {
 protected:
  void SetUp() override;

  std::string dir() const { return cache_dir_.path(); }

  // The shard file holds exactly what the manifest and the source say, as GgufWriter lays it
  // out (metadata, the fingerprint key, the tensors in manifest order).
  void ExpectFileHolds(const std::string& path, const worker::ShardManifest& m,
                       const FakeServer& server);

  TempDirectory src_dir_;
  TempDirectory cache_dir_;
  std::unique_ptr<GgufFile> source_;
  std::unique_ptr<worker::ShardCache> cache_;
};

}  // namespace moepool::testing

#endif  // MOEPOOL_TESTS_WORKER_SHARD_CACHE_TEST_UTIL_H_
