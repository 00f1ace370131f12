// Register-blocked AVX512-VNNI matmul tiles for the k-quants (Q4_K, Q5_K, Q6_K): 16 weight rows x
// up to 8 activation rows per inner loop, for products over many activation rows (prompts).
// Compiled with -mavx512f -mavx512vl -mavx512bw -mavx512vnni (engine/CMakeLists.txt, *_vnni.cc).
//
// The 16 weight rows are first repacked into `scratch`, one super-block at a time:
//   quants   64 vectors; vector w, lane r = elements 4w .. 4w + 3 of row r as unsigned bytes
//            (Q6_K keeps its +32 offset), so one vpdpbusd with 4 broadcast activation bytes
//            advances 16 rows by 4 elements;
//   scales   one vector of 16 int32 per sub-block;
//   pairs    8 vectors of int16 pairs per lane, multiplied (vpdpwssd) by the activation's bsums:
//            Q4_K / Q5_K (min, min) for the mins dot, Q6_K (-32 s_2p, -32 s_2p+1) for its offset;
//   d, dmin  16 floats each.
// Then every group of activation rows runs over the repacked blocks. Per super-block and output
// element the integers S and M are exact, and the floats follow block_numerics.h, so each output
// has the bits of VecDot*Scalar whatever the tile, the group or the batch.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "engine/quant/fp16.h"
#include "engine/quant/kernels.h"
#include "engine/quant/prefetch.h"
#include "engine/quant/quantize_internal.h"
#include "engine/quant/tile_vnni_internal.h"
#include "engine/quant/types.h"

namespace moepool::kernels {
namespace {

using tile::ForEachColumnGroup;
using tile::PrefetchPart;
using tile::Transpose16x16;

constexpr int kWords = kQK_K / 4;  // 4-element groups per super-block

// One repacked super-block of 16 rows (64-byte aligned inside the scratch buffer).
struct alignas(64) PackedBlock {
  __m512i quants[kWords];
  __m512i scales[16];  // Q4_K / Q5_K use the first 8 (32-element sub-blocks)
  __m512i pairs[8];
  __m512 d;
  __m512 dmin;  // Q4_K / Q5_K
};

inline __attribute__((always_inline)) __m256i Load256(const void* p) {
  return _mm256_loadu_si256(static_cast<const __m256i*>(p));
}

// Stores lo then hi as one 64-byte vector (the transpose loads it whole: two 32-byte stores
// would not forward to that load).
inline __attribute__((always_inline)) void Store2x256(uint8_t* p, __m256i lo, __m256i hi) {
  _mm512_store_si512(p, _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1));
}

// Element values of one super-block of a row, in element order, into u[256] (64-byte aligned).
// Q4_K: qs[32j + l] holds element 64j + l (low nibble) and 64j + 32 + l (high nibble).
void UnpackQ4_K(const BlockQ4_K& x, uint8_t* u) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  for (int j = 0; j < 4; ++j) {
    const __m256i packed = Load256(x.qs + 32 * j);
    Store2x256(u + 64 * j, _mm256_and_si256(packed, low4),
               _mm256_and_si256(_mm256_srli_epi16(packed, 4), low4));
  }
}

// Q5_K: Q4_K plus bit 2j (low nibbles) or 2j + 1 (high nibbles) of qh[l] as bit 4.
void UnpackQ5_K(const BlockQ5_K& x, uint8_t* u) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i one = _mm256_set1_epi8(1);
  __m256i high_bits = Load256(x.qh);
  for (int j = 0; j < 4; ++j) {
    const __m256i packed = Load256(x.qs + 32 * j);
    const __m256i lo5 = _mm256_slli_epi16(_mm256_and_si256(high_bits, one), 4);
    const __m256i hi5 =
        _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(high_bits, 1), one), 4);
    Store2x256(u + 64 * j, _mm256_or_si256(_mm256_and_si256(packed, low4), lo5),
               _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(packed, 4), low4), hi5));
    high_bits = _mm256_srli_epi16(high_bits, 2);
  }
}

