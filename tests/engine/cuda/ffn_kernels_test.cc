// The expert FFN, RMSNorm, RoPE, router and decode-attention kernels on every device of this
// build: a CPU reference device (the Ref* host references of expert_kernels.h) and, in CUDA
// builds, the CUDA kernels. Each result is compared with the CPU engine's own function, within
// the tolerance of that comparison (per weight type for the FFN, whose CPU path quantizes
// activations to q8), and, tightly, with the host reference.
//
// Without a CUDA device the CUDA instantiation is skipped, or fails when MOEPOOL_REQUIRE_GPU=1.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "absl/status/status.h"
#include "engine/attention.h"
#include "engine/cuda/cuda_backend.h"
#include "engine/cuda/expert_kernels.h"
#include "engine/model.h"
#include "engine/moe_ffn.h"
#include "engine/quant/fp16.h"
#include "engine/thread_pool.h"
#include "engine/transformer.h"
#include "gtest/gtest.h"
#include "tests/engine/cuda/ffn_test_util.h"
#include "tests/engine/cuda/quant_test_util.h"

namespace moepool::cuda {
namespace {

class FfnCpuReferenceDevice {
 public:
  static absl::Status Available() { return absl::OkStatus(); }
  absl::Status Ffn(const MatrixRef& g, const MatrixRef& u, const MatrixRef& d, const float* x,
                   int64_t m, float* out) {
    return RefExpertFfn(g, u, d, x, m, out);
  }
  absl::Status Norm(const float* x, const float* w, int64_t n, int64_t d, float eps, float* y) {
    RefRmsNorm(x, w, n, d, eps, y);
    return absl::OkStatus();
  }
  absl::Status Rope(float* x, int64_t heads, int64_t hd, int64_t n_rot, int64_t pos, float base) {
    RefRope(x, heads, hd, n_rot, pos, base);
    return absl::OkStatus();
  }
  absl::Status Route(const float* l, int64_t n, int n_expert, int k, int32_t* e, float* w) {
    RefRouteTopK(l, n, n_expert, k, e, w);
    return absl::OkStatus();
  }
  absl::Status Attend(const float* q, int64_t n_head, int64_t n_head_kv, int64_t hd,
                      const KvDeviceView& kv, int64_t, float scale, float* out) {
    RefAttentionDecode(q, n_head, n_head_kv, hd, kv, scale, out);
    return absl::OkStatus();
  }
};

#ifdef MOEPOOL_HAVE_CUDA
class FfnCudaDevice {
 public:
  static absl::Status Available() {
    absl::StatusOr<std::vector<CudaDeviceInfo>> devices = ListCudaDevices();
    return devices.ok() ? absl::OkStatus() : devices.status();
  }
  absl::Status Ffn(const MatrixRef& g, const MatrixRef& u, const MatrixRef& d, const float* x,
                   int64_t m, float* out) {
    return RunExpertFfnOnDevice(0, g, u, d, x, m, out);
  }
  absl::Status Norm(const float* x, const float* w, int64_t n, int64_t d, float eps, float* y) {
    return RunRmsNormOnDevice(0, x, w, n, d, eps, y);
  }
  absl::Status Rope(float* x, int64_t heads, int64_t hd, int64_t n_rot, int64_t pos, float base) {
    return RunRopeOnDevice(0, x, heads, hd, n_rot, pos, base);
  }
  absl::Status Route(const float* l, int64_t n, int n_expert, int k, int32_t* e, float* w) {
    return RunRouteTopKOnDevice(0, l, n, n_expert, k, e, w);
  }
  absl::Status Attend(const float* q, int64_t n_head, int64_t n_head_kv, int64_t hd,
                      const KvDeviceView& kv, int64_t n_phys, float scale, float* out) {
    return RunAttentionDecodeOnDevice(0, q, n_head, n_head_kv, hd, kv, n_phys, scale, out);
  }
};
#endif

template <class Device>
class FfnKernelsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const absl::Status available = Device::Available();
    if (available.ok()) return;
    if (GpuRequired()) FAIL() << "MOEPOOL_REQUIRE_GPU=1 but no usable CUDA device: " << available;
    GTEST_SKIP() << "no CUDA device here (" << available
                 << "); the CUDA instantiation runs on a GPU machine (deploy/gpu)";
  }
  Device device_;
};

#ifdef MOEPOOL_HAVE_CUDA
using FfnDevices = ::testing::Types<FfnCpuReferenceDevice, FfnCudaDevice>;
#else
using FfnDevices = ::testing::Types<FfnCpuReferenceDevice>;
#endif
TYPED_TEST_SUITE(FfnKernelsTest, FfnDevices, ReferenceOrCudaNames<FfnCpuReferenceDevice>);

