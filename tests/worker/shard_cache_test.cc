// The worker's shard cache on disk: Open, Materialize and Inventory over a temporary directory,
// with the expert tensors of a small merged-layout model written here and served by an in-memory
// fetcher (validation, names and checksums: shard_manifest_test.cc).
#include "worker/shard_cache.h"

#include <fcntl.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/gguf.h"
#include "engine/gguf_writer.h"
#include "engine/model.h"
#include "gtest/gtest.h"

namespace moepool::worker {
namespace {

using Pairs = std::vector<std::pair<int, int>>;

#define EXPECT_MESSAGE_HAS(status, needle) \
  EXPECT_PRED_FORMAT2(::testing::IsSubstring, needle, std::string((status).message()))

constexpr int64_t kEmbd = 64;
constexpr int64_t kFf = 96;
constexpr int kLayers = 2;
constexpr int kExperts = 4;
constexpr char kFingerprint[] = "0123456789abcdef0123456789abcdef";
constexpr char kOtherFingerprint[] = "fedcba9876543210fedcba9876543210";

// A directory under TempDir(), removed with everything in it at the end.
class TempDirectory {
 public:
  TempDirectory() {
    std::string pattern = ::testing::TempDir() + "shard_cache_XXXXXX";
    path_ = ::mkdtemp(pattern.data()) != nullptr ? pattern : "";
  }
  ~TempDirectory() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

std::vector<std::string> ListNames(const std::string& dir) {
  std::vector<std::string> names;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    names.push_back(e.path().filename().string());
  }
  std::sort(names.begin(), names.end());
  return names;
}

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Quantized random weights (real tensor bytes of each type); random bytes where the type has no
// quantizer.
std::string RandomTensor(TensorType type, int64_t cols, int64_t rows, std::mt19937& rng) {
  const TypeTraits& tr = GetTypeTraits(type);
  const size_t row_bytes = RowBytes(type, cols);
  std::string out(row_bytes * static_cast<size_t>(rows), '\0');
  std::normal_distribution<float> normal(0.0f, 0.2f);
  std::vector<float> row(static_cast<size_t>(cols));
  for (int64_t r = 0; r < rows; ++r) {
    for (float& v : row) v = normal(rng);
    char* dst = out.data() + static_cast<size_t>(r) * row_bytes;
    if (tr.quantize != nullptr) {
      tr.quantize(row.data(), dst, cols);
    } else {
      for (size_t i = 0; i < row_bytes; ++i) dst[i] = static_cast<char>(rng());
    }
  }
  return out;
}

struct MatrixKind {
  const char* name;
  TensorType type;
  int64_t cols;
  int64_t rows;
};
constexpr MatrixKind kMatrices[] = {{"gate", TensorType::kQ8_0, kEmbd, kFf},
                                    {"up", TensorType::kF16, kEmbd, kFf},
                                    {"down", TensorType::kQ4_0, kFf, kEmbd}};

// Writes a merged-layout Mixtral-architecture file holding only the expert tensors (what a
// coordinator would serve them from) and opens it.
std::unique_ptr<GgufFile> WriteSourceModel(const std::string& path) {
  GgufWriter w;
  w.AddMetadata("general.architecture", GgufValue::String("llama"));
  w.AddMetadata("general.name", GgufValue::String("shard-test"));
  w.AddMetadata("llama.embedding_length", GgufValue::Uint32(kEmbd));
  w.AddMetadata("llama.block_count", GgufValue::Uint32(kLayers));
  w.AddMetadata("llama.attention.head_count", GgufValue::Uint32(4));
  w.AddMetadata("llama.attention.head_count_kv", GgufValue::Uint32(2));
  w.AddMetadata("llama.feed_forward_length", GgufValue::Uint32(kFf));
  w.AddMetadata("llama.context_length", GgufValue::Uint32(128));
  w.AddMetadata("llama.attention.layer_norm_rms_epsilon", GgufValue::Float32(1e-5f));
  w.AddMetadata("llama.expert_count", GgufValue::Uint32(kExperts));
  w.AddMetadata("llama.expert_used_count", GgufValue::Uint32(2));
  w.AddMetadata("llama.vocab_size", GgufValue::Uint32(100));
  w.AddMetadata("tokenizer.ggml.tokens", GgufValue::StringArray({"a", "b"}));  // not sent
  std::mt19937 rng(42);
  std::vector<std::string> data;
  for (int l = 0; l < kLayers; ++l) {
    for (const MatrixKind& m : kMatrices) {
      EXPECT_TRUE(w.AddTensor(absl::StrCat("blk.", l, ".ffn_", m.name, "_exps.weight"), m.type,
                              {m.cols, m.rows, kExperts})
                      .ok());
      data.push_back(RandomTensor(m.type, m.cols, m.rows * kExperts, rng));
    }
  }
  auto image = GgufWriter::BuildImage(w, data);
  EXPECT_TRUE(image.ok()) << image.status();
  std::ofstream(path, std::ios::binary) << *image;
  auto file = GgufFile::Open(path);
  EXPECT_TRUE(file.ok()) << file.status();
  return file.ok() ? *std::move(file) : nullptr;
}

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

