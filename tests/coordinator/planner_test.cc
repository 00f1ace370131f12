#include "coordinator/planner.h"

#include <cmath>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "engine/synth.h"
#include "gtest/gtest.h"
#include "tests/engine/tiny_model_util.h"

namespace moepool {
namespace {

using ::moepool::testing::TinyModelPath;

ModelSizes Mixtral(const std::string& type) {
  auto shape = SynthShapeByName("mixtral-8x7b");
  EXPECT_TRUE(shape.ok());
  auto sizes = SizesFromShape(*shape, type);
  EXPECT_TRUE(sizes.ok()) << sizes.status();
  return *sizes;
}

PlanRequest Request(const ModelSizes& sizes, std::vector<uint64_t> machines) {
  PlanRequest r;
  r.sizes = sizes;
  r.machines = std::move(machines);
  return r;
}

Plan MustPlan(const PlanRequest& r) {
  auto plan = MakePlan(r);
  EXPECT_TRUE(plan.ok()) << plan.status();
  return plan.ok() ? *plan : Plan{};
}

// Checks what every plan that fits must satisfy: each pair held by at least one worker (exactly
// one without replicas), nobody over its available memory, byte counts consistent, commands and
// placement files that describe exactly the pairs held.
void ExpectConsistent(const PlanRequest& r, const Plan& plan) {
  ASSERT_TRUE(plan.fits) << plan.problem;
  const ModelSizes& s = r.sizes;
  std::map<std::pair<int, int>, int> holders;
  std::vector<std::string> workers;
  for (const MachinePlan& m : plan.machines) {
    EXPECT_LE(m.used(), m.available()) << m.name;
    uint64_t bytes = 0;
    for (const auto& [l, e] : m.pairs) {
      ++holders[{l, e}];
      bytes += s.PairBytes(l, e);
    }
    EXPECT_EQ(bytes, m.expert_bytes) << m.name;
    EXPECT_EQ(m.worker, !m.pairs.empty()) << m.name;
    if (!m.worker) continue;
    workers.push_back(m.name + ":" + std::to_string(m.port));
    EXPECT_EQ(m.worker_buffer_bytes, plan.worker_buffer);
    EXPECT_NE(m.worker_command.find("moepool worker --model " + s.model_path), std::string::npos);
    EXPECT_NE(m.worker_command.find("--listen 0.0.0.0:" + std::to_string(m.port)),
              std::string::npos);
    if (!m.placement_file_name.empty()) {
      auto parsed = ParsePlacementFile(m.placement_file, s.n_layer(), s.n_expert());
      ASSERT_TRUE(parsed.ok()) << parsed.status();
      EXPECT_EQ(*parsed, m.pairs) << m.name;
      EXPECT_NE(m.worker_command.find("--placement " + m.placement_file_name), std::string::npos);
    }
  }
  EXPECT_EQ(holders.size(), s.pair_bytes.size());
  for (const auto& [pair, n] : holders) {
    if (r.replicas) {
      EXPECT_GE(n, 1);
    } else {
      EXPECT_EQ(n, 1) << "layer " << pair.first << " expert " << pair.second;
    }
  }
  EXPECT_EQ(plan.machines.front().coordinator_bytes, plan.coordinator.total());
  for (const std::string& w : workers) {
    EXPECT_NE(plan.serve_command.find(w), std::string::npos) << plan.serve_command;
  }
}

TEST(ParseByteSizeTest, AcceptsUnitsAndPlainBytes) {
  EXPECT_EQ(*ParseByteSize("12GiB"), 12 * kGiB);
  EXPECT_EQ(*ParseByteSize("12 gib"), 12 * kGiB);
  EXPECT_EQ(*ParseByteSize("0.5GiB"), kGiB / 2);
  EXPECT_EQ(*ParseByteSize("12GB"), 12000000000u);
  EXPECT_EQ(*ParseByteSize("1.5 GB"), 1500000000u);
  EXPECT_EQ(*ParseByteSize("512MiB"), 512 * kMiB);
  EXPECT_EQ(*ParseByteSize("512MB"), 512000000u);
  EXPECT_EQ(*ParseByteSize("64KiB"), 64 * kKiB);
  EXPECT_EQ(*ParseByteSize("2TiB"), 2048 * kGiB);
  EXPECT_EQ(*ParseByteSize("4096"), 4096u);
  EXPECT_EQ(*ParseByteSize("4096B"), 4096u);
  EXPECT_EQ(*ParseByteSize("0"), 0u);
}

TEST(ParseByteSizeTest, RejectsMalformedSizes) {
  for (const char* bad : {"", "GiB", "12G", "12 gigs", "-1GiB", "1.2.3GB", "1e3", "abc", ".",
                          "99999999999GiB", "12GiB extra"}) {
    auto s = ParseByteSize(bad);
    ASSERT_FALSE(s.ok()) << bad;
    EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(s.status().message().find(std::string("'") + bad + "'"), std::string::npos)
        << s.status();
  }
}

TEST(IdRangesTest, FormatsAndParses) {
  EXPECT_EQ(FormatIdRanges({5, 0, 1, 2, 3, 7, 2}), "0-3,5,7");
  EXPECT_EQ(FormatIdRanges({}), "");
  EXPECT_EQ(*ParseIdRanges("5,0-3,2", 8, "expert"), (std::vector<int>{0, 1, 2, 3, 5}));
  EXPECT_FALSE(ParseIdRanges("3-1", 8, "expert").ok());
  EXPECT_FALSE(ParseIdRanges("0-8", 8, "expert").ok());
  EXPECT_FALSE(ParseIdRanges("x", 8, "expert").ok());
  EXPECT_FALSE(ParseIdRanges("1,,2", 8, "expert").ok());
}

TEST(PlacementFileTest, RoundTripsAndGroupsLayers) {
  std::vector<std::pair<int, int>> pairs;
  for (int l = 0; l < 32; ++l) {
    for (int e = 0; e < 8; ++e) {
      if (e < 3 || (e == 3 && l < 13) || (e == 6 && l % 7 == 0)) pairs.push_back({l, e});
    }
  }
  const std::string text = FormatPlacementFile(pairs, "header line\nsecond line");
  EXPECT_NE(text.find("# header line\n# second line\n"), std::string::npos);
  EXPECT_NE(text.find("layers 1-6: experts 0-3\n"), std::string::npos) << text;
  EXPECT_NE(text.find("layers 15-20: experts 0-2\n"), std::string::npos) << text;
  EXPECT_NE(text.find("layer 13: experts 0-2\n"), std::string::npos) << text;
  auto parsed = ParsePlacementFile(text, 32, 8);
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(*parsed, pairs);
}

TEST(PlacementFileTest, RejectsBadLinesNamingThem) {
  auto s = ParsePlacementFile("# ok\nlayers 0-3: experts 0-1\nlayers 4: experts 9\n", 32, 8);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.status().message().find("line 3"), std::string::npos) << s.status();
  EXPECT_FALSE(ParsePlacementFile("0-3 0-1\n", 32, 8).ok());
  EXPECT_FALSE(ParsePlacementFile("layers 0-3 experts 0-1\n", 32, 8).ok());
  EXPECT_FALSE(ParsePlacementFile("layers 0-40: experts 0-1\n", 32, 8).ok());
}

TEST(PlannerSizesTest, MixtralMixesAndMemoryFormulas) {
  const ModelSizes q3 = Mixtral("Q3_K_M"), q4 = Mixtral("Q4_K_M"), q5 = Mixtral("Q5_K_M");
  // Weights of llama.cpp-style mixes of the 46.7B-parameter model (see docs/planner.md).
  EXPECT_NEAR(static_cast<double>(q3.WeightBytes()), 22.55e9, 0.05e9);
  EXPECT_NEAR(static_cast<double>(q4.WeightBytes()), 28.45e9, 0.05e9);
  EXPECT_NEAR(static_cast<double>(q5.WeightBytes()), 33.23e9, 0.05e9);
  EXPECT_EQ(q5.pair_bytes.size(), 256u);
  // Gate and up are Q5_K in every pair; down is Q6_K on the "more bits" layers (0, 31) and
  // Q5_K on layer 5: exactly the type difference in bytes.
  const uint64_t gate_up = 2 * 14336 * RowBytes(TensorType::kQ5_K, 4096);
  EXPECT_EQ(q5.PairBytes(0, 3), gate_up + 4096 * RowBytes(TensorType::kQ6_K, 14336));
  EXPECT_EQ(q5.PairBytes(5, 3), gate_up + 4096 * RowBytes(TensorType::kQ5_K, 14336));
  EXPECT_EQ(q5.PairBytes(31, 7), q5.PairBytes(0, 0));
  // KV cache: 2 (K, V) * 32 layers * 4096 positions * 1024 (8 heads x 128) * 2 bytes.
  EXPECT_EQ(KvCacheBytes(q5, 4096), 512 * kMiB);
  EXPECT_EQ(KvCacheBytes(q5, 32768), 4 * kGiB);
  EXPECT_EQ(CoordinatorComputeBytes(q5, 512),
            kProcessOverheadBytes +
                512ull * (4 * (7 * 4096 + 2 * 1024 + 8 + 4 + 32000 + 4 * 4096) + 2 * 4096));
  EXPECT_EQ(WorkerBufferBytes(q5, 512),
            kProcessOverheadBytes + 512ull * (4 * (2 * 4096 + 3 * 14336) + 2 * (4096 + 14336)));
  EXPECT_FALSE(SizesFromShape(*SynthShapeByName("tiny"), "Q9_K").ok());
}

TEST(PlannerSizesTest, FileSizesEqualShapeSizesInBothLayouts) {
  const ModelSizes from_shape = *SizesFromShape(*SynthShapeByName("tiny"), "Q4_K_M");
  for (bool per_expert : {false, true}) {
    const std::string& path = TinyModelPath("Q4_K_M", 7, per_expert);
    ASSERT_FALSE(path.empty());
    auto from_file = SizesFromFile(path);
    ASSERT_TRUE(from_file.ok()) << from_file.status();
    EXPECT_EQ(from_file->pair_bytes, from_shape.pair_bytes) << per_expert;
    EXPECT_EQ(from_file->non_expert_bytes, from_shape.non_expert_bytes) << per_expert;
    EXPECT_EQ(from_file->model_path, path);
    EXPECT_EQ(from_file->n_vocab, kSynthVocabSize);
    EXPECT_EQ(from_file->kv_dim(), from_shape.kv_dim());
  }
  EXPECT_FALSE(SizesFromFile("/nonexistent/model.gguf").ok());
}

TEST(PlannerTest, TinyModelFileSplitsEvenlyOverTwoWorkers) {
  auto sizes = SizesFromFile(TinyModelPath("Q4_K_M"));
  ASSERT_TRUE(sizes.ok()) << sizes.status();
  PlanRequest r = Request(*sizes, {kGiB, kGiB});
  r.coordinator_machine = kGiB;
  const Plan plan = MustPlan(r);
  ExpectConsistent(r, plan);
  EXPECT_EQ(plan.layout, PlanLayout::kExpertRanges);
  ASSERT_EQ(plan.machines.size(), 3u);
  EXPECT_TRUE(plan.machines[0].coordinator);
  EXPECT_FALSE(plan.machines[0].worker);
  EXPECT_EQ(plan.machines[1].experts_text, "experts 0-3 on all 4 layers");
  EXPECT_EQ(plan.machines[2].experts_text, "experts 4-7 on all 4 layers");
  EXPECT_EQ(plan.machines[2].worker_command,
            "moepool worker --model " + sizes->model_path +
                " --experts 4-7 --listen 0.0.0.0:7071 --cluster-token-file cluster.token");
  EXPECT_EQ(plan.serve_command,
            "moepool serve --model " + sizes->model_path +
                " --ctx 4096 --workers machine-1:7070,machine-2:7071 --cluster-token-file "
                "cluster.token");
}

TEST(PlannerTest, Q3KMFitsOnTwo12GiBMachinesWithTheCoordinatorOnTheFirst) {
  const PlanRequest r = Request(Mixtral("Q3_K_M"), {12 * kGiB, 12 * kGiB});
  const Plan plan = MustPlan(r);
  ExpectConsistent(r, plan);
  ASSERT_EQ(plan.machines.size(), 2u);
  EXPECT_TRUE(plan.machines[0].coordinator && plan.machines[0].worker);
  EXPECT_TRUE(plan.machines[1].worker);
}

TEST(PlannerTest, Q5KMFitsOnThree12GiBMachinesAsExpertRanges) {
  const PlanRequest r = Request(Mixtral("Q5_K_M"), {12 * kGiB, 12 * kGiB, 12 * kGiB});
  const Plan plan = MustPlan(r);
  ExpectConsistent(r, plan);
  EXPECT_EQ(plan.layout, PlanLayout::kExpertRanges);
  // The coordinator's machine takes fewer experts.
  EXPECT_LT(plan.machines[0].expert_bytes, plan.machines[1].expert_bytes);
  for (const MachinePlan& m : plan.machines) {
    EXPECT_TRUE(m.placement_file_name.empty());
    EXPECT_NE(m.worker_command.find("--experts "), std::string::npos);
    EXPECT_EQ(m.worker_command.find("--layers"), std::string::npos);
  }
}

TEST(PlannerTest, Q5KMDoesNotFitOnTwo12GiBMachines) {
  const PlanRequest r = Request(Mixtral("Q5_K_M"), {12 * kGiB, 12 * kGiB});
  const Plan plan = MustPlan(r);
  EXPECT_FALSE(plan.fits);
  // Needs coordinator + experts + 2 buffers; has 2 x 11.5 GiB.
  const uint64_t need = plan.coordinator.total() + r.sizes.ExpertBytes() + 2 * plan.worker_buffer;
  EXPECT_EQ(plan.shortfall, need - 23 * kGiB);
  EXPECT_NE(plan.problem.find("short by " + FormatBytes(plan.shortfall)), std::string::npos)
      << plan.problem;
  ASSERT_FALSE(plan.suggestions.empty());
  EXPECT_EQ(plan.suggestions[0], "needs 1 more 12.00 GiB machine (3 in all)");
  const std::string text = FormatPlan(r, plan);
  EXPECT_NE(text.find("DOES NOT FIT"), std::string::npos);
  EXPECT_NE(text.find("needs 1 more 12.00 GiB machine"), std::string::npos);
  // Every smaller mix it suggests does fit.
  for (const std::string& s : plan.suggestions) {
    if (s.rfind("use ", 0) != 0) continue;
    const std::string type = s.substr(4, s.find(' ', 4) - 4);
    PlanRequest smaller = r;
    smaller.sizes = Mixtral(type);
    EXPECT_TRUE(MustPlan(smaller).fits) << type;
  }
}

TEST(PlannerTest, SuggestsAShorterContextThatFits) {
  PlanRequest r = Request(Mixtral("Q4_K_M"), {10 * kGiB, 10 * kGiB, 10 * kGiB});
  r.ctx = 32768;
  const Plan plan = MustPlan(r);
  ASSERT_FALSE(plan.fits);
  std::string ctx_hint;
  for (const std::string& s : plan.suggestions) {
    if (s.rfind("fits with --ctx ", 0) == 0) ctx_hint = s;
  }
  ASSERT_FALSE(ctx_hint.empty()) << FormatPlan(r, plan);
  r.ctx = std::stoll(ctx_hint.substr(16));
  EXPECT_LT(r.ctx, 32768);
  ExpectConsistent(r, MustPlan(r));
  r.ctx *= 2;  // the largest power-of-two fraction that fits
  EXPECT_FALSE(MustPlan(r).fits);
}

TEST(PlannerTest, FallsBackToPerLayerPlacementFiles) {
  // Room for 3.6, 3.6 and 1.1 experts: whole ranges cover only 3 + 3 + 1 experts, per-layer
  // splits cover all 8.
  const ModelSizes s = Mixtral("Q4_K_M");
  const uint64_t expert = s.ExpertBytes() / 8;
  PlanRequest r = Request(s, {0, 0});
  const uint64_t overhead = WorkerBufferBytes(s, kPlanBatch) + r.reserve;
  r.machines = {expert * 36 / 10 + overhead, expert * 36 / 10 + overhead,
                expert * 11 / 10 + overhead};
  r.coordinator_machine = 4 * kGiB;
  const Plan plan = MustPlan(r);
  ExpectConsistent(r, plan);
  EXPECT_EQ(plan.layout, PlanLayout::kPerLayer);
  int with_files = 0;
  for (const MachinePlan& m : plan.machines) with_files += m.placement_file_name.empty() ? 0 : 1;
  EXPECT_GE(with_files, 1);
  const std::string text = FormatPlan(r, plan);
  EXPECT_NE(text.find("placement file machine-1.placement:"), std::string::npos) << text;
}

TEST(PlannerTest, ReplicasUseSpareRoomForWholeExperts) {
  auto sizes = SizesFromShape(*SynthShapeByName("tiny"), "Q8_0");
  ASSERT_TRUE(sizes.ok());
  PlanRequest r = Request(*sizes, {kGiB, kGiB});
  r.coordinator_machine = kGiB;
  const Plan single = MustPlan(r);
  ExpectConsistent(r, single);
  r.replicas = true;
  const Plan replicated = MustPlan(r);
  ExpectConsistent(r, replicated);
  // Plenty of room: both workers end up holding every expert on every layer.
  for (size_t i = 1; i < replicated.machines.size(); ++i) {
    const MachinePlan& m = replicated.machines[i];
    EXPECT_EQ(m.pairs.size(), sizes->pair_bytes.size()) << m.name;
    EXPECT_EQ(m.replica_experts.size(), 4u) << m.name;
    EXPECT_EQ(m.worker_command.find("--experts 0-7 "), m.worker_command.find("--experts "));
  }
}

TEST(PlannerTest, ReplicasStayWithinEachMachine) {
  // Q4_K_M on 2 x 24 GiB + a coordinator: 4 experts each, room for 3 more on each.
  PlanRequest r = Request(Mixtral("Q4_K_M"), {24 * kGiB, 24 * kGiB});
  r.coordinator_machine = 8 * kGiB;
  r.replicas = true;
  const Plan plan = MustPlan(r);
  ExpectConsistent(r, plan);
  std::map<int, int> expert_holders;
  for (const MachinePlan& m : plan.machines) {
    std::set<int> experts;
    for (const auto& [l, e] : m.pairs) experts.insert(e);
    for (int e : experts) ++expert_holders[e];
    if (m.worker) {
      EXPECT_EQ(m.replica_experts.size(), 3u) << m.name;
    }
  }
  int doubled = 0;
  for (const auto& [e, n] : expert_holders) doubled += n == 2 ? 1 : 0;
  EXPECT_EQ(doubled, 6);
}

TEST(PlannerTest, CoordinatorThatDoesNotFitIsNamed) {
  PlanRequest r = Request(Mixtral("Q4_K_M"), {kGiB, 40 * kGiB});
  const Plan plan = MustPlan(r);
  EXPECT_FALSE(plan.fits);
  EXPECT_NE(plan.problem.find("the coordinator needs"), std::string::npos) << plan.problem;
  bool separate = false;
  for (const std::string& s : plan.suggestions) {
    separate |= s.find("separate coordinator machine") != std::string::npos;
  }
  EXPECT_TRUE(separate) << FormatPlan(r, plan);
}

TEST(PlannerTest, ManySizesKeepTheInvariants) {
  const ModelSizes s = Mixtral("Q4_K_M");
  for (uint64_t gib : {8, 10, 12, 16, 24, 48}) {
    for (size_t n : {1, 2, 3, 4, 6}) {
      PlanRequest r = Request(s, std::vector<uint64_t>(n, gib * kGiB));
      r.machines.back() = gib * kGiB / 2;  // uneven machines
      r.suggest = false;
      const Plan plan = MustPlan(r);
      if (plan.fits) ExpectConsistent(r, plan);
      const uint64_t have = [&] {
        uint64_t h = 0;
        for (uint64_t m : r.machines) h += m - r.reserve;
        return h;
      }();
      if (have < s.ExpertBytes() + plan.coordinator.total()) {
        EXPECT_FALSE(plan.fits) << gib << " GiB x " << n;
      }
    }
  }
}

TEST(PlannerTest, RejectsMalformedRequests) {
  const ModelSizes s = Mixtral("Q4_K_M");
  EXPECT_EQ(MakePlan(Request(s, {})).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_FALSE(MakePlan(Request(s, {0})).ok());
  PlanRequest r = Request(s, {kGiB});
  r.ctx = 0;
  EXPECT_FALSE(MakePlan(r).ok());
  r = Request(ModelSizes{}, {kGiB});
  EXPECT_FALSE(MakePlan(r).ok());
  for (double bad : {0.0, -1.0, std::nan(""), 1e300}) {
    r = Request(s, {16 * kGiB, 16 * kGiB});
    r.machine_speeds = {1.0, bad};
    EXPECT_EQ(MakePlan(r).status().code(), absl::StatusCode::kInvalidArgument) << bad;
  }
  r = Request(s, {16 * kGiB});
  r.machine_speeds = {1.0, 1.0};  // more speeds than machines
  EXPECT_EQ(MakePlan(r).status().code(), absl::StatusCode::kInvalidArgument);
}

// A machine half as fast gets about half the expert work of the others (the slowest worker sets
// every layer's pace), memory permitting; equal speeds plan exactly as no speeds.
TEST(PlannerTest, ASlowMachineGetsLessOfTheExpertWork) {
  const ModelSizes s = Mixtral("Q4_K_M");
  PlanRequest r = Request(s, {16 * kGiB, 16 * kGiB, 16 * kGiB});
  const Plan by_memory = MustPlan(r);
  r.machine_speeds = {2.0, 2.0, 2.0};
  const Plan same = MustPlan(r);
  for (size_t m = 0; m < 3; ++m) EXPECT_EQ(same.machines[m].pairs, by_memory.machines[m].pairs);
  EXPECT_FALSE(same.pace_memory_split.has_value());

  r.machine_speeds = {1.0, 0.5, 1.0};
  const Plan paced = MustPlan(r);
  ExpectConsistent(r, paced);
  // 8 experts at speeds 1 : 0.5 : 1 -> 3, 2, 3 (by memory, the coordinator's machine held fewer).
  EXPECT_EQ(paced.machines[0].pairs.size(), 3u * 32);
  EXPECT_EQ(paced.machines[1].pairs.size(), 2u * 32);
  EXPECT_EQ(paced.machines[2].pairs.size(), 3u * 32);
  EXPECT_LT(by_memory.machines[1].pairs.size(), 3u * 32 + 1);
  EXPECT_NEAR(paced.machines[1].work_share, 0.25, 1e-9);
  EXPECT_NEAR(paced.pace, 0.5, 1e-9);  // 2 of 8 experts at speed 0.5, as 4 of 8 at speed 1
  ASSERT_TRUE(paced.pace_memory_split.has_value());
  EXPECT_GT(*paced.pace_memory_split, paced.pace);
  EXPECT_NE(FormatPlan(r, paced).find("speed 0.5: 25% of the expert work"), std::string::npos);

  // Memory is still a hard limit: a fast machine too small for its share of the work.
  r = Request(s, {16 * kGiB, 16 * kGiB, 8 * kGiB});
  r.machine_speeds = {1.0, 1.0, 4.0};
  const Plan small_fast = MustPlan(r);
  ExpectConsistent(r, small_fast);
  EXPECT_LE(small_fast.machines[2].used(), small_fast.machines[2].available());
  EXPECT_EQ(small_fast.machines[2].pairs.size(), 2u * 32);  // 6.36 GiB: all that fits
}

}  // namespace
}  // namespace moepool