// How far the f32-activation FFN may be from ExpertFfnCpu, relative to the largest output: the
// CPU quantizes the activations of each projection to its vec_dot_type (q8 for the quantized
// types), which is most of the difference. Measured with the host reference (n_embd 256, n_ff
// 512): float types <= 3.6e-7; Q4_0..Q8_0 <= 1.5e-2; k-quants <= 2.4e-2.
double FfnTolerance(TensorType t) {
  switch (t) {
    case TensorType::kF32:
    case TensorType::kF16:
    case TensorType::kBF16:
      return 2e-6;
    case TensorType::kQ4_0:
    case TensorType::kQ4_1:
    case TensorType::kQ5_0:
    case TensorType::kQ5_1:
    case TensorType::kQ8_0:
      return 3e-2;
    default:
      return 5e-2;
  }
}

WeightMatrix View(TensorType t, const std::vector<uint8_t>& data, int64_t rows, int64_t cols) {
  WeightMatrix w;
  w.name = "test";
  w.type = t;
  w.rows = rows;
  w.cols = cols;
  w.row_bytes = RowBytes(t, cols);
  w.data = data.data();
  return w;
}

MatrixRef Ref(const WeightMatrix& w) {
  return MatrixRef{w.type, w.data, w.row_bytes, w.rows, w.cols};
}

TYPED_TEST(FfnKernelsTest, ExpertFfnMatchesEngineForEveryType) {
  const int64_t n_embd = 256, n_ff = 512;
  ThreadPool pool(2);
  for (const TensorType t : KernelTypes()) {
    const auto gate = RandomWeights(t, n_ff, n_embd, 1);
    const auto up = RandomWeights(t, n_ff, n_embd, 2);
    const auto down = RandomWeights(t, n_embd, n_ff, 3);
    ExpertWeights e;
    e.gate = View(t, gate, n_ff, n_embd);
    e.up = View(t, up, n_ff, n_embd);
    e.down = View(t, down, n_embd, n_ff);
    // 1: mat-vec; 3, 8: the fused kernel's tiles; 20: the tiled mat-mul path.
    for (const int64_t m : {1, 3, 8, 20}) {
      const std::vector<float> x = RandomActivations(m, n_embd, 4);
      std::vector<float> engine(static_cast<size_t>(m * n_embd));
      ExpertFfnCpu(e, x.data(), m, engine.data(), &pool);
      std::vector<float> ref(engine.size()), got(engine.size());
      ASSERT_TRUE(RefExpertFfn(Ref(e.gate), Ref(e.up), Ref(e.down), x.data(), m, ref.data()).ok());
      const absl::Status s =
          this->device_.Ffn(Ref(e.gate), Ref(e.up), Ref(e.down), x.data(), m, got.data());
      ASSERT_TRUE(s.ok()) << s;
      const std::string what = std::string(GetTypeTraits(t).name) + " rows " + std::to_string(m);
      EXPECT_LE(RelMaxError(got, engine), FfnTolerance(t)) << what;
      EXPECT_LE(RelMaxError(got, ref), 1e-4) << what;
    }
  }
}

TYPED_TEST(FfnKernelsTest, GateAndUpOfDifferentTypes) {
  const int64_t n_embd = 256, n_ff = 256;
  const auto gate = RandomWeights(TensorType::kQ4_K, n_ff, n_embd, 5);
  const auto up = RandomWeights(TensorType::kQ6_K, n_ff, n_embd, 6);
  const auto down = RandomWeights(TensorType::kQ8_0, n_embd, n_ff, 7);
  ExpertWeights e;
  e.gate = View(TensorType::kQ4_K, gate, n_ff, n_embd);
  e.up = View(TensorType::kQ6_K, up, n_ff, n_embd);
  e.down = View(TensorType::kQ8_0, down, n_embd, n_ff);
  const std::vector<float> x = RandomActivations(2, n_embd, 8);
  std::vector<float> ref(2 * n_embd), got(ref.size());
  ASSERT_TRUE(RefExpertFfn(Ref(e.gate), Ref(e.up), Ref(e.down), x.data(), 2, ref.data()).ok());
  ASSERT_TRUE(this->device_.Ffn(Ref(e.gate), Ref(e.up), Ref(e.down), x.data(), 2, got.data()).ok());
  EXPECT_LE(RelMaxError(got, ref), 1e-4);
}

