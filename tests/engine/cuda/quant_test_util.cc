#include "tests/engine/cuda/quant_test_util.h"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <random>

#include "engine/quant/fp16.h"

namespace moepool::cuda {
namespace {

// Byte offsets of the half-float scale fields of a block (-1: none).
struct ScaleFields {
  int offset[2] = {-1, -1};
};

ScaleFields ScaleFieldsOf(TensorType type) {
  switch (type) {
    case TensorType::kQ4_0:
      return {{offsetof(BlockQ4_0, d), -1}};
    case TensorType::kQ4_1:
      return {{offsetof(BlockQ4_1, d), offsetof(BlockQ4_1, m)}};
    case TensorType::kQ5_0:
      return {{offsetof(BlockQ5_0, d), -1}};
    case TensorType::kQ5_1:
      return {{offsetof(BlockQ5_1, d), offsetof(BlockQ5_1, m)}};
    case TensorType::kQ8_0:
      return {{offsetof(BlockQ8_0, d), -1}};
    case TensorType::kQ2_K:
      return {{offsetof(BlockQ2_K, d), offsetof(BlockQ2_K, dmin)}};
    case TensorType::kQ3_K:
      return {{offsetof(BlockQ3_K, d), -1}};
    case TensorType::kQ4_K:
      return {{offsetof(BlockQ4_K, d), offsetof(BlockQ4_K, dmin)}};
    case TensorType::kQ5_K:
      return {{offsetof(BlockQ5_K, d), offsetof(BlockQ5_K, dmin)}};
    case TensorType::kQ6_K:
      return {{offsetof(BlockQ6_K, d), -1}};
    default:
      return {};
  }
}

void PutU16(uint8_t* p, uint16_t v) { std::memcpy(p, &v, 2); }

}  // namespace

std::vector<TensorType> KernelTypes() {
  return {TensorType::kF32,  TensorType::kF16,  TensorType::kBF16, TensorType::kQ4_0,
          TensorType::kQ4_1, TensorType::kQ5_0, TensorType::kQ5_1, TensorType::kQ8_0,
          TensorType::kQ2_K, TensorType::kQ3_K, TensorType::kQ4_K, TensorType::kQ5_K,
          TensorType::kQ6_K};
}

std::vector<uint8_t> RandomWeights(TensorType type, int64_t rows, int64_t cols, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 0.05f);
  const int64_t count = rows * cols;
  std::vector<uint8_t> out(RowBytes(type, cols) * static_cast<size_t>(rows));
  if (type == TensorType::kF32) {
    for (int64_t i = 0; i < count; ++i) {
      const float v = normal(rng);
      std::memcpy(out.data() + 4 * i, &v, 4);
    }
    return out;
  }
  if (type == TensorType::kF16 || type == TensorType::kBF16) {
    for (int64_t i = 0; i < count; ++i) {
      const float v = normal(rng);
      PutU16(out.data() + 2 * i, type == TensorType::kF16 ? Fp32ToFp16(v) : Fp32ToBf16(v));
    }
    return out;
  }
  std::uniform_int_distribution<int> byte(0, 255);
  for (uint8_t& b : out) b = static_cast<uint8_t>(byte(rng));
  const TypeTraits& traits = GetTypeTraits(type);
  const ScaleFields fields = ScaleFieldsOf(type);
  std::uniform_real_distribution<float> scale(0.0005f, 0.02f);
  const size_t blocks = out.size() / traits.block_bytes;
  for (size_t b = 0; b < blocks; ++b) {
    for (int f = 0; f < 2; ++f) {
      if (fields.offset[f] < 0) continue;
      const float v = (byte(rng) & 1 ? -1.0f : 1.0f) * scale(rng);
      PutU16(out.data() + b * traits.block_bytes + fields.offset[f], Fp32ToFp16(v));
    }
  }
  return out;
}

std::vector<float> RandomActivations(int64_t n, int64_t cols, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(static_cast<size_t>(n * cols));
  for (float& v : x) v = normal(rng);
  return x;
}

ExactDot DotF64(const float* w, const float* x, int64_t n) {
  ExactDot d;
  for (int64_t i = 0; i < n; ++i) {
    const double p = static_cast<double>(w[i]) * x[i];
    d.value += p;
    d.abs_sum += std::fabs(p);
  }
  return d;
}

std::vector<float> EngineMatMul(TensorType type, const uint8_t* w, int64_t rows, int64_t cols,
                                const float* x, int64_t n) {
  const TypeTraits& traits = GetTypeTraits(type);
  const TensorType act_type = traits.vec_dot_type;
  const size_t w_row_bytes = RowBytes(type, cols);
  std::vector<float> y(static_cast<size_t>(n * rows));
  std::vector<uint8_t> converted(RowBytes(act_type, cols));
  for (int64_t t = 0; t < n; ++t) {
    const void* a = x + t * cols;
    if (act_type != TensorType::kF32) {
      GetTypeTraits(act_type).quantize(x + t * cols, converted.data(), cols);
      a = converted.data();
    }
    for (int64_t r = 0; r < rows; ++r) {
      y[t * rows + r] = traits.vec_dot(cols, w + r * w_row_bytes, a);
    }
  }
  return y;
}

double EngineTolerance(TensorType type, const float* w_dense, const float* x, int64_t cols) {
  const TensorType act_type = GetTypeTraits(type).vec_dot_type;
  const ExactDot exact = DotF64(w_dense, x, cols);
  double tol = 2 * kF32AccumulationTolerance * exact.abs_sum;
  if (act_type == TensorType::kF32) return tol;
  const int64_t block = GetTypeTraits(act_type).block_size;
  double variance = 0;   // of sum w_i (q8(x_i) - x_i), rounding errors uniform in +-step/2
  double scale_err = 0;  // the activation scale (and Q8_1's block sum) stored as f16
  for (int64_t b0 = 0; b0 < cols; b0 += block) {
    float amax = 0, wmax = 0;
    double xsum = 0;
    for (int64_t i = b0; i < b0 + block; ++i) {
      amax = std::max(amax, std::fabs(x[i]));
      wmax = std::max(wmax, std::fabs(w_dense[i]));
      xsum += x[i];
    }
    const double step = amax / 127.0;
    for (int64_t i = b0; i < b0 + block; ++i) {
      variance += static_cast<double>(w_dense[i]) * w_dense[i] * step * step / 12.0;
      scale_err += std::fabs(static_cast<double>(w_dense[i]) * x[i]) / 1024.0;
    }
    scale_err += wmax * std::fabs(xsum) / 1024.0;
  }
  return tol + 6.0 * std::sqrt(variance) + scale_err;
}

}  // namespace moepool::cuda
