#include "engine/gguf.h"

#include <cstring>
#include <random>
#include <string>

#include "gtest/gtest.h"
#include "tests/testdata.h"

namespace moepool {
namespace {

using ::moepool::testing::ReadFileOrDie;
using ::moepool::testing::SharedTestdataPath;

std::string QuantVectorsPath() { return SharedTestdataPath("conformance/quant-vectors.gguf"); }

TEST(GgufTest, OpensReferenceModelAndReadsHyperparameters) {
  const std::string path = SharedTestdataPath("conformance/tiny-Q4_K_M.gguf");
  REQUIRE_TESTDATA(path);
  auto file = GgufFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  const GgufFile& f = **file;
  EXPECT_TRUE(f.version() == 2 || f.version() == 3);
  EXPECT_EQ(*f.GetString("general.architecture"), "llama");
  EXPECT_EQ(*f.GetUint("llama.embedding_length"), 256u);
  EXPECT_EQ(*f.GetUint("llama.expert_count"), 8u);
  EXPECT_EQ(*f.GetUint("llama.expert_used_count"), 2u);
  EXPECT_DOUBLE_EQ(*f.GetFloat("llama.rope.freq_base"), 1e6);
  auto tokens = f.GetStringArray("tokenizer.ggml.tokens");
  ASSERT_TRUE(tokens.ok());
  EXPECT_EQ(tokens->size(), 32000u);
  const GgufTensorInfo* gate = f.FindTensor("blk.0.ffn_gate_exps.weight");
  ASSERT_NE(gate, nullptr);
  EXPECT_EQ(gate->n_dims, 3);
  EXPECT_EQ(gate->dims[0], 256);
  EXPECT_EQ(gate->dims[1], 768);
  EXPECT_EQ(gate->dims[2], 8);
  EXPECT_EQ(gate->ShapeString(), "[256, 768, 8]");
  // Tensor data lies inside the mapping, aligned.
  for (const auto& t : f.tensors()) {
    EXPECT_GE(t.data, f.base() + f.data_offset());
    EXPECT_LE(t.data + t.size_bytes, f.base() + f.file_size());
    EXPECT_EQ(t.offset % f.alignment(), 0u);
  }
}

TEST(GgufTest, TypedGettersReportWrongTypeAndMissingKeys) {
  const std::string path = QuantVectorsPath();
  REQUIRE_TESTDATA(path);
  auto file = GgufFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  auto missing = (*file)->GetUint("no.such.key");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(std::string(missing.status().message()).find("no.such.key"), std::string::npos);
  // The first metadata value, read with a getter for another type, is an error, not a crash.
  ASSERT_FALSE((*file)->metadata().empty());
  const auto& [key, value] = (*file)->metadata().front();
  if (value.type == GgufValueType::kString) {
    EXPECT_FALSE((*file)->GetUint(key).ok());
  } else {
    EXPECT_FALSE((*file)->GetString(key).ok());
  }
}

TEST(GgufTest, MissingFileIsNotFound) {
  auto file = GgufFile::Open("/nonexistent/model.gguf");
  ASSERT_FALSE(file.ok());
  EXPECT_EQ(file.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(std::string(file.status().message()).find("/nonexistent/model.gguf"),
            std::string::npos);
}

// Finds the index entry of a tensor in a GGUF image: returns the offset of its n_dims field.
size_t FindTensorEntry(const std::string& image, const std::string& name) {
  std::string needle(8, '\0');
  const uint64_t len = name.size();
  std::memcpy(needle.data(), &len, 8);
  needle += name;
  const size_t pos = image.find(needle);
  EXPECT_NE(pos, std::string::npos) << name;
  return pos + needle.size();
}

class CorruptedGgufTest : public ::testing::Test {
 protected:
  void SetUp() override {
    path_ = QuantVectorsPath();
    REQUIRE_TESTDATA(path_);
    image_ = ReadFileOrDie(path_);
    ASSERT_GT(image_.size(), 1024u);
    auto ok = GgufFile::FromBuffer(image_, "copy.gguf");
    ASSERT_TRUE(ok.ok()) << ok.status();
    first_tensor_ = (*ok)->tensors().front().name;
    second_tensor_ = (*ok)->tensors()[1].name;
  }

  std::string Error(const std::string& bytes) {
    auto file = GgufFile::FromBuffer(bytes, "corrupt.gguf");
    EXPECT_FALSE(file.ok());
    if (file.ok()) return "";
    EXPECT_NE(std::string(file.status().message()).find("corrupt.gguf"), std::string::npos);
    return std::string(file.status().message());
  }

  std::string path_, image_, first_tensor_, second_tensor_;
};

TEST_F(CorruptedGgufTest, BadMagic) {
  std::string b = image_;
  b[0] = 'X';
  EXPECT_NE(Error(b).find("not a GGUF file"), std::string::npos);
}

TEST_F(CorruptedGgufTest, UnsupportedVersion) {
  std::string b = image_;
  const uint32_t v = 99;
  std::memcpy(b.data() + 4, &v, 4);
  EXPECT_NE(Error(b).find("version 99"), std::string::npos);
}

TEST_F(CorruptedGgufTest, EveryTruncationIsAnError) {
  // Cut inside the header densely, inside the data sparsely.
  for (size_t cut = 0; cut < image_.size(); cut += (cut < 4096 ? 7 : 65537)) {
    auto file = GgufFile::FromBuffer(std::string_view(image_).substr(0, cut), "cut.gguf");
    EXPECT_FALSE(file.ok()) << "cut at " << cut;
  }
  auto last = GgufFile::FromBuffer(std::string_view(image_).substr(0, image_.size() - 1), "cut");
  ASSERT_FALSE(last.ok());
  EXPECT_NE(std::string(last.status().message()).find("outside the data section"),
            std::string::npos);
}

TEST_F(CorruptedGgufTest, UnknownTensorTypeNamesTheTensor) {
  std::string b = image_;
  const size_t p = FindTensorEntry(b, first_tensor_);
  uint32_t n_dims;
  std::memcpy(&n_dims, b.data() + p, 4);
  const uint32_t bad_type = 77;
  std::memcpy(b.data() + p + 4 + 8 * n_dims, &bad_type, 4);
  const std::string err = Error(b);
  EXPECT_NE(err.find(first_tensor_), std::string::npos) << err;
  EXPECT_NE(err.find("unsupported type"), std::string::npos) << err;
}

TEST_F(CorruptedGgufTest, OverlappingTensorsAreRejected) {
  std::string b = image_;
  auto read_offset = [&](const std::string& name) {
    const size_t p = FindTensorEntry(b, name);
    uint32_t n_dims;
    std::memcpy(&n_dims, b.data() + p, 4);
    return p + 4 + 8 * n_dims + 4;
  };
  const size_t off1 = read_offset(first_tensor_);
  const size_t off2 = read_offset(second_tensor_);
  std::memcpy(b.data() + off2, b.data() + off1, 8);  // second tensor now starts where first does
  const std::string err = Error(b);
  EXPECT_NE(err.find("overlap"), std::string::npos) << err;
}

TEST_F(CorruptedGgufTest, MisalignedOffsetIsRejected) {
  std::string b = image_;
  const size_t p = FindTensorEntry(b, second_tensor_);
  uint32_t n_dims;
  std::memcpy(&n_dims, b.data() + p, 4);
  uint64_t off;
  std::memcpy(&off, b.data() + p + 4 + 8 * n_dims + 4, 8);
  off += 1;
  std::memcpy(b.data() + p + 4 + 8 * n_dims + 4, &off, 8);
  EXPECT_NE(Error(b).find("not aligned"), std::string::npos);
}

TEST_F(CorruptedGgufTest, HugeDimensionIsRejected) {
  std::string b = image_;
  const size_t p = FindTensorEntry(b, first_tensor_);
  const uint64_t huge = uint64_t{1} << 62;
  std::memcpy(b.data() + p + 4 + 8, &huge, 8);
  EXPECT_NE(Error(b).find(first_tensor_), std::string::npos);
}

// Fuzz regression: random byte mutations of the header never crash the reader, and a file it
// accepts has every tensor inside the image.
TEST_F(CorruptedGgufTest, RandomHeaderMutationsNeverCrash) {
  std::mt19937_64 rng(1234);
  auto ok = GgufFile::FromBuffer(image_, "orig");
  ASSERT_TRUE(ok.ok());
  const size_t header = (*ok)->data_offset();
  const std::string_view head(image_.data(), std::min<size_t>(image_.size(), header + 4096));
  for (int iter = 0; iter < 3000; ++iter) {
    std::string b(head);
    const int n_mut = 1 + static_cast<int>(rng() % 4);
    for (int m = 0; m < n_mut; ++m) b[rng() % header] = static_cast<char>(rng());
    auto file = GgufFile::FromBuffer(b, "fuzz.gguf");
    if (file.ok()) {
      for (const auto& t : (*file)->tensors()) {
        ASSERT_LE(t.data + t.size_bytes, (*file)->base() + (*file)->file_size());
      }
    }
  }
}

}  // namespace
}  // namespace moepool
