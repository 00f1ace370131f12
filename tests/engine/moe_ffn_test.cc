// MoE routing (RouteTopK) and the local expert backend: selection and weights, and the backend's
// bit-exact contract (per-row expert FFN, weighted products added in ascending expert id).
#include "engine/moe_ffn.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <vector>

#include "engine/model.h"
#include "gtest/gtest.h"
#include "tests/engine/tiny_model_util.h"

namespace moepool {
namespace {

using ::moepool::testing::TinyModelPath;

TEST(RouteTopKTest, PicksLargestInAscendingIdOrderWithRenormalisedWeights) {
  // Top-2 by logit are experts 3 (5.0) then 2 (4.0); the output lists them by id.
  const float logits[] = {0.0f, 1.0f, 4.0f, 5.0f};
  int32_t expert[2];
  float weight[2];
  RouteTopK(logits, 1, 4, 2, expert, weight);
  EXPECT_EQ(expert[0], 2);
  EXPECT_EQ(expert[1], 3);
  // Renormalised softmax over the two: e^4 / (e^4 + e^5) and e^5 / (e^4 + e^5).
  EXPECT_NEAR(weight[0], 1.0 / (1.0 + std::exp(1.0)), 1e-6);
  EXPECT_NEAR(weight[1], 1.0 / (1.0 + std::exp(-1.0)), 1e-6);
  EXPECT_NEAR(weight[0] + weight[1], 1.0f, 1e-6);
}

TEST(RouteTopKTest, TiesGoToTheLowerId) {
  const float logits[] = {1.0f, 3.0f, 3.0f, 0.0f, 3.0f};
  int32_t expert[2];
  float weight[2];
  RouteTopK(logits, 1, 5, 2, expert, weight);
  EXPECT_EQ(expert[0], 1);
  EXPECT_EQ(expert[1], 2);
  EXPECT_FLOAT_EQ(weight[0], 0.5f);
  EXPECT_FLOAT_EQ(weight[1], 0.5f);
  // k = 1: the single expert gets weight exactly 1.
  RouteTopK(logits, 1, 5, 1, expert, weight);
  EXPECT_EQ(expert[0], 1);
  EXPECT_EQ(weight[0], 1.0f);
  // All equal: the lowest ids.
  const float flat[] = {2.0f, 2.0f, 2.0f, 2.0f};
  RouteTopK(flat, 1, 4, 2, expert, weight);
  EXPECT_EQ(expert[0], 0);
  EXPECT_EQ(expert[1], 1);
}

// Random rows against a double-precision softmax / sort / renormalise; and many rows in one call
// give the same bits as one row per call.
TEST(RouteTopKTest, MatchesSoftmaxRenormalisedTopKOnRandomRows) {
  constexpr int kRows = 64, kExperts = 8;
  std::mt19937 rng(3);
  std::normal_distribution<float> dist(0.0f, 2.0f);
  std::vector<float> logits(kRows * kExperts);
  for (float& v : logits) v = dist(rng);
  for (int k : {1, 2, 3, 8}) {
    std::vector<int32_t> expert(kRows * k);
    std::vector<float> weight(kRows * k);
    RouteTopK(logits.data(), kRows, kExperts, k, expert.data(), weight.data());
    for (int r = 0; r < kRows; ++r) {
      const float* l = &logits[r * kExperts];
      std::vector<int> order(kExperts);
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return l[a] > l[b]; });
      std::vector<int> chosen(order.begin(), order.begin() + k);
      std::sort(chosen.begin(), chosen.end());
      double denom = 0;
      for (int e : chosen) denom += std::exp(static_cast<double>(l[e]));
      double wsum = 0;
      for (int j = 0; j < k; ++j) {
        ASSERT_EQ(expert[r * k + j], chosen[j]) << "row " << r << " k " << k;
        EXPECT_NEAR(weight[r * k + j], std::exp(static_cast<double>(l[chosen[j]])) / denom, 1e-6);
        EXPECT_GT(weight[r * k + j], 0.0f);
        wsum += weight[r * k + j];
      }
      EXPECT_NEAR(wsum, 1.0, 1e-6);
      int32_t one_expert[8];
      float one_weight[8];
      RouteTopK(l, 1, kExperts, k, one_expert, one_weight);
      EXPECT_EQ(std::memcmp(one_expert, &expert[r * k], k * sizeof(int32_t)), 0);
      EXPECT_EQ(std::memcmp(one_weight, &weight[r * k], k * sizeof(float)), 0);
    }
  }
}

class LocalExpertBackendTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string& path = TinyModelPath("Q4_K_M");
    ASSERT_FALSE(path.empty());
    auto model = Model::Load(path);
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = std::move(*model);
    d_ = model_->config().n_embd;
    std::mt19937 rng(11);
    std::normal_distribution<float> dist(0.0f, 1.0f);
    x_.resize(kRows * d_);
    for (float& v : x_) v = dist(rng);
  }

  static constexpr int64_t kRows = 12;
  static constexpr int kK = 2;
  std::unique_ptr<Model> model_;
  int64_t d_ = 0;
  std::vector<float> x_;
};

