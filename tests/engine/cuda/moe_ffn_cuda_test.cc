// The CUDA expert backend against LocalExpertBackend (the CPU engine) on a synthesized tiny
// model, per device: a CPU reference backend (the host references of expert_kernels.h behind the
// ExpertBackend contract) and, in CUDA builds, CudaExpertBackend. Plus the factory's error paths,
// which run on every machine.
//
// Without a CUDA device the CUDA instantiation is skipped, or fails when MOEPOOL_REQUIRE_GPU=1.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "engine/cuda/cuda_backend.h"
#include "engine/cuda/expert_kernels.h"
#include "engine/model.h"
#include "engine/moe_ffn.h"
#include "engine/quant/fp16.h"
#include "engine/thread_pool.h"
#include "gtest/gtest.h"
#include "tests/engine/cuda/ffn_test_util.h"

namespace moepool::cuda {
namespace {

struct ReferenceBackendDevice {
  static absl::Status Available() { return absl::OkStatus(); }
  static absl::StatusOr<std::unique_ptr<ExpertBackend>> Create(const Model* model,
                                                               const CudaExpertOptions&) {
    return CreateReferenceExpertBackend(model);
  }
};

#ifdef MOEPOOL_HAVE_CUDA
struct CudaBackendDevice {
  static absl::Status Available() {
    absl::StatusOr<std::vector<CudaDeviceInfo>> devices = ListCudaDevices();
    return devices.ok() ? absl::OkStatus() : devices.status();
  }
  static absl::StatusOr<std::unique_ptr<ExpertBackend>> Create(const Model* model,
                                                               const CudaExpertOptions& options) {
    return CreateCudaExpertBackend(model, options);
  }
};
#endif

template <class Device>
class MoeFfnCudaTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const absl::Status available = Device::Available();
    if (!available.ok()) {
      if (GpuRequired()) {
        FAIL() << "MOEPOOL_REQUIRE_GPU=1 but no usable CUDA device: " << available;
      }
      GTEST_SKIP() << "no CUDA device here (" << available
                   << "); the CUDA instantiation runs on a GPU machine (deploy/gpu)";
    }
    absl::StatusOr<std::string> path = SynthModelForCudaTests("tiny", "Q4_K_M");
    ASSERT_TRUE(path.ok()) << path.status();
    absl::StatusOr<std::unique_ptr<Model>> model = Model::Load(*path);
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = std::move(*model);
  }

  // Random rows and top-k routes (ascending expert ids, weights summing to 1).
  void MakeRoutes(int64_t n, int k, uint32_t seed) {
    const ModelConfig& c = model_->config();
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    x_.resize(static_cast<size_t>(n * c.n_embd));
    for (float& v : x_) v = normal(rng);
    expert_.resize(static_cast<size_t>(n * k));
    weight_.resize(expert_.size());
    std::vector<int32_t> ids(static_cast<size_t>(c.n_expert));
    for (int64_t r = 0; r < n; ++r) {
      for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<int32_t>(i);
      std::shuffle(ids.begin(), ids.end(), rng);
      std::sort(ids.begin(), ids.begin() + k);
      float sum = 0.0f;
      for (int j = 0; j < k; ++j) {
        expert_[static_cast<size_t>(r * k + j)] = ids[static_cast<size_t>(j)];
        weight_[static_cast<size_t>(r * k + j)] = 0.1f + std::fabs(normal(rng));
        sum += weight_[static_cast<size_t>(r * k + j)];
      }
      for (int j = 0; j < k; ++j) weight_[static_cast<size_t>(r * k + j)] /= sum;
    }
  }

  ExpertRoutes Routes(int layer, int64_t n, int k) const {
    ExpertRoutes routes;
    routes.layer = layer;
    routes.n_rows = n;
    routes.n_embd = model_->config().n_embd;
    routes.k = k;
    routes.x = x_.data();
    routes.expert = expert_.data();
    routes.weight = weight_.data();
    return routes;
  }

  std::unique_ptr<ExpertBackend> Backend(int64_t max_rows = 64, bool batch_invariant = true,
                                         bool tensor_cores = false) {
    CudaExpertOptions options;
    options.show_progress = false;
    options.max_rows = max_rows;
    options.batch_invariant = batch_invariant;
    options.tensor_cores = tensor_cores;
    absl::StatusOr<std::unique_ptr<ExpertBackend>> b = Device::Create(model_.get(), options);
    EXPECT_TRUE(b.ok()) << b.status();
    return b.ok() ? std::move(*b) : nullptr;
  }

