// The forward pass: batch invariance (bit-identical logits whatever the batch composition, the
// row's place in it and the thread count), argument errors, RmsNorm / RoPE values, and Mixtral's
// MoE residual against a direct one-layer computation.
#include "engine/transformer.h"

#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "engine/matmul.h"
#include "engine/model.h"
#include "engine/moe_ffn.h"
#include "engine/quant/fp16.h"
#include "engine/synth.h"
#include "gtest/gtest.h"
#include "tests/engine/tiny_model_util.h"
#include "tests/testdata.h"

namespace moepool {
namespace {

using ::moepool::testing::PseudoRandomPrompt;
using ::moepool::testing::TinyModelPath;

constexpr int64_t kCtx = 64;

// One row of `row` logits from a [n x n_vocab] block.
std::vector<float> Row(const std::vector<float>& logits, int64_t row, int64_t n_vocab) {
  return std::vector<float>(logits.begin() + row * n_vocab, logits.begin() + (row + 1) * n_vocab);
}

bool SameBits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// Index of the first element whose bits differ, or -1.
int64_t FirstDifference(const std::vector<float>& a, const std::vector<float>& b) {
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) {
    if (std::memcmp(&a[i], &b[i], sizeof(float)) != 0) return static_cast<int64_t>(i);
  }
  return a.size() == b.size() ? -1 : static_cast<int64_t>(std::min(a.size(), b.size()));
}

// A tiny model of one type, loaded once per suite instantiation.
class BatchInvarianceTest : public ::testing::TestWithParam<const char*> {
 protected:
  void SetUp() override {
    const std::string& path = TinyModelPath(GetParam());
    ASSERT_FALSE(path.empty());
    auto model = Model::Load(path);
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = std::move(*model);
    n_vocab_ = model_->config().n_vocab;
  }

  // Evaluates `tokens` of one sequence, from position 0, in chunks of `chunk` rows per Forward
  // call, returning the logits of every position.
  std::vector<float> EvalInChunks(const std::vector<int32_t>& tokens, size_t chunk, int threads) {
    ThreadPool pool(threads);
    LocalExpertBackend experts(model_.get(), &pool);
    Transformer tf(model_.get(), &experts, &pool);
    KvCache cache(model_->config(), kCtx);
    std::vector<float> logits;
    for (size_t start = 0; start < tokens.size(); start += chunk) {
      std::vector<BatchRow> rows;
      for (size_t i = start; i < std::min(tokens.size(), start + chunk); ++i) {
        rows.push_back({tokens[i], static_cast<int64_t>(i), &cache, true});
      }
      const absl::Status s = tf.Forward(rows, &logits);
      EXPECT_TRUE(s.ok()) << s;
    }
    return logits;
  }

