// AVX512-VNNI matmul tiles for Q8_0 weights against Q8_0 activations: 16 weight rows x up to 8
// activation rows per inner loop (see tile_k_vnni.cc for the k-quants). Compiled with the VNNI
// flags (engine/CMakeLists.txt, *_vnni.cc).
//
// vpdpbusd multiplies unsigned by signed bytes, so the activations are biased once per call into
// `scratch` (a + 128, unsigned) and the weights stay signed: sum((a + 128) w) = sum(a w) +
// 128 sum(w), and 128 sum(w) per row and block is subtracted again (exact integers). Per 16
// weight rows and block the scratch holds the 8 vectors of quants (vector k, lane r = bytes
// 4k .. 4k + 3 of row r), the half scales as floats and the correction. The floats then follow
// block_numerics.h: eight lane accumulators by block index mod 8, summed in the fixed tree.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "engine/quant/block_numerics.h"
#include "engine/quant/fp16.h"
#include "engine/quant/kernels.h"
#include "engine/quant/tile_vnni_internal.h"
#include "engine/quant/types.h"

namespace moepool::kernels {
namespace {

using tile::ForEachColumnGroup;
using tile::PrefetchPart;
using tile::Transpose16x16;

constexpr int kWords = kQK8_0 / 4;  // 4-byte groups per block

// Activation rows biased per pass: bounds the scratch (256 rows of 4096 elements: 1.1 MiB).
constexpr int64_t kMaxBiasedRows = 256;

// One repacked block of 16 rows.
struct alignas(64) PackedBlock {
  __m512i quants[kWords];
  __m512 d;
  __m512i correction;  // 128 * sum of the row's quants
};

// The activation rows, biased to unsigned bytes, and their scales as floats.
struct BiasedActivations {
  uint8_t* quants;  // [n_act x nb x 32]
  float* d;         // [n_act x nb]
};

size_t PackedBytes(int64_t nb) { return static_cast<size_t>(nb) * sizeof(PackedBlock); }

// Repacks `rows` (<= 16) rows of nb blocks, two blocks (16 words) per transpose.
void PackRows(int64_t nb, const uint8_t* w, size_t w_stride, int rows, PackedBlock* packed) {
  alignas(64) uint8_t u[kTileRows][2 * kQK8_0] = {};
  alignas(64) float d[kTileRows] = {};
  for (int64_t b = 0; b < nb; b += 2) {
    const int blocks = b + 1 < nb ? 2 : 1;
    for (int h = 0; h < blocks; ++h) {
      for (int r = 0; r < rows; ++r) {
        const auto& x = reinterpret_cast<const BlockQ8_0*>(w + r * w_stride)[b + h];
        std::memcpy(u[r] + kQK8_0 * h, x.qs, kQK8_0);
        d[r] = Fp16ToFp32(x.d);
      }
      packed[b + h].d = _mm512_load_ps(d);
    }
    __m512i v[16];
    for (int r = 0; r < 16; ++r) v[r] = _mm512_load_si512(u[r]);
    Transpose16x16(v);
    const __m512i ones = _mm512_set1_epi8(1);
    for (int h = 0; h < blocks; ++h) {
      __m512i sum = _mm512_setzero_si512();
      for (int k = 0; k < kWords; ++k) {
        packed[b + h].quants[k] = v[kWords * h + k];
        sum = _mm512_dpbusd_epi32(sum, ones, v[kWords * h + k]);
      }
      packed[b + h].correction = _mm512_slli_epi32(sum, 7);
    }
  }
}

void BiasActivations(int64_t nb, const uint8_t* a, size_t a_stride, int64_t n_act,
                     BiasedActivations out) {
  const __m256i bias = _mm256_set1_epi8(static_cast<char>(0x80));
  for (int64_t t = 0; t < n_act; ++t) {
    const auto* y = reinterpret_cast<const BlockQ8_0*>(a + t * a_stride);
    uint8_t* q = out.quants + t * nb * kQK8_0;
    for (int64_t b = 0; b < nb; ++b) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y[b].qs));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + b * kQK8_0), _mm256_xor_si256(v, bias));
      out.d[t * nb + b] = Fp16ToFp32(y[b].d);
    }
  }
}