// Q6_K: element 128h + 32g + l takes its low 4 bits from ql[64h + l + 32 (g % 2)] (low nibble
// for g < 2, high for g >= 2) and its top 2 bits from bits 2g, 2g + 1 of qh[32h + l]; kept + 32.
void UnpackQ6_K(const BlockQ6_K& x, uint8_t* u) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i two = _mm256_set1_epi8(0x03);
  for (int h = 0; h < 2; ++h) {
    const __m256i ql0 = Load256(x.ql + 64 * h);
    const __m256i ql1 = Load256(x.ql + 64 * h + 32);
    const __m256i qh = Load256(x.qh + 32 * h);
    const __m256i low[4] = {_mm256_and_si256(ql0, low4), _mm256_and_si256(ql1, low4),
                            _mm256_and_si256(_mm256_srli_epi16(ql0, 4), low4),
                            _mm256_and_si256(_mm256_srli_epi16(ql1, 4), low4)};
    __m256i value[4];
    for (int g = 0; g < 4; ++g) {
      const __m256i top = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * g), two);
      value[g] = _mm256_or_si256(low[g], _mm256_slli_epi16(top, 4));
    }
    Store2x256(u + 128 * h, value[0], value[1]);
    Store2x256(u + 128 * h + 64, value[2], value[3]);
  }
}

// Sub-block j (0..7) scale and min of a Q4_K / Q5_K super-block's 12 packed bytes.
void ScaleMinK4(int j, const uint8_t* packed, int* scale, int* min) {
  uint8_t s, m;
  internal::UnpackScaleMinK4(j, packed, &s, &m);
  *scale = s;
  *min = m;
}

int32_t Int16Pair(int lo, int hi) {
  return static_cast<int32_t>(static_cast<uint16_t>(lo) | (static_cast<uint32_t>(hi) << 16));
}

// Unpacks row r's super-block into u[256] and writes its scalars into lane r.
template <typename Block>
void PackRow(const Block& x, int r, uint8_t* u, PackedBlock* out) {
  int32_t* scales = reinterpret_cast<int32_t*>(out->scales);
  int32_t* pairs = reinterpret_cast<int32_t*>(out->pairs);
  if constexpr (std::is_same_v<Block, BlockQ6_K>) {
    UnpackQ6_K(x, u);
    for (int s = 0; s < 16; ++s) scales[16 * s + r] = x.scales[s];
    for (int p = 0; p < 8; ++p) {
      pairs[16 * p + r] = Int16Pair(-32 * x.scales[2 * p], -32 * x.scales[2 * p + 1]);
    }
  } else {
    if constexpr (std::is_same_v<Block, BlockQ4_K>) {
      UnpackQ4_K(x, u);
    } else {
      UnpackQ5_K(x, u);
    }
    for (int s = 0; s < 8; ++s) {
      int scale, min;
      ScaleMinK4(s, x.scales, &scale, &min);
      scales[16 * s + r] = scale;
      pairs[16 * s + r] = Int16Pair(min, min);
    }
    reinterpret_cast<float*>(&out->dmin)[r] = _cvtsh_ss(x.dmin);
  }
  reinterpret_cast<float*>(&out->d)[r] = _cvtsh_ss(x.d);
}

