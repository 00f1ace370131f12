// WorkerCore: results equal to single-process execution (bit for bit), the refusal of every
// malformed request, and Describe. (Rows on the wire in f16/bf16: expert_service_test.cc.)
#include "worker/worker_core.h"

#include <atomic>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "engine/fingerprint.h"
#include "engine/model.h"
#include "gtest/gtest.h"
#include "tests/engine/tiny_model_util.h"
#include "tests/testdata.h"
#include "tests/worker/worker_test_util.h"

namespace moepool::worker {
namespace {

using ::moepool::testing::LocalResult;
using ::moepool::testing::MakeRoutes;
using ::moepool::testing::RequestFor;
using ::moepool::testing::TestRoutes;
using ::moepool::testing::TinyModelPath;

#define EXPECT_MESSAGE_HAS(status, needle) \
  EXPECT_PRED_FORMAT2(::testing::IsSubstring, needle, std::string((status).message()))

// Layer 1: experts 0-3; layer 2: experts 2 and 5.
ExpertSet TestExperts() { return ExpertSet({{1, 0}, {1, 1}, {1, 2}, {1, 3}, {2, 2}, {2, 5}}); }

class WorkerCoreTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    const std::string& path = TinyModelPath("Q4_K_M");
    ASSERT_FALSE(path.empty());
    WorkerCoreOptions o;
    o.model_path = path;
    o.experts = TestExperts();
    o.threads = 2;
    o.max_rows = 64;
    o.worker_id = "test-worker";
    auto core = WorkerCore::Create(o);
    ASSERT_TRUE(core.ok()) << core.status();
    core_ = core->release();
    auto full = Model::Load(path);
    ASSERT_TRUE(full.ok()) << full.status();
    full_ = full->release();
  }
  static void TearDownTestSuite() {
    delete core_;
    core_ = nullptr;
    delete full_;
    full_ = nullptr;
  }
  void SetUp() override {
    ASSERT_NE(core_, nullptr);
    ASSERT_NE(full_, nullptr);
  }
  int64_t n_embd() const { return core_->config().n_embd; }

  static WorkerCore* core_;
  static Model* full_;
};

WorkerCore* WorkerCoreTest::core_ = nullptr;
Model* WorkerCoreTest::full_ = nullptr;

TEST_F(WorkerCoreTest, ResultIsBitIdenticalToTheLocalBackend) {
  // 20 rows cross the 8-row tile of the multi-row kernels; k = 2 and k = 3 (with -1 slots).
  const TestRoutes cases[] = {MakeRoutes(1, 20, n_embd(), 2, {0, 1, 2, 3}, 1),
                              MakeRoutes(2, 9, n_embd(), 2, {2, 5}, 2),
                              MakeRoutes(1, 5, n_embd(), 3, {0, 1, 2, 3}, 3)};
  for (const TestRoutes& r : cases) {
    std::vector<float> out;
    ASSERT_TRUE(core_->Compute(RequestFor(r), &out).ok());
    const std::vector<float> want = LocalResult(*full_, r);
    ASSERT_EQ(out.size(), want.size());
    EXPECT_EQ(std::memcmp(out.data(), want.data(), out.size() * sizeof(float)), 0)
        << "layer " << r.layer;
    double norm = 0;
    for (float v : out) norm += v * v;
    EXPECT_GT(norm, 0.0);
  }
}

TEST_F(WorkerCoreTest, ZeroRowsGiveAnEmptyResult) {
  const TestRoutes r = MakeRoutes(1, 0, n_embd(), 2, {0}, 5);
  std::vector<float> out = {1, 2};
  ASSERT_TRUE(core_->Compute(RequestFor(r), &out).ok());
  EXPECT_TRUE(out.empty());
}

