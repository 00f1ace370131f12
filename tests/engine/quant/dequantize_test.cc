// Conformance of the scalar dequantizers with the reference dequantization (within 1 ulp).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "engine/gguf.h"
#include "engine/quant/fp16.h"
#include "engine/quant/kernels.h"
#include "engine/quant/types.h"
#include "gtest/gtest.h"
#include "tests/testdata.h"

namespace moepool {
namespace {

using ::moepool::testing::SharedTestdataPath;

// Distance in units in the last place; equal values (including +0 / -0 and two NaNs) give 0.
int64_t UlpDistance(float a, float b) {
  if (std::isnan(a) && std::isnan(b)) return 0;
  if (std::isnan(a) || std::isnan(b)) return std::numeric_limits<int64_t>::max();
  auto ordered = [](float f) {
    const int32_t bits = static_cast<int32_t>(Fp32ToBits(f));
    return bits < 0 ? static_cast<int64_t>(std::numeric_limits<int32_t>::min()) - bits
                    : static_cast<int64_t>(bits);
  };
  const int64_t d = ordered(a) - ordered(b);
  return d < 0 ? -d : d;
}

// Dequantizes the first ceil(count / row_length) rows of `q` (one call per row) and returns the
// first `count` values.
std::vector<float> DequantizePrefix(const GgufTensorInfo& q, int64_t count) {
  const TypeTraits& traits = GetTypeTraits(q.type);
  const int64_t row = q.dims[0];
  const int64_t rows = (count + row - 1) / row;
  const size_t row_bytes = RowBytes(q.type, row);
  std::vector<float> out(static_cast<size_t>(rows * row));
  for (int64_t r = 0; r < rows; ++r) {
    traits.dequantize(q.data + r * row_bytes, out.data() + r * row, row);
  }
  out.resize(static_cast<size_t>(count));
  return out;
}

// Compares element-wise within 1 ulp; returns a description of the failures (empty if none).
std::string CompareWithin1Ulp(const std::vector<float>& got, const float* want, int64_t row) {
  int64_t bad = 0;
  std::string first;
  for (size_t i = 0; i < got.size(); ++i) {
    if (UlpDistance(got[i], want[i]) > 1) {
      if (bad++ == 0) {
        first = "first at row " + std::to_string(static_cast<int64_t>(i) / row) + " col " +
                std::to_string(static_cast<int64_t>(i) % row) + ": got " + std::to_string(got[i]) +
                " want " + std::to_string(want[i]);
      }
    }
  }
  if (bad == 0) return "";
  return std::to_string(bad) + " of " + std::to_string(got.size()) +
         " elements differ by > 1 ulp; " + first;
}

class QuantVectorsTest : public ::testing::TestWithParam<std::string> {};

TEST_P(QuantVectorsTest, DequantizationMatchesReference) {
  const std::string path = SharedTestdataPath("conformance/quant-vectors.gguf");
  REQUIRE_TESTDATA(path);
  auto file = GgufFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  const std::string type_name = GetParam();
  const GgufTensorInfo* q = (*file)->FindTensor("q." + type_name);
  const GgufTensorInfo* ref = (*file)->FindTensor("ref." + type_name);
  ASSERT_NE(q, nullptr);
  ASSERT_NE(ref, nullptr);
  ASSERT_STREQ(GetTypeTraits(q->type).name, type_name.c_str());
  ASSERT_EQ(ref->type, TensorType::kF32);
  ASSERT_EQ(q->NumElements(), ref->NumElements());
  ASSERT_EQ(q->dims[0], ref->dims[0]);

  const std::vector<float> got = DequantizePrefix(*q, q->NumElements());
  std::vector<float> want(got.size());
  std::memcpy(want.data(), ref->data, want.size() * sizeof(float));
  EXPECT_EQ(CompareWithin1Ulp(got, want.data(), q->dims[0]), "") << type_name;

  // The vectors must exercise the kernel: a dequantizer that returned zeros would fail above
  // only if the reference is non-trivial.
  double energy = 0;
  for (float v : want) energy += static_cast<double>(v) * v;
  EXPECT_GT(energy, 0.0);
}

INSTANTIATE_TEST_SUITE_P(AllTypes, QuantVectorsTest,
                         ::testing::Values("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1",
                                           "Q5_0", "Q5_1", "Q8_0", "BF16", "F16"),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           return info.param;
                         });

class ModelDequantTest : public ::testing::TestWithParam<std::string> {};

// Each F32 tensor of M.dequant.gguf is the reference dequantization of (a prefix of) the
// same-named tensor of M.gguf.
TEST_P(ModelDequantTest, MatchesReferenceDequantization) {
  const std::string model_path = SharedTestdataPath("conformance/" + GetParam() + ".gguf");
  const std::string ref_path = SharedTestdataPath("conformance/" + GetParam() + ".dequant.gguf");
  REQUIRE_TESTDATA(model_path);
  REQUIRE_TESTDATA(ref_path);
  auto model = GgufFile::Open(model_path);
  ASSERT_TRUE(model.ok()) << model.status();
  auto ref = GgufFile::Open(ref_path);
  ASSERT_TRUE(ref.ok()) << ref.status();
  ASSERT_FALSE((*ref)->tensors().empty());

  for (const GgufTensorInfo& want : (*ref)->tensors()) {
    SCOPED_TRACE(want.name);
    ASSERT_EQ(want.type, TensorType::kF32);
    const GgufTensorInfo* q = (*model)->FindTensor(want.name);
    ASSERT_NE(q, nullptr);
    auto declared = (*ref)->GetString("dequant.type." + want.name);
    if (declared.ok()) {
      const TypeTraits* traits = FindTypeTraitsByName(*declared);
      ASSERT_NE(traits, nullptr) << *declared;
      EXPECT_EQ(traits->type, q->type);
    }
    ASSERT_LE(want.NumElements(), q->NumElements());
    const std::vector<float> got = DequantizePrefix(*q, want.NumElements());
    std::vector<float> expected(got.size());
    std::memcpy(expected.data(), want.data, expected.size() * sizeof(float));
    EXPECT_EQ(CompareWithin1Ulp(got, expected.data(), q->dims[0]), "")
        << GetTypeTraits(q->type).name;
  }
}

INSTANTIATE_TEST_SUITE_P(Models, ModelDequantTest, ::testing::Values("tiny-Q4_K_M", "tiny-Q8_0"),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           std::string name = info.param;
                           for (char& c : name) {
                             if (c == '-') c = '_';
                           }
                           return name;
                         });