  TensorFetcher Fetcher() {
    return [this](const ShardTensor& t, uint64_t offset, const auto& sink) -> absl::Status {
      const int call = calls++;
      fetched.push_back(t.name);
      std::string data = bytes.at(t.name).substr(offset);
      if (call < corrupt_calls) data[data.size() / 3] ^= 0x5a;
      data.resize(data.size() - static_cast<size_t>(missing_bytes));
      data.append(static_cast<size_t>(extra_bytes), 'x');
      const bool fail = call == fail_on_call;
      if (fail) data.resize(data.size() / 2);
      for (size_t pos = 0; pos < data.size(); pos += chunk) {
        const size_t n = std::min(chunk, data.size() - pos);
        const absl::Status s = sink(data.data() + pos, n);
        if (!s.ok()) ++sink_errors;
        if (!s.ok() && !ignore_sink_errors) return s;
        sent += n;
      }
      if (fail) return absl::UnavailableError("connection to the coordinator lost");
      return absl::OkStatus();
    };
  }
};

// The manifest of `pairs` (in this order) from the merged source file; the per-expert slices'
// bytes go to `server`.
ShardManifest ManifestFor(const GgufFile& src, const Pairs& pairs, FakeServer* server,
                          const std::string& fingerprint = kFingerprint) {
  ShardManifest m;
  m.model_fingerprint = fingerprint;
  for (const auto& [key, value] : src.metadata()) {
    if (value.type != GgufValueType::kArray) m.metadata.emplace_back(key, value);
  }
  for (const auto& [layer, expert] : pairs) {
    for (const MatrixKind& k : kMatrices) {
      const GgufTensorInfo* merged =
          src.FindTensor(absl::StrCat("blk.", layer, ".ffn_", k.name, "_exps.weight"));
      EXPECT_NE(merged, nullptr);
      ShardTensor t;
      t.name = absl::StrCat("blk.", layer, ".ffn_", k.name, ".", expert, ".weight");
      t.type = merged->type;
      t.dims = {merged->dims[0], merged->dims[1]};
      t.bytes = RowBytes(t.type, t.dims[0]) * static_cast<uint64_t>(t.dims[1]);
      const char* data = reinterpret_cast<const char*>(merged->data) + expert * t.bytes;
      t.checksum = ChecksumOf(data, t.bytes);
      t.layer = layer;
      t.expert = expert;
      server->bytes[t.name] = std::string(data, t.bytes);
      m.tensors.push_back(std::move(t));
    }
  }
  return m;
}

uint64_t TotalBytes(const ShardManifest& m) {
  uint64_t n = 0;
  for (const ShardTensor& t : m.tensors) n += t.bytes;
  return n;
}

class ShardCacheTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_FALSE(src_dir_.path().empty());
    ASSERT_FALSE(cache_dir_.path().empty());
    source_ = WriteSourceModel(src_dir_.path() + "/source.gguf");
    ASSERT_NE(source_, nullptr);
    auto cache = ShardCache::Open(cache_dir_.path());
    ASSERT_TRUE(cache.ok()) << cache.status();
    cache_ = std::make_unique<ShardCache>(*std::move(cache));
  }

  std::string dir() const { return cache_dir_.path(); }

  // The shard file holds exactly what the manifest and the source say, as GgufWriter lays it
  // out (metadata, the fingerprint key, the tensors in manifest order).
  void ExpectFileHolds(const std::string& path, const ShardManifest& m, const FakeServer& server) {
    GgufWriter w;
    for (const auto& [key, value] : m.metadata) w.AddMetadata(key, value);
    w.AddMetadata(kShardFingerprintKey, GgufValue::String(m.model_fingerprint));
    std::vector<std::string> data;
    for (const ShardTensor& t : m.tensors) {
      ASSERT_TRUE(w.AddTensor(t.name, t.type, t.dims).ok());
      data.push_back(server.bytes.at(t.name));
    }
    auto image = GgufWriter::BuildImage(w, data);
    ASSERT_TRUE(image.ok()) << image.status();
    EXPECT_TRUE(ReadAll(path) == *image) << path << " differs from the expected image";
  }

  TempDirectory src_dir_;
  TempDirectory cache_dir_;
  std::unique_ptr<GgufFile> source_;
  std::unique_ptr<ShardCache> cache_;
};

