// `moepool plan --machine cuda:SIZE`: a GPU machine is planned with its card's memory and its
// worker command puts the experts on the card; `--machine cuda` reads this machine's card (and
// fails plainly where there is none).
#include <string>

#include "engine/cuda/cuda_backend.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testdata.h"

namespace moepool {
namespace {

using Result = ::moepool::testing::CommandResult;

Result Plan(const std::string& args) { return ::moepool::testing::RunMoepool("plan " + args); }

constexpr char kQ4[] = "--shape mixtral-8x7b --type Q4_K_M --ctx 4096 ";

TEST(PlanGpuCliTest, CudaMachinesGetDeviceWorkersSizedByTheCard) {
  const Result r =
      Plan(std::string(kQ4) + "--coordinator 16GiB --machine cuda:24GiB --machine 16GiB --json");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto j = nlohmann::json::parse(r.out);
  ASSERT_TRUE(j.at("fits").get<bool>());
  const auto& machines = j.at("machines");
  ASSERT_EQ(machines.size(), 3u);
  EXPECT_EQ(machines[0].at("device"), "cpu");  // the separate coordinator
  EXPECT_EQ(machines[1].at("device"), "cuda:0");
  EXPECT_EQ(machines[1].at("size_bytes"), 24ull << 30);
  EXPECT_NE(machines[1].at("command").get<std::string>().find(" --device cuda:0 "),
            std::string::npos);
  EXPECT_EQ(machines[2].at("device"), "cpu");
  EXPECT_EQ(machines[2].at("command").get<std::string>().find("--device"), std::string::npos);
}

TEST(PlanGpuCliTest, TooSmallCardsDoNotFit) {
  const Result r = Plan(std::string(kQ4) + "--machine cuda:8GiB --machine cuda:8GiB");
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_NE(r.out.find("DOES NOT FIT"), std::string::npos) << r.out;
}

TEST(PlanGpuCliTest, BadCudaSizeIsRefused) {
  const Result r = Plan(std::string(kQ4) + "--machine cuda:lots");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("lots"), std::string::npos) << r.err;
}

TEST(PlanGpuCliTest, ThisMachinesCardOrAPlainError) {
  const Result r = Plan(std::string(kQ4) + "--machine cuda --json");
  auto devices = ListCudaDevices();
  if (devices.ok() && !devices->empty()) {
    ASSERT_NE(r.exit_code, 2) << r.err;
    const auto j = nlohmann::json::parse(r.out);
    EXPECT_EQ(j.at("machines")[0].at("size_bytes"), devices->front().total_bytes);
    return;
  }
  EXPECT_EQ(r.exit_code, 2);
  const std::string why = devices.ok() ? "no CUDA device" : std::string(devices.status().message());
  EXPECT_NE(r.err.find(why), std::string::npos) << r.err;
}

}  // namespace
}  // namespace moepool
