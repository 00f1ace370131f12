// Helpers shared by the AVX512-VNNI matmul tiles (tile_*_vnni.cc). Include only from files
// compiled with the VNNI flags (engine/CMakeLists.txt); internal to engine/quant.
#ifndef MOEPOOL_ENGINE_QUANT_TILE_VNNI_INTERNAL_H_
#define MOEPOOL_ENGINE_QUANT_TILE_VNNI_INTERNAL_H_

#include <immintrin.h>
// GCC 12's avx512fintrin.h builds its "undefined" vectors by self-initialisation, which
// -Wmaybe-uninitialized reports at every inlined conversion (a GCC false positive). The tile
// files include this header, so the setting covers them. (Clang has no such warning.)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include <cstddef>
#include <cstdint>

#include "engine/quant/kernels.h"

// Fully unrolls the loops over columns and words so that the accumulators stay in registers.
#define MOEPOOL_TILE_UNROLL _Pragma("GCC unroll 16")

namespace moepool::kernels::tile {
namespace {

// Transposes 16 rows of 16 int32 in place: afterwards v[c] lane r holds what v[r] lane c held.
inline __attribute__((always_inline)) void Transpose16x16(__m512i v[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(v[i], v[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(v[i], v[i + 1]);
  }
  // v[4q + e], 128-bit lane L: rows 4q .. 4q + 3 of column 4L + e.
  for (int i = 0; i < 16; i += 4) {
    v[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    v[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    v[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    v[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  __m512i out[16];
  for (int e = 0; e < 4; ++e) {
    const __m512i x0 = _mm512_shuffle_i32x4(v[e], v[4 + e], 0x44);
    const __m512i x1 = _mm512_shuffle_i32x4(v[e], v[4 + e], 0xEE);
    const __m512i y0 = _mm512_shuffle_i32x4(v[8 + e], v[12 + e], 0x44);
    const __m512i y1 = _mm512_shuffle_i32x4(v[8 + e], v[12 + e], 0xEE);
    out[e] = _mm512_shuffle_i32x4(x0, y0, 0x88);
    out[4 + e] = _mm512_shuffle_i32x4(x0, y0, 0xDD);
    out[8 + e] = _mm512_shuffle_i32x4(x1, y1, 0x88);
    out[12 + e] = _mm512_shuffle_i32x4(x1, y1, 0xDD);
  }
  for (int i = 0; i < 16; ++i) v[i] = out[i];
}

// Asks for `bytes` from `p` into L2, the part `part` of `parts` of them.
void PrefetchPart(const char* p, size_t bytes, int64_t part, int64_t parts) {
  const size_t lines = (bytes + 63) / 64;
  const size_t first = lines * part / parts, last = lines * (part + 1) / parts;
  for (size_t line = first; line < last; ++line) _mm_prefetch(p + 64 * line, _MM_HINT_T1);
}

// Calls run.template operator()<kCols>(t, group, n_groups) for consecutive groups of activation
// rows [t, t + kCols), kCols <= kMaxTileCols, as even as possible (11 rows run as 6 + 5).
template <typename Run>
void ForEachColumnGroup(int64_t n_act, Run&& run) {
  const int64_t n_groups = (n_act + kMaxTileCols - 1) / kMaxTileCols;
  int64_t t = 0;
  for (int64_t group = 0; t < n_act; ++group) {
    const int64_t left = n_act - t;
    const int64_t groups = (left + kMaxTileCols - 1) / kMaxTileCols;
    const int c = static_cast<int>((left + groups - 1) / groups);
    switch (c) {
#define MOEPOOL_TILE_CASE(C)                        \
  case C:                                           \
    run.template operator()<C>(t, group, n_groups); \
    break;
      MOEPOOL_TILE_CASE(1)
      MOEPOOL_TILE_CASE(2)
      MOEPOOL_TILE_CASE(3)
      MOEPOOL_TILE_CASE(4)
      MOEPOOL_TILE_CASE(5)
      MOEPOOL_TILE_CASE(6)
      MOEPOOL_TILE_CASE(7)
      MOEPOOL_TILE_CASE(8)
#undef MOEPOOL_TILE_CASE
    }
    t += c;
  }
}

}  // namespace
}  // namespace moepool::kernels::tile

#endif  // MOEPOOL_ENGINE_QUANT_TILE_VNNI_INTERNAL_H_
