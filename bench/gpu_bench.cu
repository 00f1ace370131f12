// `moepool_gpu_tests --bench`: QuantMatVec bandwidth as a share of the same device's
// device-to-device copy bandwidth, QuantMatMul throughput and the attention cases of
// gpu_attention_bench.cu (see bench/gpu_bench.h).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "bench/gpu_bench.h"
#include "engine/cuda/cuda_backend.h"
#include "engine/cuda/cuda_ops.h"
#include "engine/quant/types.h"

namespace moepool {
namespace {

using cuda::DeviceBuffer;

absl::Status Check(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(what, ": ", cudaGetErrorString(err)));
}

#define BENCH_RETURN_IF_ERROR(expr)      \
  do {                                   \
    const absl::Status _status = (expr); \
    if (!_status.ok()) return _status;   \
  } while (0)

// Median milliseconds of `iterations` runs of `launch` (after two warm-up runs), timed with
// events on the default stream.
template <class Launch>
absl::StatusOr<double> MedianMs(int iterations, Launch launch) {
  cudaEvent_t start, stop;
  BENCH_RETURN_IF_ERROR(Check(cudaEventCreate(&start), "cudaEventCreate"));
  BENCH_RETURN_IF_ERROR(Check(cudaEventCreate(&stop), "cudaEventCreate"));
  std::vector<double> ms;
  absl::Status status;
  for (int i = -2; i < iterations && status.ok(); ++i) {
    cudaEventRecord(start);
    status.Update(launch());
    cudaEventRecord(stop);
    status.Update(Check(cudaEventSynchronize(stop), "kernel"));
    float elapsed = 0;
    cudaEventElapsedTime(&elapsed, start, stop);
    if (i >= 0) ms.push_back(elapsed);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  if (!status.ok()) return status;
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

// Random bytes on the device with valid (small, finite) f16 scales: fill with bytes in 0..0x3b so
// every uint16_t is a finite half below 1.
absl::Status FillWeights(DeviceBuffer* w) {
  std::vector<uint8_t> host(w->bytes());
  std::mt19937 rng(1);
  for (uint8_t& b : host) b = static_cast<uint8_t>(rng() % 0x3c);
  return w->Upload(host.data(), host.size());
}

}  // namespace

absl::StatusOr<std::string> RunGpuBench(const GpuBenchOptions& options) {
  auto devices = ListCudaDevices();
  if (!devices.ok()) return devices.status();
  BENCH_RETURN_IF_ERROR(cuda::UseDevice(options.device));
  auto props = cuda::CurrentDeviceProperties();
  if (!props.ok()) return props.status();
  std::string name;
  for (const CudaDeviceInfo& d : *devices) {
    if (d.ordinal == options.device) name = d.name;
  }
  const int64_t working_set = std::max<int64_t>(options.l2_multiple * props->l2_bytes, 64 << 20);

  // Device-to-device copy of `working_set` bytes: bytes moved = 2 x working_set.
  auto src = DeviceBuffer::Allocate(working_set);
  if (!src.ok()) return src.status();
  auto dst = DeviceBuffer::Allocate(working_set);
  if (!dst.ok()) return dst.status();
  BENCH_RETURN_IF_ERROR(src->Zero());
  auto copy_ms = MedianMs(options.iterations, [&] {
    return Check(cudaMemcpyAsync(dst->data(), src->data(), working_set, cudaMemcpyDeviceToDevice),
                 "cudaMemcpy");
  });
  if (!copy_ms.ok()) return copy_ms.status();
  const double copy_gbs = 2.0 * working_set / (*copy_ms * 1e6);
  *dst = DeviceBuffer();  // free before the weight matrices

  std::string kernels;
  const int64_t cols = options.cols;
  auto x = DeviceBuffer::Allocate(cols * sizeof(float) * 512);
  if (!x.ok()) return x.status();
  BENCH_RETURN_IF_ERROR(x->Zero());
  for (TensorType type : {TensorType::kQ4_K, TensorType::kQ8_0}) {
    const size_t row_bytes = RowBytes(type, cols);
    const int64_t rows = (working_set + row_bytes - 1) / row_bytes;
    auto w = DeviceBuffer::Allocate(rows * row_bytes);
    if (!w.ok()) return w.status();
    BENCH_RETURN_IF_ERROR(FillWeights(&*w));
    auto y = DeviceBuffer::Allocate(rows * sizeof(float) * 512);
    if (!y.ok()) return y.status();
    auto vec_ms = MedianMs(options.iterations, [&] {
      return cuda::QuantMatVec(type, w->data(), rows, cols, x->floats(), y->floats(), nullptr);
    });
    if (!vec_ms.ok()) return vec_ms.status();
    const double vec_gbs = static_cast<double>(rows * row_bytes) / (*vec_ms * 1e6);
    std::string batches;
    for (int64_t n : {8, 64, 512}) {
      auto mat_ms = MedianMs(std::max(3, options.iterations / 4), [&] {
        return cuda::QuantMatMul(type, w->data(), rows, cols, x->floats(), y->floats(), n, nullptr);
      });
      if (!mat_ms.ok()) return mat_ms.status();
      // The tensor-core tiles on the same product (n > 8; 8 rows take the mat-vec kernel).
      std::string tc = "null";
      if (n > 8) {
        auto tc_ms = MedianMs(std::max(3, options.iterations / 4), [&] {
          return cuda::QuantMatMulTensorCores(type, w->data(), rows, cols, x->floats(), cols,
                                              y->floats(), rows, n, nullptr);
        });
        if (!tc_ms.ok()) return tc_ms.status();
        tc = absl::StrFormat("{\"ms\": %.4f, \"gflops\": %.1f, \"speedup\": %.2f}", *tc_ms,
                             2.0 * rows * cols * n / (*tc_ms * 1e6), *mat_ms / *tc_ms);
      }
      absl::StrAppend(&batches, batches.empty() ? "" : ", ",
                      absl::StrFormat("{\"n\": %d, \"ms\": %.4f, \"gflops\": %.1f, "
                                      "\"tensor_cores\": %s}",
                                      n, *mat_ms, 2.0 * rows * cols * n / (*mat_ms * 1e6), tc));
    }
    absl::StrAppend(
        &kernels, kernels.empty() ? "" : ",\n",
        absl::StrFormat("    {\"type\": \"%s\", \"rows\": %d, \"cols\": %d, \"weight_bytes\": %d, "
                        "\"matvec_ms\": %.4f, \"matvec_gbs\": %.1f, \"share_of_copy\": %.3f,\n"
                        "     \"matmul\": [%s]}",
                        GetTypeTraits(type).name, rows, cols, rows * row_bytes, *vec_ms, vec_gbs,
                        vec_gbs / copy_gbs, batches));
  }
  *src = DeviceBuffer();
  auto attention =
      RunAttentionBench(copy_gbs, options.iterations,
                        [](int iterations, const std::function<absl::Status()>& launch) {
                          return MedianMs(iterations, launch);
                        });
  if (!attention.ok()) return attention.status();
  return absl::StrFormat(
      "{\n  \"device\": \"%s\", \"sm_count\": %d, \"l2_bytes\": %d, \"working_set_bytes\": %d,\n"
      "  \"copy_ms\": %.4f, \"copy_gbs\": %.1f,\n  \"kernels\": [\n%s\n  ],\n"
      "  \"attention\": [\n%s\n  ]\n}\n",
      name, props->sm_count, props->l2_bytes, working_set, *copy_ms, copy_gbs, kernels, *attention);
}

}  // namespace moepool
