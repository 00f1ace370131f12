// `moepool serve --workers ...` against in-process fake workers: the same completions as a local
// server, /health reports the workers, and a lost worker fails requests (not the server) until
// it is back.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "httplib.h"
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

// A `moepool serve` child; the port comes from its "serving on http://HOST:PORT" line.
class ServeProcess {
 public:
  ~ServeProcess() { Stop(); }

  bool Start(const std::vector<std::string>& flags) {
    static int n = 0;
    log_ = absl::StrCat(TempDir(), "/serve", ++n, ".log");
    std::vector<std::string> args = {"serve",      "--listen", "127.0.0.1:0", "--threads", "1",
                                     "--parallel", "1"};
    args.insert(args.end(), flags.begin(), flags.end());
    std::string line;
    pid_ = ::moepool::testing::SpawnMoepool(args, log_, &line);
    const size_t colon = line.rfind(':');
    if (pid_ <= 0 || line.find("serving on") == std::string::npos || colon == std::string::npos) {
      ADD_FAILURE() << "serve did not start: " << line << ReadFileOrDie(log_);
      return false;
    }
    port_ = std::atoi(line.c_str() + colon + 1);
    return port_ > 0;
  }

  void Stop() {
    if (pid_ <= 0) return;
    kill(pid_, SIGTERM);
    waitpid(pid_, nullptr, 0);
    pid_ = -1;
  }

  bool alive() const { return pid_ > 0 && waitpid(pid_, nullptr, WNOHANG) == 0; }
  httplib::Client Client() const {
    httplib::Client c("127.0.0.1", port_);
    c.set_read_timeout(120, 0);
    return c;
  }

 private:
  pid_t pid_ = -1;
  int port_ = 0;
  std::string log_;
};

// POST /v1/completions, greedy; returns (HTTP status, body).
std::pair<int, nlohmann::json> Complete(const ServeProcess& s, const std::string& prompt) {
  const nlohmann::json req = {{"prompt", prompt}, {"max_tokens", 8}, {"temperature", 0}};
  auto r = s.Client().Post("/v1/completions", req.dump(), "application/json");
  if (!r) return {0, nullptr};
  return {r->status, nlohmann::json::parse(r->body, nullptr, false)};
}

std::pair<int, nlohmann::json> Health(const ServeProcess& s) {
  auto r = s.Client().Get("/health");
  if (!r) return {0, nullptr};
  return {r->status, nlohmann::json::parse(r->body, nullptr, false)};
}

TEST(ClusterServeTest, CompletionsMatchLocalAndWorkerLossIsSurvived) {
  const std::string& model = SmallModel("Q8_0");
  FakeWorkerOptions o;
  o.model_path = model;
  o.pairs = PairsForExperts(2, 0, 3);
  auto a = FakeWorker::Start(o);
  o.pairs = PairsForExperts(2, 4, 7);
  auto b = FakeWorker::Start(o);
  ASSERT_TRUE(a.ok() && b.ok());
  const int port_b = (*b)->port();

  ServeProcess local, cluster;
  ASSERT_TRUE(local.Start({"--model", model}));
  ASSERT_TRUE(cluster.Start({"--model", model, "--workers", (*a)->address() + "," + (*b)->address(),
                             "--step-timeout", "5"}));
  const std::string prompt = "In a hole in the ground there lived";
  const auto want = Complete(local, prompt);
  const auto got = Complete(cluster, prompt);
  ASSERT_EQ(want.first, 200) << want.second;
  ASSERT_EQ(got.first, 200) << got.second;
  EXPECT_EQ(want.second["choices"][0]["text"], got.second["choices"][0]["text"]);
  EXPECT_EQ(got.second["usage"]["completion_tokens"], 8) << got.second;
  auto health = Health(cluster);
  EXPECT_EQ(health.first, 200) << health.second;
  ASSERT_EQ(health.second["workers"].size(), 2u) << health.second;
  EXPECT_EQ(health.second["workers"][1]["up"], true);

  (*b)->Kill();
  const auto failed = Complete(cluster, prompt);
  EXPECT_NE(failed.first, 200) << failed.second;
  EXPECT_THAT(failed.second.dump(), HasSubstr((*b)->address()));
  health = Health(cluster);
  EXPECT_EQ(health.first, 503) << health.second;
  EXPECT_THAT(health.second.dump(), HasSubstr("layers 0-1: experts 4-7"));
  EXPECT_TRUE(cluster.alive());

  o.port = port_b;
  auto back = FakeWorker::Start(o);
  ASSERT_TRUE(back.ok()) << back.status();
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (Health(cluster).first != 200 && std::chrono::steady_clock::now() < give_up) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  const auto again = Complete(cluster, prompt);
  ASSERT_EQ(again.first, 200) << again.second;
  EXPECT_EQ(want.second["choices"][0]["text"], again.second["choices"][0]["text"]);
}

}  // namespace
}  // namespace moepool
