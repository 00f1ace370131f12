// Matrix-vector throughput of the dot-product kernels: weight bytes streamed per second, for a
// matrix that fits in L2 (kernel speed) and one far larger than the caches (memory bound, as in
// decode). Run: ./build/bench/vec_dot_bench [--benchmark_filter=Q4_K]
#include <cstdint>
#include <random>
#include <vector>

#include "benchmark/benchmark.h"
#include "engine/quant/kernels.h"
#include "engine/quant/types.h"

namespace moepool {
namespace {

constexpr int64_t kCols = 4096;

// args: tensor type id, total weight bytes, 1 = scalar kernels.
void BM_MatVec(benchmark::State& state) {
  const TypeTraits* tr = FindTypeTraits(static_cast<uint32_t>(state.range(0)));
  const VecDotFn dot = state.range(2) ? tr->vec_dot_scalar : tr->vec_dot;
  const size_t row_bytes = RowBytes(tr->type, kCols);
  const int64_t rows = std::max<int64_t>(1, state.range(1) / static_cast<int64_t>(row_bytes));
  std::mt19937 rng(1);
  std::normal_distribution<float> gauss(0.0f, 1.0f);
  std::vector<float> values(kCols);
  for (float& v : values) v = 0.02f * gauss(rng);
  // Every row holds the same valid quantized values; the kernel does not care.
  std::vector<uint8_t> row(row_bytes);
  tr->quantize(values.data(), row.data(), kCols);
  std::vector<uint8_t> weights(row_bytes * rows);
  for (int64_t r = 0; r < rows; ++r)
    std::copy(row.begin(), row.end(), weights.begin() + r * row_bytes);
  const TypeTraits& act = GetTypeTraits(tr->vec_dot_type);
  std::vector<uint8_t> a(RowBytes(act.type, kCols));
  if (act.type == TensorType::kF32) {
    std::copy(values.begin(), values.end(), reinterpret_cast<float*>(a.data()));
  } else {
    act.quantize(values.data(), a.data(), kCols);
  }
  std::vector<float> out(rows);
  for (auto _ : state) {
    for (int64_t r = 0; r < rows; ++r)
      out[r] = dot(kCols, weights.data() + r * row_bytes, a.data());
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * static_cast<int64_t>(weights.size()));
  state.SetLabel(std::string(tr->name) + (state.range(2) ? " scalar" : ""));
}

void Args(benchmark::internal::Benchmark* b) {
  const TensorType types[] = {
      TensorType::kQ4_K, TensorType::kQ5_K, TensorType::kQ6_K, TensorType::kQ8_0, TensorType::kQ2_K,
      TensorType::kQ3_K, TensorType::kQ4_0, TensorType::kQ4_1, TensorType::kQ5_0, TensorType::kQ5_1,
      TensorType::kF16,  TensorType::kBF16, TensorType::kF32};
  for (TensorType t : types) {
    for (int64_t bytes : {int64_t{256} << 10, int64_t{256} << 20}) {
      b->Args({static_cast<int64_t>(t), bytes, 0});
    }
    b->Args({static_cast<int64_t>(t), int64_t{256} << 10, 1});
  }
}

BENCHMARK(BM_MatVec)->Apply(Args);

// Cost of one (weight row, activation row) dot when c activation rows share each weight row
// (the multi-row kernels of batched decode): args tensor type id, c, total weight bytes (in L2,
// or far beyond the caches as in decode). Items = dots.
void BM_MultiRowDot(benchmark::State& state) {
  const TypeTraits* tr = FindTypeTraits(static_cast<uint32_t>(state.range(0)));
  const int c = static_cast<int>(state.range(1));
  const size_t row_bytes = RowBytes(tr->type, kCols);
  const int64_t rows = std::max<int64_t>(1, state.range(2) / static_cast<int64_t>(row_bytes));
  std::mt19937 rng(2);
  std::normal_distribution<float> gauss(0.0f, 1.0f);
  std::vector<float> values(kCols);
  for (float& v : values) v = 0.02f * gauss(rng);
  std::vector<uint8_t> weights(row_bytes * rows);
  tr->quantize(values.data(), weights.data(), kCols);
  for (int64_t r = 1; r < rows; ++r) {
    std::copy_n(weights.begin(), row_bytes, weights.begin() + r * row_bytes);
  }
  const TypeTraits& act = GetTypeTraits(tr->vec_dot_type);
  const size_t a_bytes = RowBytes(act.type, kCols);
  std::vector<uint8_t> a(a_bytes * c);
  for (int i = 0; i < c; ++i) act.quantize(values.data(), a.data() + i * a_bytes, kCols);
  const VecDotMultiFn multi =
      (c >= 2 && tr->vec_dot_cols != nullptr) ? tr->vec_dot_cols[c] : nullptr;
  std::vector<float> out(static_cast<size_t>(rows) * c);
  for (auto _ : state) {
    for (int64_t r = 0; r < rows; ++r) {
      const uint8_t* w = weights.data() + r * row_bytes;
      if (multi != nullptr) {
        multi(kCols, w, a.data(), a_bytes, out.data() + r * c);
      } else {
        for (int i = 0; i < c; ++i) out[r * c + i] = tr->vec_dot(kCols, w, a.data() + i * a_bytes);
      }
    }
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(state.iterations() * rows * c);
  state.SetLabel(std::string(tr->name) + (multi ? " multi" : " single"));
}

BENCHMARK(BM_MultiRowDot)
    ->ArgsProduct({{static_cast<int64_t>(TensorType::kQ4_K),
                    static_cast<int64_t>(TensorType::kQ6_K),
                    static_cast<int64_t>(TensorType::kQ8_0)},
                   {1, 2, 4, 8},
                   {int64_t{256} << 10, int64_t{256} << 20}});

}  // namespace
}  // namespace moepool

BENCHMARK_MAIN();
