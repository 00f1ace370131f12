// `moepool plan` end to end: exit codes (0 fits, 1 does not, 2 bad arguments), the JSON object,
// the text output and a model file given with --model.
#include <sys/wait.h>

#include <cstdlib>
#include <set>
#include <string>
#include <utility>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/engine/tiny_model_util.h"
#include "tests/testdata.h"

namespace moepool {
namespace {

using ::moepool::testing::ReadFileOrDie;
using ::moepool::testing::TempDir;
using ::moepool::testing::TinyModelPath;

using Result = ::moepool::testing::CommandResult;

Result Plan(const std::string& args) { return ::moepool::testing::RunMoepool("plan " + args); }

constexpr char kQ5[] = "--shape mixtral-8x7b --type Q5_K_M --ctx 4096 ";

TEST(PlanCliTest, ThreeMachinesFitQ5KMAsJson) {
  const Result r =
      Plan(std::string(kQ5) + "--machine 12GiB --machine 12GiB --machine 12GiB --json");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto j = nlohmann::json::parse(r.out);
  EXPECT_TRUE(j.at("fits").get<bool>());
  EXPECT_EQ(j.at("layout"), "expert-ranges");
  EXPECT_EQ(j.at("model").at("type"), "Q5_K_M");
  EXPECT_EQ(j.at("coordinator").at("kv_cache_bytes"), 512ull << 20);
  EXPECT_EQ(j.at("coordinator").at("machine"), "machine-1");
  const auto& machines = j.at("machines");
  ASSERT_EQ(machines.size(), 3u);
  EXPECT_EQ(machines[0].at("role"), "coordinator+worker");
  std::set<std::pair<int, int>> pairs;
  for (const auto& m : machines) {
    EXPECT_LE(m.at("used_bytes").get<uint64_t>(), m.at("available_bytes").get<uint64_t>());
    EXPECT_EQ(m.at("available_bytes").get<uint64_t>(), (12ull << 30) - (512ull << 20));
    for (const auto& p : m.at("pairs")) {
      EXPECT_TRUE(pairs.insert({p[0].get<int>(), p[1].get<int>()}).second);
    }
    EXPECT_NE(m.at("command").get<std::string>().find(
                  "moepool worker --model mixtral-8x7b-Q5_K_M.gguf --experts "),
              std::string::npos);
  }
  EXPECT_EQ(pairs.size(), 256u);
  EXPECT_EQ(j.at("serve_command"),
            "moepool serve --model mixtral-8x7b-Q5_K_M.gguf --ctx 4096 --workers "
            "machine-1:7070,machine-2:7071,machine-3:7072 --cluster-token-file cluster.token");
}

TEST(PlanCliTest, TwoMachinesDoNotFitQ5KM) {
  Result r = Plan(std::string(kQ5) + "--machine 12GiB --machine 12GiB --json");
  EXPECT_EQ(r.exit_code, 1) << r.err;
  const auto j = nlohmann::json::parse(r.out);
  EXPECT_FALSE(j.at("fits").get<bool>());
  EXPECT_GT(j.at("shortfall_bytes").get<uint64_t>(), 8ull << 30);
  EXPECT_EQ(j.at("suggestions")[0], "needs 1 more 12.00 GiB machine (3 in all)");
  r = Plan(std::string(kQ5) + "--machine 12GiB --machine=12GiB");
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_NE(r.out.find("DOES NOT FIT"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("short by"), std::string::npos) << r.out;
}

TEST(PlanCliTest, Q3KMTextPlanNamesHostsAndPrintsCommands) {
  const Result r = Plan(
      "--shape mixtral-8x7b --type Q3_K_M --machine 12GiB --machine 12GiB --host gpu-a "
      "--host gpu-b");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("FITS"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("gpu-a (coordinator + worker)"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("moepool worker --model mixtral-8x7b-Q3_K_M.gguf"), std::string::npos);
  EXPECT_NE(r.out.find("--workers gpu-a:7070,gpu-b:7071"), std::string::npos) << r.out;
}

TEST(PlanCliTest, ModelFileWithSeparateCoordinatorAndReplicas) {
  const std::string& path = TinyModelPath("Q4_K_M", 7, /*per_expert=*/true);
  ASSERT_FALSE(path.empty());
  const Result r = Plan("--model '" + path +
                        "' --machine 1GiB --machine 1GB --coordinator 2GiB --reserve 0.25GiB "
                        "--replicas --json");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j.at("model").at("path"), path);
  EXPECT_EQ(j.at("reserve_bytes"), 256ull << 20);
  const auto& machines = j.at("machines");
  ASSERT_EQ(machines.size(), 3u);
  EXPECT_EQ(machines[0].at("role"), "coordinator");
  EXPECT_EQ(machines[0].at("size_bytes"), 2ull << 30);
  EXPECT_TRUE(machines[0].at("pairs").empty());
  EXPECT_EQ(machines[2].at("size_bytes"), 1000000000ull);
  // With room to spare both workers hold everything.
  EXPECT_EQ(machines[1].at("pairs").size(), 32u);
  EXPECT_EQ(machines[2].at("pairs").size(), 32u);
}

// --machine SIZE:speed=X: the slower machine gets less of the expert work.
TEST(PlanCliTest, MachineSpeedsShareTheWorkByPace) {
  const Result r = Plan(
      "--shape mixtral-8x7b --type Q4_K_M --machine 16GiB --machine 16GiB:speed=0.5 "
      "--machine 16GiB --json");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto j = nlohmann::json::parse(r.out);
  const auto& machines = j.at("machines");
  EXPECT_EQ(machines[1].at("speed"), 0.5);
  EXPECT_EQ(machines[1].at("pairs").size(), 64u);  // 2 of 8 experts on all 32 layers
  EXPECT_EQ(machines[0].at("pairs").size(), 96u);
  EXPECT_DOUBLE_EQ(j.at("pace").get<double>(), 0.5);
  EXPECT_GT(j.at("pace_memory_split").get<double>(), 0.5);
}

TEST(PlanCliTest, BadArgumentsExitWithTwo) {
  const struct {
    const char* args;
    const char* message;
  } cases[] = {
      {"--shape mixtral-8x7b --machine 12G", "bad size '12G'"},
      {"--shape mixtral-8x7b", "--machine"},
      {"--shape nope --machine 12GiB", "unknown model shape"},
      {"--shape mixtral-8x7b --type Q9 --machine 12GiB", "unknown model type"},
      {"--machine 12GiB", "give --model or --shape"},
      {"--model /nonexistent.gguf --machine 12GiB", "/nonexistent.gguf"},
      {"--shape tiny --machine 1GiB --ctx 0", "--ctx"},
      {"--shape tiny --machine 1GiB --bogus", "unknown flag --bogus"},
      {"--shape tiny --machine 1GiB --host a --host b", "more --host names"},
      {"--shape tiny --machine 1GiB:speed=0", "speed must be a positive number"},
      {"--shape tiny --machine 1GiB:speed=fast", "speed must be a positive number"},
      {"--shape tiny --machine 1GiB:speed=", "speed must be a positive number"},
      {"--shape tiny --machine cuda:1GiB:speed=-2", "speed must be a positive number"},
  };
  for (const auto& c : cases) {
    const Result r = Plan(c.args);
    EXPECT_EQ(r.exit_code, 2) << c.args;
    EXPECT_TRUE(r.out.empty()) << c.args << ": " << r.out;
    EXPECT_NE(r.err.find("moepool: "), std::string::npos) << r.err;
    EXPECT_NE(r.err.find(c.message), std::string::npos) << c.args << ": " << r.err;
  }
}

}  // namespace
}  // namespace moepool