// Repacks `rows` (<= 16) rows of n elements; lanes of absent rows are zero. Each super-block's
// values are unpacked row by row, then transposed 16 words at a time into the quant vectors.
template <typename Block>
void PackRows(int64_t n, const uint8_t* w, size_t w_stride, int rows, PackedBlock* packed) {
  const int64_t nb = n / kQK_K;
  alignas(64) uint8_t u[kTileRows][kQK_K];
  if (rows < kTileRows) {
    std::memset(static_cast<void*>(packed), 0, nb * sizeof(PackedBlock));
    std::memset(u, 0, sizeof(u));
  }
  const size_t ahead = WeightPrefetchBytes();
  for (int64_t b = 0; b < nb; ++b) {
    for (int r = 0; r < rows; ++r) {
      const Block* row = reinterpret_cast<const Block*>(w + r * w_stride);
      // The rows stream from memory (the first tile of a task is not prefetched by the tile
      // before it): ask for each row's bytes ahead.
      PrefetchAhead(row + b, ahead, sizeof(Block));
      PackRow(row[b], r, u[r], &packed[b]);
    }
    for (int g = 0; g < kWords / 16; ++g) {
      __m512i v[16];
      for (int r = 0; r < 16; ++r) v[r] = _mm512_load_si512(u[r] + 64 * g);
      Transpose16x16(v);
      for (int c = 0; c < 16; ++c) _mm512_store_si512(&packed[b].quants[16 * g + c], v[c]);
    }
  }
}

inline __attribute__((always_inline)) __m512i Broadcast32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// kCols activation rows against the packed rows; kSubBlocks = 8 (Q4_K, Q5_K) or 16 (Q6_K).
template <int kCols, int kSubBlocks>
void TileColumns(int64_t nb, const PackedBlock* packed, const uint8_t* a, size_t a_stride,
                 __mmask16 rows, float* out, int64_t out_stride) {
  constexpr int kWordsPerSub = kWords / kSubBlocks;
  const BlockQ8_K* y[kCols];
  __m512 acc[kCols];
  MOEPOOL_TILE_UNROLL
  for (int c = 0; c < kCols; ++c) {
    y[c] = reinterpret_cast<const BlockQ8_K*>(a + c * a_stride);
    acc[c] = _mm512_setzero_ps();
  }
  for (int64_t b = 0; b < nb; ++b) {
    const PackedBlock& pb = packed[b];
    __m512i sumi[kCols];
    MOEPOOL_TILE_UNROLL
    for (int c = 0; c < kCols; ++c) sumi[c] = _mm512_setzero_si512();
    for (int s = 0; s < kSubBlocks; ++s) {
      __m512i dot[kCols];
      MOEPOOL_TILE_UNROLL
      for (int c = 0; c < kCols; ++c) dot[c] = _mm512_setzero_si512();
      MOEPOOL_TILE_UNROLL
      for (int k = 0; k < kWordsPerSub; ++k) {
        const int w = s * kWordsPerSub + k;
        const __m512i q = _mm512_load_si512(&pb.quants[w]);
        MOEPOOL_TILE_UNROLL
        for (int c = 0; c < kCols; ++c) {
          dot[c] = _mm512_dpbusd_epi32(dot[c], q, Broadcast32(y[c][b].qs + 4 * w));
        }
      }
      const __m512i scale = _mm512_load_si512(&pb.scales[s]);
      MOEPOOL_TILE_UNROLL
      for (int c = 0; c < kCols; ++c) {
        sumi[c] = _mm512_add_epi32(sumi[c], _mm512_mullo_epi32(dot[c], scale));
      }
    }
    // The pairs term: the mins dot (Q4_K, Q5_K) or the -32 offset (Q6_K), from the bsums.
    MOEPOOL_TILE_UNROLL
    for (int c = 0; c < kCols; ++c) {
      __m512i pairs = _mm512_setzero_si512();
      MOEPOOL_TILE_UNROLL
      for (int p = 0; p < 8; ++p) {
        pairs = _mm512_dpwssd_epi32(pairs, _mm512_load_si512(&pb.pairs[p]),
                                    Broadcast32(y[c][b].bsums + 2 * p));
      }
      const __m512 y_d = _mm512_set1_ps(y[c][b].d);
      if constexpr (kSubBlocks == 8) {
        const __m512 mins = _mm512_mul_ps(pb.dmin, _mm512_cvtepi32_ps(pairs));
        const __m512 block = _mm512_fmsub_ps(pb.d, _mm512_cvtepi32_ps(sumi[c]), mins);
        acc[c] = _mm512_fmadd_ps(y_d, block, acc[c]);
      } else {
        const __m512i total = _mm512_add_epi32(sumi[c], pairs);
        acc[c] = _mm512_fmadd_ps(_mm512_mul_ps(y_d, pb.d), _mm512_cvtepi32_ps(total), acc[c]);
      }
    }
  }
  MOEPOOL_TILE_UNROLL
  for (int c = 0; c < kCols; ++c) _mm512_mask_storeu_ps(out + c * out_stride, rows, acc[c]);
}

