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

// `rows` weight rows of `type` (every row the same valid quantized values; the kernels do not
// care) and one activation row converted for them, kCols wide.
struct DotOperands {
  size_t row_bytes = 0;
  int64_t rows = 0;
  std::vector<uint8_t> weights;     // [rows x row_bytes]
  std::vector<uint8_t> activation;  // one row of the vec_dot type
};

DotOperands MakeOperands(const TypeTraits& tr, int64_t total_weight_bytes, uint32_t seed) {
  DotOperands o;
  o.row_bytes = RowBytes(tr.type, kCols);
  o.rows = std::max<int64_t>(1, total_weight_bytes / static_cast<int64_t>(o.row_bytes));
  std::mt19937 rng(seed);
  std::normal_distribution<float> gauss(0.0f, 1.0f);
  std::vector<float> values(kCols);
  for (float& v : values) v = 0.02f * gauss(rng);
  o.weights.resize(o.row_bytes * static_cast<size_t>(o.rows));
  tr.quantize(values.data(), o.weights.data(), kCols);
  for (int64_t r = 1; r < o.rows; ++r) {
    std::copy_n(o.weights.begin(), o.row_bytes, o.weights.begin() + r * o.row_bytes);
  }
  const TypeTraits& act = GetTypeTraits(tr.vec_dot_type);
  o.activation.resize(RowBytes(act.type, kCols));
  if (act.type == TensorType::kF32) {
    std::copy(values.begin(), values.end(), reinterpret_cast<float*>(o.activation.data()));
  } else {
    act.quantize(values.data(), o.activation.data(), kCols);
  }
  return o;
}

// args: tensor type id, total weight bytes, 1 = scalar kernels.
void BM_MatVec(benchmark::State& state) {
  const TypeTraits* tr = FindTypeTraits(static_cast<uint32_t>(state.range(0)));
  const VecDotFn dot = state.range(2) ? tr->vec_dot_scalar : tr->vec_dot;
  const DotOperands o = MakeOperands(*tr, state.range(1), 1);
  const int64_t rows = o.rows;
  const size_t row_bytes = o.row_bytes;
  const std::vector<uint8_t>& weights = o.weights;
  const std::vector<uint8_t>& a = o.activation;
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
  const DotOperands o = MakeOperands(*tr, state.range(2), 2);
  const int64_t rows = o.rows;
  const size_t row_bytes = o.row_bytes;
  const std::vector<uint8_t>& weights = o.weights;
  // The same activation row c times (the kernels read each copy).
  const size_t a_bytes = o.activation.size();
  std::vector<uint8_t> a(a_bytes * c);
  for (int i = 0; i < c; ++i)
    std::copy(o.activation.begin(), o.activation.end(), a.begin() + i * a_bytes);
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
