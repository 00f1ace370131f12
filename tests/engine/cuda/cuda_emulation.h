// A tiny host emulation of the CUDA execution model, enough to run the kernels of
// engine/cuda/quant_matmul.cuh under the host compiler: every CUDA thread of a block is a
// std::thread, blocks run one after another, __shared__ variables are function statics (one
// block at a time uses them), __syncthreads is a barrier of the block and warp shuffles exchange
// values through a per-warp slot array between two warp barriers. Slow; for indexing checks on
// small shapes only. Include before the kernels; never in a .cu file.
#ifndef MOEPOOL_TESTS_ENGINE_CUDA_CUDA_EMULATION_H_
#define MOEPOOL_TESTS_ENGINE_CUDA_CUDA_EMULATION_H_

#ifdef __CUDACC__
#error "cuda_emulation.h is for the host compiler"
#endif

#include <barrier>
#include <cmath>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "engine/quant/fp16.h"

#define __global__
#define __launch_bounds__(x)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

namespace moepool::cuda::emulation {

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
};

struct BlockState {
  std::unique_ptr<std::barrier<>> block_barrier;
  std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
  std::vector<float> slots;  // one per thread
};

inline BlockState* g_block = nullptr;

}  // namespace moepool::cuda::emulation

// The kernels read these as in CUDA.
inline thread_local moepool::cuda::emulation::Dim3 threadIdx;
inline thread_local moepool::cuda::emulation::Dim3 blockIdx;
inline moepool::cuda::emulation::Dim3 blockDim;

inline void __syncthreads() { moepool::cuda::emulation::g_block->block_barrier->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned /*mask*/, float v, int lane_mask) {
  auto* block = moepool::cuda::emulation::g_block;
  const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  block->slots[threadIdx.x] = v;
  block->warp_barriers[warp]->arrive_and_wait();
  const float other = block->slots[warp * 32 + (lane ^ static_cast<unsigned>(lane_mask))];
  block->warp_barriers[warp]->arrive_and_wait();
  return other;
}

template <class T>
T __ldg(const T* p) {
  return *p;
}

// IEEE half as the device stores it; conversions round to nearest even like the device's.
struct __half {
  uint16_t bits;
};
inline __half __float2half(float f) { return __half{moepool::Fp32ToFp16(f)}; }
inline float __half2float(__half h) { return moepool::Fp16ToFp32(h.bits); }

// WMMA 16x16x16 as the kernels use it. Every thread of a warp holds the whole tile (a warp's
// lanes make the same collective calls with the same arguments, so their copies agree); lane 0
// alone stores. Products of halves are exact in f32 and summed in k order.
namespace nvcuda::wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int kM, int kN, int kK, class T, class Layout = void>
struct fragment {
  float v[256];  // a: [m][k]; b: [k][n]; accumulator: [m][n] (16 x 16 each)
};

template <class Use, class T, class Layout>
void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& f, float value) {
  for (float& e : f.v) e = value;
}
inline void load_matrix_sync(fragment<matrix_a, 16, 16, 16, __half, row_major>& f, const __half* p,
                             unsigned ldm) {
  for (int i = 0; i < 16; ++i) {
    for (int k = 0; k < 16; ++k) f.v[i * 16 + k] = __half2float(p[i * ldm + k]);
  }
}
inline void load_matrix_sync(fragment<matrix_b, 16, 16, 16, __half, col_major>& f, const __half* p,
                             unsigned ldm) {
  for (int j = 0; j < 16; ++j) {
    for (int k = 0; k < 16; ++k) f.v[k * 16 + j] = __half2float(p[j * ldm + k]);
  }
}
template <class LA, class LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d,
              const fragment<matrix_a, 16, 16, 16, __half, LA>& a,
              const fragment<matrix_b, 16, 16, 16, __half, LB>& b,
              const fragment<accumulator, 16, 16, 16, float>& c) {
  float out[256];
  for (int i = 0; i < 16; ++i) {
    for (int j = 0; j < 16; ++j) {
      float s = c.v[i * 16 + j];
      for (int k = 0; k < 16; ++k) s += a.v[i * 16 + k] * b.v[k * 16 + j];
      out[i * 16 + j] = s;
    }
  }
  for (int e = 0; e < 256; ++e) d.v[e] = out[e];
}
inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f,
                              unsigned ldm, layout_t layout) {
  if (threadIdx.x % 32 != 0) return;
  for (int i = 0; i < 16; ++i) {
    for (int j = 0; j < 16; ++j) {
      if (layout == mem_row_major) {
        p[i * ldm + j] = f.v[i * 16 + j];
      } else {
        p[j * ldm + i] = f.v[i * 16 + j];
      }
    }
  }
}
}  // namespace nvcuda::wmma

namespace moepool::cuda::emulation {

// Runs kernel<<<grid, block>>>(args...) to completion. block.x must be a multiple of 32 (every
// warp full, as in the kernels under test); block.y = block.z = 1.
template <class Kernel, class... Args>
void Launch(Dim3 grid, Dim3 block, Kernel kernel, Args... args) {
  blockDim = block;
  for (unsigned bz = 0; bz < grid.z; ++bz) {
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        BlockState state;
        state.block_barrier = std::make_unique<std::barrier<>>(block.x);
        for (unsigned w = 0; w < block.x / 32; ++w) {
          state.warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
        }
        state.slots.assign(block.x, 0.0f);
        g_block = &state;
        std::vector<std::thread> threads;
        threads.reserve(block.x);
        for (unsigned t = 0; t < block.x; ++t) {
          threads.emplace_back([&, t] {
            threadIdx = Dim3{t, 0, 0};
            blockIdx = Dim3{bx, by, bz};
            kernel(args...);
          });
        }
        for (std::thread& th : threads) th.join();
        g_block = nullptr;
      }
    }
  }
}

}  // namespace moepool::cuda::emulation

#endif  // MOEPOOL_TESTS_ENGINE_CUDA_CUDA_EMULATION_H_
