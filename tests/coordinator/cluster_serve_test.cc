// `moepool serve --workers ...` against in-process fake workers: the same completions as a local
// server, /health reports the workers, and a lost worker fails requests (not the server) until
// it is back.

#include <chrono>
#include <cstdlib>
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

TEST(ClusterServeTest, CompletionsMatchLocalAndWorkerLossIsSurvived) {
  const std::string& model = SmallModel("Q8_0");
  FakeWorkerOptions o;
  o.model_path = model;
  o.pairs = PairsForExperts(2, 0, 3);
  auto a = FakeWorker::Start(o);
  o.pairs = PairsForExperts(2, 4, 7);
  auto b = FakeWorker::Start(o);
  ASSERT_TRUE(a.ok() && b.ok());
  const int port_b = (*b)->port();

  ServeProcess local, cluster;
  ASSERT_TRUE(local.Start({"--model", model}));
  ASSERT_TRUE(cluster.Start({"--model", model, "--workers", (*a)->address() + "," + (*b)->address(),
                             "--step-timeout", "5"}));
  const std::string prompt = "In a hole in the ground there lived";
  const auto want = Complete(local, prompt);
  const auto got = Complete(cluster, prompt);
  ASSERT_EQ(want.first, 200) << want.second;
  ASSERT_EQ(got.first, 200) << got.second;
  EXPECT_EQ(want.second["choices"][0]["text"], got.second["choices"][0]["text"]);
  EXPECT_EQ(got.second["usage"]["completion_tokens"], 8) << got.second;
  auto health = Health(cluster);
  EXPECT_EQ(health.first, 200) << health.second;
  ASSERT_EQ(health.second["workers"].size(), 2u) << health.second;
  EXPECT_EQ(health.second["workers"][1]["up"], true);

  (*b)->Kill();
  const auto failed = Complete(cluster, prompt);
  EXPECT_NE(failed.first, 200) << failed.second;
  EXPECT_THAT(failed.second.dump(), HasSubstr((*b)->address()));
  health = Health(cluster);
  EXPECT_EQ(health.first, 503) << health.second;
  EXPECT_THAT(health.second.dump(), HasSubstr("layers 0-1: experts 4-7"));
  EXPECT_TRUE(cluster.alive());

  o.port = port_b;
  auto back = FakeWorker::Start(o);
  ASSERT_TRUE(back.ok()) << back.status();
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (Health(cluster).first != 200 && std::chrono::steady_clock::now() < give_up) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  const auto again = Complete(cluster, prompt);
  ASSERT_EQ(again.first, 200) << again.second;
  EXPECT_EQ(want.second["choices"][0]["text"], again.second["choices"][0]["text"]);
}

}  // namespace
}  // namespace moepool
