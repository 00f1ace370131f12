#include "coordinator/cluster_expert_backend.h"

#include <chrono>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "engine/engine.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/coordinator/cluster_run_util.h"
#include "tests/coordinator/fake_worker_util.h"
#include "tests/testdata.h"

namespace moepool {
namespace {

using ::moepool::testing::ExpectBitIdentical;
using ::moepool::testing::FakeWorker;
using ::moepool::testing::FakeWorkerOptions;
using ::moepool::testing::PairsForExperts;
using ::moepool::testing::SmallModel;
using ::testing::HasSubstr;

std::unique_ptr<FakeWorker> StartWorker(FakeWorkerOptions o) {
  auto w = FakeWorker::Start(o);
  EXPECT_TRUE(w.ok()) << w.status();
  return w.ok() ? *std::move(w) : nullptr;
}

std::unique_ptr<FakeWorker> StartWorker(const std::string& model, int n_layer, int lo, int hi) {
  FakeWorkerOptions o;
  o.model_path = model;
  o.pairs = PairsForExperts(n_layer, lo, hi);
  return StartWorker(o);
}

ClusterOptions Options(const std::vector<const FakeWorker*>& workers) {
  std::vector<std::string> addresses;
  for (const FakeWorker* w : workers) addresses.push_back(w->address());
  return ::moepool::testing::TestClusterOptions(addresses);
}

std::unique_ptr<Engine> LoadEngine(const std::string& model, ExpertBackend* experts) {
  return ::moepool::testing::LoadEngineWithExperts(model, experts, 256);
}

std::vector<int32_t> Prompt(int64_t n_vocab, int n, uint32_t seed = 7) {
  std::mt19937 rng(seed);
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (auto& x : t) x = static_cast<int32_t>(3 + rng() % static_cast<uint32_t>(n_vocab - 3));
  return t;
}

// Logits of every prompt position (one batch) followed by those of `n_decode` greedy decode
// steps (one row each).
absl::StatusOr<std::vector<float>> PromptAndDecode(Engine& e, const std::vector<int32_t>& prompt,
                                                   int n_decode) {
  KvCache cache(e.config(), e.n_ctx());
  auto logits = e.EvalPrompt(prompt, &cache, /*all_logits=*/true);
  if (!logits.ok()) return logits.status();
  std::vector<float> all = *logits;
  const int64_t n_vocab = e.config().n_vocab;
  for (int i = 0; i < n_decode; ++i) {
    const float* last = all.data() + all.size() - n_vocab;
    const int32_t tok = static_cast<int32_t>(std::max_element(last, last + n_vocab) - last);
    const int64_t pos = cache.n_past();
    BatchRow row{tok, pos, &cache, true};
    std::vector<float> step;
    const absl::Status s = e.transformer().Forward({&row, 1}, &step);
    if (!s.ok()) return s;
    cache.set_n_past(pos + 1);
    all.insert(all.end(), step.begin(), step.end());
  }
  return all;
}

// Runs the local engine and the cluster engine on the same prompt + decode and compares.
// The backend is handed to `keep` (if given) for further checks.
void ExpectClusterMatchesLocal(const std::string& model, const ClusterOptions& options,
                               std::unique_ptr<ClusterExpertBackend>* keep = nullptr) {
  auto backend = ClusterExpertBackend::Create(model, options);
  ASSERT_TRUE(backend.ok()) << backend.status();
  auto local = LoadEngine(model, nullptr);
  auto cluster = LoadEngine(model, backend->get());
  ASSERT_TRUE(local && cluster);
  const auto prompt = Prompt(local->config().n_vocab, 40);
  auto want = PromptAndDecode(*local, prompt, 6);
  auto got = PromptAndDecode(*cluster, prompt, 6);
  ASSERT_TRUE(want.ok()) << want.status();
  ASSERT_TRUE(got.ok()) << got.status();
  ExpectBitIdentical(*want, *got);
  const ClusterStats st = (*backend)->Stats();
  EXPECT_EQ(st.failed_steps, 0u);
  EXPECT_GT(st.steps, 0u);
  cluster.reset();
  if (keep != nullptr) *keep = *std::move(backend);
}

class TwoWorkersTest : public ::testing::TestWithParam<const char*> {};

TEST_P(TwoWorkersTest, BitIdenticalToLocal) {
  const std::string& model = SmallModel(GetParam());
  auto w0 = StartWorker(model, 2, 0, 3);
  auto w1 = StartWorker(model, 2, 4, 7);
  std::unique_ptr<ClusterExpertBackend> backend;
  ExpectClusterMatchesLocal(model, Options({w0.get(), w1.get()}), &backend);
  ASSERT_NE(backend, nullptr);
  EXPECT_GT(w0->forward_requests(), 0);
  EXPECT_GT(w1->forward_requests(), 0);
  const ClusterStats st = backend->Stats();
  ASSERT_EQ(st.workers.size(), 2u);
  EXPECT_GT(st.workers[0].requests, 0u);
  EXPECT_FALSE(st.workers[0].recent.empty());
  EXPECT_GT(st.workers[0].recent.back().round_trip_micros, 0u);
}

INSTANTIATE_TEST_SUITE_P(Types, TwoWorkersTest, ::testing::Values("F16", "Q8_0"));

TEST(ClusterExpertBackendTest, ReplicasBitIdenticalAndBothUsed) {
  const std::string& model = SmallModel("Q8_0");
  auto a = StartWorker(model, 2, 0, 7);
  auto b = StartWorker(model, 2, 0, 7);
  auto c = StartWorker(model, 2, 0, 3);
  ExpectClusterMatchesLocal(model, Options({a.get(), b.get(), c.get()}));
  EXPECT_GT(a->forward_requests(), 0);
  EXPECT_GT(b->forward_requests(), 0);
  EXPECT_GT(c->forward_requests(), 0);
}

TEST(ClusterExpertBackendTest, LocalExpertsBitIdentical) {
  const std::string& model = SmallModel("Q8_0");
  auto a = StartWorker(model, 2, 2, 5);  // expert 5 is also local: local wins
  auto b = StartWorker(model, 2, 6, 7);
  ClusterOptions o = Options({a.get(), b.get()});
  o.local_experts = {0, 1, 5};
  std::unique_ptr<ClusterExpertBackend> backend;
  ExpectClusterMatchesLocal(model, o, &backend);
  ASSERT_NE(backend, nullptr);
  EXPECT_GT(backend->Stats().local_rows, 0u);
  EXPECT_TRUE(backend->placement().local(1, 5));
}

TEST(ClusterExpertBackendTest, ChunkedMessagesBitIdentical) {
  const std::string& model = SmallModel("F16");
  FakeWorkerOptions wo;
  wo.model_path = model;
  wo.max_message_bytes = 4096;  // answers of ~10 rows per chunk
  wo.pairs = PairsForExperts(2, 0, 3);
  auto a = StartWorker(wo);
  wo.pairs = PairsForExperts(2, 4, 7);
  auto b = StartWorker(wo);
  ClusterOptions o = Options({a.get(), b.get()});
  o.max_message_bytes = 4096;  // requests of ~10 rows per chunk
  ExpectClusterMatchesLocal(model, o);
}

TEST(ClusterExpertBackendTest, ConformanceModelBitIdentical) {
  const std::string model = ::moepool::testing::SharedTestdataPath("conformance/tiny-Q4_K_M.gguf");
  REQUIRE_TESTDATA(model);
  auto a = StartWorker(model, 4, 0, 3);
  auto b = StartWorker(model, 4, 4, 7);
  ExpectClusterMatchesLocal(model, Options({a.get(), b.get()}));
}

// Backend level, many rows at once: the combine order reproduces LocalExpertBackend exactly.
TEST(ClusterExpertBackendTest, ComputeBitIdenticalOnRandomRoutes) {
  const std::string& model = SmallModel("F16");
  auto a = StartWorker(model, 2, 0, 2);
  auto b = StartWorker(model, 2, 3, 7);
  ClusterOptions o = Options({a.get(), b.get()});
  o.local_experts = {1};
  auto backend = ClusterExpertBackend::Create(model, o);
  ASSERT_TRUE(backend.ok()) << backend.status();
  auto full = Model::Load(model);
  ASSERT_TRUE(full.ok());
  ThreadPool pool(2);
  LocalExpertBackend local(full->get(), &pool);
  const int64_t n = 300, d = 64;
  const int k = 2;
  std::mt19937 rng(3);
  std::normal_distribution<float> normal;
  std::vector<float> x(n * d), w(n * k);
  std::vector<int32_t> e(n * k);
  for (auto& v : x) v = normal(rng);
  for (int64_t r = 0; r < n; ++r) {
    int e0 = static_cast<int>(rng() % 8), e1 = static_cast<int>(rng() % 8);
    if (e0 == e1) e1 = -1;  // rows with a single expert too
    e[r * k] = e1 < 0 ? e0 : std::min(e0, e1);
    e[r * k + 1] = e1 < 0 ? -1 : std::max(e0, e1);
    w[r * k] = 0.25f + static_cast<float>(rng() % 100) / 200;
    w[r * k + 1] = 1.0f - w[r * k];
  }
  ExpertRoutes routes{1, n, d, k, x.data(), e.data(), w.data()};
  std::vector<float> want(n * d), got(n * d);
  ASSERT_TRUE(local.Compute(routes, want.data()).ok());
  ASSERT_TRUE((*backend)->Compute(routes, got.data()).ok());
  ExpectBitIdentical(want, got);
}

TEST(ClusterExpertBackendTest, HalfPrecisionWireWithinTolerance) {
  const std::string& model = SmallModel("F16");
  auto a = StartWorker(model, 2, 0, 3);
  auto b = StartWorker(model, 2, 4, 7);
  auto local = LoadEngine(model, nullptr);
  ASSERT_TRUE(local);
  const auto prompt = Prompt(local->config().n_vocab, 40);
  auto want = PromptAndDecode(*local, prompt, 0);
  ASSERT_TRUE(want.ok());
  for (const auto dtype : {moepool::v1::DTYPE_F16, moepool::v1::DTYPE_BF16}) {
    ClusterOptions o = Options({a.get(), b.get()});
    o.wire_dtype = dtype;
    auto backend = ClusterExpertBackend::Create(model, o);
    ASSERT_TRUE(backend.ok()) << backend.status();
    auto cluster = LoadEngine(model, backend->get());
    auto got = PromptAndDecode(*cluster, prompt, 0);
    ASSERT_TRUE(got.ok()) << got.status();
    double err = 0, ref = 0;
    for (size_t i = 0; i < want->size(); ++i) {
      err += std::pow((*got)[i] - (*want)[i], 2);
      ref += std::pow((*want)[i], 2);
    }
    // Rounding rows and partials to 11 (f16) or 8 (bf16) mantissa bits.
    const double bound = dtype == moepool::v1::DTYPE_F16 ? 1e-5 : 1e-3;
    EXPECT_LT(err / ref, bound) << "NMSE with " << static_cast<int>(dtype);
    EXPECT_GT(err, 0.0) << "rounding on the wire should show";
  }
}

TEST(ClusterExpertBackendTest, TopThreeSingleHolderBitIdenticalSplitClose) {
  const std::string& model = SmallModel("F16", /*k=*/3);
  auto all = StartWorker(model, 2, 0, 7);
  ExpectClusterMatchesLocal(model, Options({all.get()}));
  // Split holders: additions are grouped per holder (documented), so only close.
  auto a = StartWorker(model, 2, 0, 3);
  auto b = StartWorker(model, 2, 4, 7);
  auto backend = ClusterExpertBackend::Create(model, Options({a.get(), b.get()}));
  ASSERT_TRUE(backend.ok()) << backend.status();
  auto local = LoadEngine(model, nullptr);
  auto cluster = LoadEngine(model, backend->get());
  const auto prompt = Prompt(local->config().n_vocab, 20);
  auto want = PromptAndDecode(*local, prompt, 0);
  auto got = PromptAndDecode(*cluster, prompt, 0);
  ASSERT_TRUE(want.ok() && got.ok());
  for (size_t i = 0; i < want->size(); ++i) {
    ASSERT_NEAR((*got)[i], (*want)[i], 1e-3f * (1 + std::fabs((*want)[i]))) << i;
  }
}

// The killed worker is the first (its exchange runs on the forward thread) or the second.
class KilledWorkerTest : public ::testing::TestWithParam<int> {};

TEST_P(KilledWorkerTest, FailsTheStepAndIsReconnected) {
  const std::string& model = SmallModel("Q8_0");
  const int killed = GetParam();
  std::unique_ptr<FakeWorker> w[2] = {StartWorker(model, 2, 0, 3), StartWorker(model, 2, 4, 7)};
  const int port = w[killed]->port();
  const std::string addr = w[killed]->address();
  auto backend = ClusterExpertBackend::Create(model, Options({w[0].get(), w[1].get()}));
  ASSERT_TRUE(backend.ok()) << backend.status();
  auto local = LoadEngine(model, nullptr);
  auto cluster = LoadEngine(model, backend->get());
  const auto prompt = Prompt(local->config().n_vocab, 40);
  auto want = PromptAndDecode(*local, prompt, 2);
  ASSERT_TRUE(want.ok());
  ASSERT_TRUE(PromptAndDecode(*cluster, prompt, 2).ok());

  w[killed]->Kill();
  auto failed = PromptAndDecode(*cluster, prompt, 2);
  ASSERT_FALSE(failed.ok());
  EXPECT_EQ(failed.status().code(), absl::StatusCode::kUnavailable) << failed.status();
  EXPECT_THAT(std::string(failed.status().message()), HasSubstr(addr));
  // While it is down, its experts are unavailable: still a clear error, no crash.
  auto again = PromptAndDecode(*cluster, prompt, 0);
  ASSERT_FALSE(again.ok());
  EXPECT_THAT(std::string(again.status().message()), HasSubstr(addr));

  FakeWorkerOptions wo;
  wo.model_path = model;
  wo.pairs = PairsForExperts(2, 4 * killed, 4 * killed + 3);
  wo.port = port;
  w[killed] = StartWorker(wo);
  ASSERT_NE(w[killed], nullptr);
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (!(*backend)->Stats().workers[killed].up && std::chrono::steady_clock::now() < give_up) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  const ClusterStats st = (*backend)->Stats();
  ASSERT_TRUE(st.workers[killed].up) << st.workers[killed].last_error;
  EXPECT_GE(st.workers[killed].reconnects, 1u);
  auto got = PromptAndDecode(*cluster, prompt, 2);
  ASSERT_TRUE(got.ok()) << got.status();
  ExpectBitIdentical(*want, *got);
}

INSTANTIATE_TEST_SUITE_P(Position, KilledWorkerTest, ::testing::Values(0, 1));

// The stalled worker is the first (its exchange runs on the forward thread) or the second (on
// its link thread).
class StalledWorkerTest : public ::testing::TestWithParam<int> {};

TEST_P(StalledWorkerTest, HitsTheStepTimeout) {
  const std::string& model = SmallModel("F16");
  const int stalled = GetParam();
  std::unique_ptr<FakeWorker> w[2];
  for (int i = 0; i < 2; ++i) {
    FakeWorkerOptions wo;
    wo.model_path = model;
    wo.pairs = PairsForExperts(2, 4 * i, 4 * i + 3);
    wo.stall = i == stalled;
    w[i] = StartWorker(wo);
  }
  ClusterOptions o = Options({w[0].get(), w[1].get()});
  o.step_timeout_s = 0.3;
  auto backend = ClusterExpertBackend::Create(model, o);
  ASSERT_TRUE(backend.ok()) << backend.status();
  auto cluster = LoadEngine(model, backend->get());
  const auto prompt = Prompt(cluster->config().n_vocab, 40);
  auto r = PromptAndDecode(*cluster, prompt, 0);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kDeadlineExceeded) << r.status();
  EXPECT_THAT(std::string(r.status().message()), HasSubstr(w[stalled]->address()));
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("step timeout"));
  EXPECT_THAT(std::string(r.status().message()),
              ::testing::Not(HasSubstr(w[1 - stalled]->address())));
  const ClusterStats st = (*backend)->Stats();
  EXPECT_TRUE(st.workers[1 - stalled].up);  // the other worker was not harmed
  EXPECT_EQ(st.failed_steps, 1u);
}

