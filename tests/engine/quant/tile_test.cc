// The AVX512-VNNI matmul tiles (tile_*_vnni.cc) against the scalar reference dot: every output of
// every tile shape (16 and fewer weight rows, 1..8 activation rows per group, any number of groups,
// rows of 1 to 136 Q8_0 blocks, so an odd count and every lane of the 8 Q8_0 accumulators) must
// have exactly the bits of VecDot*Scalar, including at the limits of the integer sums, and
// MatMulRowRange must give the same bits through the tiles as one row at a time.
#include <cstdint>
#include <cstring>
#include <memory>
#include <new>
#include <random>
#include <string>
#include <vector>

#include "engine/matmul.h"
#include "engine/quant/fp16.h"
#include "engine/quant/kernels.h"
#include "engine/quant/types.h"
#include "gtest/gtest.h"

namespace moepool {
namespace {

enum class Fill { kQuantized, kExtreme };

// Weight rows of `type`: quantized gaussian values, or random bytes with sane half scales
// (every quant and 6-bit scale anywhere in its range, up to all bits set).
std::vector<uint8_t> MakeWeights(TensorType type, int64_t rows, int64_t n, Fill fill,
                                 std::mt19937* rng) {
  const TypeTraits& t = GetTypeTraits(type);
  const size_t row_bytes = RowBytes(type, n);
  std::vector<uint8_t> out(row_bytes * rows);
  std::normal_distribution<float> gauss(0.0f, 1.0f);
  if (fill == Fill::kQuantized) {
    std::vector<float> values(n);
    for (int64_t r = 0; r < rows; ++r) {
      for (float& v : values) v = 0.05f * gauss(*rng);
      t.quantize(values.data(), out.data() + r * row_bytes, n);
    }
    return out;
  }
  std::uniform_int_distribution<int> byte(0, 255);
  for (uint8_t& b : out) b = static_cast<uint8_t>(byte(*rng) | (byte(*rng) < 64 ? 0xFF : 0));
  // Half scales: finite, of either sign.
  std::vector<size_t> half_offsets;
  if (type == TensorType::kQ8_0) {
    half_offsets = {offsetof(BlockQ8_0, d)};
  } else if (type == TensorType::kQ6_K) {
    half_offsets = {offsetof(BlockQ6_K, d)};
  } else if (type == TensorType::kQ5_K) {
    half_offsets = {offsetof(BlockQ5_K, d), offsetof(BlockQ5_K, dmin)};
  } else {
    half_offsets = {offsetof(BlockQ4_K, d), offsetof(BlockQ4_K, dmin)};
  }
  for (size_t b = 0; b < out.size() / t.block_bytes; ++b) {
    for (size_t off : half_offsets) {
      const uint16_t h = Fp32ToFp16(0.01f * gauss(*rng));
      std::memcpy(out.data() + b * t.block_bytes + off, &h, 2);
    }
  }
  return out;
}

// Activation rows of `type` (Q8_K or Q8_0): quantized gaussian values, or quants anywhere in
// [-128, 127] (Q8_K: with their block sums) to reach the integer limits.
std::vector<uint8_t> MakeActivations(TensorType type, int64_t rows, int64_t n, Fill fill,
                                     std::mt19937* rng) {
  const TypeTraits& t = GetTypeTraits(type);
  const size_t row_bytes = RowBytes(type, n);
  std::vector<uint8_t> out(row_bytes * rows);
  std::normal_distribution<float> gauss(0.0f, 1.0f);
  std::uniform_int_distribution<int> q(-128, 127);
  std::vector<float> values(n);
  for (int64_t r = 0; r < rows; ++r) {
    for (float& v : values) v = gauss(*rng) * (r % 3 + 1);
    t.quantize(values.data(), out.data() + r * row_bytes, n);
    if (fill != Fill::kExtreme) continue;
    for (int64_t b = 0; b < n / t.block_size; ++b) {
      const bool all_min = (b + r) % 4 == 0;
      const auto quant = [&] { return static_cast<int8_t>(all_min ? -128 : q(*rng)); };
      if (type == TensorType::kQ8_0) {
        auto* block = reinterpret_cast<BlockQ8_0*>(out.data() + r * row_bytes) + b;
        for (int8_t& v : block->qs) v = quant();
        continue;
      }
      auto* block = reinterpret_cast<BlockQ8_K*>(out.data() + r * row_bytes) + b;
      for (int8_t& v : block->qs) v = quant();
      for (int g = 0; g < kQK_K / 16; ++g) {
        int sum = 0;
        for (int i = 0; i < 16; ++i) sum += block->qs[16 * g + i];
        block->bsums[g] = static_cast<int16_t>(sum);
      }
    }
  }
  return out;
}

struct Aligned {
  explicit Aligned(size_t bytes) : data(new (std::align_val_t(64)) uint8_t[bytes]) {}
  std::unique_ptr<uint8_t[]> data;
};

class TileTest : public ::testing::TestWithParam<TensorType> {
 protected:
  void SetUp() override {
    if (GetTypeTraits(GetParam()).tile == nullptr) {
      GTEST_SKIP() << "no matmul tile for " << GetTypeTraits(GetParam()).name
                   << " on this CPU (AVX512-VNNI only)";
    }
  }
};

// Q8_0 activations: each 32-element block's Q8_0BlockSum, as ConvertRows gives the tiles; empty
// for other types.
std::vector<Q8_0BlockSum> BlockSums(TensorType type, const std::vector<uint8_t>& a, int64_t n_act,
                                    int64_t n) {
  std::vector<Q8_0BlockSum> sums;
  if (type != TensorType::kQ8_0) return sums;
  const auto* blocks = reinterpret_cast<const BlockQ8_0*>(a.data());
  for (int64_t i = 0; i < n_act * (n / kQK8_0); ++i) {
    int32_t s = 0;
    for (const int8_t q : blocks[i].qs) s += q;
    sums.push_back({-128 * s, Fp16ToFp32(blocks[i].d)});
  }
  return sums;
}

TEST_P(TileTest, EveryOutputBitIdenticalToScalarDot) {
  const TypeTraits& t = GetTypeTraits(GetParam());
  std::mt19937 rng(static_cast<uint32_t>(GetParam()) * 31);
  for (const int64_t n : {int64_t{256}, int64_t{1024}, int64_t{3584}, int64_t{4352}}) {
    for (const Fill fill : {Fill::kQuantized, Fill::kExtreme}) {
      SCOPED_TRACE(::testing::Message() << "n " << n << " fill " << static_cast<int>(fill));
      constexpr int64_t kRows = 21;  // one full tile of 16 rows and one of 5
      constexpr int64_t kActs = 17;
      const std::vector<uint8_t> w = MakeWeights(t.type, kRows, n, fill, &rng);
      const std::vector<uint8_t> a = MakeActivations(t.vec_dot_type, kActs, n, fill, &rng);
      const size_t w_bytes = RowBytes(t.type, n), a_bytes = RowBytes(t.vec_dot_type, n);
      Aligned scratch(t.tile_scratch_bytes(n, kActs));
      const std::vector<Q8_0BlockSum> sums = BlockSums(t.vec_dot_type, a, kActs, n);
      // Every activation count 1..kActs, so every group width 1..8 occurs; the Q8_0 block sums
      // given (even counts) or computed by the tile (odd ones).
      for (int64_t n_act = 1; n_act <= kActs; ++n_act) {
        std::vector<float> out(kActs * kRows, -1.0f);
        t.tile(n, w.data(), w_bytes, kRows, a.data(), a_bytes, n_act, out.data(), kRows,
               scratch.data.get(), n_act % 2 == 0 && !sums.empty() ? sums.data() : nullptr);
        for (int64_t i = 0; i < kActs; ++i) {
          for (int64_t r = 0; r < kRows; ++r) {
            const float got = out[i * kRows + r];
            if (i >= n_act) {
              ASSERT_EQ(got, -1.0f) << "wrote past the activation rows";
              continue;
            }
            const float want = t.vec_dot_scalar(n, w.data() + r * w_bytes, a.data() + i * a_bytes);
            ASSERT_EQ(std::memcmp(&got, &want, 4), 0)
                << "n_act " << n_act << " act " << i << " row " << r << ": " << got << " vs "
                << want;
          }
        }
      }
    }
  }
}

// Long prompts: hundreds of activation rows (the Q8_0 tile summing their blocks itself) still
// give every output its scalar bits.
TEST_P(TileTest, ManyActivationRowsMatchScalarDot) {
  const TypeTraits& t = GetTypeTraits(GetParam());
  std::mt19937 rng(5);
  constexpr int64_t kN = 256, kRows = 19, kActs = 530;
  const std::vector<uint8_t> w = MakeWeights(t.type, kRows, kN, Fill::kQuantized, &rng);
  const std::vector<uint8_t> a = MakeActivations(t.vec_dot_type, kActs, kN, Fill::kExtreme, &rng);
  const size_t w_bytes = RowBytes(t.type, kN), a_bytes = RowBytes(t.vec_dot_type, kN);
  Aligned scratch(t.tile_scratch_bytes(kN, kActs));
  std::vector<float> out(kActs * kRows);
  t.tile(kN, w.data(), w_bytes, kRows, a.data(), a_bytes, kActs, out.data(), kRows,
         scratch.data.get(), nullptr);
  for (int64_t i = 0; i < kActs; ++i) {
    for (int64_t r = 0; r < kRows; ++r) {
      const float want = t.vec_dot_scalar(kN, w.data() + r * w_bytes, a.data() + i * a_bytes);
      ASSERT_EQ(std::memcmp(&out[i * kRows + r], &want, 4), 0) << "act " << i << " row " << r;
    }
  }
}

// MatMulRowRange takes the tile for many activation rows; an unaligned row range must still give
// every row's single-row bits and leave the rows outside the range alone.
TEST_P(TileTest, MatMulRowRangeThroughTilesMatchesSingleRows) {
  const TypeTraits& t = GetTypeTraits(GetParam());
  std::mt19937 rng(99);
  constexpr int64_t kN = 1024, kRows = 48, kActs = 20;
  const std::vector<uint8_t> w_bytes = MakeWeights(t.type, kRows, kN, Fill::kQuantized, &rng);
  const std::vector<uint8_t> a = MakeActivations(t.vec_dot_type, kActs, kN, Fill::kQuantized, &rng);
  WeightMatrix w;
  w.type = t.type;
  w.cols = kN;
  w.rows = kRows;
  w.row_bytes = RowBytes(t.type, kN);
  w.data = w_bytes.data();
  const size_t a_bytes = RowBytes(t.vec_dot_type, kN);
  const std::vector<Q8_0BlockSum> sums = BlockSums(t.vec_dot_type, a, kActs, kN);
  const RowsView x{t.vec_dot_type, a.data(), a_bytes, kActs, sums.empty() ? nullptr : sums.data()};
  std::vector<float> y(kActs * kRows, 7.0f);
  MatMulRowRange(w, x, 3, 42, y.data(), kRows);
  for (int64_t i = 0; i < kActs; ++i) {
    for (int64_t r = 0; r < kRows; ++r) {
      const float got = y[i * kRows + r];
      if (r < 3 || r >= 42) {
        ASSERT_EQ(got, 7.0f) << "row " << r << " is outside the range";
        continue;
      }
      const float want = t.vec_dot(kN, w.Row(r), a.data() + i * a_bytes);
      ASSERT_EQ(std::memcmp(&got, &want, 4), 0) << "act " << i << " row " << r;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Types, TileTest,
                         ::testing::Values(TensorType::kQ4_K, TensorType::kQ5_K, TensorType::kQ6_K,
                                           TensorType::kQ8_0),
                         [](const auto& info) {
                           return std::string(GetTypeTraits(info.param).name);
                         });

}  // namespace
}  // namespace moepool