TEST_F(ShardCacheTest, MaterializesAShardThatModelLoadReadsWithTheSourceBytes) {
  FakeServer server;
  const Pairs pairs = {{1, 3}, {0, 1}, {1, 0}};
  const ShardManifest m = ManifestFor(*source_, pairs, &server);
  std::vector<FetchProgress> reports;
  auto r = cache_->Materialize(m, server.Fetcher(),
                               [&](const FetchProgress& p) { reports.push_back(p); });
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->path, dir() + "/" + ShardCache::FileNameFor(m));
  EXPECT_FALSE(r->untouched);
  EXPECT_EQ(r->tensors_fetched, 9);
  EXPECT_EQ(r->bytes_fetched, TotalBytes(m));
  EXPECT_EQ(r->bytes_reused, 0u);
  EXPECT_EQ(server.calls, 9);
  EXPECT_EQ(ListNames(dir()), std::vector<std::string>{ShardCache::FileNameFor(m)});
  ASSERT_FALSE(reports.empty());
  EXPECT_EQ(reports.back().bytes_total, TotalBytes(m));
  EXPECT_EQ(reports.back().bytes_done, TotalBytes(m));
  ExpectFileHolds(r->path, m, server);

  ExpertFilter filter;
  filter.non_expert = false;
  const std::set<std::pair<int, int>> keep(pairs.begin(), pairs.end());
  filter.keep = [&](int l, int e) { return keep.count({l, e}) > 0; };
  auto model = Model::Load(r->path, filter);
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_EQ((*model)->config().n_vocab, 100);
  EXPECT_TRUE((*model)->per_expert_layout());
  for (int l = 0; l < kLayers; ++l) {
    for (int e = 0; e < kExperts; ++e) {
      const ExpertWeights& E = (*model)->layer(l).experts[static_cast<size_t>(e)];
      ASSERT_EQ(E.present(), keep.count({l, e}) > 0) << l << "/" << e;
      if (!E.present()) continue;
      const WeightMatrix* mats[] = {&E.gate, &E.up, &E.down};
      for (int k = 0; k < 3; ++k) {
        const std::string& want =
            server.bytes.at(absl::StrCat("blk.", l, ".ffn_", kMatrices[k].name, ".", e, ".weight"));
        ASSERT_EQ(mats[k]->SizeBytes(), want.size());
        EXPECT_EQ(std::memcmp(mats[k]->data, want.data(), want.size()), 0) << l << "/" << e;
      }
    }
  }

  const std::vector<CachedShard> inv = cache_->Inventory();
  ASSERT_EQ(inv.size(), 1u);
  EXPECT_EQ(inv[0].path, r->path);
  EXPECT_EQ(inv[0].model_fingerprint, kFingerprint);
  EXPECT_TRUE(inv[0].complete);
  EXPECT_EQ(inv[0].pairs, (Pairs{{0, 1}, {1, 0}, {1, 3}}));
}

