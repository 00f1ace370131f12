#include "coordinator/expert_placement.h"

#include <string>
#include <vector>

#include "engine/fingerprint.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/coordinator/fake_worker_util.h"

namespace moepool {
namespace {

using ::moepool::testing::PairsForExperts;
using ::moepool::testing::SmallModel;
using ::testing::HasSubstr;

TEST(ParseExpertListTest, IdsAndRanges) {
  auto ids = ParseExpertList("5-7, 0,2,6", 8);
  ASSERT_TRUE(ids.ok()) << ids.status();
  EXPECT_EQ(*ids, (std::vector<int>{0, 2, 5, 6, 7}));
  EXPECT_TRUE(ParseExpertList("", 8)->empty());
}

TEST(ParseExpertListTest, RejectsBadSyntaxAndRange) {
  EXPECT_EQ(ParseExpertList("0,x", 8).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ParseExpertList("3-1", 8).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ParseExpertList("-1", 8).status().code(), absl::StatusCode::kInvalidArgument);
  auto s = ParseExpertList("6-8", 8).status();
  EXPECT_THAT(std::string(s.message()), HasSubstr("expert 8"));
}

TEST(DescribeExpertPairsTest, GroupsLayersWithTheSameExperts) {
  std::vector<std::pair<int, int>> pairs;
  for (int l = 0; l < 32; ++l) {
    pairs.emplace_back(l, 6);
    pairs.emplace_back(l, 7);
  }
  pairs.emplace_back(3, 1);
  pairs.emplace_back(5, 0);
  pairs.emplace_back(5, 2);
  // Layer 3 and 5 have their own sets; every other layer shares 6-7.
  EXPECT_EQ(DescribeExpertPairs(pairs),
            "layers 0-2,4,6-31: experts 6-7; layer 3: experts 1,6-7; layer 5: experts 0,2,6-7");
  EXPECT_EQ(DescribeExpertPairs({{2, 4}}), "layer 2: expert 4");
}

TEST(ExpertPlacementTest, MissingPairsAreListedCompactly) {
  auto p = ExpertPlacement::Build(32, 8, {"a:1", "b:2"},
                                  {PairsForExperts(32, 0, 3), PairsForExperts(32, 4, 5)}, {});
  ASSERT_FALSE(p.ok());
  EXPECT_EQ(p.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(p.status().message()), HasSubstr("layers 0-31: experts 6-7"));
  EXPECT_THAT(std::string(p.status().message()), HasSubstr("a:1, b:2"));
}

TEST(ExpertPlacementTest, LocalExpertsFillTheGap) {
  auto p = ExpertPlacement::Build(4, 8, {"a:1", "b:2"},
                                  {PairsForExperts(4, 0, 3), PairsForExperts(4, 4, 5)}, {6, 7});
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_TRUE(p->local(2, 6));
  EXPECT_FALSE(p->local(2, 5));
  EXPECT_EQ(p->holders(1, 4), std::vector<int>{1});
}

TEST(ExpertPlacementTest, LocalFallbackTakesWhatNoUpWorkerHolds) {
  auto p = ExpertPlacement::Build(4, 8, {"a:1", "b:2"},
                                  {PairsForExperts(4, 0, 3), PairsForExperts(4, 4, 5)}, {},
                                  /*local_fallback=*/true);
  ASSERT_TRUE(p.ok()) << p.status();  // experts 6-7 held by nobody
  EXPECT_TRUE(p->holders(1, 6).empty());
  std::vector<int64_t> rows(8, 0);
  rows[2] = rows[4] = rows[6] = 3;
  std::vector<int> holder;
  ASSERT_TRUE(p->ChooseHolders(
                   1, rows, [](int) { return true; }, 0, &holder)
                  .ok());
  EXPECT_EQ(holder[2], 0);
  EXPECT_EQ(holder[4], 1);
  EXPECT_EQ(holder[6], ExpertPlacement::kFallback);
  // Worker b down: its experts fall back too; worker a still takes its own.
  ASSERT_TRUE(p->ChooseHolders(
                   1, rows, [](int w) { return w != 1; }, 0, &holder)
                  .ok());
  EXPECT_EQ(holder[2], 0);
  EXPECT_EQ(holder[4], ExpertPlacement::kFallback);
  EXPECT_EQ(holder[7], ExpertPlacement::kNone);  // no rows
}

TEST(ExpertPlacementTest, ReplicasShareTheLoad) {
  // Workers 0 and 1 both hold everything; worker 2 holds experts 0-3.
  auto p = ExpertPlacement::Build(
      2, 8, {"a:1", "b:2", "c:3"},
      {PairsForExperts(2, 0, 7), PairsForExperts(2, 0, 7), PairsForExperts(2, 0, 3)}, {});
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->holders(0, 2), (std::vector<int>{0, 1, 2}));
  std::vector<int64_t> rows(8, 0);
  rows[1] = 10;
  rows[2] = 10;
  rows[3] = 10;
  rows[6] = 10;
  std::vector<int> holder;
  auto all_up = [](int) { return true; };
  ASSERT_TRUE(p->ChooseHolders(0, rows, all_up, 0, &holder).ok());
  // Least-loaded first: expert 1 -> a, 2 -> b, 3 -> c, 6 -> a or b (c lacks it).
  EXPECT_EQ(holder[1], 0);
  EXPECT_EQ(holder[2], 1);
  EXPECT_EQ(holder[3], 2);
  EXPECT_TRUE(holder[6] == 0 || holder[6] == 1);
  EXPECT_EQ(holder[0], ExpertPlacement::kNone);
  // The rotation spreads single experts over the replicas step by step.
  std::vector<int64_t> one(8, 0);
  one[5] = 1;
  std::vector<int> used;
  for (uint64_t step = 0; step < 4; ++step) {
    ASSERT_TRUE(p->ChooseHolders(1, one, all_up, step, &holder).ok());
    used.push_back(holder[5]);
  }
  EXPECT_EQ(used, (std::vector<int>{0, 1, 0, 1}));
  // A down replica is skipped; all holders down is UNAVAILABLE naming them.
  ASSERT_TRUE(p->ChooseHolders(
                   1, one, [](int w) { return w != 0; }, 0, &holder)
                  .ok());
  EXPECT_EQ(holder[5], 1);
  const absl::Status s = p->ChooseHolders(
      1, one, [](int w) { return w == 2; }, 0, &holder);
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(s.message()), HasSubstr("a:1, b:2"));
}