TYPED_TEST(FfnKernelsTest, RmsNormMatchesEngine) {
  const int64_t n = 3, d = 1024;
  const std::vector<float> x = RandomActivations(n, d, 9);
  const std::vector<float> w = RandomActivations(1, d, 10);
  std::vector<float> engine(x.size()), got(x.size());
  RmsNorm(x.data(), w.data(), n, d, 1e-5f, engine.data());
  ASSERT_TRUE(this->device_.Norm(x.data(), w.data(), n, d, 1e-5f, got.data()).ok());
  EXPECT_LE(RelMaxError(got, engine), 1e-6);
}

TYPED_TEST(FfnKernelsTest, RopeMatchesEngine) {
  const int64_t heads = 8, hd = 128;
  for (const int64_t pos : {0, 5, 3000}) {
    std::vector<float> engine = RandomActivations(heads, hd, 11);
    std::vector<float> got = engine;
    ApplyRope(engine.data(), heads, hd, hd, pos, 1e6f);
    ASSERT_TRUE(this->device_.Rope(got.data(), heads, hd, hd, pos, 1e6f).ok());
    // Device sinf/cosf are within 2 ulp of the C library's.
    EXPECT_LE(RelMaxError(got, engine), 1e-6) << "pos " << pos;
  }
}

TYPED_TEST(FfnKernelsTest, RouterPicksTheEngineExperts) {
  const int64_t rows = 64;
  const int n_expert = 8, k = 2;
  std::vector<float> logits = RandomActivations(rows, n_expert, 12);
  for (int e = 0; e < n_expert; ++e) logits[static_cast<size_t>(e)] = 0.25f;  // a tied row
  std::vector<int32_t> ex_engine(rows * k), ex(rows * k);
  std::vector<float> w_engine(rows * k), w(rows * k);
  RouteTopK(logits.data(), rows, n_expert, k, ex_engine.data(), w_engine.data());
  ASSERT_TRUE(this->device_.Route(logits.data(), rows, n_expert, k, ex.data(), w.data()).ok());
  EXPECT_EQ(ex, ex_engine);
  EXPECT_EQ(ex[0], 0);
  EXPECT_EQ(ex[1], 1);
  for (size_t i = 0; i < w.size(); ++i) EXPECT_NEAR(w[i], w_engine[i], 1e-6) << i;
}

// The tiled attention kernel (one row, one tile) against the CPU engine's attention.
TYPED_TEST(FfnKernelsTest, DecodeAttentionMatchesEngine) {
  const int64_t n_head = 8, n_head_kv = 2, hd = 128, kv_dim = n_head_kv * hd;
  // Two splits of positions (kAttnSplit = 256) over a shuffled paged table.
  const int64_t block_size = 32, n_phys = 12, n_kv = 300;
  const std::vector<float> kf = RandomActivations(n_phys * block_size, kv_dim, 13);
  const std::vector<float> vf = RandomActivations(n_phys * block_size, kv_dim, 14);
  std::vector<uint16_t> k(kf.size()), v(vf.size());
  for (size_t i = 0; i < k.size(); ++i) {
    k[i] = Fp32ToFp16(kf[i]);
    v[i] = Fp32ToFp16(vf[i]);
  }
  const std::vector<int32_t> blocks = {2, 0, 11, 3, 1, 9, 4, 10, 5, 7};
  const std::vector<float> q = RandomActivations(n_head, hd, 15);
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  KvDeviceView view{k.data(),
                    v.data(),
                    blocks.data(),
                    block_size,
                    static_cast<size_t>(block_size * kv_dim),
                    static_cast<size_t>(kv_dim),
                    n_kv};
  std::vector<float> got(q.size()), engine(q.size());
  ASSERT_TRUE(
      this->device_.Attend(q.data(), n_head, n_head_kv, hd, view, n_phys, scale, got.data()).ok());
  const int64_t group = n_head / n_head_kv;
  std::vector<float> scratch(static_cast<size_t>(group * n_kv));
  for (int64_t h = 0; h < n_head_kv; ++h) {
    KvHeadView kv;
    kv.k = k.data() + h * hd;
    kv.v = v.data() + h * hd;
    kv.blocks = blocks.data();
    kv.block_size = block_size;
    kv.block_stride = view.block_stride;
    kv.stride = view.stride;
    kv.n_kv = n_kv;
    AttendKvHeadScalar(q.data() + h * group * hd, static_cast<int>(group), hd, kv, scale,
                       engine.data() + h * group * hd, scratch.data());
  }
  EXPECT_LE(RelMaxError(got, engine), 1e-5);
}

}  // namespace
}  // namespace moepool::cuda