TEST_F(ShardCacheTest, AMatchingCompleteFileIsUsedUntouched) {
  FakeServer server;
  const ShardManifest m = ManifestFor(*source_, {{0, 0}, {1, 2}}, &server);
  auto first = cache_->Materialize(m, server.Fetcher());
  ASSERT_TRUE(first.ok()) << first.status();
  // An old mtime: any write or replacement would change it, however fast the test runs.
  const timespec old_times[2] = {{1000000000, 0}, {1000000000, 0}};
  ASSERT_EQ(::utimensat(AT_FDCWD, first->path.c_str(), old_times, 0), 0);
  struct stat before, after;
  ASSERT_EQ(::stat(first->path.c_str(), &before), 0);

  server.calls = 0;
  auto second = cache_->Materialize(m, server.Fetcher());
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_TRUE(second->untouched);
  EXPECT_EQ(second->path, first->path);
  EXPECT_EQ(second->tensors_fetched, 0);
  EXPECT_EQ(second->bytes_fetched, 0u);
  EXPECT_EQ(second->bytes_reused, TotalBytes(m));
  EXPECT_EQ(server.calls, 0);
  ASSERT_EQ(::stat(first->path.c_str(), &after), 0);
  EXPECT_EQ(after.st_ino, before.st_ino);
  EXPECT_EQ(after.st_mtim.tv_sec, before.st_mtim.tv_sec);
  EXPECT_EQ(after.st_mtim.tv_nsec, before.st_mtim.tv_nsec);
  EXPECT_EQ(after.st_size, before.st_size);
}

