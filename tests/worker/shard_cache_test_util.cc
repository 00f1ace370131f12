#include "tests/worker/shard_cache_test_util.h"

#include <stdlib.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "engine/gguf_writer.h"

namespace moepool::testing {
namespace {

using worker::ShardCache;
using worker::ShardManifest;
using worker::ShardTensor;

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

}  // namespace

TempDirectory::TempDirectory() {
  std::string pattern = ::testing::TempDir() + "shard_cache_XXXXXX";
  path_ = ::mkdtemp(pattern.data()) != nullptr ? pattern : "";
}

TempDirectory::~TempDirectory() {
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

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

worker::TensorFetcher FakeServer::Fetcher() {
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

ShardManifest ManifestFor(const GgufFile& src, const Pairs& pairs, FakeServer* server,
                          const std::string& fingerprint) {
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
      t.checksum = worker::ChecksumOf(data, t.bytes);
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

void ShardCacheTest::SetUp() {
  ASSERT_FALSE(src_dir_.path().empty());
  ASSERT_FALSE(cache_dir_.path().empty());
  source_ = WriteSourceModel(src_dir_.path() + "/source.gguf");
  ASSERT_NE(source_, nullptr);
  auto cache = ShardCache::Open(cache_dir_.path());
  ASSERT_TRUE(cache.ok()) << cache.status();
  cache_ = std::make_unique<ShardCache>(*std::move(cache));
}

void ShardCacheTest::ExpectFileHolds(const std::string& path, const ShardManifest& m,
                                     const FakeServer& server) {
  GgufWriter w;
  for (const auto& [key, value] : m.metadata) w.AddMetadata(key, value);
  w.AddMetadata(worker::kShardFingerprintKey, GgufValue::String(m.model_fingerprint));
  std::vector<std::string> data;
  for (const ShardTensor& t : m.tensors) {
    ASSERT_TRUE(w.AddTensor(t.name, t.type, t.dims).ok());
    data.push_back(server.bytes.at(t.name));
  }
  auto image = GgufWriter::BuildImage(w, data);
  ASSERT_TRUE(image.ok()) << image.status();
  EXPECT_TRUE(ReadAll(path) == *image) << path << " differs from the expected image";
}

}  // namespace moepool::testing
