// Per-element maths of the CUDA expert, norm, rope and router kernels, shared by the device
// kernels and their scalar host references (and tested on the CPU in every build). The weight
// block maths lives in block_math.h (whose MOEPOOL_HD marks these functions too).
//
// Plain header: compiles as C++ (host only) and as CUDA (__host__ __device__).
// Everything here is a pure function of its arguments (thread-safe).
#ifndef MOEPOOL_ENGINE_CUDA_EXPERT_MATH_H_
#define MOEPOOL_ENGINE_CUDA_EXPERT_MATH_H_

#include <cmath>
#include <cstdint>

#include "engine/cuda/block_math.h"
#include "engine/cuda/expert_kernels.h"
#include "engine/swiglu_math.h"

namespace moepool::cuda {

inline constexpr int kMaxRouted = 64;  // the router kernel handles up to this many experts

// SiLU(g) * u, the SwiGLU gate: the CPU engine's own arithmetic (engine/swiglu_math.h).
MOEPOOL_HD float SiluMul(float g, float u) { return swiglu::SiluMul(g, u); }

// RoPE angle of pair `pair` (elements 2 pair, 2 pair + 1) at position `pos`: theta starts at
// pos and is multiplied by theta_scale = base^(-2 / n_rot) once per pair, in the same order as
// ApplyRope, so host and device see the same angle.
MOEPOOL_HD float RopeTheta(int64_t pos, float theta_scale, int64_t pair) {
  float theta = static_cast<float>(pos);
  for (int64_t i = 0; i < pair; ++i) theta *= theta_scale;
  return theta;
}

// Rotates (a, b) by theta (llama / GGUF convention: adjacent pairs).
MOEPOOL_HD void RopeRotate(float theta, float* a, float* b) {
  const float c = cosf(theta);
  const float s = sinf(theta);
  const float x = *a;
  const float y = *b;
  *a = SubRn(MulRn(x, c), MulRn(y, s));
  *b = AddRn(MulRn(x, s), MulRn(y, c));
}

// Mixtral routing of one row (RouteTopK's algorithm and evaluation order): softmax over
// n_expert <= kMaxRouted logits (f32 exp, f64 sum), the k largest (ties: lower id), renormalised,
// in ascending expert id.
MOEPOOL_HD void RouteRow(const float* logits, int n_expert, int k, int32_t* expert, float* weight) {
  float prob[kMaxRouted];
  bool taken[kMaxRouted];
  float mx = logits[0];
  for (int e = 1; e < n_expert; ++e) mx = logits[e] > mx ? logits[e] : mx;
  double sum = 0.0;
  for (int e = 0; e < n_expert; ++e) {
    prob[e] = expf(logits[e] - mx);
    sum += prob[e];
    taken[e] = false;
  }
  const float inv = static_cast<float>(1.0 / sum);
  for (int e = 0; e < n_expert; ++e) prob[e] *= inv;
  for (int j = 0; j < k; ++j) {
    int best = -1;
    for (int e = 0; e < n_expert; ++e) {
      if (!taken[e] && (best < 0 || prob[e] > prob[best])) best = e;
    }
    taken[best] = true;
  }
  float wsum = 0.0f;
  for (int e = 0; e < n_expert; ++e) {
    if (taken[e]) wsum += prob[e];
  }
  int j = 0;
  for (int e = 0; e < n_expert; ++e) {
    if (!taken[e]) continue;
    expert[j] = e;
    weight[j] = prob[e] / wsum;
    ++j;
  }
}

// Position p's kv_dim-wide row in a paged view; base is kv.k or kv.v.
MOEPOOL_HD const uint16_t* KvRowAt(const uint16_t* base, const KvDeviceView& kv, int64_t p) {
  return base + static_cast<size_t>(kv.blocks[p / kv.block_size]) * kv.block_stride +
         static_cast<size_t>(p % kv.block_size) * kv.stride;
}

// The view of one batch row's K/V in `layer` over its positions 0 .. row.pos.
MOEPOOL_HD KvDeviceView RowKvView(const KvRowRef& row, int64_t layer, int64_t kv_dim) {
  KvDeviceView view;
  view.k = row.k + static_cast<size_t>(layer) * row.layer_stride;
  view.v = row.v + static_cast<size_t>(layer) * row.layer_stride;
  view.blocks = row.blocks;
  view.block_size = row.block_size;
  view.block_stride = row.block_stride;
  view.stride = static_cast<size_t>(kv_dim);
  view.n_kv = row.pos + 1;
  return view;
}

// Element offset of the row's own position in `layer` from row.k / row.v (where its K/V go).
MOEPOOL_HD size_t RowKvOffset(const KvRowRef& row, int64_t layer, int64_t kv_dim) {
  return static_cast<size_t>(row.blocks[row.pos / row.block_size]) * row.block_stride +
         static_cast<size_t>(layer) * row.layer_stride +
         static_cast<size_t>(row.pos % row.block_size) * static_cast<size_t>(kv_dim);
}

// ---- Tiled attention (AttentionTileKernel / RefAttentionTiles): each query's online softmax
// over its positions in fixed splits of kAttnSplit positions, visited in steps of
// AttnStepPositions(head_dim), then the splits merged in ascending order. Every step below is a
// function of one query's own data, so a row's bits never depend on the rows it is batched with.

// q . k over head_dim (k in half), fused multiply-adds in ascending order, times scale.
MOEPOOL_HD float AttnScore(const float* q, const uint16_t* k, int64_t head_dim, float scale) {
  float dot = 0.0f;
  for (int64_t i = 0; i < head_dim; ++i) dot = fmaf(q[i], HalfToFloat(k[i]), dot);
  return MulRn(dot, scale);
}

// One step of a query's online softmax: p[0 .. n) holds scores (-inf where masked) and becomes
// exp(score - m') with m' the new running max; *m and *l (running max and sum) are updated.
// Returns the factor by which the query's accumulated output must be scaled (exp(m - m'); 1 when
// nothing is unmasked yet, so that a fully masked step changes nothing).
MOEPOOL_HD float AttnSoftmaxStep(float* p, int n, float* m, float* l) {
  float mx = *m;
  for (int i = 0; i < n; ++i) mx = p[i] > mx ? p[i] : mx;
  if (mx == -INFINITY) {
    for (int i = 0; i < n; ++i) p[i] = 0.0f;
    return 1.0f;
  }
  const float factor = *m == -INFINITY ? 0.0f : expf(*m - mx);
  float sum = 0.0f;
  for (int i = 0; i < n; ++i) {
    p[i] = p[i] == -INFINITY ? 0.0f : expf(p[i] - mx);
    sum = AddRn(sum, p[i]);
  }
  *l = fmaf(*l, factor, sum);
  *m = mx;
  return factor;
}

// acc * factor + sum_i p[i] v[i * v_stride] in ascending i (fused multiply-adds).
MOEPOOL_HD float AttnAccumulate(float acc, float factor, const float* p, const uint16_t* v,
                                int64_t v_stride, int n) {
  acc = MulRn(acc, factor);
  for (int i = 0; i < n; ++i) acc = fmaf(p[i], HalfToFloat(v[i * v_stride]), acc);
  return acc;
}

// Output element d of a query from its n_splits partials (each [head_dim accumulators, m, l] at
// partial + s * (head_dim + 2)), merged in ascending split order.
MOEPOOL_HD float AttnMerge(const float* partial, int64_t n_splits, int64_t head_dim, int64_t d) {
  const int64_t stride = head_dim + 2;
  float mx = -INFINITY;
  for (int64_t s = 0; s < n_splits; ++s) {
    const float m = partial[s * stride + head_dim];
    mx = m > mx ? m : mx;
  }
  float l = 0.0f, o = 0.0f;
  for (int64_t s = 0; s < n_splits; ++s) {
    const float* ps = partial + s * stride;
    const float w = expf(ps[head_dim] - mx);
    l = fmaf(ps[head_dim + 1], w, l);
    o = fmaf(ps[d], w, o);
  }
  return o / l;
}

}  // namespace moepool::cuda

#endif  // MOEPOOL_ENGINE_CUDA_EXPERT_MATH_H_