// With measured paces, a replicated expert's rows go to the holder that will answer first: a
// worker 4x slower per row gets rows only once the fast one would be done later; a long round
// trip counts once per exchange.
TEST(ExpertPlacementTest, ReplicaRowsGoToTheHolderThatAnswersFirst) {
  auto p = ExpertPlacement::Build(1, 8, {"fast:1", "slow:2"},
                                  {PairsForExperts(1, 0, 7), PairsForExperts(1, 0, 7)}, {});
  ASSERT_TRUE(p.ok()) << p.status();
  auto all_up = [](int) { return true; };
  std::vector<ExpertPlacement::HolderPace> pace = {{10, 0}, {40, 0}};
  std::vector<int64_t> rows(8, 10);  // 8 experts of 10 rows each
  std::vector<int> holder;
  int64_t slow_rows = 0;
  for (uint64_t rotation = 0; rotation < 2; ++rotation) {  // either holder first in ties
    ASSERT_TRUE(p->ChooseHolders(0, rows, all_up, rotation, &holder, &pace).ok());
    slow_rows = 0;
    for (int e = 0; e < 8; ++e) slow_rows += holder[static_cast<size_t>(e)] == 1 ? 10 : 0;
    // Fast: 7 experts, done at 700 us; slow: 1, done at 400 us (a second would end at 800).
    EXPECT_EQ(slow_rows, 10) << rotation;
  }
  // Without paces: the fewest rows so far, so an even split.
  ASSERT_TRUE(p->ChooseHolders(0, rows, all_up, 0, &holder).ok());
  slow_rows = 0;
  for (int e = 0; e < 8; ++e) slow_rows += holder[static_cast<size_t>(e)] == 1 ? 10 : 0;
  EXPECT_EQ(slow_rows, 40);
  // Equal per-row times, one far link: the near worker takes rows until the far one's round trip
  // is worth paying.
  pace = {{10, 0}, {10, 250}};
  ASSERT_TRUE(p->ChooseHolders(0, rows, all_up, 1, &holder, &pace).ok());
  int64_t far_rows = 0;
  for (int e = 0; e < 8; ++e) far_rows += holder[static_cast<size_t>(e)] == 1 ? 10 : 0;
  EXPECT_EQ(far_rows, 30);  // near: 50 rows = 500 us; far: 250 + 30 x 10 = 550 us
  // A single holder is chosen whatever its pace; a down replica still is skipped.
  pace = {{1e9, 1e9}, {1, 0}};
  ASSERT_TRUE(p->ChooseHolders(
                   0, rows, [](int w) { return w == 0; }, 0, &holder, &pace)
                  .ok());
  EXPECT_EQ(holder[3], 0);
}