// Hand-built blocks pin the bit layout independently of the reference files.
TEST(DequantizeLayoutTest, Q4_0NibbleOrder) {
  BlockQ4_0 block;
  block.d = Fp32ToFp16(0.5f);
  for (int j = 0; j < 16; ++j) block.qs[j] = static_cast<uint8_t>(j | ((15 - j) << 4));
  float out[32];
  kernels::DequantizeRowQ4_0(&block, out, 32);
  for (int j = 0; j < 16; ++j) {
    EXPECT_EQ(out[j], 0.5f * static_cast<float>(j - 8)) << j;
    EXPECT_EQ(out[j + 16], 0.5f * static_cast<float>(7 - j)) << j;
  }
}

TEST(DequantizeLayoutTest, Q5_0HighBits) {
  BlockQ5_0 block;
  block.d = Fp32ToFp16(1.0f);
  std::memset(block.qs, 0, sizeof(block.qs));
  const uint32_t qh = (1u << 3) | (1u << 20);  // element 3 and element 20 get bit 4
  std::memcpy(block.qh, &qh, 4);
  float out[32];
  kernels::DequantizeRowQ5_0(&block, out, 32);
  for (int j = 0; j < 32; ++j) EXPECT_EQ(out[j], (j == 3 || j == 20) ? 0.0f : -16.0f) << j;
}

TEST(DequantizeLayoutTest, Q4_KUpperSubBlockScales) {
  // Sub-block 5: scale 6 bits = 0b100011 (35), min = 0b010110 (22); all others zero.
  BlockQ4_K block;
  std::memset(&block, 0, sizeof(block));
  block.d = Fp32ToFp16(1.0f);
  block.dmin = Fp32ToFp16(1.0f);
  block.scales[9] = static_cast<uint8_t>((35 & 0xF) | ((22 & 0xF) << 4));
  block.scales[1] = static_cast<uint8_t>((35 >> 4) << 6);
  block.scales[5] = static_cast<uint8_t>((22 >> 4) << 6);
  for (int l = 0; l < 32; ++l) block.qs[64 + l] = 0x20;  // high nibble 2: sub-block 5
  float out[kQK_K];
  kernels::DequantizeRowQ4_K(&block, out, kQK_K);
  for (int e = 0; e < kQK_K; ++e) {
    const float want = (e >= 160 && e < 192) ? 35.0f * 2.0f - 22.0f : 0.0f;
    EXPECT_EQ(out[e], want) << e;
  }
}

TEST(DequantizeLayoutTest, FloatTypesAreExact) {
  const float values[4] = {1.5f, -0.0f, 65504.0f, 3.0e-8f};
  uint16_t half[4];
  uint16_t bf[4];
  for (int i = 0; i < 4; ++i) {
    half[i] = Fp32ToFp16(values[i]);
    bf[i] = Fp32ToBf16(values[i]);
  }
  float out[4];
  kernels::DequantizeRowF16(half, out, 4);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(out[i], Fp16ToFp32(half[i]));
  EXPECT_EQ(out[2], 65504.0f);
  kernels::DequantizeRowBF16(bf, out, 4);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(Fp32ToBits(out[i]), static_cast<uint32_t>(bf[i]) << 16);
  kernels::DequantizeRowF32(values, out, 4);
  EXPECT_EQ(std::memcmp(out, values, sizeof(values)), 0);
}

}  // namespace
}  // namespace moepool