inline __attribute__((always_inline)) __m512i Broadcast32(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// kCols activation rows (starting at row t of `acts`) against the packed rows.
template <int kCols>
void TileColumns(int64_t nb, const PackedBlock* packed, const BiasedActivations& acts, int64_t t,
                 __mmask16 rows, float* out, int64_t out_stride) {
  __m512 lanes[kCols][kQ8_0Lanes];
  MOEPOOL_TILE_UNROLL
  for (int c = 0; c < kCols; ++c) {
    for (int k = 0; k < kQ8_0Lanes; ++k) lanes[c][k] = _mm512_setzero_ps();
  }
  for (int64_t b = 0; b < nb; ++b) {
    const PackedBlock& pb = packed[b];
    __m512i q[kWords];
    MOEPOOL_TILE_UNROLL
    for (int k = 0; k < kWords; ++k) q[k] = _mm512_load_si512(&pb.quants[k]);
    MOEPOOL_TILE_UNROLL
    for (int c = 0; c < kCols; ++c) {
      const uint8_t* a = acts.quants + ((t + c) * nb + b) * kQK8_0;
      __m512i dot = _mm512_setzero_si512();
      MOEPOOL_TILE_UNROLL
      for (int k = 0; k < kWords; ++k) dot = _mm512_dpbusd_epi32(dot, Broadcast32(a + 4 * k), q[k]);
      const __m512 sums = _mm512_cvtepi32_ps(_mm512_sub_epi32(dot, pb.correction));
      const __m512 scale = _mm512_mul_ps(pb.d, _mm512_set1_ps(acts.d[(t + c) * nb + b]));
      __m512& lane = lanes[c][b % kQ8_0Lanes];
      lane = _mm512_fmadd_ps(scale, sums, lane);
    }
  }
  MOEPOOL_TILE_UNROLL
  for (int c = 0; c < kCols; ++c) {
    const __m512* l = lanes[c];
    const __m512 sum =
        _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(l[0], l[4]), _mm512_add_ps(l[2], l[6])),
                      _mm512_add_ps(_mm512_add_ps(l[1], l[5]), _mm512_add_ps(l[3], l[7])));
    _mm512_mask_storeu_ps(out + c * out_stride, rows, sum);
  }
}

}  // namespace

size_t TileScratchBytesQ8_0(int64_t n, int64_t n_act) {
  const int64_t nb = n / kQK8_0;
  const int64_t biased = std::min<int64_t>(n_act, kMaxBiasedRows);
  return PackedBytes(nb) + static_cast<size_t>(biased * nb) * (kQK8_0 + sizeof(float));
}

void TileQ8_0Vnni(int64_t n, const uint8_t* w, size_t w_stride, int64_t rows, const uint8_t* a,
                  size_t a_stride, int64_t n_act, float* out, int64_t out_stride, void* scratch) {
  const int64_t nb = n / kQK8_0;
  auto* packed = static_cast<PackedBlock*>(scratch);
  uint8_t* after = static_cast<uint8_t*>(scratch) + PackedBytes(nb);
  const int64_t chunk = std::min<int64_t>(n_act, kMaxBiasedRows);
  const BiasedActivations acts{after, reinterpret_cast<float*>(after + chunk * nb * kQK8_0)};
  // At most kMaxBiasedRows activation rows are biased at a time (the scratch stays bounded for
  // long prompts); the weight rows are packed again for each such chunk.
  for (int64_t t0 = 0; t0 < n_act; t0 += kMaxBiasedRows) {
    const int64_t m = std::min<int64_t>(kMaxBiasedRows, n_act - t0);
    BiasActivations(nb, a + t0 * a_stride, a_stride, m, acts);
    float* out_chunk = out + t0 * out_stride;
    for (int64_t r = 0; r < rows; r += kTileRows) {
      const int tile_rows = static_cast<int>(std::min<int64_t>(kTileRows, rows - r));
      const uint8_t* wr = w + r * w_stride;
      PackRows(nb, wr, w_stride, tile_rows, packed);
      const __mmask16 mask = static_cast<__mmask16>((1u << tile_rows) - 1);
      const char* next = reinterpret_cast<const char*>(wr + tile_rows * w_stride);
      ForEachColumnGroup(m, [&]<int kCols>(int64_t t, int64_t group, int64_t n_groups) {
        PrefetchPart(next, kTileRows * w_stride, group, n_groups);
        TileColumns<kCols>(nb, packed, acts, t, mask, out_chunk + r + t * out_stride, out_stride);
      });
    }
  }
}

}  // namespace moepool::kernels
