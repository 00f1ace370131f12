// `moepool eval | run | bench --workers ...` against in-process fake workers (real gRPC servers
// on 127.0.0.1): same outputs as the local commands.
#include <sys/wait.h>

#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/coordinator/fake_worker_util.h"
#include "tests/testdata.h"

namespace moepool {
namespace {

using ::moepool::testing::FakeWorker;
using ::moepool::testing::FakeWorkerOptions;
using ::moepool::testing::PairsForExperts;
using ::moepool::testing::ReadFileOrDie;
using ::moepool::testing::SmallModel;
using ::moepool::testing::TempDir;
using ::testing::HasSubstr;

using RunResult = ::moepool::testing::CommandResult;

// Runs `moepool <args>` with the given environment prefix (e.g. "VAR=x ").
RunResult Moepool(const std::string& args, const std::string& env = "") {
  return ::moepool::testing::RunMoepool(args, env);
}

class ClusterCliTest : public ::testing::Test {
 protected:
  void SetUp() override {
    model_ = SmallModel("Q8_0");
    FakeWorkerOptions o;
    o.model_path = model_;
    o.token = "tok3n";
    o.pairs = PairsForExperts(2, 0, 3);
    auto a = FakeWorker::Start(o);
    o.pairs = PairsForExperts(2, 4, 5);
    auto b = FakeWorker::Start(o);
    ASSERT_TRUE(a.ok() && b.ok());
    a_ = *std::move(a);
    b_ = *std::move(b);
    workers_ = a_->address() + "," + b_->address();
  }
  std::string model_;
  std::unique_ptr<FakeWorker> a_, b_;
  std::string workers_;
};

TEST_F(ClusterCliTest, EvalLogitsBitIdenticalToLocal) {
  const std::string prompt = "--prompt 'The quick brown fox jumps over the lazy dog'";
  const std::string local_out = TempDir() + "/local.f32";
  const std::string cluster_out = TempDir() + "/cluster.f32";
  RunResult local = Moepool(
      absl::StrCat("eval --threads 2 --model ", model_, " ", prompt, " --logits-out ", local_out));
  ASSERT_EQ(local.exit_code, 0) << local.err;
  RunResult cluster =
      Moepool(absl::StrCat("eval --threads 2 --model ", model_, " ", prompt, " --logits-out ",
                           cluster_out, " --workers ", workers_, " --local-experts 6-7"),
              "MOEPOOL_CLUSTER_TOKEN=tok3n ");
  ASSERT_EQ(cluster.exit_code, 0) << cluster.err;
  EXPECT_EQ(local.out, cluster.out);
  const std::string a = ReadFileOrDie(local_out), b = ReadFileOrDie(cluster_out);
  ASSERT_FALSE(a.empty());
  EXPECT_TRUE(a == b) << "logits differ";
}

TEST_F(ClusterCliTest, RunGreedyTokensMatchLocal) {
  const std::string common =
      absl::StrCat("run --threads 2 --model ", model_,
                   " --prompt 'Once upon a time' --n 12 --temperature 0 --ignore-eos --json");
  RunResult local = Moepool(common);
  ASSERT_EQ(local.exit_code, 0) << local.err;
  RunResult cluster = Moepool(
      absl::StrCat(common, " --workers ", workers_, " --local-experts 6,7 --cluster-token tok3n"));
  ASSERT_EQ(cluster.exit_code, 0) << cluster.err;
  EXPECT_EQ(local.out, cluster.out);
}

TEST_F(ClusterCliTest, MissingExpertsAndWrongTokenAreClearErrors) {
  // Experts 6-7 are held by no worker: computed here by default, an error without the fallback.
  const std::string eval =
      absl::StrCat("eval --model ", model_, " --prompt hi --logits-out ", TempDir(),
                   "/x.f32 --workers ", workers_, " --cluster-token tok3n");
  RunResult fallback = Moepool(eval);
  EXPECT_EQ(fallback.exit_code, 0) << fallback.err;
  RunResult missing = Moepool(eval + " --local-fallback off");
  EXPECT_EQ(missing.exit_code, 1);
  EXPECT_THAT(missing.err, HasSubstr("layers 0-1: experts 6-7"));
  RunResult bad = Moepool(eval + " --local-fallback maybe");
  EXPECT_EQ(bad.exit_code, 1);
  EXPECT_THAT(bad.err, HasSubstr("--local-fallback must be on or off, not 'maybe'"));
  RunResult wrong = Moepool(absl::StrCat("eval --model ", model_, " --prompt hi --logits-out ",
                                         TempDir(), "/x.f32 --workers ", workers_,
                                         " --local-experts 6-7 --cluster-token nope"));
  EXPECT_EQ(wrong.exit_code, 1);
  EXPECT_THAT(wrong.err, HasSubstr(a_->address() + " refused the cluster token"));
  RunResult stray = Moepool(absl::StrCat("eval --model ", model_, " --local-experts 1"));
  EXPECT_EQ(stray.exit_code, 1);
  EXPECT_THAT(stray.err, HasSubstr("--local-experts needs --workers"));
  // Workers off loopback need a token, or --insecure (then it is the connection that fails).
  const std::string remote = absl::StrCat("eval --model ", model_, " --prompt hi --logits-out ",
                                          TempDir(), "/x.f32 --workers 192.0.2.1:7070");
  RunResult no_token = Moepool(remote, "MOEPOOL_CLUSTER_TOKEN= ");
  EXPECT_EQ(no_token.exit_code, 1);
  EXPECT_THAT(no_token.err, HasSubstr("worker 192.0.2.1:7070 is not on loopback: give a cluster "
                                      "token"));
  RunResult insecure = Moepool(remote + " --insecure --connect-timeout 0.2");
  EXPECT_EQ(insecure.exit_code, 1);
  EXPECT_THAT(insecure.err, ::testing::Not(HasSubstr("not on loopback")));
  EXPECT_THAT(insecure.err, HasSubstr("192.0.2.1:7070"));
  const std::string token_file = TempDir() + "/cluster.token";
  std::ofstream(token_file) << "tok3n\n";
  RunResult with_file =
      Moepool(remote + " --cluster-token-file " + token_file + " --connect-timeout 0.2");
  EXPECT_EQ(with_file.exit_code, 1);
  EXPECT_THAT(with_file.err, ::testing::Not(HasSubstr("not on loopback")));
  RunResult stray_insecure = Moepool(absl::StrCat("eval --model ", model_, " --insecure"));
  EXPECT_EQ(stray_insecure.exit_code, 1);
  EXPECT_THAT(stray_insecure.err, HasSubstr("--insecure needs --workers"));
  RunResult stray_fallback = Moepool(absl::StrCat("eval --model ", model_, " --local-fallback on"));
  EXPECT_EQ(stray_fallback.exit_code, 1);
  EXPECT_THAT(stray_fallback.err, HasSubstr("--local-fallback needs --workers"));
}

TEST_F(ClusterCliTest, BenchReportsDispatchOverheadAndWireBytes) {
  RunResult r = Moepool(absl::StrCat(
      "bench --threads 2 --json --prompt-tokens 16 --decode-tokens 8 --pings 50 --model ", model_,
      " --workers ", workers_, " --local-experts 6-7 --cluster-token tok3n"));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const nlohmann::json j = nlohmann::json::parse(r.out);
  EXPECT_GT(j["decode_tokens_per_s"].get<double>(), 0);
  const nlohmann::json& c = j["cluster"];
  ASSERT_EQ(c["workers"].size(), 2u);
  EXPECT_GT(c["decode_dispatch_overhead_us"]["samples"].get<int>(), 0);
  EXPECT_GT(c["decode_round_trip_us"]["p50"].get<double>(), 0);
  EXPECT_EQ(c["tcp_ping_pong_us"]["samples"].get<int>(), 50);
  // Every request carries at least one f32 row of 64 values.
  EXPECT_GT(c["decode_request_bytes_per_token"].get<double>(), 64 * 4);
  EXPECT_EQ(c["wire_dtype"], "f32");
}

}  // namespace
}  // namespace moepool
