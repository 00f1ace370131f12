// "The same bars on other shapes, seeds, quant types and the per-expert layout": every stored
// type, synthesized from the same seed as an F32 model, is checked three ways.
//
//  1. kernels: its prompt logits against an F32 copy holding its own weights dequantized. Both
//     models have the same weights, so the only differences are the activation quantization of
//     the dot products and summation order: the situation of the shared reference bars. A broken
//     vec_dot kernel or activation quantizer lands near NMSE 1 and top-1 near 0%.
//  2. quantizer: its dequantized weights against the F32 weights (NMSE over all quantized
//     tensors). Not chaotic, so the bounds are tight. A broken quantizer lands near 1.
//  3. end to end: its prompt logits against the F32 model's. This adds the weight quantization
//     error, which these chaotic random models amplify (a small error flips a router's top-2
//     choice and changes a whole position), so below 5 bits the logits are nearly unrelated and
//     the bounds only document that.
// All bounds were measured (kBars) and hold on seeds 7 to 11; the test runs seed 7.
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/gguf_writer.h"
#include "engine/model.h"
#include "engine/moe_ffn.h"
#include "engine/synth.h"
#include "engine/tokenizer.h"
#include "engine/transformer.h"
#include "gtest/gtest.h"
#include "tests/engine/conformance_util.h"
#include "tests/engine/tiny_model_util.h"
#include "tests/testdata.h"

