// q8_0 rows on the wire (--wire-dtype q8_0): bit-identical where the workers' kernels take Q8_0
// activations and the sums come back in f32; within the engine's conformance bars against the
// reference logits otherwise (shared models, sums returned in f16, the default).
#include <cstdio>
#include <map>
#include <string>
#include <vector>

#include "coordinator/cluster_expert_backend.h"
#include "engine/engine.h"
#include "engine/synth.h"
#include "gtest/gtest.h"
#include "tests/coordinator/cluster_run_util.h"
#include "tests/coordinator/fake_worker_util.h"
#include "tests/engine/conformance_util.h"
#include "tests/testdata.h"

namespace moepool {
namespace {

namespace pb = ::moepool::v1;
using ::moepool::testing::FakeWorker;
using ::moepool::testing::FakeWorkerOptions;
using ::moepool::testing::PairsForExperts;

struct TwoWorkers {
  std::unique_ptr<FakeWorker> a, b;
  ClusterOptions options;
};

TwoWorkers StartTwo(const std::string& model, int n_layer) {
  TwoWorkers t;
  FakeWorkerOptions o;
  o.model_path = model;
  o.pairs = PairsForExperts(n_layer, 0, 3);
  auto a = FakeWorker::Start(o);
  o.pairs = PairsForExperts(n_layer, 4, 7);
  auto b = FakeWorker::Start(o);
  EXPECT_TRUE(a.ok() && b.ok());
  if (!a.ok() || !b.ok()) return t;
  t.a = *std::move(a);
  t.b = *std::move(b);
  t.options = ::moepool::testing::TestClusterOptions({t.a->address(), t.b->address()});
  return t;
}

// Logits of every position of `tokens`, evaluated in one batch.
std::vector<float> Logits(Engine& e, const std::vector<int32_t>& tokens) {
  KvCache cache(e.config(), e.n_ctx());
  auto logits = e.EvalPrompt(tokens, &cache, /*all_logits=*/true);
  EXPECT_TRUE(logits.ok()) << logits.status();
  return logits.ok() ? *logits : std::vector<float>();
}

// Weights whose kernels quantize their input to Q8_0 compute on exactly the blocks the
// coordinator sends: with f32 sums back the result is the local one, bit for bit.
TEST(Q8WireTest, Q8_0WeightsWithF32SumsBitIdenticalToLocal) {
  const std::string& model = ::moepool::testing::SmallModel("Q8_0");
  TwoWorkers t = StartTwo(model, 2);
  ASSERT_NE(t.b, nullptr);
  t.options.wire_dtype = pb::DTYPE_Q8_0;
  t.options.wire_return_dtype = pb::DTYPE_F32;
  auto backend = ClusterExpertBackend::Create(model, t.options);
  ASSERT_TRUE(backend.ok()) << backend.status();
  auto local = ::moepool::testing::LoadEngineWithExperts(model, nullptr, 256);
  auto cluster = ::moepool::testing::LoadEngineWithExperts(model, backend->get(), 256);
  std::vector<int32_t> tokens;
  for (int i = 0; i < 40; ++i) tokens.push_back(3 + (i * 37) % 200);
  ::moepool::testing::ExpectBitIdentical(Logits(*local, tokens), Logits(*cluster, tokens));
  EXPECT_GT(t.a->forward_requests(), 0);
  EXPECT_GT(t.b->forward_requests(), 0);
}

struct Q8Case {
  const char* model;
  double max_median_nmse;  // the engine's bars (tests/engine/conformance_test.cc)
  double min_top1;
};

class Q8ConformanceTest : public ::testing::TestWithParam<Q8Case> {};

// Distributed with q8_0 rows (f16 sums back) against the reference logits, within the bars the
// single-process engine meets; and it does differ from the local result (rows were rounded).
TEST_P(Q8ConformanceTest, WithinTheEnginesBars) {
  const Q8Case c = GetParam();
  const std::string path =
      ::moepool::testing::SharedTestdataPath(std::string("conformance/") + c.model + ".gguf");
  REQUIRE_TESTDATA(path);
  auto probe = Model::Load(path);
  ASSERT_TRUE(probe.ok()) << probe.status();
  TwoWorkers t = StartTwo(path, static_cast<int>((*probe)->config().n_layer));
  ASSERT_NE(t.b, nullptr);
  t.options.wire_dtype = pb::DTYPE_Q8_0;
  auto backend = ClusterExpertBackend::Create(path, t.options);
  ASSERT_TRUE(backend.ok()) << backend.status();
  auto local = ::moepool::testing::LoadEngineWithExperts(path, nullptr, 512);
  auto cluster = ::moepool::testing::LoadEngineWithExperts(path, backend->get(), 512);
  std::vector<double> nmse, drift;
  int agree = 0, total = 0;
  for (const char* prompt : {"p1", "p2"}) {
    const auto rc = ::moepool::testing::ReadReferenceCase(c.model, prompt);
    const std::vector<float> got = Logits(*cluster, rc.prompt_tokens);
    ASSERT_EQ(got.size(), rc.logits.size());
    const auto row_nmse = ::moepool::testing::RowNmse(got, rc.logits, rc.n_vocab);
    nmse.insert(nmse.end(), row_nmse.begin(), row_nmse.end());
    agree += ::moepool::testing::Top1Agreement(got, rc.logits, rc.n_vocab);
    total += static_cast<int>(rc.logits.size() / static_cast<size_t>(rc.n_vocab));
    const auto d = ::moepool::testing::RowNmse(got, Logits(*local, rc.prompt_tokens), rc.n_vocab);
    drift.insert(drift.end(), d.begin(), d.end());
  }
  const double median = ::moepool::testing::Median(nmse);
  const double top1 = static_cast<double>(agree) / total;
  std::printf("%s, q8_0 rows: median NMSE %.3g vs reference, top-1 %.1f%%; %.3g vs local\n",
              c.model, median, 100 * top1, ::moepool::testing::Median(drift));
  EXPECT_LE(median, c.max_median_nmse);
  EXPECT_GE(top1, c.min_top1);
  EXPECT_GT(::moepool::testing::Median(drift), 0.0) << "q8_0 rounding should show";
}

INSTANTIATE_TEST_SUITE_P(SharedModels, Q8ConformanceTest,
                         ::testing::Values(Q8Case{"tiny-F16", 1e-4, 0.95},
                                           Q8Case{"tiny-Q8_0", 5e-3, 0.80},
                                           Q8Case{"tiny-Q4_K_M", 5e-3, 0.80}),
                         [](const auto& info) {
                           std::string name = info.param.model;
                           for (char& ch : name) {
                             if (ch == '-') ch = '_';
                           }
                           return name;
                         });

// The tiny shape (n_embd 256, 4 layers: K-quant rows fit) in `type`, synthesized once.
const std::string& TinyModel(const std::string& type) {
  static auto* paths = new std::map<std::string, std::string>;
  if (auto it = paths->find(type); it != paths->end()) return it->second;
  SynthOptions o;
  auto shape = SynthShapeByName("tiny");
  EXPECT_TRUE(shape.ok());
  o.shape = *shape;
  o.type = type;
  o.vocab_path = std::string(MOEPOOL_SOURCE_DIR) + "/" + kDefaultSynthVocabPath;
  o.out_path = ::moepool::testing::TempDir() + "/q8-wire-tiny-" + type + ".gguf";
  const absl::Status s = SynthesizeModel(o);
  EXPECT_TRUE(s.ok()) << s;
  return paths->emplace(type, o.out_path).first->second;
}

class Q8SynthTypesTest : public ::testing::TestWithParam<const char*> {};

// Every weight type the engine reads, on a synthesized model: q8_0 rows against the local
// result, within the engine's quantized bars (median NMSE <= 5e-3, top-1 >= 80%).
TEST_P(Q8SynthTypesTest, CloseToLocal) {
  const std::string& model = TinyModel(GetParam());
  TwoWorkers t = StartTwo(model, 4);
  ASSERT_NE(t.b, nullptr);
  t.options.wire_dtype = pb::DTYPE_Q8_0;
  auto backend = ClusterExpertBackend::Create(model, t.options);
  ASSERT_TRUE(backend.ok()) << backend.status();
  auto local = ::moepool::testing::LoadEngineWithExperts(model, nullptr, 256);
  auto cluster = ::moepool::testing::LoadEngineWithExperts(model, backend->get(), 256);
  std::vector<int32_t> tokens;
  for (int i = 0; i < 48; ++i) tokens.push_back(3 + (i * 53) % 250);
  const std::vector<float> want = Logits(*local, tokens);
  const std::vector<float> got = Logits(*cluster, tokens);
  const int64_t n_vocab = local->config().n_vocab;
  const double median = ::moepool::testing::Median(::moepool::testing::RowNmse(got, want, n_vocab));
  const double top1 = static_cast<double>(::moepool::testing::Top1Agreement(got, want, n_vocab)) /
                      static_cast<double>(tokens.size());
  std::printf("%s, q8_0 rows vs local: median NMSE %.3g, top-1 %.1f%%\n", GetParam(), median,
              100 * top1);
  EXPECT_LE(median, 5e-3);
  EXPECT_GE(top1, 0.80);
}

INSTANTIATE_TEST_SUITE_P(Types, Q8SynthTypesTest,
                         ::testing::Values("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0",
                                           "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"));

}  // namespace
}  // namespace moepool