  std::unique_ptr<Model> model_;
  std::vector<float> x_;
  std::vector<int32_t> expert_;
  std::vector<float> weight_;
};

#ifdef MOEPOOL_HAVE_CUDA
using BackendDevices = ::testing::Types<ReferenceBackendDevice, CudaBackendDevice>;
#else
using BackendDevices = ::testing::Types<ReferenceBackendDevice>;
#endif
TYPED_TEST_SUITE(MoeFfnCudaTest, BackendDevices, ReferenceOrCudaNames<ReferenceBackendDevice>);

TYPED_TEST(MoeFfnCudaTest, MatchesLocalBackendOnEveryLayer) {
  ThreadPool pool(2);
  LocalExpertBackend local(this->model_.get(), &pool);
  std::unique_ptr<ExpertBackend> reference = CreateReferenceExpertBackend(this->model_.get());
  std::unique_ptr<ExpertBackend> invariant = this->Backend(64, /*batch_invariant=*/true);
  std::unique_ptr<ExpertBackend> tiled = this->Backend(64, /*batch_invariant=*/false);
  std::unique_ptr<ExpertBackend> tensor =
      this->Backend(64, /*batch_invariant=*/false, /*tensor_cores=*/true);
  ASSERT_NE(invariant, nullptr);
  ASSERT_NE(tiled, nullptr);
  ASSERT_NE(tensor, nullptr);
  const ModelConfig& c = this->model_->config();
  const int k = static_cast<int>(c.n_expert_used);
  for (const int64_t n : {1, 5, 19}) {
    this->MakeRoutes(n, k, static_cast<uint32_t>(n));
    if (n == 19) {  // expert 0 gets every row: the tiled kernels when not batch-invariant
      for (int64_t r = 0; r < n; ++r) this->expert_[static_cast<size_t>(r * k)] = 0;
    }
    for (int layer = 0; layer < c.n_layer; ++layer) {
      const ExpertRoutes routes = this->Routes(layer, n, k);
      std::vector<float> cpu(this->x_.size()), ref(cpu.size());
      ASSERT_TRUE(local.Compute(routes, cpu.data()).ok());
      ASSERT_TRUE(reference->Compute(routes, ref.data()).ok());
      for (ExpertBackend* backend : {invariant.get(), tiled.get(), tensor.get()}) {
        std::vector<float> got(cpu.size());
        const absl::Status s = backend->Compute(routes, got.data());
        ASSERT_TRUE(s.ok()) << s;
        const bool f16_tiles = backend == tensor.get();
        const std::string what = absl::StrCat(
            "layer ", layer, " rows ", n,
            f16_tiles ? " tensor cores" : (backend == tiled.get() ? " tiled" : " invariant"));
        // Q4_K_M experts (Q4_K and Q6_K): the CPU's q8 activations are the difference; the
        // tensor-core tiles add the f16 rounding of both factors (rows > 8 of one expert).
        EXPECT_LE(RelMaxError(got, cpu), 5e-2) << what;
        EXPECT_LE(RelMaxError(got, ref), f16_tiles ? 5e-3 : 1e-4) << what;
      }
    }
  }
}

// With batch_invariant (the default) a row's result is the same bits whether it is computed
// alone or with 20 others.
TYPED_TEST(MoeFfnCudaTest, RowsAreBatchInvariant) {
  std::unique_ptr<ExpertBackend> backend = this->Backend();
  ASSERT_NE(backend, nullptr);
  const int64_t n = 21, d = this->model_->config().n_embd;
  this->MakeRoutes(n, 2, 9);
  for (int64_t r = 0; r < n; ++r) this->expert_[static_cast<size_t>(2 * r)] = 0;  // 21 rows
  std::vector<float> batch(this->x_.size());
  ASSERT_TRUE(backend->Compute(this->Routes(3, n, 2), batch.data()).ok());
  std::vector<float> alone(static_cast<size_t>(d));
  for (int64_t r = 0; r < n; ++r) {
    ExpertRoutes one = this->Routes(3, 1, 2);
    one.x = this->x_.data() + r * d;
    one.expert = this->expert_.data() + 2 * r;
    one.weight = this->weight_.data() + 2 * r;
    ASSERT_TRUE(backend->Compute(one, alone.data()).ok());
    for (int64_t i = 0; i < d; ++i) {
      ASSERT_EQ(Fp32ToBits(alone[static_cast<size_t>(i)]),
                Fp32ToBits(batch[static_cast<size_t>(r * d + i)]))
          << "row " << r << " element " << i;
    }
  }
}