// Paces near each other become equal (the group's fastest); paces beyond the tolerance stay.
TEST(MergeNearPacesTest, NoiseIsMergedRealDifferencesStay) {
  std::vector<ExpertPlacement::HolderPace> p = {{12, 130}, {10, 100}, {40, 600}, {11.5, 180}};
  MergeNearPaces(&p);
  EXPECT_EQ(p[0].micros_per_row, 10);
  EXPECT_EQ(p[1].micros_per_row, 10);
  EXPECT_EQ(p[2].micros_per_row, 40);
  EXPECT_EQ(p[3].micros_per_row, 10);
  EXPECT_EQ(p[0].round_trip_micros, 100);  // within 25% + 100 us of 100
  EXPECT_EQ(p[1].round_trip_micros, 100);
  EXPECT_EQ(p[2].round_trip_micros, 600);
  EXPECT_EQ(p[3].round_trip_micros, 100);
  p = {{10, 0}, {12.6, 0}};  // just beyond 25%
  MergeNearPaces(&p);
  EXPECT_EQ(p[1].micros_per_row, 12.6);
  std::vector<ExpertPlacement::HolderPace> none;
  MergeNearPaces(&none);  // nothing to do
}

class ValidateWorkerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto m = Model::Load(SmallModel("F16"));
    ASSERT_TRUE(m.ok()) << m.status();
    model_ = *std::move(m);
    const ModelConfig& c = model_->config();
    pairs_ = PairsForExperts(static_cast<int>(c.n_layer), 0, 3);
    d_.set_protocol_version(moepool::v1::PROTOCOL_VERSION_CURRENT);
    d_.mutable_model()->set_fingerprint(ModelFingerprint(*model_, pairs_));
    auto* h = d_.mutable_hparams();
    h->set_n_embd(c.n_embd);
    h->set_n_ff(c.n_ff);
    h->set_n_layer(c.n_layer);
    h->set_n_expert(c.n_expert);
    h->set_n_expert_used(c.n_expert_used);
    for (const auto& [l, e] : pairs_) d_.mutable_experts()->add_packed(PackExpertPair(l, e));
  }
  std::unique_ptr<Model> model_;
  std::vector<std::pair<int, int>> pairs_;
  moepool::v1::DescribeResponse d_;
};

TEST_F(ValidateWorkerTest, AcceptsTheSameModel) {
  EXPECT_TRUE(ValidateWorker("w:1", d_, *model_).ok());
  auto pairs = WorkerExpertPairs("w:1", d_, model_->config());
  ASSERT_TRUE(pairs.ok());
  EXPECT_EQ(*pairs, pairs_);
}

TEST_F(ValidateWorkerTest, RefusesAnotherModelFile) {
  auto other = Model::Load(SmallModel("F16", 2, /*seed=*/2));
  ASSERT_TRUE(other.ok()) << other.status();
  d_.mutable_model()->set_fingerprint(ModelFingerprint(**other, pairs_));
  const absl::Status s = ValidateWorker("w:1", d_, *model_);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(s.message()), HasSubstr("worker w:1 serves a different model file"));
}

TEST_F(ValidateWorkerTest, RefusesAnotherProtocolOrShape) {
  moepool::v1::DescribeResponse d = d_;
  d.set_protocol_version(static_cast<moepool::v1::ProtocolVersion>(2));
  EXPECT_THAT(std::string(ValidateWorker("w:1", d, *model_).message()),
              HasSubstr("worker w:1 speaks protocol version 2"));
  d = d_;
  d.mutable_hparams()->set_n_ff(999);
  EXPECT_THAT(std::string(ValidateWorker("w:1", d, *model_).message()),
              HasSubstr("worker w:1 serves a model of other hyperparameters"));
  d = d_;
  d.mutable_experts()->add_packed(PackExpertPair(9, 0));
  EXPECT_THAT(std::string(ValidateWorker("w:1", d, *model_).message()), HasSubstr("layer 9"));
}

}  // namespace
}  // namespace moepool
