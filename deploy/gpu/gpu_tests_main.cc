// moepool_gpu_tests: the CUDA test suites (tests/engine/cuda) and the kernel benchmark in one
// self-contained binary for GPU machines (deploy/gpu/pack.sh builds it).
//   moepool_gpu_tests [gtest flags]   run the tests
//   moepool_gpu_tests --bench         print the benchmark JSON (bench/gpu_bench.h)
#include <cstdio>
#include <cstring>
#include <iostream>

#include "bench/gpu_bench.h"
#include "gtest/gtest.h"

int main(int argc, char** argv) {
  if (argc >= 2 && std::strcmp(argv[1], "--bench") == 0) {
    auto json = moepool::RunGpuBench(moepool::GpuBenchOptions());
    if (!json.ok()) {
      std::cerr << "benchmark: " << json.status() << "\n";
      return 1;
    }
    std::fputs(json->c_str(), stdout);
    return 0;
  }
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