TEST_F(ShardCacheTest, AnInterruptedTransferResumesWithTheMissingTensors) {
  FakeServer server;
  const ShardManifest m = ManifestFor(*source_, {{0, 0}, {0, 3}, {1, 1}}, &server);
  server.fail_on_call = 4;  // four tensors arrive, the fifth breaks off half-way
  auto failed = cache_->Materialize(m, server.Fetcher());
  ASSERT_FALSE(failed.ok());
  EXPECT_EQ(failed.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(server.calls, 5);

  const std::string partial = dir() + "/" + ShardCache::FileNameFor(m) + ".partial";
  std::vector<CachedShard> inv = cache_->Inventory();
  ASSERT_EQ(inv.size(), 1u);
  EXPECT_EQ(inv[0].path, partial);
  EXPECT_FALSE(inv[0].complete);
  EXPECT_EQ(inv[0].pairs, (Pairs{{0, 0}, {0, 3}, {1, 1}}));

  server = FakeServer{server.bytes};
  auto resumed = cache_->Materialize(m, server.Fetcher());
  ASSERT_TRUE(resumed.ok()) << resumed.status();
  EXPECT_EQ(server.calls, 5);
  EXPECT_EQ(resumed->tensors_fetched, 5);
  std::vector<std::string> rest;
  uint64_t reused = 0;
  for (size_t i = 0; i < m.tensors.size(); ++i) {
    if (i >= 4) rest.push_back(m.tensors[i].name);
    if (i < 4) reused += m.tensors[i].bytes;
  }
  EXPECT_EQ(server.fetched, rest);
  EXPECT_EQ(resumed->bytes_reused, reused);
  EXPECT_EQ(resumed->bytes_fetched, TotalBytes(m) - reused);
  ExpectFileHolds(resumed->path, m, server);
  inv = cache_->Inventory();
  ASSERT_EQ(inv.size(), 1u);
  EXPECT_TRUE(inv[0].complete);
  EXPECT_EQ(ListNames(dir()), std::vector<std::string>{ShardCache::FileNameFor(m)});
}

TEST_F(ShardCacheTest, NewMetadataForTheSameTensorsRewritesTheFileFromTheOldOne) {
  FakeServer server;
  ShardManifest m = ManifestFor(*source_, {{0, 2}, {1, 1}}, &server);
  auto first = cache_->Materialize(m, server.Fetcher());
  ASSERT_TRUE(first.ok()) << first.status();
  for (auto& [key, value] : m.metadata) {
    if (key == "general.name") value = GgufValue::String("renamed");
  }
  server.calls = 0;
  auto second = cache_->Materialize(m, server.Fetcher());
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_EQ(second->path, first->path);  // the name depends on the tensors only
  EXPECT_FALSE(second->untouched);
  EXPECT_EQ(server.calls, 0);
  EXPECT_EQ(second->bytes_reused, TotalBytes(m));
  ExpectFileHolds(second->path, m, server);
  EXPECT_EQ(ListNames(dir()), std::vector<std::string>{ShardCache::FileNameFor(m)});
}

TEST_F(ShardCacheTest, AnAlteredTensorIsFetchedAgainAlone) {
  FakeServer server;
  const ShardManifest m = ManifestFor(*source_, {{0, 2}, {1, 3}}, &server);
  auto first = cache_->Materialize(m, server.Fetcher());
  ASSERT_TRUE(first.ok()) << first.status();
  uint64_t offset = 0;
  {
    auto file = GgufFile::Open(first->path);
    ASSERT_TRUE(file.ok()) << file.status();
    const GgufTensorInfo* t = (*file)->FindTensor(m.tensors[4].name);
    ASSERT_NE(t, nullptr);
    offset = (*file)->data_offset() + t->offset + t->size_bytes / 2;
  }
  const int fd = ::open(first->path.c_str(), O_RDWR);
  ASSERT_GE(fd, 0);
  char byte = 0;
  ASSERT_EQ(::pread(fd, &byte, 1, static_cast<off_t>(offset)), 1);
  byte = static_cast<char>(byte ^ 0x01);
  ASSERT_EQ(::pwrite(fd, &byte, 1, static_cast<off_t>(offset)), 1);
  ::close(fd);

  server.calls = 0;
  server.fetched.clear();
  auto second = cache_->Materialize(m, server.Fetcher());
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_FALSE(second->untouched);
  EXPECT_EQ(server.calls, 1);
  EXPECT_EQ(server.fetched, std::vector<std::string>{m.tensors[4].name});
  EXPECT_EQ(second->tensors_fetched, 1);
  EXPECT_EQ(second->bytes_reused, TotalBytes(m) - m.tensors[4].bytes);
  ExpectFileHolds(second->path, m, server);
  EXPECT_EQ(ListNames(dir()), std::vector<std::string>{ShardCache::FileNameFor(m)});
}

TEST_F(ShardCacheTest, ATruncatedCompleteFileIsRebuilt) {
  FakeServer server;
  const ShardManifest m = ManifestFor(*source_, {{0, 1}, {1, 1}}, &server);
  auto first = cache_->Materialize(m, server.Fetcher());
  ASSERT_TRUE(first.ok()) << first.status();
  uint64_t cut = 0;
  {
    auto file = GgufFile::Open(first->path);
    ASSERT_TRUE(file.ok()) << file.status();
    const GgufTensorInfo* t = (*file)->FindTensor(m.tensors[3].name);
    ASSERT_NE(t, nullptr);
    cut = (*file)->data_offset() + t->offset + 10;
  }
  // Cut inside tensor 3: the three before it still verify and are kept.
  ASSERT_EQ(::truncate(first->path.c_str(), static_cast<off_t>(cut)), 0);
  server.calls = 0;
  auto second = cache_->Materialize(m, server.Fetcher());
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_EQ(server.calls, 3);
  ExpectFileHolds(second->path, m, server);

  // Cut inside the header: nothing is left to keep.
  ASSERT_EQ(::truncate(first->path.c_str(), 40), 0);
  server.calls = 0;
  auto third = cache_->Materialize(m, server.Fetcher());
  ASSERT_TRUE(third.ok()) << third.status();
  EXPECT_EQ(server.calls, 6);
  ExpectFileHolds(third->path, m, server);
  EXPECT_EQ(ListNames(dir()), std::vector<std::string>{ShardCache::FileNameFor(m)});
}

TEST_F(ShardCacheTest, BytesThatNeverVerifyAreDataLossAfterTwoFetches) {
  FakeServer server;
  const ShardManifest m = ManifestFor(*source_, {{1, 2}}, &server);
  server.corrupt_calls = 1000;
  auto r = cache_->Materialize(m, server.Fetcher());
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(server.calls, 2);
  EXPECT_MESSAGE_HAS(r.status(), m.tensors[0].name);
  EXPECT_MESSAGE_HAS(r.status(), m.tensors[0].checksum.Hex());
  std::string bad = server.bytes.at(m.tensors[0].name);
  bad[bad.size() / 3] ^= 0x5a;
  EXPECT_MESSAGE_HAS(r.status(), ChecksumOf(bad.data(), bad.size()).Hex());
  EXPECT_FALSE(std::filesystem::exists(dir() + "/" + ShardCache::FileNameFor(m)));
}

TEST_F(ShardCacheTest, BytesThatVerifyOnTheSecondFetchAreAccepted) {
  FakeServer server;
  const ShardManifest m = ManifestFor(*source_, {{1, 2}}, &server);
  server.corrupt_calls = 1;
  std::vector<FetchProgress> reports;
  auto r = cache_->Materialize(m, server.Fetcher(),
                               [&](const FetchProgress& p) { reports.push_back(p); });
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(server.calls, 4);
  EXPECT_EQ(r->tensors_fetched, 3);
  EXPECT_EQ(r->bytes_fetched, TotalBytes(m) + m.tensors[0].bytes);
  ASSERT_FALSE(reports.empty());
  EXPECT_EQ(reports.back().bytes_done, reports.back().bytes_total);
  ExpectFileHolds(r->path, m, server);
}

TEST_F(ShardCacheTest, AFetcherSendingTooManyOrTooFewBytesFails) {
  const struct {
    int extra, missing;
    bool ignore_sink_errors;
  } cases[] = {{1, 0, false}, {1, 0, true}, {0, 1, false}};
  for (const auto& c : cases) {
    for (const std::string& name : ListNames(dir())) std::filesystem::remove(dir() + "/" + name);
    FakeServer server;
    const ShardManifest m = ManifestFor(*source_, {{0, 3}}, &server);
    server.extra_bytes = c.extra;
    server.missing_bytes = c.missing;
    server.ignore_sink_errors = c.ignore_sink_errors;
    auto r = cache_->Materialize(m, server.Fetcher());
    ASSERT_FALSE(r.ok()) << c.extra << " " << c.missing;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kDataLoss) << r.status();
    EXPECT_MESSAGE_HAS(r.status(), m.tensors[0].name);
    EXPECT_EQ(server.calls, 1);
    // The sink itself refuses the byte too many (it would land on the next tensor).
    EXPECT_EQ(server.sink_errors, c.extra > 0 ? 1 : 0);
    EXPECT_FALSE(std::filesystem::exists(dir() + "/" + ShardCache::FileNameFor(m)));
  }
}

