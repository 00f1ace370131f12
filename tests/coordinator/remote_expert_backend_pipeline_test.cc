// ClusterExpertBackend's asynchronous form and its in-step retry, against in-process workers:
// micro-batches pipelined over remote experts give the local bits; a worker killed or stalled
// during a run is replaced by a replica within the step (same bits, no failed step); without a
// replica the step still fails naming the worker.
#include <chrono>
#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "coordinator/remote_expert_backend.h"
#include "engine/engine.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/coordinator/fake_worker_util.h"

namespace moepool {
namespace {

using ::moepool::testing::FakeWorker;
using ::moepool::testing::FakeWorkerOptions;
using ::moepool::testing::PairsForExperts;
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

std::vector<int32_t> Prompt(int64_t n_vocab, int n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (auto& x : t) x = static_cast<int32_t>(3 + rng() % static_cast<uint32_t>(n_vocab - 3));
  return t;
}

// Three sequences (prompts of 30, 20 and 1 tokens, then `n_decode` tokens each, fed from the
// prompts' own ids) in one or three micro-batches per step; the logits of every step.
absl::StatusOr<std::vector<float>> RunThree(Engine& e, bool pipelined, int n_decode = 3) {
  const int64_t n_vocab = e.config().n_vocab;
  const std::vector<int32_t> seq[3] = {Prompt(n_vocab, 30 + n_decode, 1),
                                       Prompt(n_vocab, 20 + n_decode, 2),
                                       Prompt(n_vocab, 1 + n_decode, 3)};
  const int64_t prompt[3] = {30, 20, 1};
  std::vector<std::unique_ptr<KvCache>> caches;
  for (int s = 0; s < 3; ++s) caches.push_back(std::make_unique<KvCache>(e.config(), e.n_ctx()));
  std::vector<float> all;
  for (int step = 0; step <= n_decode; ++step) {
    std::vector<BatchRow> rows[3];
    for (int s = 0; s < 3; ++s) {
      const int64_t from = step == 0 ? 0 : prompt[s] + step - 1;
      const int64_t to = step == 0 ? prompt[s] : from + 1;
      for (int64_t p = from; p < to; ++p) {
        rows[s].push_back({seq[s][static_cast<size_t>(p)], p, caches[s].get(), true});
      }
    }
    absl::Status st;
    if (pipelined) {
      const absl::Span<const BatchRow> spans[] = {rows[0], rows[1], rows[2]};
      st = e.transformer().ForwardMicroBatches(spans, &all);
    } else {
      for (int s = 0; s < 3 && st.ok(); ++s) st = e.transformer().Forward(rows[s], &all);
    }
    if (!st.ok()) return st;
  }
  return all;
}

void ExpectBitIdentical(const std::vector<float>& a, const std::vector<float>& b) {
  ASSERT_EQ(a.size(), b.size());
  size_t differ = 0;
  for (size_t i = 0; i < a.size(); ++i) differ += std::memcmp(&a[i], &b[i], 4) != 0;
  EXPECT_EQ(differ, 0u) << "of " << a.size() << " logits";
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

// Workers 0-3, 4-7 and a replica of everything; one of them is killed after a first run. The
// next runs still complete with the local bits: its rows go to the replicas within the step.
class KilledReplicaTest : public ::testing::TestWithParam<int> {};

TEST_P(KilledReplicaTest, RowsRetriedOnReplicaWithinTheStep) {
  const std::string& model = SmallModel("F16");
  std::vector<std::unique_ptr<FakeWorker>> w;
  w.push_back(StartWorker(model, 0, 3));
  w.push_back(StartWorker(model, 4, 7));
  w.push_back(StartWorker(model, 0, 7));
  auto backend = ClusterExpertBackend::Create(model, Options(w));
  ASSERT_TRUE(backend.ok()) << backend.status();
  auto local = LoadEngine(model, nullptr);
  auto cluster = LoadEngine(model, backend->get());
  auto want = RunThree(*local, false);
  ASSERT_TRUE(want.ok()) << want.status();
  auto before = RunThree(*cluster, GetParam() % 2 == 0);
  ASSERT_TRUE(before.ok()) << before.status();
  ExpectBitIdentical(*want, *before);

  const int killed = GetParam();
  w[static_cast<size_t>(killed)]->Kill();
  for (const bool pipelined : {true, false}) {
    auto after = RunThree(*cluster, pipelined);
    ASSERT_TRUE(after.ok()) << after.status();
    ExpectBitIdentical(*want, *after);
  }
  const ClusterStats st = (*backend)->Stats();
  EXPECT_EQ(st.failed_steps, 0u);
  EXPECT_GE(st.retried_steps, 1u);
  EXPECT_GE(st.retried_rows, 1u);
  EXPECT_FALSE(st.workers[static_cast<size_t>(killed)].up);
}

INSTANTIATE_TEST_SUITE_P(Killed, KilledReplicaTest, ::testing::Values(0, 1, 2));

// A stalled worker hits the step timeout (DEADLINE_EXCEEDED); its rows are retried on the
// replica of its experts in the same step.
TEST(ClusterRetryTest, StalledWorkerRetriedOnReplica) {
  const std::string& model = SmallModel("F16");
  std::vector<std::unique_ptr<FakeWorker>> w;
  w.push_back(StartWorker(model, 0, 3, /*stall=*/true));
  w.push_back(StartWorker(model, 4, 7));
  w.push_back(StartWorker(model, 0, 3));
  ClusterOptions o = Options(w);
  o.step_timeout_s = 0.3;
  o.reconnect_initial_s = 30;  // stays down for the rest of the test
  auto backend = ClusterExpertBackend::Create(model, o);
  ASSERT_TRUE(backend.ok()) << backend.status();
  auto local = LoadEngine(model, nullptr);
  auto cluster = LoadEngine(model, backend->get());
  auto want = RunThree(*local, false, 1);
  auto got = RunThree(*cluster, true, 1);
  ASSERT_TRUE(want.ok() && got.ok()) << got.status();
  ExpectBitIdentical(*want, *got);
  const ClusterStats st = (*backend)->Stats();
  EXPECT_EQ(st.failed_steps, 0u);
  EXPECT_GE(st.retried_steps, 1u);
  EXPECT_FALSE(st.workers[0].up);
  EXPECT_THAT(st.workers[0].last_error, HasSubstr("step timeout"));
}

// Without a replica (or with retries off) the step fails with the worker's error, also when
// micro-batches are in flight, and the backend stays usable once the worker is back.
TEST(ClusterRetryTest, NoReplicaFailsNamingTheWorker) {
  const std::string& model = SmallModel("F16");
  for (const bool retry : {true, false}) {
    std::vector<std::unique_ptr<FakeWorker>> w;
    w.push_back(StartWorker(model, 0, 3));
    w.push_back(StartWorker(model, 4, 7));
    w.push_back(StartWorker(model, 0, 3));  // replicas of 0-3 only
    ClusterOptions o = Options(w);
    o.retry_on_replica = retry;
    auto backend = ClusterExpertBackend::Create(model, o);
    ASSERT_TRUE(backend.ok()) << backend.status();
    auto cluster = LoadEngine(model, backend->get());
    ASSERT_TRUE(RunThree(*cluster, true).ok());
    const std::string addr = w[1]->address();
    w[1]->Kill();
    auto failed = RunThree(*cluster, true);
    ASSERT_FALSE(failed.ok());
    EXPECT_EQ(failed.status().code(), absl::StatusCode::kUnavailable) << failed.status();
    EXPECT_THAT(std::string(failed.status().message()), HasSubstr(addr));
    // With retries on, the message says there was no replica (or that the worker's other
    // stream failed too).
    EXPECT_EQ(std::string(failed.status().message()).find("retry") != std::string::npos, retry)
        << failed.status();
    EXPECT_GE((*backend)->Stats().failed_steps, 1u);
  }
}

// A worker restarted while one of its streams had not seen it go: that stream's first request
// fails, and without a replica it is retried on a fresh stream of the worker within the step.
TEST(ClusterRetryTest, RestartedWorkerServesEveryStreamAgain) {
  const std::string& model = SmallModel("F16");
  std::vector<std::unique_ptr<FakeWorker>> w;
  w.push_back(StartWorker(model, 0, 3));
  w.push_back(StartWorker(model, 4, 7));
  ClusterOptions o = Options(w);
  o.streams_per_worker = 3;  // one per micro-batch of RunThree
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
