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
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __launch_bounds__(x)
#define __shared__ static

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

namespace moepool::cuda::emulation {

// Runs kernel<<<grid, block>>>(args...) to completion. block.x must be a multiple of 32 (every
// warp full, as in the kernels under test); block.y = block.z = 1.
template <class Kernel, class... Args>
void Launch(Dim3 grid, Dim3 block, Kernel kernel, Args... args) {
  blockDim = block;
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
          blockIdx = Dim3{bx, by, 0};
          kernel(args...);
        });
      }
      for (std::thread& th : threads) th.join();
      g_block = nullptr;
    }
  }
}

}  // namespace moepool::cuda::emulation

#endif  // MOEPOOL_TESTS_ENGINE_CUDA_CUDA_EMULATION_H_
