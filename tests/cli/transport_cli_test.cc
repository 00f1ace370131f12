// `--transport nccl` where NCCL cannot be used (this machine: no GPU; a CPU build: no CUDA):
// the worker and the coordinator each say so in one line and the cluster runs over gRPC with
// the same tokens as a local run. Bad values fail at startup.
#include <signal.h>
#include <sys/wait.h>

#include <regex>
#include <string>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "tests/engine/tiny_model_util.h"
#include "tests/testdata.h"

namespace moepool {
namespace {

using ::moepool::testing::ReadFileOrDie;
using ::moepool::testing::RunMoepool;
using ::moepool::testing::SpawnMoepool;
using ::moepool::testing::TempDir;
using ::moepool::testing::TinyModelPath;

// How often `needle` occurs in `text`.
int Count(const std::string& text, const std::string& needle) {
  int n = 0;
  for (size_t at = text.find(needle); at != std::string::npos; at = text.find(needle, at + 1)) ++n;
  return n;
}

TEST(TransportCliTest, NcclFallsBackToGrpcWithOneLineOnEachSide) {
  const std::string& model = TinyModelPath("Q4_K_M");
  ASSERT_FALSE(model.empty());
  const std::string log = TempDir() + "/nccl-worker.log";
  std::string ready;
  const pid_t worker = SpawnMoepool({"worker", "--model", model, "--experts", "0-7", "--listen",
                                     "127.0.0.1:0", "--threads", "1", "--transport", "nccl"},
                                    log, &ready);
  ASSERT_GT(worker, 0);
  std::smatch m;
  const std::regex port(R"(on 127\.0\.0\.1:([0-9]+))");
  const bool started = std::regex_search(ready, m, port);
  const std::string worker_log = ReadFileOrDie(log);
  if (!started) {
    kill(worker, SIGKILL);
    waitpid(worker, nullptr, 0);
    FAIL() << "worker did not start: " << ready << worker_log;
  }
  EXPECT_EQ(Count(worker_log, "--transport nccl: NCCL cannot be used here"), 1) << worker_log;
  EXPECT_NE(worker_log.find("rows travel over gRPC"), std::string::npos) << worker_log;

  const std::string run = absl::StrCat("run --threads 1 --model ", model,
                                       " --prompt 'Once upon a time' -n 8 --temperature 0 "
                                       "--ignore-eos --json");
  const auto local = RunMoepool(run);
  const auto cluster =
      RunMoepool(absl::StrCat(run, " --workers 127.0.0.1:", m[1].str(), " --transport nccl"));
  kill(worker, SIGTERM);
  int status = 0;
  waitpid(worker, &status, 0);
  ASSERT_EQ(local.exit_code, 0) << local.err;
  ASSERT_EQ(cluster.exit_code, 0) << cluster.err;
  EXPECT_EQ(local.out, cluster.out);
  EXPECT_EQ(Count(cluster.err, "--transport nccl:"), 1) << cluster.err;
  EXPECT_NE(cluster.err.find("rows travel over gRPC"), std::string::npos) << cluster.err;
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}

TEST(TransportCliTest, BadTransportValuesFailAtStartup) {
  const std::string& model = TinyModelPath("Q4_K_M");
  ASSERT_FALSE(model.empty());
  const auto worker = RunMoepool(
      absl::StrCat("worker --model ", model, " --experts 0 --listen 127.0.0.1:0 --transport udp"));
  EXPECT_EQ(worker.exit_code, 1);
  EXPECT_NE(worker.err.find("--transport: expected tcp, grpc or nccl, got 'udp'"),
            std::string::npos)
      << worker.err;
  const auto run = RunMoepool(
      absl::StrCat("run --model ", model, " --prompt hi -n 1 --workers 127.0.0.1:1 --transport x"));
  EXPECT_EQ(run.exit_code, 1);
  EXPECT_NE(run.err.find("got 'x'"), std::string::npos) << run.err;
  const auto alone =
      RunMoepool(absl::StrCat("run --model ", model, " --prompt hi -n 1 --transport nccl"));
  EXPECT_EQ(alone.exit_code, 1);
  EXPECT_NE(alone.err.find("--transport needs --workers"), std::string::npos) << alone.err;
}

}  // namespace
}  // namespace moepool
