// The quantized matrix kernels on every device of this build: a CPU reference device (the host
// references of quant_matmul_ref.h) and, in CUDA builds, the CUDA kernels (cuda_ops.h). Every
// type and several shapes (ragged rows, ragged batches, K tails) are compared with the exact dot
// product of the engine's dequantized weights and with the CPU engine's own results.
//
// Without a CUDA device the CUDA instantiation is skipped, or fails when MOEPOOL_REQUIRE_GPU=1
// (the GPU bundle sets it, so a machine whose GPU is not seen cannot pass silently).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "engine/cuda/cuda_backend.h"
#include "engine/cuda/quant_matmul_ref.h"
#include "engine/quant/fp16.h"
#include "engine/quant/types.h"
#include "gtest/gtest.h"
#include "tests/engine/cuda/quant_test_util.h"
#ifdef MOEPOOL_HAVE_CUDA
#include "engine/cuda/cuda_ops.h"
#endif

namespace moepool::cuda {
namespace {

// One product Y = X W^T; rows of X and Y may be strided.
struct MatMulArgs {
  TensorType type;
  int64_t rows = 0, cols = 0, n = 0;
  int64_t x_stride = 0, y_stride = 0;
  const std::vector<uint8_t>* weights = nullptr;  // rows x RowBytes(type, cols)
  const std::vector<float>* x = nullptr;          // n x x_stride
};

// Host implementation of the kernels' contract.
class CpuReferenceDevice {
 public:
  static absl::Status Available() { return absl::OkStatus(); }
  // `y` (n x y_stride) keeps its contents outside the written elements.
  absl::Status MatMul(const MatMulArgs& a, std::vector<float>* y) {
    std::vector<float> row(static_cast<size_t>(a.rows));
    for (int64_t t = 0; t < a.n; ++t) {
      QuantMatVecReference(a.type, a.weights->data(), a.rows, a.cols, a.x->data() + t * a.x_stride,
                           row.data());
      std::memcpy(y->data() + t * a.y_stride, row.data(), row.size() * sizeof(float));
    }
    return absl::OkStatus();
  }
  // QuantMatMulTensorCores' contract: both factors rounded to f16, products summed in f32.
  absl::Status MatMulTensorCores(const MatMulArgs& a, std::vector<float>* y) {
    std::vector<float> w(static_cast<size_t>(a.rows * a.cols));
    DequantizeRowsReference(a.type, a.weights->data(), a.rows, a.cols, w.data());
    const auto f16 = [](float v) { return Fp16ToFp32(Fp32ToFp16(v)); };
    for (int64_t t = 0; t < a.n; ++t) {
      for (int64_t r = 0; r < a.rows; ++r) {
        float sum = 0.0f;
        for (int64_t c = 0; c < a.cols; ++c) {
          sum += f16(w[r * a.cols + c]) * f16((*a.x)[t * a.x_stride + c]);
        }
        (*y)[t * a.y_stride + r] = sum;
      }
    }
    return absl::OkStatus();
  }
  absl::Status Dequantize(TensorType type, const std::vector<uint8_t>& w, int64_t rows,
                          int64_t cols, std::vector<float>* out) {
    out->resize(static_cast<size_t>(rows * cols));
    DequantizeRowsReference(type, w.data(), rows, cols, out->data());
    return absl::OkStatus();
  }
};

#ifdef MOEPOOL_HAVE_CUDA
class CudaDevice {
 public:
  static absl::Status Available() {
    auto devices = ListCudaDevices();
    if (!devices.ok()) return devices.status();
    return UseDevice((*devices)[0].ordinal);
  }
  absl::Status MatMul(const MatMulArgs& a, std::vector<float>* y) { return Run(a, y, false); }
  absl::Status MatMulTensorCores(const MatMulArgs& a, std::vector<float>* y) {
    return Run(a, y, true);
  }
  absl::Status Run(const MatMulArgs& a, std::vector<float>* y, bool tensor_cores) {
    auto w = DeviceBuffer::Allocate(a.weights->size());
    auto x = DeviceBuffer::Allocate(a.x->size() * sizeof(float));
    auto yd = DeviceBuffer::Allocate(y->size() * sizeof(float));
    for (const auto* b : {&w, &x, &yd}) {
      if (!b->ok()) return b->status();
    }
    if (auto s = w->Upload(a.weights->data(), a.weights->size()); !s.ok()) return s;
    if (auto s = x->Upload(a.x->data(), a.x->size() * sizeof(float)); !s.ok()) return s;
    if (auto s = yd->Upload(y->data(), y->size() * sizeof(float)); !s.ok()) return s;
    const absl::Status launched =
        tensor_cores ? QuantMatMulTensorCores(a.type, w->data(), a.rows, a.cols, x->floats(),
                                              a.x_stride, yd->floats(), a.y_stride, a.n, nullptr)
                     : QuantMatMul(a.type, w->data(), a.rows, a.cols, x->floats(), a.x_stride,
                                   yd->floats(), a.y_stride, a.n, nullptr);
    if (!launched.ok()) return launched;
    if (auto s = SyncStream(nullptr); !s.ok()) return s;
    return yd->Download(y->data(), y->size() * sizeof(float));
  }
  absl::Status Dequantize(TensorType type, const std::vector<uint8_t>& w, int64_t rows,
                          int64_t cols, std::vector<float>* out) {
    out->assign(static_cast<size_t>(rows * cols), 0.0f);
    auto wd = DeviceBuffer::Allocate(w.size());
    auto od = DeviceBuffer::Allocate(out->size() * sizeof(float));
    if (!wd.ok()) return wd.status();
    if (!od.ok()) return od.status();
    if (auto s = wd->Upload(w.data(), w.size()); !s.ok()) return s;
    if (auto s = DequantizeRows(type, wd->data(), rows, cols, od->floats(), nullptr); !s.ok()) {
      return s;
    }
    return od->Download(out->data(), out->size() * sizeof(float));
  }
};
#endif

bool RequireGpu() {
  const char* v = std::getenv("MOEPOOL_REQUIRE_GPU");
  return v != nullptr && std::string(v) == "1";
}

template <class Device>
class QuantMatMulDeviceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const absl::Status available = Device::Available();
    if (available.ok()) return;
    if (RequireGpu()) {
      FAIL() << "MOEPOOL_REQUIRE_GPU=1 but the device is unusable: " << available;
    }
    GTEST_SKIP() << "no CUDA device here (" << available
                 << "); run the GPU bundle (deploy/gpu) on a GPU machine";
  }
  Device device_;
};

