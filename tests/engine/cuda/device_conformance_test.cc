// The device engine against the reference implementation's logits (../shared/testdata/
// conformance), with the CPU engine's bars (tests/engine/conformance_test.cc), and against the
// CPU engine on synthesized models of every weight mix. Attention, router and head run behind
// the device forward pass (engine/cuda/device_attention.h), typed over its DeviceOps.
// CpuReference (every build): the host-reference ops with the experts' host reference
// (RefExpertFfn), i.e. the GPU engine's arithmetic on the CPU, so the device orchestration meets
// the bars in CI. Cuda (CUDA builds with a device): attention and experts both on GPU 0, the
// whole GPU engine; skipped without a device, a failure under MOEPOOL_REQUIRE_GPU=1. The GPU
// bundle carries tiny-Q4_K_M (deploy/gpu/pack.sh); the other reference models are checked where
// the shared files are. The synthesized models need nothing but the vocabulary.
#include <cstdio>
#include <memory>
#include <string>
#include <type_traits>
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

// Attention and experts on their host references.
struct ReferenceEngine {
  static absl::Status Available() { return absl::OkStatus(); }
  static absl::StatusOr<std::unique_ptr<ExpertBackend>> Experts(const Model* model, ThreadPool*) {
    return CreateReferenceExpertBackend(model);
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

// A model with the device engine's backends and a forward pass over them.
struct DeviceStack {
  std::unique_ptr<ExpertBackend> experts;
  std::unique_ptr<AttentionBackend> attention;
  std::unique_ptr<Transformer> transformer;
};

template <class DeviceEngine>
void MakeStack(const Model* model, ThreadPool* pool, DeviceStack* stack) {
  absl::StatusOr<std::unique_ptr<ExpertBackend>> experts = DeviceEngine::Experts(model, pool);
  ASSERT_TRUE(experts.ok()) << experts.status();
  absl::StatusOr<std::unique_ptr<AttentionBackend>> attention = DeviceEngine::Attention(model);
  ASSERT_TRUE(attention.ok()) << attention.status();
  stack->experts = std::move(*experts);
  stack->attention = std::move(*attention);
  TransformerOptions options;
  options.attention = stack->attention.get();
  stack->transformer = std::make_unique<Transformer>(model, stack->experts.get(), pool, options);
}

template <class DeviceEngine>
class DeviceConformanceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const absl::Status available = DeviceEngine::Available();
    if (!available.ok()) {
      if (GpuRequired()) FAIL() << "MOEPOOL_REQUIRE_GPU=1 but no usable CUDA device: " << available;
      GTEST_SKIP() << "no CUDA device here (" << available << ")";
    }
  }

