// Asking for weight rows ahead of the kernels that stream them (dot products and the tiles'
// packing): without it the hardware prefetcher leaves decode at 60-70% of the memory bandwidth
// bound (docs/engine.md). Internal to engine/quant.
#ifndef MOEPOOL_ENGINE_QUANT_PREFETCH_H_
#define MOEPOOL_ENGINE_QUANT_PREFETCH_H_

#include <cstddef>

namespace moepool::kernels {

// Asks for the `bytes` bytes at `p + ahead` into L1: a kernel streaming weight rows calls it once
// per block it reads with ahead = WeightPrefetchBytes() (types.h; 0: nothing). Consecutive calls
// over a stream leave no line out; prefetches never fault, so reading past a row's end is fine.
inline __attribute__((always_inline)) void PrefetchAhead(const void* p, size_t ahead,
                                                         size_t bytes) {
  if (ahead == 0) return;
  const char* first = static_cast<const char*>(p) + ahead;
  for (size_t off = 0; off < bytes; off += 64) __builtin_prefetch(first + off, 0, 3);
}

}  // namespace moepool::kernels

#endif  // MOEPOOL_ENGINE_QUANT_PREFETCH_H_
