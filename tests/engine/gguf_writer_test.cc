#include "engine/gguf_writer.h"

#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "engine/gguf.h"
#include "gtest/gtest.h"
#include "tests/testdata.h"

namespace moepool {
namespace {

using ::moepool::testing::ReadFileOrDie;
using ::moepool::testing::TempDir;

GgufValue Raw(GgufValueType type, uint64_t u, int64_t i, double f) {
  GgufValue v;
  v.type = type;
  v.uint_value = u;
  v.int_value = i;
  v.float_value = f;
  return v;
}

std::string Bytes(size_t n, uint8_t seed) {
  std::string s(n, '\0');
  for (size_t i = 0; i < n; ++i) s[i] = static_cast<char>(seed + i * 7);
  return s;
}

TEST(GgufWriterTest, RoundTripsEveryValueType) {
  GgufWriter w;
  w.AddMetadata("u8", Raw(GgufValueType::kUint8, 250, 0, 0));
  w.AddMetadata("i8", Raw(GgufValueType::kInt8, 0, -100, 0));
  w.AddMetadata("u16", Raw(GgufValueType::kUint16, 65000, 0, 0));
  w.AddMetadata("i16", Raw(GgufValueType::kInt16, 0, -30000, 0));
  w.AddMetadata("u32", GgufValue::Uint32(4000000000u));
  w.AddMetadata("i32", GgufValue::Int32(-2000000000));
  w.AddMetadata("f32", GgufValue::Float32(1e-5f));
  w.AddMetadata("bool", GgufValue::Bool(true));
  w.AddMetadata("str", GgufValue::String("h\xc3\xa9llo\0x"));
  w.AddMetadata("u64", GgufValue::Uint64(uint64_t{1} << 60));
  w.AddMetadata("i64", Raw(GgufValueType::kInt64, 0, -(int64_t{1} << 50), 0));
  w.AddMetadata("f64", Raw(GgufValueType::kFloat64, 0, 0, 0.1));
  w.AddMetadata("strs", GgufValue::StringArray({"<unk>", "", "\xe2\x96\x81the"}));
  w.AddMetadata("floats", GgufValue::Float32Array({0.f, -1e9f, 3.5f}));
  w.AddMetadata("ints", GgufValue::Int32Array({2, 3, -6}));
  w.AddMetadata("empty", GgufValue::Int32Array({}));
  w.AddMetadata("bools", GgufValue::Array(GgufValueType::kBool,
                                          {GgufValue::Bool(true), GgufValue::Bool(false)}));
  w.AddMetadata("u16s", GgufValue::Array(GgufValueType::kUint16, {GgufValue::Uint32(65535)}));
  w.AddMetadata("u32", GgufValue::Uint32(7));  // replaces, keeps position

  auto image = GgufWriter::BuildImage(w, {});
  ASSERT_TRUE(image.ok()) << image.status();
  auto file = GgufFile::FromBuffer(*image, "values.gguf");
  ASSERT_TRUE(file.ok()) << file.status();
  const GgufFile& f = **file;
  EXPECT_EQ(f.version(), 3u);
  ASSERT_EQ(f.metadata().size(), 18u);
  EXPECT_EQ(f.metadata()[4].first, "u32");
  EXPECT_EQ(f.Find("u8")->type, GgufValueType::kUint8);
  EXPECT_EQ(*f.GetUint("u8"), 250u);
  EXPECT_EQ(f.Find("i8")->int_value, -100);
  EXPECT_EQ(f.Find("i8")->type, GgufValueType::kInt8);
  EXPECT_EQ(*f.GetUint("u16"), 65000u);
  EXPECT_EQ(f.Find("i16")->int_value, -30000);
  EXPECT_EQ(*f.GetUint("u32"), 7u);
  EXPECT_EQ(f.Find("i32")->int_value, -2000000000);
  EXPECT_EQ(f.Find("f32")->type, GgufValueType::kFloat32);
  EXPECT_EQ(*f.GetFloat("f32"), static_cast<double>(1e-5f));
  EXPECT_TRUE(*f.GetBool("bool"));
  EXPECT_EQ(*f.GetString("str"), "h\xc3\xa9llo");
  EXPECT_EQ(*f.GetUint("u64"), uint64_t{1} << 60);
  EXPECT_EQ(f.Find("i64")->int_value, -(int64_t{1} << 50));
  EXPECT_EQ(f.Find("f64")->type, GgufValueType::kFloat64);
  EXPECT_EQ(*f.GetFloat("f64"), 0.1);
  EXPECT_EQ(*f.GetStringArray("strs"), (std::vector<std::string>{"<unk>", "", "\xe2\x96\x81the"}));
  EXPECT_EQ(*f.GetFloatArray("floats"), (std::vector<float>{0.f, -1e9f, 3.5f}));
  EXPECT_EQ(f.Find("ints")->array_type, GgufValueType::kInt32);
  EXPECT_EQ(*f.GetIntArray("ints"), (std::vector<int64_t>{2, 3, -6}));
  EXPECT_TRUE(f.GetIntArray("empty")->empty());
  const GgufValue* bools = f.Find("bools");
  ASSERT_NE(bools, nullptr);
  ASSERT_EQ(bools->ArraySize(), 2u);
  EXPECT_EQ(bools->ArrayElement(0).type, GgufValueType::kBool);
  EXPECT_EQ(bools->ArrayElement(0).uint_value, 1u);
  EXPECT_EQ(bools->ArrayElement(1).uint_value, 0u);
  EXPECT_EQ(*f.GetIntArray("u16s"), (std::vector<int64_t>{65535}));
  EXPECT_FALSE(f.GetIntArray("floats").ok());
  EXPECT_FALSE(f.Has("general.alignment"));
}

class GgufWriterTensorTest : public ::testing::TestWithParam<uint32_t> {};

TEST_P(GgufWriterTensorTest, StreamedFileMatchesImageAndRoundTrips) {
  const uint32_t alignment = GetParam();
  GgufWriter w(alignment);
  w.AddMetadata("general.architecture", GgufValue::String("llama"));
  ASSERT_TRUE(w.AddTensor("a", TensorType::kF32, {5}).ok());
  ASSERT_TRUE(w.AddTensor("b", TensorType::kF16, {3, 2}).ok());
  ASSERT_TRUE(w.AddTensor("c", TensorType::kQ8_0, {64, 3, 2}).ok());
  ASSERT_TRUE(w.AddTensor("d", TensorType::kQ4_K, {256, 1, 1, 2}).ok());
  const std::vector<std::string> data = {Bytes(20, 1), Bytes(12, 2), Bytes(2 * 34 * 6, 3),
                                         Bytes(144 * 2, 4)};

  const std::string path = TempDir() + "/tensors_" + std::to_string(alignment) + ".gguf";
  ASSERT_TRUE(w.Begin(path).ok());
  for (size_t i = 0; i < data.size(); ++i) {
    const std::string name(1, static_cast<char>('a' + i));
    ASSERT_TRUE(w.WriteTensorData(name, data[i].data(), data[i].size()).ok()) << name;
  }
  ASSERT_TRUE(w.Finish().ok());

  auto image = GgufWriter::BuildImage(w, data);
  ASSERT_TRUE(image.ok()) << image.status();
  EXPECT_EQ(ReadFileOrDie(path), *image);
  EXPECT_EQ(image->size() % alignment, 0u);

  auto file = GgufFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  const GgufFile& f = **file;
  EXPECT_EQ(f.alignment(), alignment);
  EXPECT_EQ(f.Has("general.alignment"), alignment != kGgufDefaultAlignment);
  EXPECT_EQ(f.data_offset() % alignment, 0u);
  ASSERT_EQ(f.tensors().size(), 4u);
  const int64_t want_dims[4][4] = {{5, 1, 1, 1}, {3, 2, 1, 1}, {64, 3, 2, 1}, {256, 1, 1, 2}};
  const int want_n_dims[4] = {1, 2, 3, 4};
  const TensorType want_type[4] = {TensorType::kF32, TensorType::kF16, TensorType::kQ8_0,
                                   TensorType::kQ4_K};
  for (size_t i = 0; i < 4; ++i) {
    const GgufTensorInfo& t = f.tensors()[i];
    EXPECT_EQ(t.name, std::string(1, static_cast<char>('a' + i)));
    EXPECT_EQ(t.n_dims, want_n_dims[i]);
    EXPECT_EQ(t.type, want_type[i]);
    for (int d = 0; d < 4; ++d) EXPECT_EQ(t.dims[d], want_dims[i][d]) << t.name;
    EXPECT_EQ(t.offset % alignment, 0u);
    ASSERT_EQ(t.size_bytes, data[i].size());
    EXPECT_EQ(std::memcmp(t.data, data[i].data(), data[i].size()), 0) << t.name;
  }
}

INSTANTIATE_TEST_SUITE_P(Alignments, GgufWriterTensorTest, ::testing::Values(32u, 64u, 8u));

// Re-serialising a file written by the reference implementation reproduces it byte for byte:
// same value encodings, tensor index, header padding and per-tensor padding.
TEST(GgufWriterTest, RewritingReferenceFileReproducesItExactly) {
  const std::string path = ::moepool::testing::SharedTestdataPath("conformance/tiny-Q4_K_M.gguf");
  REQUIRE_TESTDATA(path);
  auto file = GgufFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  const GgufFile& f = **file;
  GgufWriter w(f.alignment());
  for (const auto& [key, value] : f.metadata()) w.AddMetadata(key, value);
  std::vector<std::string> data;
  for (const GgufTensorInfo& t : f.tensors()) {
    ASSERT_TRUE(w.AddTensor(t.name, t.type, std::vector<int64_t>(t.dims, t.dims + t.n_dims)).ok());
    data.emplace_back(reinterpret_cast<const char*>(t.data), t.size_bytes);
  }
  auto image = GgufWriter::BuildImage(w, data);
  ASSERT_TRUE(image.ok()) << image.status();
  EXPECT_TRUE(*image == ReadFileOrDie(path));
}

TEST(GgufWriterTest, UnwritablePathIsAnErrorNamingThePath) {
  GgufWriter w;
  ASSERT_TRUE(w.AddTensor("a", TensorType::kF32, {4}).ok());
  const absl::Status s = w.Begin("/nonexistent-dir/sub/model.gguf");
  ASSERT_FALSE(s.ok());
  EXPECT_NE(std::string(s.message()).find("/nonexistent-dir/sub/model.gguf"), std::string::npos);
  // The writer is still usable afterwards.
  EXPECT_TRUE(w.Begin(TempDir() + "/retry.gguf").ok());
}

TEST(GgufWriterTest, RejectsBadTensorDeclarations) {
  GgufWriter w;
  ASSERT_TRUE(w.AddTensor("x", TensorType::kF32, {4}).ok());
  EXPECT_EQ(w.AddTensor("x", TensorType::kF32, {4}).code(), absl::StatusCode::kAlreadyExists);
  EXPECT_FALSE(w.AddTensor("", TensorType::kF32, {4}).ok());
  EXPECT_FALSE(w.AddTensor("nodims", TensorType::kF32, {}).ok());
  EXPECT_FALSE(w.AddTensor("fivedims", TensorType::kF32, {1, 1, 1, 1, 1}).ok());
  EXPECT_FALSE(w.AddTensor("zero", TensorType::kF32, {4, 0}).ok());
  EXPECT_FALSE(w.AddTensor("partial_block", TensorType::kQ4_K, {128, 2}).ok());
  EXPECT_FALSE(w.AddTensor("activation_type", TensorType::kQ8_K, {256}).ok());
  EXPECT_FALSE(w.AddTensor("unknown", static_cast<TensorType>(77), {256}).ok());

  GgufWriter odd(48);
  EXPECT_FALSE(odd.AddTensor("t", TensorType::kF32, {4}).ok());
  EXPECT_FALSE(GgufWriter::BuildImage(odd, {}).ok());
}

TEST(GgufWriterTest, MisuseIsReportedNotCrashed) {
  const std::string path = TempDir() + "/misuse.gguf";
  GgufWriter w;
  ASSERT_TRUE(w.AddTensor("a", TensorType::kF32, {2}).ok());
  ASSERT_TRUE(w.AddTensor("b", TensorType::kF32, {2}).ok());
  const float v[2] = {1, 2};
  EXPECT_EQ(w.WriteTensorData("a", v, 8).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(w.Finish().code(), absl::StatusCode::kFailedPrecondition);
  ASSERT_TRUE(w.Begin(path).ok());
  EXPECT_FALSE(w.Begin(path).ok());
  EXPECT_FALSE(w.AddTensor("c", TensorType::kF32, {2}).ok());
  EXPECT_EQ(w.WriteTensorData("b", v, 8).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(w.WriteTensorData("a", v, 4).code(), absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(w.WriteTensorData("a", v, 8).ok());
  const absl::Status early = w.Finish();
  EXPECT_EQ(early.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(std::string(early.message()).find("'b'"), std::string::npos);
  ASSERT_TRUE(w.WriteTensorData("b", v, 8).ok());
  EXPECT_FALSE(w.WriteTensorData("b", v, 8).ok());
  ASSERT_TRUE(w.Finish().ok());
  EXPECT_TRUE(GgufFile::Open(path).ok());

  EXPECT_FALSE(GgufWriter::BuildImage(w, {std::string(8, 'x')}).ok());
  EXPECT_FALSE(GgufWriter::BuildImage(w, {std::string(8, 'x'), std::string(7, 'x')}).ok());
}

TEST(GgufWriterTest, UnfinishedFileIsRemoved) {
  const std::string path = TempDir() + "/unfinished.gguf";
  {
    GgufWriter w;
    ASSERT_TRUE(w.AddTensor("a", TensorType::kF32, {2}).ok());
    ASSERT_TRUE(w.Begin(path).ok());
    EXPECT_TRUE(std::filesystem::exists(path));
  }
  EXPECT_FALSE(std::filesystem::exists(path));
}

TEST(GgufWriterTest, InconsistentMetadataIsRejected) {
  GgufWriter w(64);
  w.AddMetadata("general.alignment", GgufValue::Uint32(32));
  EXPECT_FALSE(w.Begin(TempDir() + "/inconsistent.gguf").ok());
  GgufWriter torn;
  GgufValue bad = GgufValue::Int32Array({1, 2});
  bad.packed.pop_back();  // 7 bytes: not whole int32 values
  torn.AddMetadata("bad", bad);
  EXPECT_FALSE(GgufWriter::BuildImage(torn, {}).ok());
  GgufWriter nested;
  GgufValue arrays = GgufValue::Array(GgufValueType::kInt32, {});
  arrays.array_type = GgufValueType::kArray;
  nested.AddMetadata("nested", arrays);
  const auto status = GgufWriter::BuildImage(nested, {}).status();
  EXPECT_NE(std::string(status.message()).find("arrays of arrays"), std::string::npos) << status;
}

}  // namespace
}  // namespace moepool
