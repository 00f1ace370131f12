// Scalar host references of the CUDA kernels (expert_kernels.h), built with and without CUDA.
#include <cmath>
#include <cstdint>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/cuda/expert_kernels.h"
#include "engine/cuda/expert_math.h"

namespace moepool::cuda {
namespace {

using ChunkFn = void (*)(const uint8_t* row, int64_t c, float* out);

ChunkFn ChunkFnFor(TensorType t) {
  switch (t) {
#define MOEPOOL_REF_CASE(NAME) \
  case TensorType::NAME:       \
    return &DequantChunk32<TensorType::NAME>;
    MOEPOOL_REF_CASE(kF32)
    MOEPOOL_REF_CASE(kF16)
    MOEPOOL_REF_CASE(kBF16)
    MOEPOOL_REF_CASE(kQ4_0)
    MOEPOOL_REF_CASE(kQ4_1)
    MOEPOOL_REF_CASE(kQ5_0)
    MOEPOOL_REF_CASE(kQ5_1)
    MOEPOOL_REF_CASE(kQ8_0)
    MOEPOOL_REF_CASE(kQ2_K)
    MOEPOOL_REF_CASE(kQ3_K)
    MOEPOOL_REF_CASE(kQ4_K)
    MOEPOOL_REF_CASE(kQ5_K)
    MOEPOOL_REF_CASE(kQ6_K)
#undef MOEPOOL_REF_CASE
    default:
      return nullptr;
  }
}

// y [m x w.rows] = x w^T with the weights dequantized chunk by chunk.
absl::Status RefMatMul(const MatrixRef& w, const float* x, int64_t m, float* y) {
  const ChunkFn chunk = ChunkFnFor(w.type);
  if (chunk == nullptr || w.cols % kChunk != 0) {
    return absl::UnimplementedError(
        absl::StrCat("no chunk maths for weight type ", static_cast<uint32_t>(w.type)));
  }
  std::vector<float> row(static_cast<size_t>(w.cols));
  for (int64_t r = 0; r < w.rows; ++r) {
    const auto* src = static_cast<const uint8_t*>(w.data) + static_cast<size_t>(r) * w.row_bytes;
    for (int64_t c = 0; c < w.cols / kChunk; ++c) chunk(src, c, row.data() + c * kChunk);
    for (int64_t t = 0; t < m; ++t) {
      const float* xt = x + t * w.cols;
      float dot = 0.0f;
      for (int64_t i = 0; i < w.cols; ++i) dot += row[static_cast<size_t>(i)] * xt[i];
      y[t * w.rows + r] = dot;
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status RefExpertFfn(const MatrixRef& gate, const MatrixRef& up, const MatrixRef& down,
                          const float* x, int64_t m, float* out) {
  std::vector<float> g(static_cast<size_t>(m * gate.rows));
  std::vector<float> u(g.size());
  if (absl::Status s = RefMatMul(gate, x, m, g.data()); !s.ok()) return s;
  if (absl::Status s = RefMatMul(up, x, m, u.data()); !s.ok()) return s;
  for (size_t i = 0; i < g.size(); ++i) g[i] = SiluMul(g[i], u[i]);
  return RefMatMul(down, g.data(), m, out);
}

void RefRmsNorm(const float* x, const float* w, int64_t n, int64_t d, float eps, float* y) {
  for (int64_t r = 0; r < n; ++r) {
    const float* xr = x + r * d;
    double sum = 0.0;
    for (int64_t i = 0; i < d; ++i) sum += static_cast<double>(xr[i]) * xr[i];
    const float mean = static_cast<float>(sum / static_cast<double>(d));
    const float scale = 1.0f / std::sqrt(mean + eps);
    for (int64_t i = 0; i < d; ++i) y[r * d + i] = (xr[i] * scale) * w[i];
  }
}

void RefRope(float* x, int64_t n_heads, int64_t head_dim, int64_t n_rot, int64_t pos, float base) {
  const float theta_scale = std::pow(base, -2.0f / static_cast<float>(n_rot));
  for (int64_t h = 0; h < n_heads; ++h) {
    for (int64_t p = 0; p < n_rot / 2; ++p) {
      float* v = x + h * head_dim + 2 * p;
      RopeRotate(RopeTheta(pos, theta_scale, p), &v[0], &v[1]);
    }
  }
}

void RefRouteTopK(const float* logits, int64_t n_rows, int n_expert, int k, int32_t* expert,
                  float* weight) {
  for (int64_t r = 0; r < n_rows; ++r) {
    RouteRow(logits + r * n_expert, n_expert, k, expert + r * k, weight + r * k);
  }
}

void RefAttentionDecode(const float* q, int64_t n_head, int64_t n_head_kv, int64_t head_dim,
                        const KvDeviceView& kv, float scale, float* out) {
  const int64_t group = n_head / n_head_kv;
  std::vector<float> score(static_cast<size_t>(kv.n_kv));
  auto row = [&](const uint16_t* base, int64_t p) {
    return base + static_cast<size_t>(kv.blocks[p / kv.block_size]) * kv.block_stride +
           static_cast<size_t>(p % kv.block_size) * kv.stride;
  };
  for (int64_t h = 0; h < n_head; ++h) {
    const float* qh = q + h * head_dim;
    const int64_t off = (h / group) * head_dim;
    float mx = -INFINITY;
    for (int64_t p = 0; p < kv.n_kv; ++p) {
      const uint16_t* k = row(kv.k, p) + off;
      float dot = 0.0f;
      for (int64_t i = 0; i < head_dim; ++i) dot += qh[i] * HalfBitsToF32(k[i]);
      score[static_cast<size_t>(p)] = dot * scale;
      mx = std::fmax(mx, score[static_cast<size_t>(p)]);
    }
    float sum = 0.0f;
    for (float& s : score) {
      s = std::exp(s - mx);
      sum += s;
    }
    const float inv = 1.0f / sum;
    float* o = out + h * head_dim;
    for (int64_t i = 0; i < head_dim; ++i) o[i] = 0.0f;
    for (int64_t p = 0; p < kv.n_kv; ++p) {
      const uint16_t* v = row(kv.v, p) + off;
      const float w = score[static_cast<size_t>(p)] * inv;
      for (int64_t i = 0; i < head_dim; ++i) o[i] += w * HalfBitsToF32(v[i]);
    }
  }
}

}  // namespace moepool::cuda
