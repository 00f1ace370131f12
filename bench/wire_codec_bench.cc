// The cost of the row codec (wire/row_codec.h) per Mixtral-sized row (4096 values), next to the
// conversion a worker makes anyway before its kernels run (QuantizeRowQ8_K for K-quant weights,
// QuantizeRowQ8_0 for Q4_0/Q5_0/Q8_0 weights), and the bytes each format puts on the wire.
// Answers: what does receiving q8_0 rows cost a K-quant worker, and would sending the worker's
// own format (Q8_K, 256-value blocks) be better? Prints one line per operation; baseline: the
// f32 row copy of the same run.
//
//   build/bench/moepool_wire_codec_bench [ROWS]   (default 20000 rows per measurement)
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "engine/quant/types.h"
#include "wire/row_codec.h"

namespace {

namespace pb = ::moepool::v1;
constexpr int64_t kEmbd = 4096;

// Median over 5 runs of the nanoseconds per row of fn(row index).
double NsPerRow(int64_t rows, const std::function<void(int64_t)>& fn) {
  std::vector<double> runs;
  for (int r = 0; r < 5; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int64_t i = 0; i < rows; ++i) fn(i);
    const auto t1 = std::chrono::steady_clock::now();
    runs.push_back(std::chrono::duration<double, std::nano>(t1 - t0).count() /
                   static_cast<double>(rows));
  }
  std::sort(runs.begin(), runs.end());
  return runs[2];
}

}  // namespace

int main(int argc, char** argv) {
  const int64_t rows = argc > 1 ? std::max(1L, std::atol(argv[1])) : 20000;
  constexpr int kDistinct = 64;  // distinct rows cycled through (stay in L2 like decode rows)
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  std::vector<float> x(kDistinct * kEmbd);
  for (float& v : x) v = normal(rng);
  std::vector<float> y(kEmbd);
  std::string out;
  out.reserve(kEmbd * 4);
  auto row = [&](int64_t i) { return x.data() + (i % kDistinct) * kEmbd; };

  std::printf("moepool_wire_codec_bench: %lld rows of %lld values, kernels %s\n",
              static_cast<long long>(rows), static_cast<long long>(kEmbd),
              moepool::KernelIsaName());
  std::printf("%-34s %10s %12s %10s\n", "operation", "ns/row", "vs f32 copy", "bytes/row");
  double base = 0;
  auto report = [&](const char* what, double ns, int64_t bytes) {
    if (base == 0) base = ns;
    std::printf("%-34s %10.0f %12.2f %10lld\n", what, ns, ns / base, static_cast<long long>(bytes));
  };
  for (const pb::DType dtype : {pb::DTYPE_F32, pb::DTYPE_F16, pb::DTYPE_BF16, pb::DTYPE_Q8_0}) {
    const std::string name = moepool::wire::DTypeName(dtype);
    const double enc = NsPerRow(rows, [&](int64_t i) {
      out.clear();
      moepool::wire::EncodeRows(dtype, row(i), kEmbd, &out);
    });
    report(("encode " + name).c_str(), enc, moepool::wire::EncodedBytes(dtype, kEmbd));
    std::string encoded;
    moepool::wire::EncodeRows(dtype, row(0), kEmbd, &encoded);
    const double dec = NsPerRow(rows, [&](int64_t) {
      moepool::wire::DecodeRows(dtype, encoded, kEmbd, y.data()).IgnoreError();
    });
    report(("decode " + name).c_str(), dec, moepool::wire::EncodedBytes(dtype, kEmbd));
  }
  // What a worker does with the decoded row before its kernels run.
  for (const moepool::TensorType t : {moepool::TensorType::kQ8_0, moepool::TensorType::kQ8_K}) {
    const moepool::TypeTraits& tr = moepool::GetTypeTraits(t);
    std::vector<char> blocks(moepool::RowBytes(t, kEmbd));
    const double ns = NsPerRow(rows, [&](int64_t i) { tr.quantize(row(i), blocks.data(), kEmbd); });
    report((std::string("worker: quantize to ") + tr.name).c_str(), ns,
           static_cast<int64_t>(blocks.size()));
  }
  return 0;
}
