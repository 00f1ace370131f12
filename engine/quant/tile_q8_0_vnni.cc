// AVX512-VNNI matmul tiles for Q8_0 weights against Q8_0 activations: 16 weight rows x up to 8
// activation rows per inner loop (see tile_k_vnni.cc for the k-quants). Compiled with the VNNI
// flags (engine/CMakeLists.txt, *_vnni.cc).
//
// vpdpbusd multiplies unsigned by signed bytes, so the weights are packed unsigned (w + 128, an
// exclusive or with 0x80 while repacking) and the activations stay signed, read straight from
// their Q8_0 blocks: sum((w + 128) a) = sum(w a) + 128 sum(a), and 128 sum(a) per activation row
// and block (exact integers: from ConvertRows, once per matmul, or computed here) starts each
// block's accumulator negated.
// Per 16 weight rows and block the scratch holds the 8 vectors of quants (vector k, lane r =
// bytes 4k .. 4k + 3 of row r) and the half scales as floats (the activations' scales are
// converted as they are read). The floats then follow
// block_numerics.h: eight lane accumulators by block index mod 8, summed in the fixed tree.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "engine/quant/block_numerics.h"
#include "engine/quant/fp16.h"
#include "engine/quant/kernels.h"
#include "engine/quant/prefetch.h"
#include "engine/quant/tile_vnni_internal.h"
#include "engine/quant/types.h"

namespace moepool::kernels {
namespace {

using tile::ForEachColumnGroup;
using tile::PrefetchPart;
using tile::Transpose16x16;

constexpr int kWords = kQK8_0 / 4;  // 4-byte groups per block

// One repacked block of 16 rows: quants as unsigned bytes (w + 128).
struct alignas(64) PackedBlock {
  __m512i quants[kWords];
  __m512 d;
};

size_t PackedBytes(int64_t nb) { return static_cast<size_t>(nb) * sizeof(PackedBlock); }

// Repacks `rows` (<= 16) rows of nb blocks, two blocks (16 words) per transpose: each row's two
// blocks of quants are loaded straight into one vector, the 16 rows' half scales converted at
// once (rows past `rows` hold zeros; their outputs are never stored).
void PackRows(int64_t nb, const uint8_t* w, size_t w_stride, int rows, PackedBlock* packed) {
  const __m512i bias = _mm512_set1_epi8(static_cast<char>(0x80));
  const size_t ahead = WeightPrefetchBytes();
  for (int64_t b = 0; b < nb; b += 2) {
    const int blocks = b + 1 < nb ? 2 : 1;
    alignas(32) uint16_t d[2][kTileRows] = {};
    __m512i v[16];
    for (int r = 0; r < 16; ++r) {
      if (r >= rows) {
        v[r] = bias;
        continue;
      }
      const auto* x = reinterpret_cast<const BlockQ8_0*>(w + r * w_stride) + b;
      // The rows stream from memory (the first tile of a task is not prefetched by the tile
      // before it): ask for each row's bytes ahead.
      PrefetchAhead(x, ahead, 2 * sizeof(BlockQ8_0));
      const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[0].qs));
      const __m256i hi = blocks == 2 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[1].qs))
                                     : _mm256_setzero_si256();
      v[r] = _mm512_xor_si512(_mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1), bias);
      d[0][r] = x[0].d;
      if (blocks == 2) d[1][r] = x[1].d;
    }
    Transpose16x16(v);
    for (int h = 0; h < blocks; ++h) {
      packed[b + h].d = _mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(d[h])));
      for (int k = 0; k < kWords; ++k) packed[b + h].quants[k] = v[kWords * h + k];
    }
  }
}

// sums[t * nb + b] = activation row t's block b Q8_0BlockSum.
void SumActivations(int64_t nb, const uint8_t* a, size_t a_stride, int64_t n_act,
                    Q8_0BlockSum* sums) {
  const __m256i ones = _mm256_set1_epi8(1);
  for (int64_t t = 0; t < n_act; ++t) {
    const auto* y = reinterpret_cast<const BlockQ8_0*>(a + t * a_stride);
    for (int64_t b = 0; b < nb; ++b) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y[b].qs));
      const __m256i s8 = _mm256_dpbusd_epi32(_mm256_setzero_si256(), ones, v);
      __m128i s = _mm_add_epi32(_mm256_castsi256_si128(s8), _mm256_extracti128_si256(s8, 1));
      s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
      s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
      sums[t * nb + b] = {-128 * _mm_cvtsi128_si32(s), Fp16ToFp32(y[b].d)};
    }
  }
}

