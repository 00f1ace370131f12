// The parts of the shard cache that need no files: manifest validation, the shard file name and
// the checksums.
#include <algorithm>
#include <functional>
#include <random>
#include <string>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "engine/gguf.h"
#include "gtest/gtest.h"
#include "worker/shard_cache.h"

namespace moepool::worker {
namespace {

#define EXPECT_MESSAGE_HAS(status, needle) \
  EXPECT_PRED_FORMAT2(::testing::IsSubstring, needle, std::string((status).message()))

constexpr char kFingerprint[] = "0123456789abcdef0123456789abcdef";

// A valid three-tensor manifest for the validation table.
ShardManifest SmallManifest() {
  ShardManifest m;
  m.model_fingerprint = kFingerprint;
  m.metadata.emplace_back("general.architecture", GgufValue::String("llama"));
  for (const char* kind : {"gate", "up", "down"}) {
    ShardTensor t;
    t.name = absl::StrCat("blk.0.ffn_", kind, ".0.weight");
    t.dims = {32, 4};
    t.bytes = 32 * 4 * 4;
    m.tensors.push_back(t);
  }
  return m;
}

TEST(ValidateManifestTest, RejectsEveryBadFieldNamingIt) {
  ShardLimits limits;
  limits.max_tensors = 4;
  limits.max_metadata = 3;
  limits.max_string_bytes = 64;
  limits.max_total_bytes = 1 << 20;
  ASSERT_TRUE(ValidateManifest(SmallManifest(), limits).ok());

  using Edit = std::function<void(ShardManifest&)>;
  const int64_t huge = int64_t{1} << 40;
  const struct {
    const char* what;
    Edit edit;
    const char* message;
  } cases[] = {
      {"short fingerprint", [](auto& m) { m.model_fingerprint = "0123"; }, "fingerprint"},
      {"uppercase fingerprint",
       [](auto& m) { m.model_fingerprint = "0123456789ABCDEF0123456789abcdef"; }, "fingerprint"},
      {"path fingerprint", [](auto& m) { m.model_fingerprint = "../../etc"; }, "fingerprint"},
      {"path fingerprint of 32 chars",
       [](auto& m) { m.model_fingerprint = "../../../../../../../../../../ab"; }, "fingerprint"},
      {"layer mismatch", [](auto& m) { m.tensors[0].layer = 1; }, "blk.0.ffn_gate.0.weight"},
      {"expert mismatch", [](auto& m) { m.tensors[2].expert = 3; }, "blk.0.ffn_down.0.weight"},
      {"slash in name", [](auto& m) { m.tensors[1].name = "blk.0/ffn_up.0.weight"; }, "name"},
      {"other matrix", [](auto& m) { m.tensors[1].name = "blk.0.ffn_norm.0.weight"; }, "name"},
      {"leading zero", [](auto& m) { m.tensors[1].name = "blk.00.ffn_up.0.weight"; }, "name"},
      {"layer out of range",
       [](auto& m) {
         m.tensors[0].layer = 70000;
         m.tensors[0].name = "blk.70000.ffn_gate.0.weight";
       },
       "70000"},
      {"duplicate names", [](auto& m) { m.tensors[1] = m.tensors[0]; }, "duplicate tensor"},
      {"zero dim",
       [](auto& m) {
         m.tensors[0].dims = {32, 0};
         m.tensors[0].bytes = 0;
       },
       "dimension 0"},
      {"five dims",
       [](auto& m) {
         m.tensors[0].dims = {32, 1, 1, 1, 4};
       },
       "5 dimensions"},
      {"no dims", [](auto& m) { m.tensors[0].dims = {}; }, "0 dimensions"},
      {"bytes mismatch", [](auto& m) { m.tensors[0].bytes += 1; }, "bytes"},
      {"huge dims",
       [=](auto& m) {
         m.tensors[0].dims = {huge, huge, huge, huge};
       },
       "too large"},
      {"over 2^40",
       [=](auto& m) {
         m.tensors[0].dims = {32, huge * 2};
       },
       "dimension"},
      {"unknown type", [](auto& m) { m.tensors[0].type = static_cast<TensorType>(999); }, "999"},
      {"activation type", [](auto& m) { m.tensors[0].type = TensorType::kQ8_K; }, "type"},
      {"row not whole blocks",
       [](auto& m) {
         m.tensors[0].type = TensorType::kQ8_0;
         m.tensors[0].dims = {48, 4};
       },
       "block size"},
      {"over the byte limit",
       [](auto& m) {
         m.tensors[0].dims = {32, 16384};
         m.tensors[0].bytes = 32 * 16384 * 4;
       },
       "limit"},
      {"no tensors", [](auto& m) { m.tensors.clear(); }, "0 tensors"},
      {"too many tensors",
       [](auto& m) {
         for (const char* kind : {"gate", "up"}) {
           ShardTensor t = m.tensors[0];
           t.expert = 1;
           t.name = absl::StrCat("blk.0.ffn_", kind, ".1.weight");
           m.tensors.push_back(t);
         }
       },
       "5 tensors"},
      {"array metadata",
       [](auto& m) { m.metadata.emplace_back("tokenizer.x", GgufValue::StringArray({"a"})); },
       "tokenizer.x"},
      {"unknown metadata type",
       [](auto& m) {
         GgufValue v;
         v.type = static_cast<GgufValueType>(99);
         m.metadata.emplace_back("general.odd", v);
       },
       "general.odd"},
      {"duplicate metadata key",
       [](auto& m) { m.metadata.emplace_back("general.architecture", GgufValue::String("x")); },
       "duplicate metadata key"},
      {"reserved key",
       [](auto& m) { m.metadata.emplace_back(kShardFingerprintKey, GgufValue::String("x")); },
       "reserved"},
      {"empty key", [](auto& m) { m.metadata.emplace_back("", GgufValue::Uint32(1)); }, "empty"},
      {"slash in key", [](auto& m) { m.metadata.emplace_back("a/b", GgufValue::Uint32(1)); },
       "a/b"},
      {"control char in key",
       [](auto& m) { m.metadata.emplace_back("a\nb", GgufValue::Uint32(1)); }, "printable"},
      {"long key", [](auto& m) { m.metadata.emplace_back(std::string(65, 'k'), GgufValue()); },
       "longer than 64"},
      {"long string",
       [](auto& m) {
         m.metadata.emplace_back("general.name", GgufValue::String(std::string(65, 's')));
       },
       "longer than 64"},
      {"too many metadata",
       [](auto& m) {
         for (int i = 0; i < 3; ++i) m.metadata.emplace_back(absl::StrCat("k", i), GgufValue());
       },
       "4 metadata entries"},
  };
  for (const auto& c : cases) {
    ShardManifest m = SmallManifest();
    c.edit(m);
    const absl::Status s = ValidateManifest(m, limits);
    ASSERT_FALSE(s.ok()) << c.what;
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << c.what;
    EXPECT_MESSAGE_HAS(s, c.message) << c.what;
  }
}

TEST(ShardFileNameTest, DependsOnTheFingerprintAndTheTensorIndexOnly) {
  const ShardManifest m = SmallManifest();
  const std::string name = ShardCache::FileNameFor(m);
  ASSERT_EQ(name.size(), 32u + 1 + 16 + 5);
  EXPECT_TRUE(absl::StartsWith(name, absl::StrCat(kFingerprint, "-")));
  EXPECT_TRUE(absl::EndsWith(name, ".gguf"));
  EXPECT_EQ(name.find_first_not_of("0123456789abcdef", 33), name.size() - 5);

  ShardManifest same = m;
  same.tensors[0].checksum = Checksum{1, 2};
  same.metadata.emplace_back("general.name", GgufValue::String("other"));
  EXPECT_EQ(ShardCache::FileNameFor(same), name);
  ShardManifest reordered = m;
  std::swap(reordered.tensors[0], reordered.tensors[1]);
  EXPECT_NE(ShardCache::FileNameFor(reordered), name);
  ShardManifest retyped = m;
  retyped.tensors[0].type = TensorType::kF16;
  EXPECT_NE(ShardCache::FileNameFor(retyped), name);
  ShardManifest reshaped = m;
  reshaped.tensors[0].dims = {32, 2, 2};
  EXPECT_NE(ShardCache::FileNameFor(reshaped), name);
}

TEST(ShardChecksumTest, StreamingOverAnySplitEqualsOneShot) {
  std::string data(100000, '\0');
  std::mt19937 rng(7);
  for (char& c : data) c = static_cast<char>(rng());
  const Checksum whole = ChecksumOf(data.data(), data.size());
  for (size_t step : {size_t{1}, size_t{7}, size_t{4096}, size_t{65536}, data.size()}) {
    ChecksumStream stream;
    for (size_t pos = 0; pos < data.size(); pos += step) {
      stream.Update(data.data() + pos, std::min(step, data.size() - pos));
    }
    EXPECT_EQ(stream.Digest(), whole) << step;
  }
  ChecksumStream empty;
  EXPECT_EQ(empty.Digest(), ChecksumOf(nullptr, 0));
  std::string changed = data;
  changed[5000] ^= 1;
  EXPECT_NE(ChecksumOf(changed.data(), changed.size()), whole);

  const std::string hex = whole.Hex();
  EXPECT_EQ(hex.size(), 32u);
  EXPECT_EQ(hex.find_first_not_of("0123456789abcdef"), std::string::npos);
  EXPECT_EQ((Checksum{0x1, 0xabcdef}).Hex(),
            "0000000000000001"
            "0000000000abcdef");
}

}  // namespace
}  // namespace moepool::worker