INSTANTIATE_TEST_SUITE_P(Position, StalledWorkerTest, ::testing::Values(0, 1));

TEST(ClusterExpertBackendTest, WrongTokenRefusedAtStartup) {
  const std::string& model = SmallModel("F16");
  FakeWorkerOptions wo;
  wo.model_path = model;
  wo.pairs = PairsForExperts(2, 0, 7);
  wo.token = "s3cret";
  auto w = StartWorker(wo);
  ClusterOptions o = Options({w.get()});
  o.cluster_token = "wrong";
  auto bad = ClusterExpertBackend::Create(model, o);
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kUnauthenticated);
  EXPECT_THAT(std::string(bad.status().message()),
              HasSubstr("worker " + w->address() + " refused the cluster token"));
  o.cluster_token = "s3cret";
  ExpectClusterMatchesLocal(model, o);
}

TEST(ClusterExpertBackendTest, OtherModelFileRefusedAtStartup) {
  const std::string& model = SmallModel("F16");
  auto good = StartWorker(model, 2, 0, 3);
  auto other = StartWorker(SmallModel("F16", 2, /*seed=*/2), 2, 4, 7);
  auto b = ClusterExpertBackend::Create(model, Options({good.get(), other.get()}));
  ASSERT_FALSE(b.ok());
  EXPECT_EQ(b.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(b.status().message()),
              HasSubstr("worker " + other->address() + " serves a different model file"));
  EXPECT_THAT(std::string(b.status().message()), ::testing::Not(HasSubstr(good->address())));
}