  std::unique_ptr<Model> model_;
  int64_t n_vocab_ = 0;
};

TEST_P(BatchInvarianceTest, OneBatchEqualsTokenByTokenAndOtherChunkings) {
  const std::vector<int32_t> prompt = PseudoRandomPrompt(13, n_vocab_);
  const std::vector<float> batched = EvalInChunks(prompt, prompt.size(), 2);
  ASSERT_EQ(batched.size(), prompt.size() * n_vocab_);
  for (size_t chunk : {size_t{1}, size_t{4}}) {
    const std::vector<float> chunked = EvalInChunks(prompt, chunk, 2);
    const int64_t diff = FirstDifference(batched, chunked);
    EXPECT_EQ(diff, -1) << "chunk " << chunk << ": position " << diff / n_vocab_ << " token "
                        << diff % n_vocab_ << " differs";
  }
}

TEST_P(BatchInvarianceTest, ThreadCountDoesNotChangeLogits) {
  const std::vector<int32_t> prompt = PseudoRandomPrompt(9, n_vocab_, 2);
  const std::vector<float> one = EvalInChunks(prompt, prompt.size(), 1);
  for (int threads : {2, 3}) {
    const std::vector<float> many = EvalInChunks(prompt, prompt.size(), threads);
    const int64_t diff = FirstDifference(one, many);
    EXPECT_EQ(diff, -1) << threads << " threads: position " << diff / n_vocab_ << " differs";
  }
  // Decode steps too (one row per call, where parallelism splits the matrices differently).
  const std::vector<float> one_by_one = EvalInChunks(prompt, 1, 3);
  EXPECT_TRUE(SameBits(one, one_by_one));
}

// Two sequences with their own caches, interleaved in one Forward call (so each row sits at a
// different index next to different rows), give the same bits as each sequence alone; so do
// their next decode tokens batched together versus one at a time.
TEST_P(BatchInvarianceTest, InterleavedSequencesEqualEachAlone) {
  const std::vector<int32_t> a = PseudoRandomPrompt(10, n_vocab_, 3);
  const std::vector<int32_t> b = PseudoRandomPrompt(6, n_vocab_, 4);
  const std::vector<float> a_alone = EvalInChunks(a, a.size(), 2);
  const std::vector<float> b_alone = EvalInChunks(b, b.size(), 2);

  ThreadPool pool(2);
  LocalExpertBackend experts(model_.get(), &pool);
  Transformer tf(model_.get(), &experts, &pool);
  KvCache ca(model_->config(), kCtx), cb(model_->config(), kCtx);
  // B starts first; A's rows then alternate with B's until B runs out.
  std::vector<BatchRow> rows;
  std::vector<std::pair<char, size_t>> order;  // (sequence, position) of each logits row
  rows.push_back({b[0], 0, &cb, true});
  order.push_back({'b', 0});
  for (size_t i = 0; i < a.size(); ++i) {
    rows.push_back({a[i], static_cast<int64_t>(i), &ca, true});
    order.push_back({'a', i});
    if (i + 1 < b.size()) {
      rows.push_back({b[i + 1], static_cast<int64_t>(i + 1), &cb, true});
      order.push_back({'b', i + 1});
    }
  }
  std::vector<float> mixed;
  ASSERT_TRUE(tf.Forward(rows, &mixed).ok());
  ASSERT_EQ(mixed.size(), order.size() * n_vocab_);
  for (size_t r = 0; r < order.size(); ++r) {
    const auto [seq, pos] = order[r];
    const std::vector<float> want = Row(seq == 'a' ? a_alone : b_alone, pos, n_vocab_);
    EXPECT_TRUE(SameBits(Row(mixed, r, n_vocab_), want))
        << "sequence " << seq << " position " << pos << " (batch row " << r << ")";
  }

  // Decode: one more token for each, batched (B first) versus alone on copies of the state.
  const int32_t next_a = 4242, next_b = 777;
  std::vector<float> both;
  const BatchRow decode[] = {{next_b, static_cast<int64_t>(b.size()), &cb, true},
                             {next_a, static_cast<int64_t>(a.size()), &ca, true}};
  ASSERT_TRUE(tf.Forward(decode, &both).ok());
  std::vector<int32_t> a_longer = a, b_longer = b;
  a_longer.push_back(next_a);
  b_longer.push_back(next_b);
  EXPECT_TRUE(
      SameBits(Row(both, 0, n_vocab_), Row(EvalInChunks(b_longer, 1, 2), b.size(), n_vocab_)));
  EXPECT_TRUE(
      SameBits(Row(both, 1, n_vocab_), Row(EvalInChunks(a_longer, 1, 2), a.size(), n_vocab_)));
}

// Rows without want_logits produce no logits and do not change the others'.
TEST_P(BatchInvarianceTest, OnlyRowsThatWantLogitsGetThem) {
  const std::vector<int32_t> prompt = PseudoRandomPrompt(7, n_vocab_, 5);
  const std::vector<float> all = EvalInChunks(prompt, prompt.size(), 2);
  ThreadPool pool(2);
  LocalExpertBackend experts(model_.get(), &pool);
  Transformer tf(model_.get(), &experts, &pool);
  KvCache cache(model_->config(), kCtx);
  std::vector<BatchRow> rows;
  for (size_t i = 0; i < prompt.size(); ++i) {
    rows.push_back({prompt[i], static_cast<int64_t>(i), &cache, i == 2 || i == 6});
  }
  std::vector<float> some = {1.0f};  // Forward appends after what is there
  ASSERT_TRUE(tf.Forward(rows, &some).ok());
  ASSERT_EQ(some.size(), 1 + 2 * n_vocab_);
  EXPECT_EQ(some[0], 1.0f);
  const std::vector<float> rest(some.begin() + 1, some.end());
  EXPECT_TRUE(SameBits(Row(rest, 0, n_vocab_), Row(all, 2, n_vocab_)));
  EXPECT_TRUE(SameBits(Row(rest, 1, n_vocab_), Row(all, 6, n_vocab_)));
}

INSTANTIATE_TEST_SUITE_P(Tiny, BatchInvarianceTest, ::testing::Values("Q4_K_M", "F16"),
                         [](const auto& info) { return std::string(info.param); });

TEST(TransformerTest, BadTokenOrPositionIsInvalidArgument) {
  const std::string& path = TinyModelPath("Q4_K_M");
  ASSERT_FALSE(path.empty());
  auto model = Model::Load(path);
  ASSERT_TRUE(model.ok()) << model.status();
  const int32_t n_vocab = static_cast<int32_t>((*model)->config().n_vocab);
  ThreadPool pool(1);
  LocalExpertBackend experts(model->get(), &pool);
  Transformer tf(model->get(), &experts, &pool);
  KvCache cache((*model)->config(), 8);
  std::vector<float> logits;
  for (int32_t token : {-1, n_vocab, n_vocab + 100}) {
    const BatchRow row{token, 0, &cache, true};
    const absl::Status s = tf.Forward({&row, 1}, &logits);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << token;
    EXPECT_NE(s.message().find("token id"), absl::string_view::npos) << s;
  }
  for (int64_t pos : {int64_t{8}, int64_t{9}, int64_t{-1}}) {
    // A valid row first: the bad one still fails the call.
    const BatchRow rows[] = {{5, 0, &cache, true}, {6, pos, &cache, true}};
    const absl::Status s = tf.Forward(rows, &logits);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << pos;
    EXPECT_NE(s.message().find("position"), absl::string_view::npos) << s;
  }
  const BatchRow no_cache{5, 0, nullptr, true};
  EXPECT_EQ(tf.Forward({&no_cache, 1}, &logits).code(), absl::StatusCode::kInvalidArgument);
  logits.clear();
  // The last position of the context is fine.
  const BatchRow last{5, 7, &cache, true};
  EXPECT_TRUE(tf.Forward({&last, 1}, &logits).ok());
  EXPECT_EQ(logits.size(), static_cast<size_t>(n_vocab));
  // An empty batch does nothing.
  EXPECT_TRUE(tf.Forward({}, &logits).ok());
  EXPECT_EQ(logits.size(), static_cast<size_t>(n_vocab));
}

TEST(TransformerTest, RmsNormMatchesHandComputedValues) {
  // Row 0: mean square (1 + 4 + 9 + 16) / 4 = 7.5. Row 1: mean square 4 / 4 = 1.
  const float x[] = {1, 2, 3, 4, 2, 0, 0, 0};
  const float w[] = {1, 1, 2, 0.5f};
  float y[8];
  RmsNorm(x, w, 2, 4, 0.0f, y);
  const float s0 = 1.0f / std::sqrt(7.5f);
  EXPECT_FLOAT_EQ(y[0], 1 * s0);
  EXPECT_FLOAT_EQ(y[1], 2 * s0);
  EXPECT_FLOAT_EQ(y[2], 3 * s0 * 2);
  EXPECT_FLOAT_EQ(y[3], 4 * s0 * 0.5f);
  EXPECT_FLOAT_EQ(y[4], 2.0f);
  EXPECT_EQ(y[5], 0.0f);
  // eps is added to the mean square: 1 + 3 = 4, scale 1/2.
  RmsNorm(x + 4, w, 1, 4, 3.0f, y);
  EXPECT_FLOAT_EQ(y[0], 1.0f);
  // In place is allowed (x == y).
  float z[] = {3, 4};
  const float ones[] = {1, 1};
  RmsNorm(z, ones, 1, 2, 0.0f, z);
  EXPECT_FLOAT_EQ(z[0], 3.0f / std::sqrt(12.5f));
  EXPECT_FLOAT_EQ(z[1], 4.0f / std::sqrt(12.5f));
}

TEST(TransformerTest, RopeRotatesAdjacentPairsByPositionTimesFrequency) {
  // Two heads of dim 6, rotating the first 4 dims: pair 0 at frequency 1, pair 1 at
  // base^(-2/4) = 1/100 for base 1e4. Dims 4, 5 are not rotated.
  float x[12] = {1, 0, 0, 1, 7, 8, 0.5f, -2, 3, 0.25f, 9, 10};
  const float orig[12] = {1, 0, 0, 1, 7, 8, 0.5f, -2, 3, 0.25f, 9, 10};
  ApplyRope(x, 2, 6, 4, 0, 1e4f);
  for (int i = 0; i < 12; ++i) EXPECT_EQ(x[i], orig[i]) << i;  // position 0: identity

  ApplyRope(x, 2, 6, 4, 3, 1e4f);
  auto rot = [](float a, float b, double angle, float* out) {
    out[0] = static_cast<float>(a * std::cos(angle) - b * std::sin(angle));
    out[1] = static_cast<float>(a * std::sin(angle) + b * std::cos(angle));
  };
  for (int h = 0; h < 2; ++h) {
    const float* o = orig + 6 * h;
    float want[4];
    rot(o[0], o[1], 3.0, want);
    rot(o[2], o[3], 3.0 * 0.01, want + 2);
    for (int i = 0; i < 4; ++i) EXPECT_NEAR(x[6 * h + i], want[i], 2e-6) << h << " " << i;
    EXPECT_EQ(x[6 * h + 4], o[4]);
    EXPECT_EQ(x[6 * h + 5], o[5]);
  }
  EXPECT_NEAR(x[0], std::cos(3.0), 1e-6);
  EXPECT_NEAR(x[1], std::sin(3.0), 1e-6);
  EXPECT_NEAR(x[2], -std::sin(0.03), 1e-6);
  EXPECT_NEAR(x[3], std::cos(0.03), 1e-6);
}

// Which stream the MoE output is added to in DirectOneLayerLogits: Mixtral's un-normalised
// residual, or the normalised FFN input (the reference implementation's old bug, kept here only
// to show the test tells the two apart).
enum class ResidualBase { kStream, kNormalisedInput };

// One layer, one token at position 0 (attention over a single position returns its V row, as
// stored in the half-precision cache), computed step by step from the model's weights.
std::vector<float> DirectOneLayerLogits(const Model& m, int32_t token, ResidualBase base,
                                        ThreadPool* pool) {
  const ModelConfig& c = m.config();
  const int64_t d = c.n_embd;
  const LayerWeights& L = m.layer(0);
  std::vector<float> x(d), h(d), v(c.kv_dim()), attn(d), o(d), h2(d), router(c.n_expert);
  DequantizeRow(m.token_embd(), token, x.data());
  RmsNorm(x.data(), L.attn_norm.data(), 1, d, c.rms_eps, h.data());
  MatMul(L.wv, h.data(), 1, v.data(), pool);
  for (int64_t head = 0; head < c.n_head; ++head) {
    const int64_t kv_head = head / (c.n_head / c.n_head_kv);
    for (int64_t i = 0; i < c.head_dim; ++i) {
      attn[head * c.head_dim + i] = Fp16ToFp32(Fp32ToFp16(v[kv_head * c.head_dim + i]));
    }
  }
  MatMul(L.wo, attn.data(), 1, o.data(), pool);
  for (int64_t i = 0; i < d; ++i) x[i] += o[i];
  RmsNorm(x.data(), L.ffn_norm.data(), 1, d, c.rms_eps, h2.data());
  MatMul(L.router, h2.data(), 1, router.data(), pool);
  std::vector<int32_t> experts(c.n_expert_used);
  std::vector<float> weights(c.n_expert_used);
  RouteTopK(router.data(), 1, static_cast<int>(c.n_expert), static_cast<int>(c.n_expert_used),
            experts.data(), weights.data());
  std::vector<float> moe(d, 0.0f), y(d);
  for (int64_t j = 0; j < c.n_expert_used; ++j) {
    ExpertFfnCpu(L.experts[experts[j]], h2.data(), 1, y.data(), pool);
    for (int64_t i = 0; i < d; ++i) moe[i] += weights[j] * y[i];
  }
  // h = h + MoE(ffn_norm(h)) (or, for kNormalisedInput, ffn_norm(h) + MoE(ffn_norm(h))).
  const std::vector<float>& residual = base == ResidualBase::kStream ? x : h2;
  for (int64_t i = 0; i < d; ++i) x[i] = residual[i] + moe[i];
  RmsNorm(x.data(), m.output_norm().data(), 1, d, c.rms_eps, h.data());
  std::vector<float> logits(c.n_vocab);
  MatMul(m.output(), h.data(), 1, logits.data(), pool);
  return logits;
}

double RelativeSquaredError(const std::vector<float>& got, const std::vector<float>& want) {
  double err = 0, norm = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    err += (got[i] - want[i]) * (got[i] - want[i]);
    norm += want[i] * want[i];
  }
  return err / norm;
}

