// The device engine against the reference implementation's logits (../shared/testdata/
// conformance), with the CPU engine's bars (tests/engine/conformance_test.cc): attention, router
// and head behind the device forward pass (engine/cuda/device_attention.h), typed over its
// DeviceOps. CpuReference (every build): the host-reference ops with the CPU experts, so the
// device orchestration itself meets the bars in CI. Cuda (CUDA builds with a device): attention
// and experts both on GPU 0, the whole GPU engine; skipped without a device, a failure under
// MOEPOOL_REQUIRE_GPU=1. The GPU bundle carries tiny-Q4_K_M (deploy/gpu/pack.sh); the other
// models are checked where the shared files are.
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/cuda/cuda_backend.h"
#include "engine/cuda/device_attention.h"
#include "engine/cuda/device_ops.h"
#include "engine/kv_cache.h"
#include "engine/model.h"
#include "engine/moe_ffn.h"
#include "engine/thread_pool.h"
#include "engine/transformer.h"
#include "gtest/gtest.h"
#include "tests/engine/conformance_util.h"
#include "tests/engine/cuda/ffn_test_util.h"
#include "tests/testdata.h"

namespace moepool::cuda {
namespace {

using ::moepool::testing::ReadReferenceCase;
using ::moepool::testing::ReferenceCase;
using ::moepool::testing::SharedTestdataPath;

// Attention on the host reference, experts on the CPU.
struct ReferenceEngine {
  static absl::Status Available() { return absl::OkStatus(); }
  static absl::StatusOr<std::unique_ptr<ExpertBackend>> Experts(const Model* model,
                                                                ThreadPool* pool) {
    return std::unique_ptr<ExpertBackend>(new LocalExpertBackend(model, pool));
  }
  static absl::StatusOr<std::unique_ptr<AttentionBackend>> Attention(const Model* model) {
    return CreateDeviceAttentionBackend(model, CreateReferenceDeviceOps());
  }
};

// Everything but embedding and sampling on GPU 0.
struct CudaEngine {
  static absl::Status Available() {
    absl::StatusOr<std::vector<CudaDeviceInfo>> devices = ListCudaDevices();
    return devices.ok() ? absl::OkStatus() : devices.status();
  }
  static absl::StatusOr<std::unique_ptr<ExpertBackend>> Experts(const Model* model, ThreadPool*) {
    CudaExpertOptions options;
    options.show_progress = false;
    return CreateCudaExpertBackend(model, options);
  }
  static absl::StatusOr<std::unique_ptr<AttentionBackend>> Attention(const Model* model) {
    return CreateCudaAttentionBackend(model, 0);
  }
};

struct Bars {
  const char* model;
  double max_median_nmse;
  double min_top1;
  int greedy_prefix;  // tokens that must match; 0 = not compared
};

template <class DeviceEngine>
class DeviceConformanceTest : public ::testing::Test {
 protected:
  void Check(const Bars& bars) {
    const absl::Status available = DeviceEngine::Available();
    if (!available.ok()) {
      if (GpuRequired()) FAIL() << "MOEPOOL_REQUIRE_GPU=1 but no usable CUDA device: " << available;
      GTEST_SKIP() << "no CUDA device here (" << available << ")";
    }
    const std::string path = SharedTestdataPath(std::string("conformance/") + bars.model + ".gguf");
    REQUIRE_TESTDATA(path);
    absl::StatusOr<std::unique_ptr<Model>> model = Model::Load(path);
    ASSERT_TRUE(model.ok()) << model.status();
    ThreadPool pool(2);
    absl::StatusOr<std::unique_ptr<ExpertBackend>> experts =
        DeviceEngine::Experts(model->get(), &pool);
    ASSERT_TRUE(experts.ok()) << experts.status();
    absl::StatusOr<std::unique_ptr<AttentionBackend>> attention =
        DeviceEngine::Attention(model->get());
    ASSERT_TRUE(attention.ok()) << attention.status();
    TransformerOptions options;
    options.attention = attention->get();
    Transformer tf(model->get(), experts->get(), &pool, options);
    const int64_t n_vocab = (*model)->config().n_vocab;
    std::vector<double> nmse;
    int agree = 0, total = 0;
    for (const char* prompt : {"p1", "p2"}) {
      const ReferenceCase rc = ReadReferenceCase(bars.model, prompt);
      ASSERT_EQ(rc.n_vocab, n_vocab);
      KvCache cache((*model)->config(), 512);
      std::vector<BatchRow> rows;
      for (size_t i = 0; i < rc.prompt_tokens.size(); ++i) {
        rows.push_back({rc.prompt_tokens[i], static_cast<int64_t>(i), &cache, true});
      }
      std::vector<float> logits;
      ASSERT_TRUE(tf.Forward(rows, &logits).ok());
      ASSERT_EQ(logits.size(), rc.logits.size());
      const std::vector<double> row_nmse = testing::RowNmse(logits, rc.logits, n_vocab);
      nmse.insert(nmse.end(), row_nmse.begin(), row_nmse.end());
      agree += testing::Top1Agreement(logits, rc.logits, n_vocab);
      total += static_cast<int>(rc.prompt_tokens.size());
      // Greedy continuation from the last prompt row, one decode step at a time.
      std::vector<int32_t> greedy;
      int64_t pos = static_cast<int64_t>(rc.prompt_tokens.size());
      const float* last = logits.data() + logits.size() - n_vocab;
      for (int step = 0; step < bars.greedy_prefix; ++step) {
        const int32_t next = testing::Argmax(last, n_vocab);
        greedy.push_back(next);
        logits.clear();
        const BatchRow row{next, pos++, &cache, true};
        ASSERT_TRUE(tf.Forward(absl::MakeConstSpan(&row, 1), &logits).ok());
        last = logits.data();
      }
      const std::vector<int32_t> want(rc.greedy_tokens.begin(),
                                      rc.greedy_tokens.begin() + bars.greedy_prefix);
      EXPECT_EQ(greedy, want) << bars.model << " " << prompt;
    }
    const double median = testing::Median(nmse);
    const double top1 = static_cast<double>(agree) / total;
    std::printf("%s on the device path: median NMSE %.3g, top-1 agreement %.1f%% (%d/%d)\n",
                bars.model, median, 100 * top1, agree, total);
    EXPECT_LE(median, bars.max_median_nmse);
    EXPECT_GE(top1, bars.min_top1);
  }
};

using Engines = ::testing::Types<ReferenceEngine
#ifdef MOEPOOL_HAVE_CUDA
                                 ,
                                 CudaEngine
#endif
                                 >;
TYPED_TEST_SUITE(DeviceConformanceTest, Engines, ReferenceOrCudaNames<ReferenceEngine>);

// The CPU engine's bars (conformance_test.cc).
TYPED_TEST(DeviceConformanceTest, TinyF16) { this->Check({"tiny-F16", 1e-4, 0.95, 8}); }
TYPED_TEST(DeviceConformanceTest, TinyQ8_0) { this->Check({"tiny-Q8_0", 5e-3, 0.85, 0}); }
TYPED_TEST(DeviceConformanceTest, TinyQ4_K_M) { this->Check({"tiny-Q4_K_M", 5e-3, 0.85, 0}); }

}  // namespace
}  // namespace moepool::cuda
