// `moepool worker` end to end: it reads its weights into memory, prints its ready line, answers
// Describe with the token, and exits cleanly on SIGTERM; bad flags fail with a message.
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <regex>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "moepool/v1/expert_service.grpc.pb.h"
#include "tests/engine/tiny_model_util.h"
#include "tests/testdata.h"

extern char** environ;

namespace moepool {
namespace {

using ::moepool::testing::ReadFileOrDie;
using ::moepool::testing::TempDir;
using ::moepool::testing::TinyModelPath;

// Starts `moepool ARGS` with stdout and stderr in files; returns the pid (or -1).
pid_t Spawn(const std::vector<std::string>& args, const std::string& out, const std::string& err) {
  std::vector<char*> argv;
  std::string binary = MOEPOOL_BINARY;
  argv.push_back(binary.data());
  std::vector<std::string> copies = args;
  for (std::string& a : copies) argv.push_back(a.data());
  argv.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 1, out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_addopen(&actions, 2, err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  pid_t pid = -1;
  const int rc = posix_spawn(&pid, binary.c_str(), &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  return rc == 0 ? pid : -1;
}

// Waits for the child to exit; returns its exit code (-1 if killed by a signal).
int WaitExit(pid_t pid) {
  int status = 0;
  if (waitpid(pid, &status, 0) != pid) return -2;
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

TEST(WorkerCommandTest, ServesUntilSigtermAndAnswersDescribeWithTheToken) {
  const std::string& model = TinyModelPath("Q4_K_M");
  ASSERT_FALSE(model.empty());
  const std::string placement = TempDir() + "/cli-worker.placement";
  std::ofstream(placement) << "# two layers\n1: 0-1\n2: 7\n";
  const std::string out = TempDir() + "/worker.stdout", err = TempDir() + "/worker.stderr";
  const pid_t pid =
      Spawn({"worker", "--model", model, "--placement", placement, "--listen", "127.0.0.1:0",
             "--threads", "1", "--name", "cli-test", "--cluster-token", "tok"},
            out, err);
  ASSERT_GT(pid, 0);
  // The ready line, once the server listens (the wait ends early if the process exits).
  const std::regex ready(
      R"(moepool worker: serving 3 experts \(([0-9.]+) MiB\) of (.+) on 127\.0\.0\.1:([0-9]+)\n)");
  std::smatch m;
  std::string text;
  for (int i = 0; i < 600 && !std::regex_search(text, m, ready); ++i) {
    if (waitpid(pid, nullptr, WNOHANG) == pid) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    text = ReadFileOrDie(out);
  }
  if (!std::regex_search(text, m, ready)) {
    kill(pid, SIGKILL);
    WaitExit(pid);
    FAIL() << "no ready line; stdout: " << text << "\nstderr: " << ReadFileOrDie(err);
  }
  EXPECT_EQ(m[2].str(), model);
  const int port = std::stoi(m[3].str());
  // --preload on (the default): the weights were read before the ready line.
  const std::string log = ReadFileOrDie(err);
  EXPECT_NE(log.find("moepool worker: reading 0.0 GiB of weights into memory"), std::string::npos)
      << log;
  EXPECT_NE(log.find("moepool worker: weights in memory after"), std::string::npos) << log;

  auto stub = moepool::v1::ExpertService::NewStub(
      grpc::CreateChannel(absl::StrCat("127.0.0.1:", port), grpc::InsecureChannelCredentials()));
  grpc::ClientContext context;
  context.AddMetadata("authorization", "Bearer tok");
  moepool::v1::DescribeResponse d;
  const grpc::Status s = stub->Describe(&context, moepool::v1::DescribeRequest(), &d);
  EXPECT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(d.worker_id(), "cli-test");
  EXPECT_EQ(d.threads(), 1);
  EXPECT_EQ(std::vector<uint32_t>(d.experts().packed().begin(), d.experts().packed().end()),
            (std::vector<uint32_t>{65536, 65537, 2 * 65536 + 7}));

  ASSERT_EQ(kill(pid, SIGTERM), 0);
  EXPECT_EQ(WaitExit(pid), 0) << ReadFileOrDie(err);
  EXPECT_NE(ReadFileOrDie(err).find("terminated, shutting down"), std::string::npos);
}

TEST(WorkerCommandTest, BadFlagsFailWithAMessage) {
  const std::string& model = TinyModelPath("Q4_K_M");
  ASSERT_FALSE(model.empty());
  struct Case {
    std::vector<std::string> args;
    const char* message;
  };
  const std::string token_file = TempDir() + "/cluster.token";
  const std::string empty_file = TempDir() + "/empty.token";
  {
    std::ofstream(token_file) << "s3cret\n";
    std::ofstream(empty_file) << "\n";
  }
  const std::vector<Case> cases = {
      {{"worker", "--experts", "0", "--listen", "127.0.0.1:0"}, "--model is required"},
      {{"worker", "--model", model, "--listen", "127.0.0.1:0"}, "give either --experts"},
      {{"worker", "--model", model, "--experts", "0-8", "--listen", "127.0.0.1:0"},
       "--experts: 8 is out of range"},
      {{"worker", "--model", model, "--experts", "0", "--layers", "9", "--listen", "127.0.0.1:0"},
       "--layers: 9 is out of range"},
      {{"worker", "--model", model, "--experts", "0"}, "--listen HOST:PORT is required"},
      {{"worker", "--model", model, "--experts", "0", "--listen", "127.0.0.1:0", "--tls-cert",
        model + ".absent"},
       ".absent"},
      {{"worker", "--model", model, "--experts", "0", "--listen", "127.0.0.1:0", "--bogus", "1"},
       "unknown flag --bogus"},
      {{"worker", "--model", model, "--experts", "0", "--listen", "127.0.0.1:0", "--preload",
        "maybe"},
       "--preload must be on or off"},
      // Off loopback a cluster token is required, or --insecure (the later --preload error
      // shows the address was accepted).
      {{"worker", "--model", model, "--experts", "0", "--listen", "0.0.0.0:0"},
       "--listen 0.0.0.0:0 is not on loopback: give a cluster token"},
      {{"worker", "--model", model, "--experts", "0", "--listen", "[::]:0"},
       "--listen [::]:0 is not on loopback"},
      {{"worker", "--model", model, "--experts", "0", "--listen", "0.0.0.0:0", "--insecure",
        "--preload", "maybe"},
       "--preload must be on or off"},
      {{"worker", "--model", model, "--experts", "0", "--listen", "0.0.0.0:0", "--cluster-token",
        "t0k", "--preload", "maybe"},
       "--preload must be on or off"},
      {{"worker", "--model", model, "--experts", "0", "--listen", "[::1]:0", "--preload", "maybe"},
       "--preload must be on or off"},
      {{"worker", "--model", model, "--experts", "0", "--listen", "0.0.0.0:0",
        "--cluster-token-file", token_file, "--preload", "maybe"},
       "--preload must be on or off"},
      {{"worker", "--model", model, "--experts", "0", "--listen", "0.0.0.0:0",
        "--cluster-token-file", empty_file},
       "is empty"},
      {{"worker", "--model", model, "--experts", "0", "--listen", "0.0.0.0:0",
        "--cluster-token-file", token_file + ".absent"},
       ".absent: cannot read"},
      {{"worker", "--model", model, "--experts", "0", "--listen", "127.0.0.1:0", "--cluster-token",
        "a", "--cluster-token-file", token_file},
       "not both"},
      {{"worker", "--model", model, "--experts", "0", "--listen", "localhost:0", "--preload",
        "maybe"},
       "--preload must be on or off"},
      // --join: no model file or expert list, a fixed port, a token off loopback.
      {{"worker", "--join", "127.0.0.1:1", "--model", model, "--listen", "127.0.0.1:7070"},
       "--model does not go with --join"},
      {{"worker", "--join", "127.0.0.1:1", "--experts", "0", "--listen", "127.0.0.1:7070"},
       "--experts does not go with --join"},
      {{"worker", "--join", "127.0.0.1:1", "--listen", "127.0.0.1:0"}, "needs a fixed port"},
      {{"worker", "--join", "127.0.0.1:1"}, "--listen HOST:PORT is required"},
      {{"worker", "--join", "192.0.2.1:7100", "--listen", "127.0.0.1:7070"},
       "--join 192.0.2.1:7100 is not on loopback"},
      {{"worker", "--join", "127.0.0.1:1", "--listen", "127.0.0.1:7070", "--memory", "lots"},
       "lots"},
      {{"worker", "--model", model, "--experts", "0", "--listen", "127.0.0.1:0", "--cache-dir",
        "c"},
       "--cache-dir needs --join"},
  };
  unsetenv("MOEPOOL_CLUSTER_TOKEN");
  for (const Case& c : cases) {
    const std::string out = TempDir() + "/bad.stdout", err = TempDir() + "/bad.stderr";
    const pid_t pid = Spawn(c.args, out, err);
    ASSERT_GT(pid, 0);
    EXPECT_EQ(WaitExit(pid), 1) << c.message;
    EXPECT_TRUE(ReadFileOrDie(out).empty());
    EXPECT_NE(ReadFileOrDie(err).find(c.message), std::string::npos)
        << "want '" << c.message << "' in: " << ReadFileOrDie(err);
  }
}

}  // namespace
}  // namespace moepool