// Pairs combine as products rounded to f32, added from 0 in ascending expert id: the result of a
// row with two experts is the f32 sum of the two single-expert results. Every row has the same
// two experts, so each expert sees the same rows in all three calls (the kernels chosen for an
// expert depend on how many rows it has).
TYPED_TEST(MoeFfnCudaTest, CombinesRoundedProductsInExpertOrder) {
  std::unique_ptr<ExpertBackend> backend = this->Backend();
  ASSERT_NE(backend, nullptr);
  this->MakeRoutes(3, 2, 5);
  for (int64_t r = 0; r < 3; ++r) {
    this->expert_[static_cast<size_t>(2 * r)] = 2;
    this->expert_[static_cast<size_t>(2 * r + 1)] = 5;
  }
  const int64_t d = this->model_->config().n_embd;
  std::vector<float> both(this->x_.size());
  ASSERT_TRUE(backend->Compute(this->Routes(1, 3, 2), both.data()).ok());
  const std::vector<int32_t> expert = this->expert_;
  const std::vector<float> weight = this->weight_;
  std::vector<float> first(both.size()), second(both.size());
  for (int j = 0; j < 2; ++j) {
    for (int64_t r = 0; r < 3; ++r) {
      this->expert_[static_cast<size_t>(r)] = expert[static_cast<size_t>(r * 2 + j)];
      this->weight_[static_cast<size_t>(r)] = weight[static_cast<size_t>(r * 2 + j)];
    }
    ASSERT_TRUE(backend->Compute(this->Routes(1, 3, 1), (j == 0 ? first : second).data()).ok());
  }
  for (int64_t i = 0; i < 3 * d; ++i) {
    const float sum = first[static_cast<size_t>(i)] + second[static_cast<size_t>(i)];
    ASSERT_EQ(Fp32ToBits(both[static_cast<size_t>(i)]), Fp32ToBits(sum)) << i;
  }
}

// More rows than the device buffers hold are computed in chunks, with the same result per row.
TYPED_TEST(MoeFfnCudaTest, RowsBeyondMaxRowsAreChunked) {
  std::unique_ptr<ExpertBackend> small = this->Backend(/*max_rows=*/4);
  std::unique_ptr<ExpertBackend> large = this->Backend();
  ASSERT_NE(small, nullptr);
  ASSERT_NE(large, nullptr);
  this->MakeRoutes(11, 2, 6);
  std::vector<float> a(this->x_.size()), b(a.size());
  ASSERT_TRUE(small->Compute(this->Routes(2, 11, 2), a.data()).ok());
  ASSERT_TRUE(large->Compute(this->Routes(2, 11, 2), b.data()).ok());
  EXPECT_LE(RelMaxError(a, b), 1e-5);
}

TYPED_TEST(MoeFfnCudaTest, RowsWithoutExpertsAreZero) {
  std::unique_ptr<ExpertBackend> backend = this->Backend();
  ASSERT_NE(backend, nullptr);
  this->MakeRoutes(4, 2, 7);
  this->expert_[0] = -1;  // row 0: one expert left
  this->expert_[2] = -1;  // row 1: none
  this->expert_[3] = -1;
  std::vector<float> out(this->x_.size(), 99.0f);
  ASSERT_TRUE(backend->Compute(this->Routes(0, 4, 2), out.data()).ok());
  const int64_t d = this->model_->config().n_embd;
  for (int64_t i = 0; i < d; ++i) ASSERT_EQ(out[static_cast<size_t>(d + i)], 0.0f);
  EXPECT_NE(out[0], 0.0f);
}

TYPED_TEST(MoeFfnCudaTest, RejectsLayerOrWidthItDoesNotHold) {
  std::unique_ptr<ExpertBackend> backend = this->Backend();
  ASSERT_NE(backend, nullptr);
  this->MakeRoutes(2, 2, 8);
  std::vector<float> out(this->x_.size());
  ExpertRoutes routes = this->Routes(static_cast<int>(this->model_->config().n_layer), 2, 2);
  EXPECT_EQ(backend->Compute(routes, out.data()).code(), absl::StatusCode::kInvalidArgument);
  routes = this->Routes(0, 2, 2);
  routes.n_embd -= 1;
  EXPECT_EQ(backend->Compute(routes, out.data()).code(), absl::StatusCode::kInvalidArgument);
}