namespace moepool {
namespace {

using ::moepool::testing::TinyModelPath;

constexpr int kPromptTokens = 24;
constexpr int64_t kVocab = 32000;

// Seed 7; MOEPOOL_SYNTH_CONFORMANCE_SEED=N re-measures the table on another seed.
uint64_t Seed() {
  const char* env = std::getenv("MOEPOOL_SYNTH_CONFORMANCE_SEED");
  return env != nullptr ? std::strtoull(env, nullptr, 10) : 7;
}

struct TypeBars {
  const char* type;
  bool per_expert;
  double max_weight_nmse;  // 2. dequantized weights vs F32 weights
  double max_f32_nmse;     // 3. logits vs the F32 model: median NMSE
  double min_f32_top1;     //    and top-1 agreement
};

// Measured on seeds 7, 8, 9, 10, 11 (two 24-token prompts pooled), 2026-12-06, with Mixtral's
// MoE residual (h + MoE(ffn_norm(h)); the earlier table was measured with the reference
// implementation's normalised-input residual, which made these models far more chaotic):
//   weights: the same to 3 digits on every seed; bound = 1.3x.
//   logits vs F32: median NMSE max over the seeds / top-1 min over the seeds in the comment;
//   bound about 2x the NMSE and 10-20 points below the top-1.
constexpr TypeBars kBars[] = {
    {"F16", false, 6e-8, 1.2e-6, 0.95},     // 5.8e-7 | 100%
    {"BF16", false, 3.6e-6, 6e-5, 0.85},    // 2.6e-5 | 96%
    {"Q8_0", false, 3.7e-5, 1.5e-3, 0.80},  // 6.2e-4 | 92%
    {"Q6_K", false, 4.1e-4, 2e-2, 0.50},    // 9.3e-3 | 67%
    {"Q5_K", false, 1.7e-3, 4e-2, 0.50},    // 2.0e-2 | 67%
    {"Q5_0", false, 2.4e-3, 5e-2, 0.45},    // 2.3e-2 | 60%
    {"Q5_1", false, 1.9e-3, 5e-2, 0.45},    // 2.1e-2 | 62%
    {"Q4_K", false, 6.7e-3, 0.15, 0.10},    // 0.075 | 23%
    {"Q4_0", false, 9.6e-3, 0.2, 0.10},     // 0.099 | 27%
    {"Q4_1", false, 8e-3, 0.2, 0.15},       // 0.093 | 31%
    {"Q4_K_M", false, 6.3e-3, 0.1, 0.25},   // 0.048 | 40%
    {"Q4_K_M", true, 6.3e-3, 0.1, 0.25},    // identical to the merged layout
    {"Q3_K", false, 3e-2, 0.55, 0.0},       // 0.27 | 6%
    {"Q2_K", false, 0.107, 1.4, 0.0},       // 0.67 | 2%
};

// 1. Same weights, two valid computations. On seeds 7 to 11 every type meets the shared
// reference bars but one (median NMSE <= 5e-3, top-1 >= 80%; worst: Q6_K seed 10, 3.6e-3 and
// 77%: a router near-tie at an early position flipped an expert there and spread to later
// positions through attention). A legitimate change of summation order re-rolls these
// near-ties, so the bounds allow such a run; a broken kernel gives NMSE ~1 and top-1 ~0%.
constexpr double kKernelMaxNmse = 1.5e-2;
constexpr double kKernelMinTop1 = 0.60;

// The logits of every position of each prompt, evaluated separately, concatenated.
std::vector<float> PromptLogits(const std::string& path,
                                const std::vector<std::vector<int32_t>>& prompts,
                                ThreadPool* pool) {
  auto model = Model::Load(path);
  EXPECT_TRUE(model.ok()) << model.status();
  if (!model.ok()) return {};
  LocalExpertBackend experts(model->get(), pool);
  Transformer tf(model->get(), &experts, pool);
  std::vector<float> logits;
  for (const std::vector<int32_t>& tokens : prompts) {
    KvCache cache((*model)->config(), kPromptTokens);
    std::vector<BatchRow> rows;
    for (size_t i = 0; i < tokens.size(); ++i) {
      rows.push_back({tokens[i], static_cast<int64_t>(i), &cache, true});
    }
    const absl::Status s = tf.Forward(rows, &logits);
    EXPECT_TRUE(s.ok()) << s;
  }
  return logits;
}

// Writes `dst`: `src` with every tensor dequantized to F32. Accumulates the squared error of the
// non-F32 tensors against the same-named F32 tensors of `f32` into *err and their norm into *norm.
absl::Status WriteDequantizedCopy(const std::string& src, const std::string& dst,
                                  const GgufFile& f32, double* err, double* norm) {
  auto in = GgufFile::Open(src);
  if (!in.ok()) return in.status();
  GgufWriter writer((*in)->alignment());
  for (const auto& [key, value] : (*in)->metadata()) writer.AddMetadata(key, value);
  for (const GgufTensorInfo& t : (*in)->tensors()) {
    absl::Status s =
        writer.AddTensor(t.name, TensorType::kF32, std::vector<int64_t>(t.dims, t.dims + t.n_dims));
    if (!s.ok()) return s;
  }
  absl::Status s = writer.Begin(dst);
  if (!s.ok()) return s;
  std::vector<float> values;
  for (const GgufTensorInfo& t : (*in)->tensors()) {
    values.resize(static_cast<size_t>(t.NumElements()));
    const size_t row_bytes = RowBytes(t.type, t.dims[0]);
    for (int64_t r = 0; r < t.NumRows(); ++r) {
      GetTypeTraits(t.type).dequantize(t.data + r * row_bytes, &values[r * t.dims[0]], t.dims[0]);
    }
    const GgufTensorInfo* ref = f32.FindTensor(t.name);
    size_t ref_offset = 0;  // elements
    int layer = 0, expert = 0;
    char kind[8] = {};
    if (ref == nullptr &&
        std::sscanf(t.name.c_str(), "blk.%d.ffn_%4[a-z].%d.weight", &layer, kind, &expert) == 3) {
      // Per-expert tensor: the F32 model is merged, holding it as slice `expert`.
      ref = f32.FindTensor(absl::StrCat("blk.", layer, ".ffn_", kind, "_exps.weight"));
      ref_offset = static_cast<size_t>(expert) * static_cast<size_t>(t.NumElements());
    }
    if (ref == nullptr || ref->type != TensorType::kF32 ||
        ref->NumElements() < static_cast<int64_t>(ref_offset) + t.NumElements()) {
      return absl::InternalError(absl::StrCat("no F32 counterpart of ", t.name));
    }
    if (t.type != TensorType::kF32) {
      const float* want = reinterpret_cast<const float*>(ref->data) + ref_offset;
      for (size_t i = 0; i < values.size(); ++i) {
        *err += (static_cast<double>(values[i]) - want[i]) * (values[i] - want[i]);
        *norm += static_cast<double>(want[i]) * want[i];
      }
    }
    s = writer.WriteTensorData(t.name, values.data(), values.size() * sizeof(float));
    if (!s.ok()) return s;
  }
  return writer.Finish();
}

struct Agreement {
  double median_nmse;
  double top1;
};

Agreement Compare(const std::vector<float>& got, const std::vector<float>& want) {
  return {testing::Median(testing::RowNmse(got, want, kVocab)),
          static_cast<double>(testing::Top1Agreement(got, want, kVocab)) /
              static_cast<double>(got.size() / kVocab)};
}

TEST(SynthConformanceTest, EveryTypeMatchesItsWeightsAndApproximatesF32) {
  const std::string& f32_path = TinyModelPath("F32", Seed());
  ASSERT_FALSE(f32_path.empty());
  auto f32_file = GgufFile::Open(f32_path);
  ASSERT_TRUE(f32_file.ok()) << f32_file.status();
  // Two prompts of kPromptTokens tokens, pooled (as the shared reference bars are).
  std::vector<std::vector<int32_t>> prompts;
  {
    auto tok = Tokenizer::FromGguf(**f32_file);
    ASSERT_TRUE(tok.ok()) << tok.status();
    for (const char* text :
         {"Mixtral sends every token through two of its eight experts, and the router learns "
          "which experts suit which tokens best.",
          "In the beginning the Universe was created. This has made a lot of people very angry "
          "and been widely regarded as a bad move."}) {
      prompts.push_back((*tok)->Encode(text, true));
      ASSERT_GE(prompts.back().size(), static_cast<size_t>(kPromptTokens));
      prompts.back().resize(kPromptTokens);
    }
  }
  ThreadPool pool(2);
  const std::vector<float> f32_logits = PromptLogits(f32_path, prompts, &pool);
  ASSERT_EQ(f32_logits.size(), prompts.size() * kPromptTokens * kVocab);
  const std::string dequant_path = testing::TempDir() + "/synth-conformance-dequantized.gguf";

  std::printf("seed %llu        kernels: NMSE  top-1  weights: NMSE  vs F32: NMSE  top-1\n",
              static_cast<unsigned long long>(Seed()));
  for (const TypeBars& bars : kBars) {
    const std::string name = std::string(bars.type) + (bars.per_expert ? " per-expert" : "");
    SCOPED_TRACE(name);
    const std::string& path = TinyModelPath(bars.type, Seed(), bars.per_expert);
    ASSERT_FALSE(path.empty());
    const std::vector<float> logits = PromptLogits(path, prompts, &pool);
    ASSERT_EQ(logits.size(), f32_logits.size());

    double err = 0, norm = 0;
    ASSERT_TRUE(WriteDequantizedCopy(path, dequant_path, **f32_file, &err, &norm).ok());
    const Agreement kernels = Compare(logits, PromptLogits(dequant_path, prompts, &pool));
    const double weight_nmse = err / norm;
    const Agreement end_to_end = Compare(logits, f32_logits);

    std::printf("%-18s %13.3g %5.0f%% %14.3g %13.3g %5.0f%%\n", name.c_str(), kernels.median_nmse,
                100 * kernels.top1, weight_nmse, end_to_end.median_nmse, 100 * end_to_end.top1);
    RecordProperty(name + " kernel_median_nmse", std::to_string(kernels.median_nmse));
    RecordProperty(name + " weight_nmse", std::to_string(weight_nmse));
    RecordProperty(name + " f32_median_nmse", std::to_string(end_to_end.median_nmse));
    EXPECT_LE(kernels.median_nmse, kKernelMaxNmse);
    EXPECT_GE(kernels.top1, kKernelMinTop1);
    EXPECT_GT(weight_nmse, 0.0);
    EXPECT_LE(weight_nmse, bars.max_weight_nmse);
    EXPECT_LE(end_to_end.median_nmse, bars.max_f32_nmse);
    EXPECT_GE(end_to_end.top1, bars.min_f32_top1);
  }
}

}  // namespace
}  // namespace moepool