#ifdef MOEPOOL_HAVE_CUDA
using Devices = ::testing::Types<CpuReferenceDevice, CudaDevice>;
#else
using Devices = ::testing::Types<CpuReferenceDevice>;
#endif
class DeviceNames {
 public:
  template <class T>
  static std::string GetName(int) {
    return std::is_same_v<T, CpuReferenceDevice> ? "CpuReference" : "Cuda";
  }
};
TYPED_TEST_SUITE(QuantMatMulDeviceTest, Devices, DeviceNames);

struct Shape {
  int64_t rows, cols, n;
};

// Shapes for a type with `block` elements per block: ragged rows (not multiples of 4 or 64),
// batches that use the mat-vec kernel (n <= 8) and the tiled one (n > 8, ragged tiles), and for
// 32-element blocks rows that end inside a 128-element K chunk.
std::vector<Shape> ShapesFor(TensorType type) {
  std::vector<Shape> shapes = {{7, 256, 1},   {130, 1024, 3}, {64, 4352, 8},
                               {130, 256, 9}, {70, 1024, 33}, {129, 256, 70}};
  if (GetTypeTraits(type).block_size < 256) {
    shapes.push_back({5, 96, 1});
    shapes.push_back({67, 160, 40});
  }
  return shapes;
}

std::vector<float> DequantizeOnCpu(TensorType type, const std::vector<uint8_t>& w, int64_t rows,
                                   int64_t cols) {
  std::vector<float> out(static_cast<size_t>(rows * cols));
  const size_t row_bytes = RowBytes(type, cols);
  for (int64_t r = 0; r < rows; ++r) {
    GetTypeTraits(type).dequantize(w.data() + r * row_bytes, out.data() + r * cols, cols);
  }
  return out;
}

// Results of y [n x rows] further than tolerance x sum |w x| from the exact dot of the
// dequantized weights (the first one is reported).
int64_t CountFarFromExactDot(const std::vector<float>& y, const std::vector<float>& dense,
                             const std::vector<float>& x, const Shape& s, double tolerance) {
  int64_t bad = 0;
  for (int64_t t = 0; t < s.n; ++t) {
    for (int64_t r = 0; r < s.rows; ++r) {
      const float got = y[t * s.rows + r];
      const ExactDot exact = DotF64(dense.data() + r * s.cols, x.data() + t * s.cols, s.cols);
      if (!(std::fabs(got - exact.value) <= tolerance * exact.abs_sum) && bad++ == 0) {
        ADD_FAILURE() << "row " << r << " t " << t << ": got " << got << " exact " << exact.value;
      }
    }
  }
  return bad;
}

