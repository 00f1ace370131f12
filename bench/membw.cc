// Memory read bandwidth of this machine: `moepool_membw [--threads N] [--mib M] [--passes P]`
// sums a buffer of M MiB (default 2048, far larger than the caches) with N threads (default: 1,
// then every count up to the core count), each reading its own contiguous share, and prints one
// JSON object with the best pass's GB/s per thread count, reading plainly and with each line
// asked for 3 KiB ahead (as the CPU kernels read weights; take the larger). The decode bound of a
// memory-bound model is this figure divided by the bytes one token reads (bench/fullsize_run.sh).
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

namespace {

// Sums `n` words with four independent accumulators (the loads, not the adds, are the limit).
uint64_t SumWords(const uint64_t* p, size_t n) {
  uint64_t a = 0, b = 0, c = 0, d = 0;
  size_t i = 0;
  for (; i + 4 <= n; i += 4) {
    a += p[i];
    b += p[i + 1];
    c += p[i + 2];
    d += p[i + 3];
  }
  for (; i < n; ++i) a += p[i];
  return a + b + c + d;
}

// As SumWords, asking for each cache line 3 KiB ahead as the CPU kernels do
// (engine/quant/types.h, WeightPrefetchBytes): the hardware prefetcher alone may not keep enough
// reads in flight to reach the memory's bandwidth.
uint64_t SumWordsPrefetched(const uint64_t* p, size_t n) {
  constexpr size_t kAheadWords = 3072 / sizeof(uint64_t);
  uint64_t a = 0, b = 0, c = 0, d = 0;
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __builtin_prefetch(p + i + kAheadWords);
    a += p[i] + p[i + 4];
    b += p[i + 1] + p[i + 5];
    c += p[i + 2] + p[i + 6];
    d += p[i + 3] + p[i + 7];
  }
  for (; i < n; ++i) a += p[i];
  return a + b + c + d;
}

using SumFn = uint64_t (*)(const uint64_t*, size_t);

// GB/s of the best of `passes` reads of the whole buffer with `threads` threads.
double Bandwidth(const std::vector<uint64_t>& buf, int threads, int passes, SumFn sum,
                 uint64_t* sink) {
  double best = 0;
  for (int pass = 0; pass < passes; ++pass) {
    std::vector<std::thread> pool;
    std::vector<uint64_t> sums(static_cast<size_t>(threads));
    const size_t share = buf.size() / static_cast<size_t>(threads);
    const auto t0 = std::chrono::steady_clock::now();
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] { sums[t] = sum(buf.data() + t * share, share); });
    }
    for (std::thread& th : pool) th.join();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    for (uint64_t v : sums) *sink += v;
    best = std::max(best, static_cast<double>(share * threads * sizeof(uint64_t)) / s / 1e9);
  }
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  int max_threads = static_cast<int>(std::thread::hardware_concurrency());
  int only_threads = 0;
  size_t mib = 2048;
  int passes = 5;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    const long v = std::strtol(argv[i + 1], nullptr, 10);
    if (flag == "--threads" && v > 0) {
      only_threads = static_cast<int>(v);
    } else if (flag == "--mib" && v > 0) {
      mib = static_cast<size_t>(v);
    } else if (flag == "--passes" && v > 0) {
      passes = static_cast<int>(v);
    } else {
      std::fprintf(stderr, "usage: moepool_membw [--threads N] [--mib M] [--passes P]\n");
      return 2;
    }
  }
  std::vector<uint64_t> buf(mib * (size_t{1} << 20) / sizeof(uint64_t));
  for (size_t i = 0; i < buf.size(); ++i) buf[i] = i;  // touch every page
  uint64_t sink = 0;
  std::printf("{\"mib\": %zu, \"passes\": %d, \"read_gb_per_s\": {", mib, passes);
  const int from = only_threads > 0 ? only_threads : 1;
  const int to = only_threads > 0 ? only_threads : std::max(1, max_threads);
  for (int t = from; t <= to; ++t) {
    std::printf("%s\"%d\": %.2f", t == from ? "" : ", ", t,
                Bandwidth(buf, t, passes, SumWords, &sink));
  }
  std::printf("}, \"read_gb_per_s_prefetched\": {");
  for (int t = from; t <= to; ++t) {
    std::printf("%s\"%d\": %.2f", t == from ? "" : ", ", t,
                Bandwidth(buf, t, passes, SumWordsPrefetched, &sink));
  }
  std::printf("}, \"checksum\": %llu}\n", static_cast<unsigned long long>(sink % 1000));
  return 0;
}
