// Conformance against the reference logits (../shared/testdata/conformance, regenerated
// 2026-12-06 from the reference implementation with Mixtral's MoE residual corrected), with the
// bars of its README: median NMSE <= 1e-4 / 5e-3 and top-1 >= 95% / 80% for F16 / quantized.
#include <string>
#include <vector>

#include "engine/model.h"
#include "engine/moe_ffn.h"
#include "engine/transformer.h"
#include "gtest/gtest.h"
#include "tests/engine/conformance_util.h"
#include "tests/testdata.h"

namespace moepool {
namespace {

using ::moepool::testing::ReadReferenceCase;
using ::moepool::testing::ReferenceCase;
using ::moepool::testing::SharedTestdataPath;

struct Bars {
  const char* model;
  double max_median_nmse;
  double min_top1;
  int greedy_prefix;  // tokens that must match; 0 = not compared
};

class ConformanceTest : public ::testing::TestWithParam<Bars> {};

std::vector<float> EvalPrompt(const Model& model, const std::vector<int32_t>& tokens,
                              ThreadPool* pool) {
  LocalExpertBackend experts(&model, pool);
  Transformer tf(&model, &experts, pool);
  KvCache cache(model.config(), 512);
  std::vector<BatchRow> rows;
  for (size_t i = 0; i < tokens.size(); ++i) {
    rows.push_back({tokens[i], static_cast<int64_t>(i), &cache, true});
  }
  std::vector<float> logits;
  EXPECT_TRUE(tf.Forward(rows, &logits).ok());
  return logits;
}

std::vector<int32_t> Greedy(const Model& model, const std::vector<int32_t>& prompt, int n,
                            ThreadPool* pool) {
  LocalExpertBackend experts(&model, pool);
  Transformer tf(&model, &experts, pool);
  KvCache cache(model.config(), 512);
  std::vector<BatchRow> rows;
  for (size_t i = 0; i < prompt.size(); ++i) {
    rows.push_back({prompt[i], static_cast<int64_t>(i), &cache, i + 1 == prompt.size()});
  }
  std::vector<int32_t> out;
  int64_t pos = static_cast<int64_t>(prompt.size());
  for (int step = 0; step < n; ++step) {
    std::vector<float> logits;
    EXPECT_TRUE(tf.Forward(rows, &logits).ok());
    const int32_t next = testing::Argmax(logits.data(), model.config().n_vocab);
    out.push_back(next);
    rows = {{next, pos++, &cache, true}};
  }
  return out;
}

TEST_P(ConformanceTest, MatchesReferenceLogits) {
  const Bars bars = GetParam();
  const std::string path = SharedTestdataPath(std::string("conformance/") + bars.model + ".gguf");
  REQUIRE_TESTDATA(path);
  auto model = Model::Load(path);
  ASSERT_TRUE(model.ok()) << model.status();
  ThreadPool pool(2);
  std::vector<double> nmse;
  int agree = 0, total = 0;
  for (const char* prompt : {"p1", "p2"}) {
    const ReferenceCase rc = ReadReferenceCase(bars.model, prompt);
    ASSERT_EQ(rc.n_vocab, (*model)->config().n_vocab);
    const std::vector<float> logits = EvalPrompt(**model, rc.prompt_tokens, &pool);
    ASSERT_EQ(logits.size(), rc.logits.size());
    const auto row_nmse = testing::RowNmse(logits, rc.logits, rc.n_vocab);
    nmse.insert(nmse.end(), row_nmse.begin(), row_nmse.end());
    agree += testing::Top1Agreement(logits, rc.logits, rc.n_vocab);
    total += static_cast<int>(rc.prompt_tokens.size());
    if (bars.greedy_prefix > 0) {
      const auto greedy = Greedy(**model, rc.prompt_tokens, bars.greedy_prefix, &pool);
      const std::vector<int32_t> want(rc.greedy_tokens.begin(),
                                      rc.greedy_tokens.begin() + bars.greedy_prefix);
      EXPECT_EQ(greedy, want) << bars.model << " " << prompt;
    }
  }
  const double median = testing::Median(nmse);
  const double top1 = static_cast<double>(agree) / total;
  RecordProperty("median_nmse", std::to_string(median));
  RecordProperty("top1", std::to_string(top1));
  std::printf("%s: median NMSE %.3g, top-1 agreement %.1f%% (%d/%d)\n", bars.model, median,
              100 * top1, agree, total);
  EXPECT_LE(median, bars.max_median_nmse);
  EXPECT_GE(top1, bars.min_top1);
}

INSTANTIATE_TEST_SUITE_P(SharedModels, ConformanceTest,
                         ::testing::Values(Bars{"tiny-F16", 1e-4, 0.95, 8},
                                           Bars{"tiny-Q8_0", 5e-3, 0.80, 0},
                                           Bars{"tiny-Q4_K_M", 5e-3, 0.80, 0}),
                         [](const auto& info) {
                           std::string s = info.param.model;
                           for (char& ch : s) ch = (ch == '-' ? '_' : ch);
                           return s;
                         });

}  // namespace
}  // namespace moepool