TEST_F(ShardCacheTest, TensorsOfAnotherShardOfTheSameModelAreCopiedAndItIsDeletedAfter) {
  FakeServer server;
  const ShardManifest old_share = ManifestFor(*source_, {{0, 0}, {0, 1}}, &server);
  ASSERT_TRUE(cache_->Materialize(old_share, server.Fetcher()).ok());
  // The same tensors under another model's fingerprint must not be taken.
  const ShardManifest other_model =
      ManifestFor(*source_, {{1, 2}, {0, 1}}, &server, kOtherFingerprint);
  auto other = cache_->Materialize(other_model, server.Fetcher());
  ASSERT_TRUE(other.ok()) << other.status();
  std::ofstream(dir() + "/notes.gguf") << "not a GGUF file";
  std::ofstream(dir() + "/README") << "keep me";
  // A shard file of the model under a name the cache did not give it is not the cache's to delete.
  std::filesystem::copy_file(dir() + "/" + ShardCache::FileNameFor(old_share),
                             dir() + "/backup.gguf");

  server.calls = 0;
  server.fetched.clear();
  const ShardManifest new_share = ManifestFor(*source_, {{0, 1}, {1, 2}}, &server);
  auto r = cache_->Materialize(new_share, server.Fetcher());
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(server.fetched,
            (std::vector<std::string>{"blk.1.ffn_gate.2.weight", "blk.1.ffn_up.2.weight",
                                      "blk.1.ffn_down.2.weight"}));
  EXPECT_EQ(r->tensors_fetched, 3);
  EXPECT_EQ(r->bytes_reused,
            new_share.tensors[0].bytes + new_share.tensors[1].bytes + new_share.tensors[2].bytes);
  ExpectFileHolds(r->path, new_share, server);

  std::vector<std::string> want = {"README", "backup.gguf", "notes.gguf",
                                   ShardCache::FileNameFor(new_share),
                                   ShardCache::FileNameFor(other_model)};
  std::sort(want.begin(), want.end());
  EXPECT_EQ(ListNames(dir()), want);
  const std::vector<CachedShard> inv = cache_->Inventory();
  ASSERT_EQ(inv.size(), 3u);
  for (const CachedShard& s : inv) {
    EXPECT_TRUE(s.complete);
    if (s.path == dir() + "/backup.gguf") {
      EXPECT_EQ(s.pairs, (Pairs{{0, 0}, {0, 1}}));
    } else if (s.path == r->path) {
      EXPECT_EQ(s.model_fingerprint, kFingerprint);
      EXPECT_EQ(s.pairs, (Pairs{{0, 1}, {1, 2}}));
    } else {
      EXPECT_EQ(s.path, other->path);
      EXPECT_EQ(s.model_fingerprint, kOtherFingerprint);
    }
  }
}