TEST_F(WorkerCoreTest, RefusesEveryMalformedRequestAndLeavesNoOutput) {
  const TestRoutes base = MakeRoutes(1, 4, n_embd(), 2, {0, 1, 2, 3}, 6);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  struct Case {
    const char* what;
    std::function<void(TestRoutes*, ComputeRequest*)> mutate;
    absl::StatusCode code;
    const char* message;
  };
  const absl::StatusCode kInvalid = absl::StatusCode::kInvalidArgument;
  const Case cases[] = {
      {"layer -1", [](TestRoutes*, ComputeRequest* c) { c->layer = -1; }, kInvalid,
       "layer -1 is out of range"},
      {"layer n_layer", [](TestRoutes*, ComputeRequest* c) { c->layer = 4; }, kInvalid,
       "layer 4 is out of range"},
      {"n_embd", [](TestRoutes*, ComputeRequest* c) { c->n_embd = 128; }, kInvalid,
       "n_embd 128 != the model's embedding length 256"},
      {"n_rows -1", [](TestRoutes*, ComputeRequest* c) { c->n_rows = -1; }, kInvalid,
       "n_rows -1 is outside [0, 64]"},
      {"n_rows > max", [](TestRoutes*, ComputeRequest* c) { c->n_rows = 65; }, kInvalid,
       "n_rows 65 is outside [0, 64]"},
      {"k 0", [](TestRoutes*, ComputeRequest* c) { c->k = 0; }, kInvalid, "k 0 is outside [1, 8]"},
      {"k 9", [](TestRoutes*, ComputeRequest* c) { c->k = 9; }, kInvalid, "k 9 is outside"},
      {"rows null", [](TestRoutes*, ComputeRequest* c) { c->x = nullptr; }, kInvalid,
       "rows are missing"},
      {"n_rows 3 with 4 rows of pairs", [](TestRoutes*, ComputeRequest* c) { c->n_rows = 3; },
       kInvalid, "expected n_rows x k = 6"},
      {"expert count", [](TestRoutes*, ComputeRequest* c) { c->expert_count = 7; }, kInvalid,
       "got 7 expert ids and 8 weights, expected n_rows x k = 8"},
      {"weight count", [](TestRoutes*, ComputeRequest* c) { c->weight_count = 9; }, kInvalid,
       "8 expert ids and 9 weights"},
      {"expert -2", [](TestRoutes* r, ComputeRequest*) { r->expert[1] = -2; }, kInvalid,
       "row 0: expert id -2 is outside [-1, 8)"},
      {"expert 8", [](TestRoutes* r, ComputeRequest*) { r->expert[3] = 8; }, kInvalid,
       "row 1: expert id 8 is outside"},
      {"descending", [](TestRoutes* r, ComputeRequest*) { r->expert[0] = 3, r->expert[1] = 1; },
       kInvalid, "row 0: expert ids must be ascending without repeats (1 after 3)"},
      {"repeated", [](TestRoutes* r, ComputeRequest*) { r->expert[0] = 2, r->expert[1] = 2; },
       kInvalid, "(2 after 2)"},
      {"weight NaN", [&](TestRoutes* r, ComputeRequest*) { r->weight[2] = nan; }, kInvalid,
       "row 1: weight 0 is not finite"},
      {"weight inf", [&](TestRoutes* r, ComputeRequest*) { r->weight[7] = -inf; }, kInvalid,
       "row 3: weight 1 is not finite"},
      {"weight NaN on a -1 slot",
       [&](TestRoutes* r, ComputeRequest*) { r->expert[4] = -1, r->weight[4] = nan; }, kInvalid,
       "not finite"},
      {"expert not held", [](TestRoutes* r, ComputeRequest*) { r->expert[7] = 4; },
       absl::StatusCode::kFailedPrecondition,
       "expert 4 of layer 1 is not held by this worker (test-worker holds 6 experts on 2 layers)"},
      {"layer not held", [](TestRoutes*, ComputeRequest* c) { c->layer = 0; },
       absl::StatusCode::kFailedPrecondition, "of layer 0 is not held"},
  };
  for (const Case& c : cases) {
    TestRoutes r = base;
    r.expert = {0, 1, 2, 3, 0, 3, 1, 2};
    ComputeRequest request = RequestFor(r);
    c.mutate(&r, &request);
    std::vector<float> out = {1, 2};
    const absl::Status s = core_->Compute(request, &out);
    EXPECT_EQ(s.code(), c.code) << c.what << ": " << s;
    EXPECT_MESSAGE_HAS(s, c.message) << c.what;
    EXPECT_TRUE(out.empty()) << c.what;
  }
}

