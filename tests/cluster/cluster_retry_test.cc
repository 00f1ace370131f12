// ClusterExpertBackend over in-process links (tests/cluster/in_process_link_util.h): every
// worker is a WorkerCore of this process, so dispatch, combine, links and the in-step retry on
// replicas are tested without sockets or timing. A worker down during a run is replaced by a
// replica within the step (same bits, no failed step); a stalled one is cancelled by the step
// watchdog and replaced too; without a replica the step fails naming the worker, and the backend
// serves again once the worker is back. (The gRPC link's own failure modes:
// tests/coordinator/cluster_expert_backend_*_test.cc.)
#include <memory>
#include <string>
#include <vector>

#include "coordinator/cluster_expert_backend.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/cluster/in_process_link_util.h"
#include "tests/coordinator/cluster_run_util.h"
#include "tests/coordinator/fake_worker_util.h"
#include "worker/worker_core.h"

namespace moepool {
namespace {

using ::moepool::testing::ExpectBitIdentical;
using ::moepool::testing::InProcessWorkers;
using ::moepool::testing::PairsForExperts;
using ::moepool::testing::RunThree;
using ::moepool::testing::SmallModel;
using ::testing::HasSubstr;

constexpr int kLayers = 2;  // SmallModel's

// In-process workers "w0", "w1", ... holding the given expert ranges on every layer.
class InProcessCluster {
 public:
  InProcessCluster(const std::string& model, const std::vector<std::pair<int, int>>& ranges)
      : model_(model) {
    for (size_t i = 0; i < ranges.size(); ++i) {
      worker::WorkerCoreOptions o;
      o.model_path = model;
      o.experts = worker::ExpertSet(PairsForExperts(kLayers, ranges[i].first, ranges[i].second));
      o.threads = 1;
      o.worker_id = "w" + std::to_string(i);
      auto core = worker::WorkerCore::Create(o);
      EXPECT_TRUE(core.ok()) << core.status();
      cores_.push_back(*std::move(core));
      addresses_.push_back(o.worker_id);
      registry_.Add(o.worker_id, cores_.back().get());
    }
  }

  ClusterOptions Options() {
    ClusterOptions o = ::moepool::testing::TestClusterOptions(addresses_);
    o.make_link = registry_.Factory();
    return o;
  }
  std::unique_ptr<Engine> LoadEngine(ExpertBackend* experts) {
    return ::moepool::testing::LoadEngineWithExperts(model_, experts, 128);
  }
  InProcessWorkers& registry() { return registry_; }
  const std::string& address(size_t i) const { return addresses_[i]; }