TEST_F(ShardCacheTest, InventoryLeavesOutFilesThatAreNotShardFiles) {
  // A valid GGUF without the fingerprint key, garbage, a shard file cut inside its header, and a
  // shard file whose names do not make a whole pair.
  std::filesystem::copy_file(source_->path(), dir() + "/model.gguf");
  std::ofstream(dir() + "/garbage.gguf") << "GGUF and then nothing useful";
  FakeServer server;
  ShardManifest m = ManifestFor(*source_, {{1, 1}}, &server);
  auto r = cache_->Materialize(m, server.Fetcher());
  ASSERT_TRUE(r.ok()) << r.status();
  const std::string cut = dir() + "/" + std::string(kOtherFingerprint) + "-0000000000000000.gguf";
  std::filesystem::copy_file(r->path, cut);
  ASSERT_EQ(::truncate(cut.c_str(), 100), 0);
  m.tensors.pop_back();  // no ffn_down: (1, 1) is not whole
  m.model_fingerprint = kOtherFingerprint;
  ASSERT_TRUE(cache_->Materialize(m, server.Fetcher()).ok());

  const std::vector<CachedShard> inv = cache_->Inventory();
  ASSERT_EQ(inv.size(), 2u);
  EXPECT_EQ(inv[0].path, r->path);
  EXPECT_EQ(inv[0].pairs, (Pairs{{1, 1}}));
  EXPECT_EQ(inv[1].model_fingerprint, kOtherFingerprint);
  EXPECT_TRUE(inv[1].pairs.empty());
  // None of them was deleted.
  EXPECT_TRUE(std::filesystem::exists(dir() + "/model.gguf"));
  EXPECT_TRUE(std::filesystem::exists(dir() + "/garbage.gguf"));
  EXPECT_TRUE(std::filesystem::exists(cut));
}

TEST_F(ShardCacheTest, AnInvalidManifestWritesNothing) {
  FakeServer server;
  ShardManifest m = ManifestFor(*source_, {{0, 0}}, &server);
  m.model_fingerprint = "../../etc/passwd";
  auto r = cache_->Materialize(m, server.Fetcher());
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(server.calls, 0);
  EXPECT_TRUE(ListNames(dir()).empty());
}

TEST_F(ShardCacheTest, ProgressIsReportedAtMostEvery100MsAndAtTheEnd) {
  FakeServer server;
  server.chunk = 64;  // hundreds of sink calls
  const ShardManifest m = ManifestFor(*source_, {{0, 0}, {0, 1}, {1, 0}, {1, 1}}, &server);
  std::vector<FetchProgress> reports;
  const auto start = std::chrono::steady_clock::now();
  auto r = cache_->Materialize(m, server.Fetcher(),
                               [&](const FetchProgress& p) { reports.push_back(p); });
  const double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_FALSE(reports.empty());
  EXPECT_LE(reports.size(), static_cast<size_t>(ms / 100) + 1);
  for (size_t i = 1; i < reports.size(); ++i) {
    EXPECT_GE(reports[i].bytes_done, reports[i - 1].bytes_done);
  }
  EXPECT_EQ(reports.back().bytes_done, TotalBytes(m));
  EXPECT_EQ(reports.back().bytes_total, TotalBytes(m));
  EXPECT_GE(reports.back().seconds, 0.0);
}

TEST(ShardCacheOpenTest, CreatesTheDirectoryAndRejectsWhatIsNotOne) {
  TempDirectory tmp;
  const std::string nested = tmp.path() + "/a/b/cache/";
  auto cache = ShardCache::Open(nested);
  ASSERT_TRUE(cache.ok()) << cache.status();
  EXPECT_EQ(cache->dir(), tmp.path() + "/a/b/cache");
  struct stat st;
  ASSERT_EQ(::stat(cache->dir().c_str(), &st), 0);
  EXPECT_TRUE(S_ISDIR(st.st_mode));
  EXPECT_EQ(st.st_mode & 0777, 0700u);
  EXPECT_TRUE(cache->Inventory().empty());

  EXPECT_EQ(ShardCache::Open("").status().code(), absl::StatusCode::kInvalidArgument);
  std::ofstream(tmp.path() + "/file") << "x";
  EXPECT_FALSE(ShardCache::Open(tmp.path() + "/file").ok());
  EXPECT_FALSE(ShardCache::Open(tmp.path() + "/file/sub").ok());
}

}  // namespace
}  // namespace moepool::worker
