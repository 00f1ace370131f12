// Scalar host references of the CUDA kernels (expert_kernels.h), built with and without CUDA.
#include <cmath>
#include <cstdint>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/cuda/expert_kernels.h"
#include "engine/cuda/expert_math.h"
#include "engine/cuda/quant_matmul_ref.h"

namespace moepool::cuda {
namespace {

absl::Status RefMatMul(const MatrixRef& w, const float* x, int64_t m, float* y) {
  if (!BlockMathSupports(w.type)) {
    return absl::UnimplementedError(
        absl::StrCat("no block maths for weight type ", static_cast<uint32_t>(w.type)));
  }
  QuantMatMulReference(w.type, w.data, w.rows, w.cols, x, y, m);
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
      for (int64_t i = 0; i < head_dim; ++i) dot += qh[i] * HalfToFloat(k[i]);
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
      for (int64_t i = 0; i < head_dim; ++i) o[i] += w * HalfToFloat(v[i]);
    }
  }
}

void RefRopeRows(float* x, int64_t row_stride, int64_t n, int64_t n_heads, int64_t head_dim,
                 int64_t n_rot, float base, const int64_t* pos) {
  for (int64_t r = 0; r < n; ++r)
    RefRope(x + r * row_stride, n_heads, head_dim, n_rot, pos[r], base);
}

void RefStoreKvRows(const KvRowRef* rows, int64_t n, int64_t layer, int64_t kv_dim, const float* k,
                    const float* v) {
  for (int64_t r = 0; r < n; ++r) {
    const size_t at = RowKvOffset(rows[r], layer, kv_dim);
    for (int64_t i = 0; i < kv_dim; ++i) {
      rows[r].k[at + static_cast<size_t>(i)] = FloatToHalf(k[r * kv_dim + i]);
      rows[r].v[at + static_cast<size_t>(i)] = FloatToHalf(v[r * kv_dim + i]);
    }
  }
}

void RefAttentionRows(const float* q, const KvRowRef* rows, int64_t n, int64_t layer,
                      int64_t n_head, int64_t n_head_kv, int64_t head_dim, float scale,
                      float* out) {
  const int64_t width = n_head * head_dim;
  for (int64_t r = 0; r < n; ++r) {
    RefAttentionDecode(q + r * width, n_head, n_head_kv, head_dim,
                       RowKvView(rows[r], layer, n_head_kv * head_dim), scale, out + r * width);
  }
}

}  // namespace moepool::cuda