// out[r] = sum over the row's pairs, in ascending expert id from 0.0f, of
// f32(weight * ExpertFfnCpu(expert, x[r] alone)): the contract every backend must meet bit for bit.
TEST_F(LocalExpertBackendTest, ComputeEqualsPerRowDirectComputationBitForBit) {
  // Expert 3 serves rows 0-9 (more than one 8-row tile of the multi-row dot kernels), each
  // paired with another expert below or above it; row 10 has one expert (-1 = none); row 11 uses
  // the two ends, 0 and 7.
  int32_t expert[kRows * kK];
  float weight[kRows * kK];
  for (int r = 0; r < 10; ++r) {
    const int32_t other = r % 7 < 3 ? r % 7 : r % 7 + 1;
    expert[r * kK] = std::min(3, other);
    expert[r * kK + 1] = std::max(3, other);
    weight[r * kK] = 0.05f + 0.09f * static_cast<float>(r);
    weight[r * kK + 1] = 1.0f - weight[r * kK];
  }
  expert[20] = -1, expert[21] = 6, weight[20] = 0.3f, weight[21] = 1.0f;
  expert[22] = 0, expert[23] = 7, weight[22] = 0.3333f, weight[23] = 0.6667f;
  ThreadPool pool(2);
  LocalExpertBackend backend(model_.get(), &pool);
  ExpertRoutes routes;
  routes.layer = 2;
  routes.n_rows = kRows;
  routes.n_embd = d_;
  routes.k = kK;
  routes.x = x_.data();
  routes.expert = expert;
  routes.weight = weight;
  std::vector<float> out(kRows * d_, -1.0f);
  ASSERT_TRUE(backend.Compute(routes, out.data()).ok());

  const LayerWeights& L = model_->layer(2);
  std::vector<float> y(d_);
  for (int64_t r = 0; r < kRows; ++r) {
    std::vector<float> want(d_, 0.0f);
    for (int j = 0; j < kK; ++j) {
      const int32_t e = expert[r * kK + j];
      if (e < 0) continue;
      ExpertFfnCpu(L.experts[e], &x_[r * d_], 1, y.data(), &pool);
      for (int64_t i = 0; i < d_; ++i) {
        const float product = weight[r * kK + j] * y[i];
        want[i] += product;
      }
    }
    EXPECT_EQ(std::memcmp(&out[r * d_], want.data(), d_ * sizeof(float)), 0) << "row " << r;
  }
  // The output is not just zeros or a copy of the input.
  EXPECT_NE(out[0], 0.0f);
  EXPECT_NE(out[0], x_[0]);
}

// An expert's FFN on a batch of rows equals it on each row alone (batch invariance of experts),
// whatever the thread count.
TEST_F(LocalExpertBackendTest, ExpertFfnIsBatchAndThreadInvariant) {
  const ExpertWeights& e = model_->layer(1).experts[4];
  ThreadPool one(1), three(3);
  std::vector<float> batched(kRows * d_);
  ExpertFfnCpu(e, x_.data(), kRows, batched.data(), &three);
  std::vector<float> single(d_);
  for (int64_t r = 0; r < kRows; ++r) {
    ExpertFfnCpu(e, &x_[r * d_], 1, single.data(), &one);
    EXPECT_EQ(std::memcmp(single.data(), &batched[r * d_], d_ * sizeof(float)), 0) << r;
  }
  // And it is a SwiGLU FFN of the right scale: a non-trivial output.
  double norm = 0;
  for (float v : batched) norm += v * v;
  EXPECT_GT(norm, 0.0);
  EXPECT_TRUE(std::isfinite(norm));
}

TEST_F(LocalExpertBackendTest, RejectsBadLayerRowWidthOrExpert) {
  ThreadPool pool(1);
  LocalExpertBackend backend(model_.get(), &pool);
  const int32_t expert[kK] = {0, 1};
  const float weight[kK] = {0.5f, 0.5f};
  std::vector<float> out(d_);
  ExpertRoutes routes;
  routes.n_rows = 1;
  routes.n_embd = d_;
  routes.k = kK;
  routes.x = x_.data();
  routes.expert = expert;
  routes.weight = weight;
  const int n_layer = static_cast<int>(model_->config().n_layer);
  for (int layer : {-1, n_layer, n_layer + 5}) {
    routes.layer = layer;
    const absl::Status s = backend.Compute(routes, out.data());
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << layer;
    EXPECT_NE(s.message().find("layer"), absl::string_view::npos) << s;
  }
  routes.layer = 0;
  routes.n_embd = d_ + 1;
  absl::Status s = backend.Compute(routes, out.data());
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("width"), absl::string_view::npos) << s;
  routes.n_embd = d_;
  const int32_t bad_expert[kK] = {1, static_cast<int32_t>(model_->config().n_expert)};
  routes.expert = bad_expert;
  s = backend.Compute(routes, out.data());
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("expert 8"), absl::string_view::npos) << s;
  routes.expert = expert;
  for (int k : {0, -1, static_cast<int>(model_->config().n_expert) + 1}) {
    routes.k = k;
    s = backend.Compute(routes, out.data());
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << k;
    EXPECT_NE(s.message().find("k = "), absl::string_view::npos) << s;
  }
  routes.k = kK;
  EXPECT_TRUE(backend.Compute(routes, out.data()).ok());
}

}  // namespace
}  // namespace moepool