// Runs every activation row against the packed rows. Meanwhile the next tile's weights (`next`,
// `next_bytes`: the rows that follow these in the matrix) are asked for, a share per group of
// columns: packing reads them from memory otherwise, with nothing to overlap the wait.
template <int kSubBlocks>
void TileAll(int64_t nb, const PackedBlock* packed, const uint8_t* a, size_t a_stride,
             int64_t n_act, __mmask16 rows, float* out, int64_t out_stride, const char* next,
             size_t next_bytes) {
  ForEachColumnGroup(n_act, [&]<int kCols>(int64_t t, int64_t group, int64_t n_groups) {
    PrefetchPart(next, next_bytes, group, n_groups);
    TileColumns<kCols, kSubBlocks>(nb, packed, a + t * a_stride, a_stride, rows,
                                   out + t * out_stride, out_stride);
  });
}

template <typename Block, int kSubBlocks>
void Tile(int64_t n, const uint8_t* w, size_t w_stride, int64_t rows, const uint8_t* a,
          size_t a_stride, int64_t n_act, float* out, int64_t out_stride, void* scratch) {
  auto* packed = static_cast<PackedBlock*>(scratch);
  for (int64_t r = 0; r < rows; r += kTileRows) {
    const int tile_rows = static_cast<int>(std::min<int64_t>(kTileRows, rows - r));
    const uint8_t* wr = w + r * w_stride;
    PackRows<Block>(n, wr, w_stride, tile_rows, packed);
    const __mmask16 mask = static_cast<__mmask16>((1u << tile_rows) - 1);
    const char* next = reinterpret_cast<const char*>(wr + tile_rows * w_stride);
    TileAll<kSubBlocks>(n / kQK_K, packed, a, a_stride, n_act, mask, out + r, out_stride, next,
                        static_cast<size_t>(kTileRows) * w_stride);
  }
}

}  // namespace

size_t TileScratchBytesK(int64_t n, int64_t /*n_act*/) {
  return static_cast<size_t>(n / kQK_K) * sizeof(PackedBlock);
}

void TileQ4_KVnni(int64_t n, const uint8_t* w, size_t w_stride, int64_t rows, const uint8_t* a,
                  size_t a_stride, int64_t n_act, float* out, int64_t out_stride, void* scratch,
                  const Q8_0BlockSum* /*a_block_sums*/) {
  Tile<BlockQ4_K, 8>(n, w, w_stride, rows, a, a_stride, n_act, out, out_stride, scratch);
}

void TileQ5_KVnni(int64_t n, const uint8_t* w, size_t w_stride, int64_t rows, const uint8_t* a,
                  size_t a_stride, int64_t n_act, float* out, int64_t out_stride, void* scratch,
                  const Q8_0BlockSum* /*a_block_sums*/) {
  Tile<BlockQ5_K, 8>(n, w, w_stride, rows, a, a_stride, n_act, out, out_stride, scratch);
}

void TileQ6_KVnni(int64_t n, const uint8_t* w, size_t w_stride, int64_t rows, const uint8_t* a,
                  size_t a_stride, int64_t n_act, float* out, int64_t out_stride, void* scratch,
                  const Q8_0BlockSum* /*a_block_sums*/) {
  Tile<BlockQ6_K, 16>(n, w, w_stride, rows, a, a_stride, n_act, out, out_stride, scratch);
}

}  // namespace moepool::kernels
