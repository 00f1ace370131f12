// `moepool serve --workers ...` against in-process fake workers: the same completions as a local
// server, /health reports the workers; a lost worker's experts are computed by the coordinator
// (the same text), or, with --local-fallback off, its requests fail (not the server) until it
// is back.

#include <chrono>
#include <cstdlib>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "httplib.h"
#include "nlohmann/json.hpp"
#include "tests/coordinator/cluster_process_util.h"
#include "tests/coordinator/fake_worker_util.h"
#include "tests/testdata.h"

namespace moepool {
namespace {

using ::moepool::testing::FakeWorker;
using ::moepool::testing::FakeWorkerOptions;
using ::moepool::testing::GetJson;
using ::moepool::testing::PairsForExperts;
using ::moepool::testing::ServeProcess;
using ::moepool::testing::SmallModel;
using ::testing::HasSubstr;

// POST /v1/completions, greedy; returns (HTTP status, body).
std::pair<int, nlohmann::json> Complete(const ServeProcess& s, const std::string& prompt) {
  const nlohmann::json req = {{"prompt", prompt}, {"max_tokens", 8}, {"temperature", 0}};
  auto r = s.Client().Post("/v1/completions", req.dump(), "application/json");
  if (!r) return {0, nullptr};
  return {r->status, nlohmann::json::parse(r->body, nullptr, false)};
}

std::pair<int, nlohmann::json> Health(const ServeProcess& s) { return GetJson(s, "/health"); }

// Two fake workers (experts 0-3 and 4-7) and a `moepool serve` over them with `flags`.
struct ServedCluster {
  FakeWorkerOptions options;
  std::unique_ptr<FakeWorker> a, b;
  ServeProcess local, cluster;
  nlohmann::json want;  // the local server's completion of kPrompt

  static constexpr char kPrompt[] = "In a hole in the ground there lived";

  bool Start(const std::vector<std::string>& flags) {
    const std::string& model = SmallModel("Q8_0");
    options.model_path = model;
    options.pairs = PairsForExperts(2, 0, 3);
    auto wa = FakeWorker::Start(options);
    options.pairs = PairsForExperts(2, 4, 7);
    auto wb = FakeWorker::Start(options);
    if (!wa.ok() || !wb.ok()) return false;
    a = *std::move(wa);
    b = *std::move(wb);
    std::vector<std::string> args = {
        "--model", model, "--workers", a->address() + "," + b->address(), "--step-timeout", "5"};
    args.insert(args.end(), flags.begin(), flags.end());
    if (!local.Start({"--model", model}) || !cluster.Start(args)) return false;
    const auto w = Complete(local, kPrompt);
    want = w.second;
    return w.first == 200;
  }
  // Starts worker b again on its port and waits for /health to say 200 without fallback.
  bool RestartB() {
    options.port = b->port();
    b.reset();
    auto back = FakeWorker::Start(options);
    if (!back.ok()) return false;
    b = *std::move(back);
    const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    while (std::chrono::steady_clock::now() < give_up) {
      const auto h = Health(cluster);
      if (h.first == 200 && !h.second.contains("fallback_experts")) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return false;
  }
};

TEST(ClusterServeTest, CompletionsMatchLocalAndALostWorkersExpertsFallBackHere) {
  ServedCluster s;
  ASSERT_TRUE(s.Start({}));  // --local-fallback on, the default
  const auto got = Complete(s.cluster, ServedCluster::kPrompt);
  ASSERT_EQ(got.first, 200) << got.second;
  EXPECT_EQ(s.want["choices"][0]["text"], got.second["choices"][0]["text"]);
  EXPECT_EQ(got.second["usage"]["completion_tokens"], 8) << got.second;
  auto health = Health(s.cluster);
  EXPECT_EQ(health.first, 200) << health.second;
  ASSERT_EQ(health.second["workers"].size(), 2u) << health.second;
  EXPECT_EQ(health.second["workers"][1]["up"], true);

  auto view = GetJson(s.cluster, "/v1/cluster");
  ASSERT_EQ(view.first, 200) << view.second;
  EXPECT_EQ(view.second["placement_version"], 1);
  ASSERT_EQ(view.second["workers"].size(), 2u);
  EXPECT_EQ(view.second["workers"][1]["id"], "w1");
  EXPECT_EQ(view.second["workers"][1]["address"], s.b->address());
  EXPECT_EQ(view.second["workers"][1]["state"], "ready");
  EXPECT_EQ(view.second["workers"][1]["experts"].size(), 8u);  // 2 layers x experts 4-7
  EXPECT_EQ(view.second["workers"][1]["experts"][0], nlohmann::json::array({0, 4}));
  EXPECT_EQ(view.second["fallback_expert_pairs"], 0);
  const auto alone = GetJson(s.local, "/v1/cluster");
  EXPECT_EQ(alone.second["placement_version"], 0) << alone.second;
  EXPECT_TRUE(alone.second["workers"].empty());

  s.b->Kill();  // no replica of 4-7: the coordinator computes them, same text
  const auto fallen_back = Complete(s.cluster, ServedCluster::kPrompt);
  ASSERT_EQ(fallen_back.first, 200) << fallen_back.second;
  EXPECT_EQ(s.want["choices"][0]["text"], fallen_back.second["choices"][0]["text"]);
  health = Health(s.cluster);
  EXPECT_EQ(health.first, 200) << health.second;
  EXPECT_EQ(health.second["fallback_experts"], "layers 0-1: experts 4-7") << health.second;
  EXPECT_EQ(health.second["workers"][1]["up"], false);
  view = GetJson(s.cluster, "/v1/cluster");
  EXPECT_EQ(view.second["workers"][1]["state"], "gone") << view.second;
  EXPECT_EQ(view.second["workers"][0]["state"], "ready") << view.second;
  EXPECT_EQ(view.second["fallback_expert_pairs"], 8) << view.second;
  auto metrics = s.cluster.Client().Get("/metrics");
  ASSERT_TRUE(metrics);
  EXPECT_THAT(metrics->body, HasSubstr("moepool_cluster_workers{state=\"gone\"} 1"));
  EXPECT_THAT(metrics->body, HasSubstr("moepool_cluster_fallback_experts 8"));

  ASSERT_TRUE(s.RestartB());
  const auto again = Complete(s.cluster, ServedCluster::kPrompt);
  ASSERT_EQ(again.first, 200) << again.second;
  EXPECT_EQ(s.want["choices"][0]["text"], again.second["choices"][0]["text"]);
}

TEST(ClusterServeTest, WithoutFallbackALostWorkerFailsRequestsUntilItIsBack) {
  ServedCluster s;
  ASSERT_TRUE(s.Start({"--local-fallback", "off"}));
  s.b->Kill();
  const auto failed = Complete(s.cluster, ServedCluster::kPrompt);
  EXPECT_NE(failed.first, 200) << failed.second;
  EXPECT_THAT(failed.second.dump(), HasSubstr(s.b->address()));
  const auto health = Health(s.cluster);
  EXPECT_EQ(health.first, 503) << health.second;
  EXPECT_THAT(health.second.dump(), HasSubstr("layers 0-1: experts 4-7"));
  EXPECT_TRUE(s.cluster.alive());
  ASSERT_TRUE(s.RestartB());
  const auto again = Complete(s.cluster, ServedCluster::kPrompt);
  ASSERT_EQ(again.first, 200) << again.second;
  EXPECT_EQ(s.want["choices"][0]["text"], again.second["choices"][0]["text"]);
}

}  // namespace
}  // namespace moepool