// Every type and shape against the exact dot and the CPU engine; where the tiles run (n > 8),
// also the tensor-core tiles against the exact dot within the f16 rounding of both factors.
TYPED_TEST(QuantMatMulDeviceTest, EveryTypeAndShapeMatchesExactDotAndCpuEngine) {
  uint32_t seed = 100;
  for (TensorType type : KernelTypes()) {
    for (const Shape& s : ShapesFor(type)) {
      SCOPED_TRACE(std::string(GetTypeTraits(type).name) + " rows " + std::to_string(s.rows) +
                   " cols " + std::to_string(s.cols) + " n " + std::to_string(s.n));
      const std::vector<uint8_t> w = RandomWeights(type, s.rows, s.cols, ++seed);
      const std::vector<float> x = RandomActivations(s.n, s.cols, ++seed);
      std::vector<float> y(static_cast<size_t>(s.n * s.rows),
                           std::numeric_limits<float>::quiet_NaN());
      const MatMulArgs args{type, s.rows, s.cols, s.n, s.cols, s.rows, &w, &x};
      ASSERT_TRUE(this->device_.MatMul(args, &y).ok());
      const std::vector<float> dense = DequantizeOnCpu(type, w, s.rows, s.cols);
      const std::vector<float> engine = EngineMatMul(type, w.data(), s.rows, s.cols, x.data(), s.n);
      EXPECT_EQ(CountFarFromExactDot(y, dense, x, s, kF32AccumulationTolerance), 0);
      int64_t bad_engine = 0;
      for (int64_t t = 0; t < s.n; ++t) {
        for (int64_t r = 0; r < s.rows; ++r) {
          const float got = y[t * s.rows + r];
          const float* wr = dense.data() + r * s.cols;
          const float* xt = x.data() + t * s.cols;
          const double tol = EngineTolerance(type, wr, xt, s.cols);
          if (!(std::fabs(got - engine[t * s.rows + r]) <= tol)) {
            if (bad_engine++ == 0) {
              ADD_FAILURE() << "row " << r << " t " << t << ": got " << got << " engine "
                            << engine[t * s.rows + r] << " tolerance " << tol;
            }
          }
        }
      }
      EXPECT_EQ(bad_engine, 0);
      if (s.n > 8) {  // the tiled kernels (smaller n takes the mat-vec kernel)
        std::vector<float> tc(y.size(), std::numeric_limits<float>::quiet_NaN());
        ASSERT_TRUE(this->device_.MatMulTensorCores(args, &tc).ok());
        EXPECT_EQ(CountFarFromExactDot(tc, dense, x, s, kF16TileTolerance), 0) << "tensor cores";
      }
    }
  }
}

TYPED_TEST(QuantMatMulDeviceTest, StridedRowsWriteOnlyTheirElements) {
  const TensorType type = TensorType::kQ4_K;
  for (int64_t n : {2, 20}) {
    const int64_t rows = 40, cols = 512, x_stride = 600, y_stride = 50;
    const std::vector<uint8_t> w = RandomWeights(type, rows, cols, 5);
    const std::vector<float> x = RandomActivations(n, x_stride, 6);
    const float kUntouched = -12345.0f;
    std::vector<float> y(static_cast<size_t>(n * y_stride), kUntouched);
    const MatMulArgs args{type, rows, cols, n, x_stride, y_stride, &w, &x};
    ASSERT_TRUE(this->device_.MatMul(args, &y).ok());
    std::vector<float> dense_x(static_cast<size_t>(n * cols));
    for (int64_t t = 0; t < n; ++t) {
      std::memcpy(dense_x.data() + t * cols, x.data() + t * x_stride, cols * sizeof(float));
    }
    std::vector<float> want(static_cast<size_t>(n * rows));
    QuantMatMulReference(type, w.data(), rows, cols, dense_x.data(), want.data(), n);
    for (int64_t t = 0; t < n; ++t) {
      for (int64_t r = 0; r < y_stride; ++r) {
        const float got = y[t * y_stride + r];
        if (r >= rows) {
          EXPECT_EQ(got, kUntouched) << "n " << n << " t " << t << " padding " << r;
        } else {
          EXPECT_NEAR(got, want[t * rows + r], 1e-4f) << "n " << n << " t " << t << " row " << r;
        }
      }
    }
  }
}