TEST(ClusterExpertBackendTest, OtherProtocolVersionRefused) {
  const std::string& model = SmallModel("F16");
  FakeWorkerOptions wo;
  wo.model_path = model;
  wo.pairs = PairsForExperts(2, 0, 7);
  wo.protocol_version = 2;
  auto w = StartWorker(wo);
  auto b = ClusterExpertBackend::Create(model, Options({w.get()}));
  ASSERT_FALSE(b.ok());
  EXPECT_THAT(std::string(b.status().message()),
              HasSubstr("worker " + w->address() + " speaks protocol version 2"));
}

TEST(ClusterExpertBackendTest, MissingExpertsRefusedAtStartup) {
  const std::string& model = SmallModel("F16");
  auto a = StartWorker(model, 2, 0, 3);
  auto b = StartWorker(model, 2, 4, 5);
  auto r = ClusterExpertBackend::Create(model, Options({a.get(), b.get()}));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("layers 0-1: experts 6-7"));
}

TEST(ClusterExpertBackendTest, UnreachableWorkerRefusedAtStartup) {
  const std::string& model = SmallModel("F16");
  auto a = StartWorker(model, 2, 0, 7);
  const std::string gone = a->address();
  a->Kill();
  ClusterOptions o;
  o.workers = {gone};
  o.connect_timeout_s = 0.3;
  auto r = ClusterExpertBackend::Create(model, o);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("worker " + gone));
}

}  // namespace
}  // namespace moepool