TEST_F(WorkerCoreTest, ConcurrentCallsAreSerialisedAndCorrect) {
  const TestRoutes r = MakeRoutes(1, 10, n_embd(), 2, {0, 1, 2, 3}, 7);
  const std::vector<float> want = LocalResult(*full_, r);
  std::vector<std::vector<float>> outs(4);
  std::vector<absl::Status> statuses(4);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] { statuses[t] = core_->Compute(RequestFor(r), &outs[t]); });
  }
  for (auto& t : threads) t.join();
  for (int t = 0; t < 4; ++t) {
    EXPECT_TRUE(statuses[t].ok()) << statuses[t];
    ASSERT_EQ(outs[t].size(), want.size()) << t;
    EXPECT_EQ(std::memcmp(outs[t].data(), want.data(), want.size() * sizeof(float)), 0) << t;
  }
}

TEST_F(WorkerCoreTest, DescribeReportsIdentityHyperparametersAndHoldings) {
  auto d = core_->Describe();
  ASSERT_TRUE(d.ok()) << d.status();
  const ExpertSet set = TestExperts();
  // The fingerprint is the one a coordinator computes over the same pairs of its own copy.
  EXPECT_EQ(d->fingerprint, ModelFingerprint(*full_, set.pairs()));
  EXPECT_NE(d->fingerprint, ModelFingerprint(*full_, {{1, 0}}));
  EXPECT_EQ(d->model_name, full_->config().name);
  EXPECT_EQ(d->file_bytes, full_->file().file_size());
  EXPECT_EQ(d->n_embd, 256);
  EXPECT_EQ(d->n_ff, full_->config().n_ff);
  EXPECT_EQ(d->n_layer, 4);
  EXPECT_EQ(d->n_expert, 8);
  EXPECT_EQ(d->n_expert_used, 2);
  EXPECT_EQ(d->experts, set.Packed());
  uint64_t bytes = 0;
  for (const auto& [layer, expert] : set.pairs()) {
    const ExpertWeights& e = full_->layer(layer).experts[static_cast<size_t>(expert)];
    bytes += e.gate.SizeBytes() + e.up.SizeBytes() + e.down.SizeBytes();
  }
  EXPECT_EQ(d->expert_bytes, bytes);
  EXPECT_EQ(d->device, "cpu");
  EXPECT_EQ(d->worker_id, "test-worker");
  EXPECT_EQ(d->threads, 2);
  EXPECT_GT(d->memory_used_bytes, 0u);
  EXPECT_GT(d->memory_free_bytes, 0u);
}

TEST(WorkerCoreCreateTest, RefusesEmptyOrOutOfModelSetsAndBadOptions) {
  const std::string& path = TinyModelPath("Q4_K_M");
  ASSERT_FALSE(path.empty());
  WorkerCoreOptions o;
  o.model_path = path;
  auto empty = WorkerCore::Create(o);
  EXPECT_EQ(empty.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_MESSAGE_HAS(empty.status(), "at least one");

  o.experts = ExpertSet({{0, 8}});
  auto outside = WorkerCore::Create(o);
  EXPECT_EQ(outside.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_MESSAGE_HAS(outside.status(), "(layer 0, expert 8) is outside");

  o.experts = ExpertSet({{4, 0}});
  EXPECT_EQ(WorkerCore::Create(o).status().code(), absl::StatusCode::kInvalidArgument);

  o.experts = ExpertSet({{0, 0}});
  o.max_rows = 0;
  EXPECT_EQ(WorkerCore::Create(o).status().code(), absl::StatusCode::kInvalidArgument);

  o.max_rows = 16;
  o.model_path = path + ".absent";
  EXPECT_FALSE(WorkerCore::Create(o).ok());
}

}  // namespace
}  // namespace moepool::worker