TEST(TransformerTest, MoeOutputIsAddedToTheUnnormalisedResidualStream) {
  SynthOptions o = testing::TinySynthOptions("F32", 9, false, "one-layer-F32.gguf");
  o.shape.n_layer = 1;
  ASSERT_TRUE(SynthesizeModel(o).ok());
  auto model = Model::Load(o.out_path);
  ASSERT_TRUE(model.ok()) << model.status();
  ThreadPool pool(2);
  LocalExpertBackend experts(model->get(), &pool);
  Transformer tf(model->get(), &experts, &pool);
  KvCache cache((*model)->config(), 4);
  const BatchRow row{1234, 0, &cache, true};
  std::vector<float> got;
  ASSERT_TRUE(tf.Forward({&row, 1}, &got).ok());
  const std::vector<float> mixtral =
      DirectOneLayerLogits(**model, 1234, ResidualBase::kStream, &pool);
  const std::vector<float> normalised =
      DirectOneLayerLogits(**model, 1234, ResidualBase::kNormalisedInput, &pool);
  ASSERT_EQ(got.size(), mixtral.size());
  // Same operations in the same order: equal up to float reassociation, far below the
  // difference between the two residuals.
  EXPECT_LT(RelativeSquaredError(got, mixtral), 1e-10);
  EXPECT_GT(RelativeSquaredError(got, normalised), 1e-3)
      << "the residual must be the un-normalised stream, not ffn_norm's output";
}

}  // namespace
}  // namespace moepool