#ifdef MOEPOOL_HAVE_CUDA
// Experts the model does not bind are not held: asking for one is INVALID_ARGUMENT.
TEST(CudaExpertBackendTest, ExpertNotBoundIsInvalidArgument) {
  if (!ListCudaDevices().ok()) {
    if (GpuRequired()) FAIL() << "MOEPOOL_REQUIRE_GPU=1 but no usable CUDA device";
    GTEST_SKIP() << "no CUDA device here";
  }
  absl::StatusOr<std::string> path = SynthModelForCudaTests("tiny", "Q4_K_M");
  ASSERT_TRUE(path.ok()) << path.status();
  ExpertFilter filter;
  filter.keep = [](int, int expert) { return expert < 4; };
  absl::StatusOr<std::unique_ptr<Model>> model = Model::Load(*path, filter);
  ASSERT_TRUE(model.ok()) << model.status();
  CudaExpertOptions options;
  options.show_progress = false;
  auto backend = CreateCudaExpertBackend(model->get(), options);
  ASSERT_TRUE(backend.ok()) << backend.status();
  const int64_t d = (*model)->config().n_embd;
  std::vector<float> x(static_cast<size_t>(d), 1.0f), out(x.size());
  const int32_t expert[2] = {1, 6};
  const float weight[2] = {0.5f, 0.5f};
  ExpertRoutes routes{0, 1, d, 2, x.data(), expert, weight};
  const absl::Status s = (*backend)->Compute(routes, out.data());
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "expert 6")) << s;
}

TEST(CudaExpertBackendTest, ChecksFreeMemoryAndDeviceOrdinals) {
  if (!ListCudaDevices().ok()) {
    if (GpuRequired()) FAIL() << "MOEPOOL_REQUIRE_GPU=1 but no usable CUDA device";
    GTEST_SKIP() << "no CUDA device here";
  }
  absl::StatusOr<std::string> path = SynthModelForCudaTests("tiny", "Q4_K_M");
  ASSERT_TRUE(path.ok()) << path.status();
  auto model = Model::Load(*path);
  ASSERT_TRUE(model.ok()) << model.status();
  CudaExpertOptions options;
  options.show_progress = false;
  options.reserve_bytes = 1ull << 62;  // more than any device has
  auto full = CreateCudaExpertBackend(model->get(), options);
  ASSERT_EQ(full.status().code(), absl::StatusCode::kResourceExhausted) << full.status();
  EXPECT_TRUE(absl::StrContains(full.status().message(), "cuda:0")) << full.status();
  EXPECT_TRUE(absl::StrContains(full.status().message(), "bytes are free")) << full.status();
  options.reserve_bytes = 0;
  options.devices = {4096};
  EXPECT_EQ(CreateCudaExpertBackend(model->get(), options).status().code(),
            absl::StatusCode::kInvalidArgument);
}
#endif

// Runs everywhere: without a usable device (or without CUDA) the factory says why, with the code
// of the device listing, and never crashes.
TEST(CudaExpertBackendTest, WithoutDeviceReportsWhy) {
  absl::StatusOr<std::vector<CudaDeviceInfo>> devices = ListCudaDevices();
  if (devices.ok()) GTEST_SKIP() << "this machine has a CUDA device";
  absl::StatusOr<std::string> path = SynthModelForCudaTests("tiny", "Q4_K_M");
  ASSERT_TRUE(path.ok()) << path.status();
  auto model = Model::Load(*path);
  ASSERT_TRUE(model.ok()) << model.status();
  CudaExpertOptions options;
  options.show_progress = false;
  auto backend = CreateCudaExpertBackend(model->get(), options);
  ASSERT_FALSE(backend.ok());
  EXPECT_EQ(backend.status().code(), devices.status().code()) << backend.status();
  EXPECT_TRUE(backend.status().code() == absl::StatusCode::kUnavailable ||
              backend.status().code() == absl::StatusCode::kFailedPrecondition)
      << backend.status();
  EXPECT_FALSE(backend.status().message().empty());
}

TEST(CudaExpertBackendTest, NullModelIsRejected) {
  auto backend = CreateCudaExpertBackend(nullptr, CudaExpertOptions());
  ASSERT_FALSE(backend.ok());
  EXPECT_TRUE(backend.status().code() == absl::StatusCode::kInvalidArgument ||
              backend.status().code() == absl::StatusCode::kFailedPrecondition)
      << backend.status();
}

}  // namespace
}  // namespace moepool::cuda