  void Check(const Bars& bars) {
    const std::string path = SharedTestdataPath(std::string("conformance/") + bars.model + ".gguf");
    REQUIRE_TESTDATA(path);
    absl::StatusOr<std::unique_ptr<Model>> model = Model::Load(path);
    ASSERT_TRUE(model.ok()) << model.status();
    ThreadPool pool(2);
    DeviceStack stack;
    ASSERT_NO_FATAL_FAILURE(MakeStack<DeviceEngine>(model->get(), &pool, &stack));
    Transformer& tf = *stack.transformer;
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

  // The synthesized tiny model of weight mix `type` through the device engine and the CPU engine
  // (LocalExpertBackend, CPU attention): two 32-token prompts, each followed by 8 decode steps fed
  // the CPU's greedy tokens, so that both engines see the same 80 rows. Median NMSE and top-1
  // agreement against the bars. On a GPU the device's logits are also held to the host
  // reference's (the same f32 arithmetic but for summation order): median NMSE <= 1e-6.
  void CheckAgainstCpuEngine(const std::string& type, double max_median_nmse, double min_top1) {
    absl::StatusOr<std::string> path = SynthModelForCudaTests("tiny", type);
    ASSERT_TRUE(path.ok()) << path.status();
    absl::StatusOr<std::unique_ptr<Model>> model = Model::Load(*path);
    ASSERT_TRUE(model.ok()) << model.status();
    const ModelConfig& c = (*model)->config();
    ThreadPool pool(2);
    DeviceStack stack, reference;
    ASSERT_NO_FATAL_FAILURE(MakeStack<DeviceEngine>(model->get(), &pool, &stack));
    constexpr bool kOnGpu = !std::is_same_v<DeviceEngine, ReferenceEngine>;
    if (kOnGpu) {
      ASSERT_NO_FATAL_FAILURE(MakeStack<ReferenceEngine>(model->get(), &pool, &reference));
    }
    LocalExpertBackend cpu_experts(model->get(), &pool);
    Transformer cpu(model->get(), &cpu_experts, &pool);
    std::vector<double> nmse, ref_nmse;
    int agree = 0, total = 0;
    for (int prompt = 0; prompt < 2; ++prompt) {
      KvCache cpu_cache(c, 64), dev_cache(c, 64), ref_cache(c, 64);
      std::vector<int32_t> tokens;
      for (int i = 0; i < 32; ++i) tokens.push_back(3 + (i * 7919 + prompt * 104729) % 31000);
      int64_t from = 0;
      for (int step = 0; step <= 8; ++step) {
        const auto rows = [&](KvCache* cache) {
          std::vector<BatchRow> out;
          for (int64_t i = from; i < static_cast<int64_t>(tokens.size()); ++i) {
            out.push_back({tokens[static_cast<size_t>(i)], i, cache, true});
          }
          return out;
        };
        std::vector<float> want, got;
        ASSERT_TRUE(cpu.Forward(rows(&cpu_cache), &want).ok());
        const absl::Status s = stack.transformer->Forward(rows(&dev_cache), &got);
        ASSERT_TRUE(s.ok()) << s;
        ASSERT_EQ(got.size(), want.size());
        const std::vector<double> row_nmse = testing::RowNmse(got, want, c.n_vocab);
        nmse.insert(nmse.end(), row_nmse.begin(), row_nmse.end());
        agree += testing::Top1Agreement(got, want, c.n_vocab);
        total += static_cast<int>(row_nmse.size());
        if (kOnGpu) {
          std::vector<float> host;
          ASSERT_TRUE(reference.transformer->Forward(rows(&ref_cache), &host).ok());
          const std::vector<double> r = testing::RowNmse(got, host, c.n_vocab);
          ref_nmse.insert(ref_nmse.end(), r.begin(), r.end());
        }
        from = static_cast<int64_t>(tokens.size());
        tokens.push_back(testing::Argmax(want.data() + want.size() - c.n_vocab, c.n_vocab));
      }
    }
    const double median = testing::Median(nmse);
    const double top1 = static_cast<double>(agree) / total;
    std::printf(
        "synthesized tiny %s, device engine vs CPU engine: median NMSE %.3g, top-1 "
        "agreement %.1f%% (%d/%d)\n",
        type.c_str(), median, 100 * top1, agree, total);
    EXPECT_LE(median, max_median_nmse) << type;
    EXPECT_GE(top1, min_top1) << type;
    if (kOnGpu) {
      const double ref_median = testing::Median(ref_nmse);
      std::printf("  vs the host reference of the same arithmetic: median NMSE %.3g\n", ref_median);
      EXPECT_LE(ref_median, 1e-6) << type;
    }
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
TYPED_TEST(DeviceConformanceTest, TinyQ8_0) { this->Check({"tiny-Q8_0", 5e-3, 0.80, 0}); }
TYPED_TEST(DeviceConformanceTest, TinyQ4_K_M) { this->Check({"tiny-Q4_K_M", 5e-3, 0.80, 0}); }

// Every weight mix the synthesizer writes, against the CPU engine on the same file. With F16 and
// BF16 weights both engines keep f32 activations: tight bars (measured 1.3e-9 and 7.8e-10). With
// quantized weights the CPU rounds activations to q8 and the device does not; the NMSE bar is
// the reference suite's (5e-3; measured 4.3e-4..1.5e-3). Top-1 is looser than there (80%; measured
// 85-95% over the 80 rows): on these random models a q8 rounding now and then flips a near-tied
// top-2 expert choice, which moves that row's logits a lot. A kernel slip costs far more.
TYPED_TEST(DeviceConformanceTest, SynthesizedWeightMixesMatchTheCpuEngine) {
  for (const char* type : {"F16", "BF16"}) this->CheckAgainstCpuEngine(type, 1e-6, 0.97);
  for (const char* type :
       {"Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K"}) {
    this->CheckAgainstCpuEngine(type, 5e-3, 0.8);
  }
}

}  // namespace
}  // namespace moepool::cuda
