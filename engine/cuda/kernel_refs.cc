// Scalar host references of the CUDA kernels (expert_kernels.h), built with and without CUDA.
#include <algorithm>
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
  for (int64_t h = 0; h < n_head; ++h) {
    const float* qh = q + h * head_dim;
    const int64_t off = (h / group) * head_dim;
    float mx = -INFINITY;
    for (int64_t p = 0; p < kv.n_kv; ++p) {
      const uint16_t* k = KvRowAt(kv.k, kv, p) + off;
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
      const uint16_t* v = KvRowAt(kv.v, kv, p) + off;
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

absl::Status CheckAttentionShape(int64_t n_head, int64_t n_head_kv, int64_t head_dim) {
  if (n_head_kv <= 0 || n_head % n_head_kv != 0 || head_dim <= 0 || head_dim > 256 ||
      AttnTileRows(n_head / n_head_kv, head_dim) < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the attention kernel takes head sizes up to 256 and up to ",
        AttnMaxQueries(std::max<int64_t>(head_dim, 1)), " query heads per KV head; this model has ",
        n_head, " query heads over ", n_head_kv, " KV heads of size ", head_dim));
  }
  return absl::OkStatus();
}

// The kernel's blocks one after another, each with its (query, dimension) elements in order.
void RefAttentionTiles(const float* q, const KvRowRef* rows, const AttnTile* tiles, int64_t n_tiles,
                       int64_t r0, int64_t n_rows, int64_t layer, int64_t n_head, int64_t n_head_kv,
                       int64_t head_dim, float scale, int64_t n_splits, float* partial,
                       float* out) {
  const int64_t hd = head_dim, group = n_head / n_head_kv, width = n_head * hd;
  const int64_t step = AttnStepPositions(hd);
  std::vector<float> p(static_cast<size_t>(step)), acc(static_cast<size_t>(hd));
  std::vector<uint16_t> v(static_cast<size_t>(step * hd));
  for (int64_t t = 0; t < n_tiles; ++t) {
    const AttnTile tile = tiles[t];
    const int64_t last_pos = rows[tile.first + tile.count - 1].pos;
    const KvDeviceView kv = RowKvView(rows[tile.first], layer, n_head_kv * hd);
    for (int64_t g = 0; g < n_head_kv; ++g) {
      for (int64_t s0 = 0; s0 <= last_pos; s0 += kAttnSplit) {
        const int64_t s1 = std::min(s0 + kAttnSplit, last_pos + 1);
        const int64_t split = s0 / kAttnSplit;
        for (int64_t qi = 0; qi < tile.count * group; ++qi) {
          const int64_t row = tile.first + qi / group, head = g * group + qi % group;
          if (rows[row].pos < s0) continue;  // the split is beyond the query: not merged
          const float* qv = q + row * width + head * hd;
          float m = -INFINITY, l = 0.0f;
          std::fill(acc.begin(), acc.end(), 0.0f);
          for (int64_t p0 = s0; p0 < s1; p0 += step) {
            const int np = static_cast<int>(std::min(step, s1 - p0));
            for (int i = 0; i < np; ++i) {
              const uint16_t* k = KvRowAt(kv.k, kv, p0 + i) + g * hd;
              p[static_cast<size_t>(i)] =
                  p0 + i <= rows[row].pos ? AttnScore(qv, k, hd, scale) : -INFINITY;
            }
            const float factor = AttnSoftmaxStep(p.data(), np, &m, &l);
            for (int i = 0; i < np; ++i) {  // the step's V [np x hd], as the kernel stages it
              const uint16_t* src = KvRowAt(kv.v, kv, p0 + i) + g * hd;
              std::copy(src, src + hd, v.begin() + i * hd);
            }
            for (int64_t d = 0; d < hd; ++d) {
              acc[static_cast<size_t>(d)] =
                  AttnAccumulate(acc[static_cast<size_t>(d)], factor, p.data(), &v[d], hd, np);
            }
          }
          float* dst = partial + (((row - r0) * n_head + head) * n_splits + split) * (hd + 2);
          std::copy(acc.begin(), acc.end(), dst);
          dst[hd] = m;
          dst[hd + 1] = l;
        }
      }
    }
  }
  for (int64_t r = 0; r < n_rows; ++r) {
    const int64_t splits = rows[r0 + r].pos / kAttnSplit + 1;
    for (int64_t h = 0; h < n_head; ++h) {
      const float* base = partial + (r * n_head + h) * n_splits * (hd + 2);
      for (int64_t d = 0; d < hd; ++d) {
        out[(r0 + r) * width + h * hd + d] = AttnMerge(base, splits, hd, d);
      }
    }
  }
}

}  // namespace moepool::cuda