inline __attribute__((always_inline)) __m512i Broadcast32(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// kCols activation rows (starting at row t) against the packed rows. One lane at a time: the
// blocks b = k, k + 8, ... into kCols accumulators (lane k of each column, the blocks in order as
// block_numerics.h asks), so that the accumulators stay in registers; the eight lanes per column
// are then summed in the fixed tree.
template <int kCols>
void TileColumns(int64_t nb, const PackedBlock* packed, const uint8_t* a, size_t a_stride,
                 const Q8_0BlockSum* sums, int64_t t, __mmask16 rows, float* out,
                 int64_t out_stride) {
  const BlockQ8_0* act[kCols];
  const Q8_0BlockSum* sum[kCols];
  MOEPOOL_TILE_UNROLL
  for (int c = 0; c < kCols; ++c) {
    act[c] = reinterpret_cast<const BlockQ8_0*>(a + (t + c) * a_stride);
    sum[c] = sums + (t + c) * nb;
  }
  __m512 lanes[kCols][kQ8_0Lanes];
  for (int k = 0; k < kQ8_0Lanes; ++k) {
    __m512 acc[kCols];
    MOEPOOL_TILE_UNROLL
    for (int c = 0; c < kCols; ++c) acc[c] = _mm512_setzero_ps();
    for (int64_t b = k; b < nb; b += kQ8_0Lanes) {
      const PackedBlock& pb = packed[b];
      __m512i q[kWords];
      MOEPOOL_TILE_UNROLL
      for (int w = 0; w < kWords; ++w) q[w] = _mm512_load_si512(&pb.quants[w]);
      MOEPOOL_TILE_UNROLL
      for (int c = 0; c < kCols; ++c) {
        const uint8_t* qs = reinterpret_cast<const uint8_t*>(act[c][b].qs);
        __m512i dot = _mm512_set1_epi32(sum[c][b].minus_128_sum);
        MOEPOOL_TILE_UNROLL
        for (int w = 0; w < kWords; ++w)
          dot = _mm512_dpbusd_epi32(dot, q[w], Broadcast32(qs + 4 * w));
        const __m512 scale = _mm512_mul_ps(pb.d, _mm512_set1_ps(sum[c][b].d));
        acc[c] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(dot), acc[c]);
      }
    }
    MOEPOOL_TILE_UNROLL
    for (int c = 0; c < kCols; ++c) lanes[c][k] = acc[c];
  }
  MOEPOOL_TILE_UNROLL
  for (int c = 0; c < kCols; ++c) {
    const __m512* l = lanes[c];
    const __m512 total =
        _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(l[0], l[4]), _mm512_add_ps(l[2], l[6])),
                      _mm512_add_ps(_mm512_add_ps(l[1], l[5]), _mm512_add_ps(l[3], l[7])));
    _mm512_mask_storeu_ps(out + c * out_stride, rows, total);
  }
}

}  // namespace

size_t TileScratchBytesQ8_0(int64_t n, int64_t n_act) {
  const int64_t nb = n / kQK8_0;
  return PackedBytes(nb) + static_cast<size_t>(n_act * nb) * sizeof(Q8_0BlockSum);
}

void TileQ8_0Vnni(int64_t n, const uint8_t* w, size_t w_stride, int64_t rows, const uint8_t* a,
                  size_t a_stride, int64_t n_act, float* out, int64_t out_stride, void* scratch,
                  const Q8_0BlockSum* a_block_sums) {
  const int64_t nb = n / kQK8_0;
  auto* packed = static_cast<PackedBlock*>(scratch);
  const Q8_0BlockSum* sums = a_block_sums;
  if (sums == nullptr) {
    auto* computed =
        reinterpret_cast<Q8_0BlockSum*>(static_cast<uint8_t*>(scratch) + PackedBytes(nb));
    SumActivations(nb, a, a_stride, n_act, computed);
    sums = computed;
  }
  for (int64_t r = 0; r < rows; r += kTileRows) {
    const int tile_rows = static_cast<int>(std::min<int64_t>(kTileRows, rows - r));
    const uint8_t* wr = w + r * w_stride;
    PackRows(nb, wr, w_stride, tile_rows, packed);
    const __mmask16 mask = static_cast<__mmask16>((1u << tile_rows) - 1);
    const char* next = reinterpret_cast<const char*>(wr + tile_rows * w_stride);
    ForEachColumnGroup(n_act, [&]<int kCols>(int64_t t, int64_t group, int64_t n_groups) {
      PrefetchPart(next, kTileRows * w_stride, group, n_groups);
      TileColumns<kCols>(nb, packed, a, a_stride, sums, t, mask, out + r + t * out_stride,
                         out_stride);
    });
  }
}

}  // namespace moepool::kernels
