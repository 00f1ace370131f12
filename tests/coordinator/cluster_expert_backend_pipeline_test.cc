// ClusterExpertBackend's asynchronous form over real gRPC links to in-process workers:
// micro-batches pipelined over remote experts give the local bits, and a restarted worker's
// stale stream is retried on a fresh one. (Retry on replicas, without sockets:
// tests/cluster/cluster_retry_test.cc.)
#include <chrono>
#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "coordinator/cluster_expert_backend.h"
#include "engine/engine.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/coordinator/cluster_run_util.h"
#include "tests/coordinator/fake_worker_util.h"

namespace moepool {
namespace {

using ::moepool::testing::ExpectBitIdentical;
using ::moepool::testing::FakeWorker;
using ::moepool::testing::FakeWorkerOptions;
using ::moepool::testing::PairsForExperts;
using ::moepool::testing::RunThree;
using ::moepool::testing::SmallModel;
using ::testing::HasSubstr;

constexpr int kLayers = 2;  // SmallModel's

std::unique_ptr<FakeWorker> StartWorker(const std::string& model, int lo, int hi,
                                        bool stall = false) {
  FakeWorkerOptions o;
  o.model_path = model;
  o.pairs = PairsForExperts(kLayers, lo, hi);
  o.stall = stall;
  auto w = FakeWorker::Start(o);
  EXPECT_TRUE(w.ok()) << w.status();
  return w.ok() ? *std::move(w) : nullptr;
}

ClusterOptions Options(const std::vector<std::unique_ptr<FakeWorker>>& workers) {
  std::vector<std::string> addresses;
  for (const auto& w : workers) addresses.push_back(w->address());
  return ::moepool::testing::TestClusterOptions(addresses);
}

std::unique_ptr<Engine> LoadEngine(const std::string& model, ExpertBackend* experts) {
  return ::moepool::testing::LoadEngineWithExperts(model, experts, 128);
}

struct Split {
  const char* name;
  std::vector<std::pair<int, int>> workers;  // expert ranges
  std::vector<int> local;
};

class PipelinedClusterTest : public ::testing::TestWithParam<Split> {};

TEST_P(PipelinedClusterTest, BitIdenticalToLocal) {
  const std::string& model = SmallModel("Q8_0");
  std::vector<std::unique_ptr<FakeWorker>> w;
  for (const auto& [lo, hi] : GetParam().workers) w.push_back(StartWorker(model, lo, hi));
  ClusterOptions o = Options(w);
  o.local_experts = GetParam().local;
  auto backend = ClusterExpertBackend::Create(model, o);
  ASSERT_TRUE(backend.ok()) << backend.status();
  EXPECT_TRUE((*backend)->overlaps());
  auto local = LoadEngine(model, nullptr);
  auto cluster = LoadEngine(model, backend->get());
  auto want = RunThree(*local, false);
  ASSERT_TRUE(want.ok()) << want.status();
  auto plain = RunThree(*cluster, false);
  ASSERT_TRUE(plain.ok()) << plain.status();
  ExpectBitIdentical(*want, *plain);
  auto piped = RunThree(*cluster, true);
  ASSERT_TRUE(piped.ok()) << piped.status();
  ExpectBitIdentical(*want, *piped);
  const ClusterStats st = (*backend)->Stats();
  EXPECT_EQ(st.failed_steps, 0u);
  EXPECT_EQ(st.retried_steps, 0u);
  EXPECT_GT(st.blocked_micros, 0u);
}

INSTANTIATE_TEST_SUITE_P(Splits, PipelinedClusterTest,
                         ::testing::Values(Split{"TwoWorkers", {{0, 3}, {4, 7}}, {}},
                                           Split{"Replicas", {{0, 5}, {2, 7}, {0, 7}}, {}},
                                           Split{"LocalAndRemote", {{2, 7}}, {0, 1}}),
                         [](const auto& info) { return std::string(info.param.name); });

// A worker restarted while one of its streams had not seen it go: that stream's first request
// fails, and without a replica it is retried on a fresh stream of the worker within the step.
TEST(ClusterRetryTest, RestartedWorkerServesEveryStreamAgain) {
  const std::string& model = SmallModel("F16");
  std::vector<std::unique_ptr<FakeWorker>> w;
  w.push_back(StartWorker(model, 0, 3));
  w.push_back(StartWorker(model, 4, 7));
  ClusterOptions o = Options(w);
  o.links_per_worker = 3;  // one per micro-batch of RunThree
  auto backend = ClusterExpertBackend::Create(model, o);
  ASSERT_TRUE(backend.ok()) << backend.status();
  auto local = LoadEngine(model, nullptr);
  auto cluster = LoadEngine(model, backend->get());
  auto want = RunThree(*local, false);
  ASSERT_TRUE(want.ok()) << want.status();
  ASSERT_TRUE(RunThree(*cluster, true).ok());  // the three streams of both workers in use

  const int port = w[1]->port();
  w[1]->Kill();
  // One micro-batch: stream 0 fails, and so does its retry on stream 1; stream 2 is not told.
  ASSERT_FALSE(RunThree(*cluster, false).ok());
  FakeWorkerOptions wo;
  wo.model_path = model;
  wo.pairs = PairsForExperts(kLayers, 4, 7);
  wo.port = port;
  auto restarted = FakeWorker::Start(wo);
  ASSERT_TRUE(restarted.ok()) << restarted.status();
  w[1] = *std::move(restarted);
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (!(*backend)->Stats().workers[1].up && std::chrono::steady_clock::now() < give_up) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ASSERT_TRUE((*backend)->Stats().workers[1].up);
  (*backend)->ResetStats();
  auto got = RunThree(*cluster, true);
  ASSERT_TRUE(got.ok()) << got.status();
  ExpectBitIdentical(*want, *got);
  EXPECT_EQ((*backend)->Stats().failed_steps, 0u);
  EXPECT_EQ((*backend)->Stats().retried_steps, 1u);  // the stale stream, once
}

}  // namespace
}  // namespace moepool