 private:
  std::string model_;
  std::vector<std::unique_ptr<worker::WorkerCore>> cores_;
  std::vector<std::string> addresses_;
  InProcessWorkers registry_;
};

// The logits of the three sequences computed here, all experts local.
std::vector<float> LocalLogits(InProcessCluster& c, int n_decode = 3) {
  auto local = c.LoadEngine(nullptr);
  auto want = RunThree(*local, false, n_decode);
  EXPECT_TRUE(want.ok()) << want.status();
  return want.ok() ? *want : std::vector<float>();
}

TEST(InProcessClusterTest, BitIdenticalToLocalAndPipelinedMicroBatchesUseEveryLane) {
  InProcessCluster c(SmallModel("Q8_0"), {{0, 3}, {4, 7}});
  ClusterOptions o = c.Options();
  o.links_per_worker = 3;  // one per micro-batch of RunThree
  auto backend = ClusterExpertBackend::Create(SmallModel("Q8_0"), o);
  ASSERT_TRUE(backend.ok()) << backend.status();
  const std::vector<float> want = LocalLogits(c);
  auto cluster = c.LoadEngine(backend->get());
  auto plain = RunThree(*cluster, false);
  ASSERT_TRUE(plain.ok()) << plain.status();
  ExpectBitIdentical(want, *plain);
  // One micro-batch at a time: one link.
  EXPECT_THAT(c.registry().JobsPerLink(c.address(0)),
              ::testing::ElementsAre(::testing::Gt(0), 0, 0));
  auto piped = RunThree(*cluster, true);
  ASSERT_TRUE(piped.ok()) << piped.status();
  ExpectBitIdentical(want, *piped);
  // Three micro-batches in flight: each on a link of its own.
  for (size_t w = 0; w < 2; ++w) {
    for (const int jobs : c.registry().JobsPerLink(c.address(w))) EXPECT_GT(jobs, 0) << w;
  }
  EXPECT_EQ((*backend)->Stats().failed_steps, 0u);
}

// Two workers holding every expert, one 8x slower per row (as its exchanges report): once the
// backend has measured them, the fast one takes most rows of each step; the bits stay the
// single-process ones, and with equal paces the rows split evenly again.
TEST(InProcessClusterTest, ReplicaRowsGoToTheWorkerThatAnswersFirst) {
  InProcessCluster c(SmallModel("Q8_0"), {{0, 7}, {0, 7}});
  auto backend = ClusterExpertBackend::Create(SmallModel("Q8_0"), c.Options());
  ASSERT_TRUE(backend.ok()) << backend.status();
  const std::vector<float> want = LocalLogits(c);
  auto cluster = c.LoadEngine(backend->get());
  auto rows_of = [&](size_t w) { return (*backend)->Stats().workers[w].rows; };
  c.registry().SetPace(c.address(0), 10, 100);
  c.registry().SetPace(c.address(1), 80, 100);
  for (const bool pipelined : {false, true}) {
    (*backend)->ResetStats();
    auto got = RunThree(*cluster, pipelined);
    ASSERT_TRUE(got.ok()) << got.status();
    ExpectBitIdentical(want, *got);
    EXPECT_GT(rows_of(0), 3 * rows_of(1)) << pipelined;
  }
  c.registry().SetPace(c.address(1), 10, 100);
  for (int run = 0; run < 12; ++run) {  // the moving average forgets the slow pace
    ASSERT_TRUE(RunThree(*cluster, false).ok());
  }
  (*backend)->ResetStats();
  auto even = RunThree(*cluster, false);
  ASSERT_TRUE(even.ok()) << even.status();
  ExpectBitIdentical(want, *even);
  EXPECT_LT(rows_of(0), 2 * rows_of(1));
  EXPECT_LT(rows_of(1), 2 * rows_of(0));
}

// Paces within noise of each other (12 vs 10 us per row, 130 vs 100 us of link) count as
// equal: the rows split as without paces, so both replicas keep being measured.
TEST(InProcessClusterTest, NearlyEqualPacesShareTheRows) {
  InProcessCluster c(SmallModel("Q8_0"), {{0, 7}, {0, 7}});
  auto backend = ClusterExpertBackend::Create(SmallModel("Q8_0"), c.Options());
  ASSERT_TRUE(backend.ok()) << backend.status();
  auto cluster = c.LoadEngine(backend->get());
  auto rows_of = [&](size_t w) { return (*backend)->Stats().workers[w].rows; };
  c.registry().SetPace(c.address(0), 10, 100);
  c.registry().SetPace(c.address(1), 12, 130);
  ASSERT_TRUE(RunThree(*cluster, false).ok());  // measured
  (*backend)->ResetStats();
  ASSERT_TRUE(RunThree(*cluster, false, 12).ok());
  EXPECT_GT(rows_of(1), 0u);
  EXPECT_LT(rows_of(0), 3 * rows_of(1) / 2);
  EXPECT_LT(rows_of(1), 3 * rows_of(0) / 2);
}

// A replica 8x slower gets no rows of one-row steps by its pace; every 16th round spreads the
// rows by count anyway, so when it goes down the backend finds out (and retries those rows on
// the fast replica) instead of showing a dead worker as up.
TEST(InProcessClusterTest, AReplicaThePacesPassOverIsStillCheckedAndFoundDown) {
  InProcessCluster c(SmallModel("Q8_0"), {{0, 7}, {0, 7}});
  auto backend = ClusterExpertBackend::Create(SmallModel("Q8_0"), c.Options());
  ASSERT_TRUE(backend.ok()) << backend.status();
  auto cluster = c.LoadEngine(backend->get());
  c.registry().SetPace(c.address(0), 10, 100);
  c.registry().SetPace(c.address(1), 80, 100);
  ASSERT_TRUE(RunThree(*cluster, false).ok());  // measured
  c.registry().SetDown(c.address(1), true);
  KvCache cache(cluster->config(), cluster->n_ctx());
  std::vector<float> logits;
  for (int64_t p = 0; p < 40; ++p) {  // one row per step: 80 rounds
    const BatchRow row{static_cast<int32_t>(1 + p), p, &cache, true};
    ASSERT_TRUE(cluster->transformer().Forward({&row, 1}, &logits).ok()) << p;
  }
  const ClusterStats st = (*backend)->Stats();
  EXPECT_FALSE(st.workers[1].up);
  EXPECT_GE(st.retried_steps, 1u);
  EXPECT_EQ(st.failed_steps, 0u);
}

// Workers 0-3, 4-7 and a replica of everything; one of them goes down after a first run. The
// next runs still complete with the local bits: its rows go to the replicas within the step.
class DownReplicaTest : public ::testing::TestWithParam<int> {};

TEST_P(DownReplicaTest, RowsRetriedOnReplicaWithinTheStep) {
  InProcessCluster c(SmallModel("F16"), {{0, 3}, {4, 7}, {0, 7}});
  auto backend = ClusterExpertBackend::Create(SmallModel("F16"), c.Options());
  ASSERT_TRUE(backend.ok()) << backend.status();
  const std::vector<float> want = LocalLogits(c);
  auto cluster = c.LoadEngine(backend->get());
  auto before = RunThree(*cluster, GetParam() % 2 == 0);
  ASSERT_TRUE(before.ok()) << before.status();
  ExpectBitIdentical(want, *before);

  const size_t down = static_cast<size_t>(GetParam());
  c.registry().SetDown(c.address(down), true);
  for (const bool pipelined : {true, false}) {
    auto after = RunThree(*cluster, pipelined);
    ASSERT_TRUE(after.ok()) << after.status();
    ExpectBitIdentical(want, *after);
  }
  const ClusterStats st = (*backend)->Stats();
  EXPECT_EQ(st.failed_steps, 0u);
  EXPECT_FALSE(st.workers[down].up);
  EXPECT_GE(st.retried_steps, 1u);  // the step that found out
  EXPECT_GE(st.retried_rows, 1u);
}

INSTANTIATE_TEST_SUITE_P(Down, DownReplicaTest, ::testing::Values(0, 1, 2));

// A stalled worker hits the step timeout (DEADLINE_EXCEEDED); its rows are retried on the
// replica of its experts in the same step.
TEST(InProcessRetryTest, StalledWorkerRetriedOnReplica) {
  InProcessCluster c(SmallModel("F16"), {{0, 3}, {4, 7}, {0, 3}});
  c.registry().SetStalled(c.address(0), true);
  ClusterOptions o = c.Options();
  o.step_timeout_s = 0.2;
  auto backend = ClusterExpertBackend::Create(SmallModel("F16"), o);
  ASSERT_TRUE(backend.ok()) << backend.status();
  const std::vector<float> want = LocalLogits(c, 1);
  auto cluster = c.LoadEngine(backend->get());
  auto got = RunThree(*cluster, true, 1);
  ASSERT_TRUE(got.ok()) << got.status();
  ExpectBitIdentical(want, *got);
  const ClusterStats st = (*backend)->Stats();
  EXPECT_EQ(st.failed_steps, 0u);
  EXPECT_GE(st.retried_steps, 1u);
  EXPECT_THAT(st.workers[0].last_error, HasSubstr("step timeout"));
}

// Without a replica (or with retries off) the step fails with the worker's error, also when
// micro-batches are in flight; once the worker is back the backend serves the local bits again.
TEST(InProcessRetryTest, NoReplicaFailsNamingTheWorkerUntilItIsBack) {
  for (const bool retry : {true, false}) {
    InProcessCluster c(SmallModel("F16"), {{0, 3}, {4, 7}, {0, 3}});  // replicas of 0-3 only
    ClusterOptions o = c.Options();
    o.retry_on_replica = retry;
    auto backend = ClusterExpertBackend::Create(SmallModel("F16"), o);
    ASSERT_TRUE(backend.ok()) << backend.status();
    const std::vector<float> want = LocalLogits(c);
    auto cluster = c.LoadEngine(backend->get());
    ASSERT_TRUE(RunThree(*cluster, true).ok());
    c.registry().SetDown(c.address(1), true);
    auto failed = RunThree(*cluster, true);
    ASSERT_FALSE(failed.ok());
    EXPECT_EQ(failed.status().code(), absl::StatusCode::kUnavailable) << failed.status();
    EXPECT_THAT(std::string(failed.status().message()), HasSubstr(c.address(1)));
    EXPECT_EQ(std::string(failed.status().message()).find("retry") != std::string::npos, retry)
        << failed.status();
    EXPECT_FALSE((*backend)->UncoveredPairs().empty());
    EXPECT_GE((*backend)->Stats().failed_steps, 1u);
    c.registry().SetDown(c.address(1), false);
    EXPECT_TRUE((*backend)->UncoveredPairs().empty());
    auto back = RunThree(*cluster, true);
    ASSERT_TRUE(back.ok()) << back.status();
    ExpectBitIdentical(want, *back);
  }
}

// The local fallback: experts no worker holds at startup, and a worker that goes down without a
// replica, are computed by the coordinator with the same bits; no call fails, and a worker that
// comes back takes its experts again.
TEST(LocalFallbackTest, UnheldExpertsAreComputedHereWithTheSameBits) {
  InProcessCluster c(SmallModel("Q8_0"), {{0, 3}});  // nobody holds 4-7
  ClusterOptions o = c.Options();
  EXPECT_FALSE(ClusterExpertBackend::Create(SmallModel("Q8_0"), o).ok());  // fallback off
  o.local_fallback = true;
  auto backend = ClusterExpertBackend::Create(SmallModel("Q8_0"), o);
  ASSERT_TRUE(backend.ok()) << backend.status();
  EXPECT_FALSE((*backend)->UncoveredPairs().empty());
  const std::vector<float> want = LocalLogits(c);
  auto cluster = c.LoadEngine(backend->get());
  for (const bool pipelined : {false, true}) {
    auto got = RunThree(*cluster, pipelined);
    ASSERT_TRUE(got.ok()) << got.status();
    ExpectBitIdentical(want, *got);
  }
  const ClusterStats st = (*backend)->Stats();
  EXPECT_EQ(st.failed_steps, 0u);
  EXPECT_GT(st.fallback_rows, 0u);
  EXPECT_GT(st.workers[0].requests, 0u);
}

TEST(LocalFallbackTest, WorkerLostWithoutReplicaFailsNoCallAndComesBack) {
  InProcessCluster c(SmallModel("F16"), {{0, 3}, {4, 7}});
  ClusterOptions o = c.Options();
  o.local_fallback = true;
  auto backend = ClusterExpertBackend::Create(SmallModel("F16"), o);
  ASSERT_TRUE(backend.ok()) << backend.status();
  const std::vector<float> want = LocalLogits(c);
  auto cluster = c.LoadEngine(backend->get());
  ASSERT_TRUE(RunThree(*cluster, true).ok());
  EXPECT_EQ((*backend)->Stats().fallback_rows, 0u);
  c.registry().SetDown(c.address(1), true);
  for (const bool pipelined : {true, false}) {
    auto got = RunThree(*cluster, pipelined);
    ASSERT_TRUE(got.ok()) << got.status();
    ExpectBitIdentical(want, *got);
  }
  ClusterStats st = (*backend)->Stats();
  EXPECT_EQ(st.failed_steps, 0u);
  EXPECT_GE(st.retried_steps, 1u);  // the call that found out, retried here
  EXPECT_GT(st.fallback_rows, 0u);
  EXPECT_FALSE(st.workers[1].up);
  // Back: the worker takes its experts again.
  c.registry().SetDown(c.address(1), false);
  (*backend)->ResetStats();
  auto again = RunThree(*cluster, true);
  ASSERT_TRUE(again.ok()) << again.status();
  ExpectBitIdentical(want, *again);
  st = (*backend)->Stats();
  EXPECT_EQ(st.fallback_rows, 0u);
  EXPECT_GT(st.workers[1].requests, 0u);
}

}  // namespace
}  // namespace moepool
