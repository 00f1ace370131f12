// Dot-product kernels (vec_dot_scalar.cc, vec_dot_avx2.cc, vec_dot_k_avx2.cc) and the Q8
// activation quantizers (q8_activations*.cc): the scalar dot equals the dot of the dequantized
// rows, AVX2 agrees with scalar, and the AVX2 quantizers reproduce the scalar blocks bit for bit.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "engine/quant/fp16.h"
#include "engine/quant/kernels.h"
#include "engine/quant/types.h"
#include "gtest/gtest.h"

namespace moepool {
namespace {

struct DotCase {
  TensorType type;
  VecDotFn scalar;
  VecDotFn avx2;
  VecDotFn vnni;  // nullptr where the VNNI build is not compiled in
  // Byte offsets of the half-float scale fields in a block (-1: none).
  int scale_offsets[2];
};

#ifdef MOEPOOL_HAVE_VNNI_KERNELS
#define MOEPOOL_VNNI_DOT(T) &kernels::VecDot##T##Vnni
#else
#define MOEPOOL_VNNI_DOT(T) nullptr
#endif
#define MOEPOOL_DOT_CASE(T, OFF0, OFF1)                                                            \
  DotCase {                                                                                        \
    TensorType::k##T, &kernels::VecDot##T##Scalar, &kernels::VecDot##T##Avx2, MOEPOOL_VNNI_DOT(T), \
    {                                                                                              \
      OFF0, OFF1                                                                                   \
    }                                                                                              \
  }

const DotCase kDotCases[] = {
    MOEPOOL_DOT_CASE(F32, -1, -1),
    MOEPOOL_DOT_CASE(F16, -1, -1),
    MOEPOOL_DOT_CASE(BF16, -1, -1),
    MOEPOOL_DOT_CASE(Q4_0, offsetof(BlockQ4_0, d), -1),
    MOEPOOL_DOT_CASE(Q4_1, offsetof(BlockQ4_1, d), offsetof(BlockQ4_1, m)),
    MOEPOOL_DOT_CASE(Q5_0, offsetof(BlockQ5_0, d), -1),
    MOEPOOL_DOT_CASE(Q5_1, offsetof(BlockQ5_1, d), offsetof(BlockQ5_1, m)),
    MOEPOOL_DOT_CASE(Q8_0, offsetof(BlockQ8_0, d), -1),
    MOEPOOL_DOT_CASE(Q2_K, offsetof(BlockQ2_K, d), offsetof(BlockQ2_K, dmin)),
    MOEPOOL_DOT_CASE(Q3_K, offsetof(BlockQ3_K, d), -1),
    MOEPOOL_DOT_CASE(Q4_K, offsetof(BlockQ4_K, d), offsetof(BlockQ4_K, dmin)),
    MOEPOOL_DOT_CASE(Q5_K, offsetof(BlockQ5_K, d), offsetof(BlockQ5_K, dmin)),
    MOEPOOL_DOT_CASE(Q6_K, offsetof(BlockQ6_K, d), -1),
};
#undef MOEPOOL_DOT_CASE

void PrintTo(const DotCase& c, std::ostream* os) { *os << GetTypeTraits(c.type).name; }

// How the weight bytes are filled.
enum class WeightPattern { kRandom, kAllOnes, kAll0x80 };
// How the float activations are drawn.
enum class ActivationPattern { kGaussian, kAllPlus, kAllMinus };

bool IsFloatType(TensorType t) {
  return t == TensorType::kF32 || t == TensorType::kF16 || t == TensorType::kBF16;
}

// Elements per row: several blocks of every type, an odd block count (exercises unrolled loops'
// remainders) and, for float types, a length that is not a multiple of 8.
int64_t RowLength(TensorType t) {
  if (IsFloatType(t)) return 1027;
  return GetTypeTraits(t).block_size == kQK_K ? 9 * kQK_K : 73 * 32;
}

void PutHalf(uint8_t* p, float v) {
  const uint16_t h = Fp32ToFp16(v);
  std::memcpy(p, &h, 2);
}

// A valid weight row: quant bytes from the pattern, scale fields set to small finite halves.
std::vector<uint8_t> MakeWeights(const DotCase& c, int64_t n, WeightPattern pattern,
                                 std::mt19937& rng) {
  const TypeTraits& tr = GetTypeTraits(c.type);
  std::vector<uint8_t> w(RowBytes(c.type, n));
  std::uniform_real_distribution<float> unit(-1.0f, 1.0f);
  if (c.type == TensorType::kF32) {
    for (int64_t i = 0; i < n; ++i) {
      const float v = pattern == WeightPattern::kRandom ? unit(rng) : 0.75f;
      std::memcpy(w.data() + 4 * i, &v, 4);
    }
    return w;
  }
  if (c.type == TensorType::kF16 || c.type == TensorType::kBF16) {
    for (int64_t i = 0; i < n; ++i) {
      const float v = pattern == WeightPattern::kRandom ? unit(rng) : -0.75f;
      const uint16_t h = c.type == TensorType::kF16 ? Fp32ToFp16(v) : Fp32ToBf16(v);
      std::memcpy(w.data() + 2 * i, &h, 2);
    }
    return w;
  }
  std::uniform_int_distribution<int> byte(0, 255);
  for (uint8_t& b : w) {
    b = pattern == WeightPattern::kRandom    ? static_cast<uint8_t>(byte(rng))
        : pattern == WeightPattern::kAllOnes ? uint8_t{0xFF}
                                             : uint8_t{0x80};
  }
  std::uniform_real_distribution<float> scale(0.001f, 0.01f);
  for (int64_t b = 0; b < n / tr.block_size; ++b) {
    uint8_t* block = w.data() + b * tr.block_bytes;
    if (c.scale_offsets[0] >= 0) PutHalf(block + c.scale_offsets[0], scale(rng));
    // The second field is a min: either sign is valid.
    if (c.scale_offsets[1] >= 0) {
      PutHalf(block + c.scale_offsets[1], (byte(rng) & 1 ? 1.0f : -1.0f) * scale(rng));
    }
  }
  return w;
}

std::vector<float> MakeActivations(int64_t n, ActivationPattern pattern, std::mt19937& rng) {
  std::normal_distribution<float> gauss(0.0f, 1.0f);
  std::vector<float> a(static_cast<size_t>(n));
  for (float& v : a) {
    v = pattern == ActivationPattern::kGaussian  ? gauss(rng)
        : pattern == ActivationPattern::kAllPlus ? 1.5f
                                                 : -1.5f;
  }
  return a;
}

// The activation row in the form the dot product takes (floats, or quantized with the scalar
// quantizer of the weight type's vec_dot_type).
std::vector<uint8_t> ConvertActivations(TensorType weight_type, const std::vector<float>& a) {
  const TypeTraits& dot_traits = GetTypeTraits(GetTypeTraits(weight_type).vec_dot_type);
  const int64_t n = static_cast<int64_t>(a.size());
  std::vector<uint8_t> out(RowBytes(dot_traits.type, n));
  switch (dot_traits.type) {
    case TensorType::kF32:
      std::memcpy(out.data(), a.data(), out.size());
      break;
    case TensorType::kQ8_0:
      kernels::QuantizeRowQ8_0(a.data(), out.data(), n);
      break;
    case TensorType::kQ8_1:
      kernels::QuantizeRowQ8_1(a.data(), out.data(), n);
      break;
    case TensorType::kQ8_K:
      kernels::QuantizeRowQ8_K(a.data(), out.data(), n);
      break;
    default:
      ADD_FAILURE() << "unexpected vec_dot_type";
  }
  return out;
}

std::vector<float> Dequantize(TensorType type, const void* data, int64_t n) {
  std::vector<float> out(static_cast<size_t>(n));
  GetTypeTraits(type).dequantize(data, out.data(), n);
  return out;
}

struct Reference {
  double dot;        // dot of the dequantized rows (with the Q8_1 sum term, see below)
  double abs_scale;  // sum of |w_i * a_i|, the scale of the rounding error
};

Reference ReferenceDot(TensorType weight_type, const std::vector<uint8_t>& w,
                       const std::vector<uint8_t>& a, int64_t n) {
  const TensorType dot_type = GetTypeTraits(weight_type).vec_dot_type;
  const std::vector<float> wf = Dequantize(weight_type, w.data(), n);
  const std::vector<float> af = Dequantize(dot_type, a.data(), n);
  Reference ref{0.0, 0.0};
  for (int64_t i = 0; i < n; ++i) {
    ref.dot += static_cast<double>(wf[i]) * af[i];
    ref.abs_scale += std::fabs(static_cast<double>(wf[i]) * af[i]);
  }
  if (dot_type == TensorType::kQ8_1) {
    // The min term uses the block's stored half s = d * sum(q), not the exact d * sum(q).
    const auto* ab = reinterpret_cast<const BlockQ8_1*>(a.data());
    const auto* wb = w.data();
    const size_t bytes = GetTypeTraits(weight_type).block_bytes;
    for (int64_t b = 0; b < n / kQK8_1; ++b) {
      uint16_t m_bits;
      std::memcpy(&m_bits, wb + b * bytes + 2, 2);  // Q4_1 / Q5_1: m follows d
      double qsum = 0.0;
      for (int j = 0; j < kQK8_1; ++j) qsum += ab[b].qs[j];
      const double exact = static_cast<double>(Fp16ToFp32(ab[b].d)) * qsum;
      ref.dot += static_cast<double>(Fp16ToFp32(m_bits)) * (Fp16ToFp32(ab[b].s) - exact);
    }
  }
  return ref;
}

class VecDotTest : public ::testing::TestWithParam<DotCase> {};

std::string CaseName(const ::testing::TestParamInfo<DotCase>& info) {
  return GetTypeTraits(info.param.type).name;
}

TEST_P(VecDotTest, ScalarMatchesDequantizedDotAndAvx2MatchesScalar) {
  const DotCase& c = GetParam();
  const int64_t n = RowLength(c.type);
  std::mt19937 rng(1234 + static_cast<uint32_t>(c.type));
  const WeightPattern weight_patterns[] = {WeightPattern::kRandom, WeightPattern::kAllOnes,
                                           WeightPattern::kAll0x80};
  const ActivationPattern activation_patterns[] = {
      ActivationPattern::kGaussian, ActivationPattern::kAllPlus, ActivationPattern::kAllMinus};
  for (int rep = 0; rep < 4; ++rep) {
    for (WeightPattern wp : weight_patterns) {
      for (ActivationPattern ap : activation_patterns) {
        SCOPED_TRACE(::testing::Message() << "rep " << rep << " weights " << static_cast<int>(wp)
                                          << " activations " << static_cast<int>(ap));
        const std::vector<uint8_t> w = MakeWeights(c, n, wp, rng);
        const std::vector<uint8_t> a = ConvertActivations(c.type, MakeActivations(n, ap, rng));
        const Reference ref = ReferenceDot(c.type, w, a, n);
        ASSERT_GT(ref.abs_scale, 0.0);
        const float scalar = c.scalar(n, w.data(), a.data());
        EXPECT_NEAR(scalar, ref.dot, 2e-6 * ref.abs_scale);
        if (CpuHasAvx2()) {
          const float avx2 = c.avx2(n, w.data(), a.data());
          EXPECT_NEAR(avx2, scalar, 1e-5 * ref.abs_scale);
          // Q4_K, Q5_K, Q6_K and Q8_0 share block_numerics.h: the same bits.
          if (c.type == TensorType::kQ4_K || c.type == TensorType::kQ5_K ||
              c.type == TensorType::kQ6_K || c.type == TensorType::kQ8_0) {
            EXPECT_EQ(avx2, scalar);
          }
          // The VNNI build replaces instruction pairs by fused ones with the same int32 lanes.
          if (CpuHasAvx512Vnni()) {
            EXPECT_EQ(c.vnni(n, w.data(), a.data()), avx2);
          }
        }
      }
    }
  }
}

TEST_P(VecDotTest, ZeroLengthRowIsZero) {
  const DotCase& c = GetParam();
  EXPECT_EQ(c.scalar(0, nullptr, nullptr), 0.0f);
  if (CpuHasAvx2()) {
    EXPECT_EQ(c.avx2(0, nullptr, nullptr), 0.0f);
  }
}

INSTANTIATE_TEST_SUITE_P(AllStoredTypes, VecDotTest, ::testing::ValuesIn(kDotCases), CaseName);

TEST(VecDotTraitsTest, DispatchPicksTheFastestBuildTheCpuRuns) {
  for (const DotCase& c : kDotCases) {
    const TypeTraits& tr = GetTypeTraits(c.type);
    EXPECT_EQ(tr.vec_dot_scalar, c.scalar) << tr.name;
    EXPECT_EQ(tr.vec_dot, CpuHasAvx512Vnni() ? c.vnni
                          : CpuHasAvx2()     ? c.avx2
                                             : c.scalar)
        << tr.name;
  }
}

}  // namespace
}  // namespace moepool