namespace moepool::worker {
namespace {

TEST(WorkerCoreReleaseTest, ReleasedPairsAreRefusedUnlistedAndTheRestStillExact) {
  const std::string& path = ::moepool::testing::TinyModelPath("Q4_K_M");
  WorkerCoreOptions o;
  o.model_path = path;
  o.experts = TestExperts();
  o.threads = 1;
  auto core = WorkerCore::Create(o);
  ASSERT_TRUE(core.ok()) << core.status();
  auto full = Model::Load(path);
  ASSERT_TRUE(full.ok()) << full.status();
  (*core)->Release({{1, 2}, {1, 3}, {7, 7}});  // (7, 7) is not held: ignored
  EXPECT_EQ((*core)->experts().size(), 4u);
  auto d = (*core)->Describe();
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(d->experts, (std::vector<uint32_t>{PackExpert(1, 0), PackExpert(1, 1), PackExpert(2, 2),
                                               PackExpert(2, 5)}));
  const int64_t n_embd = (*core)->config().n_embd;
  std::vector<float> out;
  const TestRoutes released = MakeRoutes(1, 3, n_embd, 2, {2, 3}, 1);
  EXPECT_EQ((*core)->Compute(RequestFor(released), &out).code(),
            absl::StatusCode::kFailedPrecondition);
  const TestRoutes kept = MakeRoutes(1, 6, n_embd, 2, {0, 1}, 2);
  ASSERT_TRUE((*core)->Compute(RequestFor(kept), &out).ok());
  const std::vector<float> want = LocalResult(**full, kept);
  ASSERT_EQ(out.size(), want.size());
  EXPECT_EQ(std::memcmp(out.data(), want.data(), out.size() * sizeof(float)), 0);
}

// A placement change: the core adopts another set (here of the same file) while calls run on
// other threads; every call answers, for the old or the new set, and after the swap the new set
// is exact and the old one refused. Another shape is refused and changes nothing.
TEST(WorkerCoreAdoptTest, AdoptSwapsTheSetBetweenCallsAndRefusesAnotherShape) {
  const std::string& path = ::moepool::testing::TinyModelPath("Q4_K_M");
  WorkerCoreOptions o;
  o.model_path = path;
  o.experts = ExpertSet({{1, 0}, {1, 1}});
  o.threads = 1;
  auto core = WorkerCore::Create(o);
  ASSERT_TRUE(core.ok()) << core.status();
  auto full = Model::Load(path);
  ASSERT_TRUE(full.ok()) << full.status();
  const int64_t n_embd = (*core)->config().n_embd;
  const TestRoutes old_pairs = MakeRoutes(1, 4, n_embd, 2, {0, 1}, 3);
  const TestRoutes new_pairs = MakeRoutes(1, 4, n_embd, 2, {2, 3}, 4);
  std::atomic<bool> stop{false};
  std::atomic<int> wrong{0};
  std::thread caller([&] {
    const std::vector<float> want = LocalResult(**full, old_pairs);
    while (!stop.load()) {
      std::vector<float> out;
      const absl::Status s = (*core)->Compute(RequestFor(old_pairs), &out);
      // Before the swap: exact; after: refused, never a wrong answer.
      if (s.ok() ? std::memcmp(out.data(), want.data(), out.size() * sizeof(float)) != 0
                 : s.code() != absl::StatusCode::kFailedPrecondition) {
        ++wrong;
      }
    }
  });
  ASSERT_TRUE((*core)->Adopt(path, ExpertSet({{1, 2}, {1, 3}})).ok());
  stop = true;
  caller.join();
  EXPECT_EQ(wrong.load(), 0);
  std::vector<float> out;
  EXPECT_EQ((*core)->Compute(RequestFor(old_pairs), &out).code(),
            absl::StatusCode::kFailedPrecondition);
  ASSERT_TRUE((*core)->Compute(RequestFor(new_pairs), &out).ok());
  const std::vector<float> want = LocalResult(**full, new_pairs);
  ASSERT_EQ(out.size(), want.size());
  EXPECT_EQ(std::memcmp(out.data(), want.data(), out.size() * sizeof(float)), 0);
  EXPECT_EQ((*core)->experts().size(), 2u);

  const std::string other = ::moepool::testing::TempDir() + "/adopt-other-shape.gguf";
  ::moepool::testing::GgufEdits edits;
  edits.metadata = [](std::vector<std::pair<std::string, GgufValue>>* metadata) {
    for (auto& [key, value] : *metadata) {
      if (key == "llama.expert_used_count") value.uint_value = 1;
    }
  };
  ASSERT_TRUE(::moepool::testing::CopyGgufWithEdits(path, other, edits).ok());
  const absl::Status refused = (*core)->Adopt(other, ExpertSet({{1, 0}}));
  EXPECT_EQ(refused.code(), absl::StatusCode::kInvalidArgument) << refused;
  EXPECT_EQ((*core)->Adopt(path, ExpertSet({{1, 99}})).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ((*core)->Adopt("/nonexistent.gguf", ExpertSet({{1, 0}})).code(),
            absl::StatusCode::kNotFound);
  ASSERT_TRUE((*core)->Compute(RequestFor(new_pairs), &out).ok());  // still serving
}

}  // namespace
}  // namespace moepool::worker