TYPED_TEST(QuantMatMulDeviceTest, DequantizationBitIdenticalToEngine) {
  for (TensorType type : KernelTypes()) {
    SCOPED_TRACE(GetTypeTraits(type).name);
    const int64_t rows = 9, cols = 768;
    const std::vector<uint8_t> w = RandomWeights(type, rows, cols, 77);
    std::vector<float> got;
    ASSERT_TRUE(this->device_.Dequantize(type, w, rows, cols, &got).ok());
    const std::vector<float> want = DequantizeOnCpu(type, w, rows, cols);
    int64_t bad = 0;
    for (size_t i = 0; i < want.size(); ++i) bad += Fp32ToBits(got[i]) != Fp32ToBits(want[i]);
    EXPECT_EQ(bad, 0) << "of " << want.size();
  }
}

#ifdef MOEPOOL_HAVE_CUDA
// Argument checks come before any CUDA call, so these run without a device.
TEST(QuantMatMulArgumentsTest, BadShapesAndTypesAreErrorsNotCrashes) {
  float dummy = 0;
  EXPECT_EQ(QuantMatVec(TensorType::kQ4_K, &dummy, 4, 100, &dummy, &dummy, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(QuantMatVec(TensorType::kF32, &dummy, 4, 48, &dummy, &dummy, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(QuantMatVec(TensorType::kQ8_K, &dummy, 4, 256, &dummy, &dummy, nullptr).code(),
            absl::StatusCode::kUnimplemented);
  EXPECT_EQ(QuantMatMul(TensorType::kQ8_0, &dummy, 4, 64, &dummy, 32, &dummy, 4, 2, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(QuantMatMul(TensorType::kQ8_0, nullptr, 4, 64, &dummy, &dummy, 2, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(QuantMatMul(TensorType::kQ8_0, &dummy, 4, 64, &dummy, &dummy, 0, nullptr).ok());
  EXPECT_EQ(DequantizeRows(TensorType::kQ6_K, &dummy, 1, 128, &dummy, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  for (TensorType type : KernelTypes()) EXPECT_TRUE(QuantKernelSupports(type));
  EXPECT_FALSE(QuantKernelSupports(TensorType::kQ8_1));
}

TEST(DeviceBufferTest, EmptyBufferChecksRangesWithoutTouchingCuda) {
  auto empty = DeviceBuffer::Allocate(0);
  ASSERT_TRUE(empty.ok()) << empty.status();
  EXPECT_EQ(empty->data(), nullptr);
  char host[8] = {};
  EXPECT_EQ(empty->Upload(host, sizeof(host)).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(empty->Download(host, 1, 0).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(empty->Upload(host, 0).ok());
  EXPECT_TRUE(empty->Zero().ok());
}

TEST(DeviceBufferTest, WithoutADeviceAllocationIsAnErrorNotACrash) {
  if (ListCudaDevices().ok()) GTEST_SKIP() << "a CUDA device is present";
  auto buffer = DeviceBuffer::Allocate(1 << 20);
  EXPECT_EQ(buffer.status().code(), absl::StatusCode::kUnavailable) << buffer.status();
  EXPECT_FALSE(DeviceStream::Create().ok());
}

TEST(DeviceBufferTest, MovesTransferOwnershipAndCopiesRespectOffsets) {
  if (!ListCudaDevices().ok()) {
    if (RequireGpu()) FAIL() << "MOEPOOL_REQUIRE_GPU=1 but no CUDA device";
    GTEST_SKIP() << "no CUDA device here";
  }
  auto a = DeviceBuffer::Allocate(256);
  ASSERT_TRUE(a.ok()) << a.status();
  void* p = a->data();
  DeviceBuffer b = std::move(*a);
  EXPECT_EQ(b.data(), p);
  EXPECT_EQ(b.bytes(), 256u);
  std::vector<uint8_t> in(256), out(256, 0);
  for (size_t i = 0; i < in.size(); ++i) in[i] = static_cast<uint8_t>(i * 7);
  ASSERT_TRUE(b.Upload(in.data() + 128, 128, 128).ok());
  ASSERT_TRUE(b.Download(out.data() + 128, 128, 128).ok());
  EXPECT_TRUE(std::equal(in.begin() + 128, in.end(), out.begin() + 128));
}
#endif

}  // namespace
}  // namespace moepool::cuda
