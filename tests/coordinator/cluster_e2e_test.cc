// End to end with real `moepool worker` processes on 127.0.0.1: `moepool eval --workers` gives
// logits bit-identical to a local `moepool eval`, and a worker killed mid-run is reported,
// survived and reconnected after it restarts; with a replica of its experts, a worker killed
// while a sequence decodes fails no step (its rows are re-sent to the replica).
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "coordinator/cluster_expert_backend.h"
#include "engine/engine.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/coordinator/cluster_process_util.h"
#include "tests/testdata.h"

namespace moepool {
namespace {

using ::moepool::testing::ReadFileOrDie;
using ::moepool::testing::SharedTestdataPath;
using ::moepool::testing::TempDir;
using ::testing::HasSubstr;

constexpr char kToken[] = "e2e-token";

// A `moepool worker` child process with this test's cluster token.
class WorkerProcess {
 public:
  bool Start(const std::string& model, const std::string& experts, int port = 0) {
    return process_.Start(model, experts, port, {"--cluster-token", kToken});
  }
  void Kill() { process_.Kill(); }
  int port() const { return process_.port(); }
  std::string address() const { return process_.address(); }

 private:
  ::moepool::testing::WorkerProcess process_;
};

int RunCommand(const std::string& args, std::string* err) {
  static int n = 0;
  const std::string base = absl::StrCat(TempDir(), "/e2e", ++n);
  const std::string cmd = absl::StrCat("MOEPOOL_CLUSTER_TOKEN=", kToken, " ", MOEPOOL_BINARY, " ",
                                       args, " >", base, ".out 2>", base, ".err");
  const int rc = std::system(cmd.c_str());
  *err = ReadFileOrDie(base + ".err");
  return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

class ClusterEndToEndTest : public ::testing::TestWithParam<const char*> {};

TEST_P(ClusterEndToEndTest, EvalLogitsBitIdenticalToLocal) {
  const std::string model = SharedTestdataPath(absl::StrCat("conformance/", GetParam()));
  const std::string prompt = SharedTestdataPath("conformance/p1.txt");
  REQUIRE_TESTDATA(model);
  REQUIRE_TESTDATA(prompt);
  WorkerProcess a, b;
  ASSERT_TRUE(a.Start(model, "0-3"));
  ASSERT_TRUE(b.Start(model, "4-7"));
  const std::string local = TempDir() + "/e2e-local.f32";
  const std::string cluster = TempDir() + "/e2e-cluster.f32";
  std::string err;
  ASSERT_EQ(RunCommand(absl::StrCat("eval --threads 2 --model ", model, " --prompt-file ", prompt,
                                    " --logits-out ", local),
                       &err),
            0)
      << err;
  ASSERT_EQ(RunCommand(absl::StrCat("eval --threads 2 --model ", model, " --prompt-file ", prompt,
                                    " --logits-out ", cluster, " --workers ", a.address(), ",",
                                    b.address()),
                       &err),
            0)
      << err;
  const std::string want = ReadFileOrDie(local), got = ReadFileOrDie(cluster);
  ASSERT_FALSE(want.empty());
  EXPECT_EQ(want.size(), got.size());
  EXPECT_TRUE(want == got) << "cluster logits differ from local logits";
}

TEST(ClusterEndToEndHalfTest, HalfPrecisionWireCloseToLocal) {
  const std::string model = SharedTestdataPath("conformance/tiny-F16.gguf");
  const std::string prompt = SharedTestdataPath("conformance/p2.txt");
  REQUIRE_TESTDATA(model);
  REQUIRE_TESTDATA(prompt);
  WorkerProcess a;
  ASSERT_TRUE(a.Start(model, "0-7"));
  const std::string local = TempDir() + "/e2e-half-local.f32";
  const std::string cluster = TempDir() + "/e2e-half-cluster.f32";
  std::string err;
  ASSERT_EQ(RunCommand(absl::StrCat("eval --threads 2 --model ", model, " --prompt-file ", prompt,
                                    " --logits-out ", local),
                       &err),
            0)
      << err;
  ASSERT_EQ(RunCommand(absl::StrCat("eval --threads 2 --model ", model, " --prompt-file ", prompt,
                                    " --logits-out ", cluster, " --wire-dtype f16 --workers ",
                                    a.address()),
                       &err),
            0)
      << err;
  const std::string want = ReadFileOrDie(local), got = ReadFileOrDie(cluster);
  ASSERT_EQ(want.size(), got.size());
  ASSERT_FALSE(want.empty());
  const size_t n = want.size() / 4;
  std::vector<float> w(n), g(n);
  std::memcpy(w.data(), want.data(), n * 4);
  std::memcpy(g.data(), got.data(), n * 4);
  double err2 = 0, ref2 = 0;
  for (size_t i = 0; i < n; ++i) {
    err2 += (g[i] - w[i]) * (g[i] - w[i]);
    ref2 += w[i] * w[i];
  }
  // f16 rows and partial sums: far inside the F16 conformance bar (median NMSE 1e-4).
  EXPECT_LT(err2 / ref2, 1e-4);
}

INSTANTIATE_TEST_SUITE_P(Conformance, ClusterEndToEndTest,
                         ::testing::Values("tiny-F16.gguf", "tiny-Q4_K_M.gguf"));

TEST(ClusterEndToEndKillTest, KilledWorkerIsReportedAndReconnected) {
  const std::string model = SharedTestdataPath("conformance/tiny-Q4_K_M.gguf");
  REQUIRE_TESTDATA(model);
  WorkerProcess a, b;
  ASSERT_TRUE(a.Start(model, "0-3"));
  ASSERT_TRUE(b.Start(model, "4-7"));
  ClusterOptions o;
  o.workers = {a.address(), b.address()};
  o.cluster_token = kToken;
  o.reconnect_initial_s = 0.05;
  o.reconnect_max_s = 0.5;
  auto backend = ClusterExpertBackend::Create(model, o);
  ASSERT_TRUE(backend.ok()) << backend.status();
  EngineOptions eo;
  eo.model_path = model;
  eo.threads = 2;
  eo.n_ctx = 128;
  eo.experts = backend->get();
  auto engine = Engine::Load(eo);
  ASSERT_TRUE(engine.ok()) << engine.status();
  const std::vector<int32_t> prompt = (*engine)->Tokenize("The capital of France is Paris, and");
  KvCache cache((*engine)->config(), (*engine)->n_ctx());
  auto first = (*engine)->EvalPrompt(prompt, &cache, true);
  ASSERT_TRUE(first.ok()) << first.status();

  b.Kill();
  auto failed = (*engine)->EvalPrompt(prompt, &cache, true);
  ASSERT_FALSE(failed.ok());
  EXPECT_EQ(failed.status().code(), absl::StatusCode::kUnavailable) << failed.status();
  EXPECT_THAT(std::string(failed.status().message()), HasSubstr(b.address()));

  const int port = b.port();
  ASSERT_TRUE(b.Start(model, "4-7", port));
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (!(*backend)->Stats().workers[1].up && std::chrono::steady_clock::now() < give_up) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  ASSERT_TRUE((*backend)->Stats().workers[1].up) << (*backend)->Stats().workers[1].last_error;
  auto again = (*engine)->EvalPrompt(prompt, &cache, true);
  ASSERT_TRUE(again.ok()) << again.status();
  ASSERT_EQ(again->size(), first->size());
  EXPECT_EQ(std::memcmp(again->data(), first->data(), first->size() * 4), 0);
}

// Prompt then `n_decode` decode steps of `tokens` (prompt first), the logits of every row; calls
// on_step(i) before decode step i.
absl::StatusOr<std::vector<float>> PromptThenDecode(Engine& e, const std::vector<int32_t>& tokens,
                                                    size_t n_prompt,
                                                    const std::function<void(size_t)>& on_step) {
  KvCache cache(e.config(), e.n_ctx());
  std::vector<BatchRow> rows;
  for (size_t i = 0; i < n_prompt; ++i) {
    rows.push_back({tokens[i], static_cast<int64_t>(i), &cache, true});
  }
  std::vector<float> logits;
  absl::Status s = e.transformer().Forward(rows, &logits);
  for (size_t i = n_prompt; s.ok() && i < tokens.size(); ++i) {
    on_step(i - n_prompt);
    const BatchRow row{tokens[i], static_cast<int64_t>(i), &cache, true};
    s = e.transformer().Forward({&row, 1}, &logits);
  }
  if (!s.ok()) return s;
  return logits;
}

// Workers 0-3, 4-7 and 0-7 (a replica of both): the first is killed by another thread while the
// coordinator decodes. No step fails, the logits are the local ones bit for bit, and the
// backend reports the in-step retry.
TEST(ClusterEndToEndKillTest, KilledWorkerWithReplicaFailsNoStep) {
  const std::string model = SharedTestdataPath("conformance/tiny-Q4_K_M.gguf");
  REQUIRE_TESTDATA(model);
  WorkerProcess a, b, c;
  ASSERT_TRUE(a.Start(model, "0-3"));
  ASSERT_TRUE(b.Start(model, "4-7"));
  ASSERT_TRUE(c.Start(model, "0-7"));
  ClusterOptions o;
  o.workers = {a.address(), b.address(), c.address()};
  o.cluster_token = kToken;
  o.reconnect_initial_s = 0.05;
  o.reconnect_max_s = 0.5;
  auto backend = ClusterExpertBackend::Create(model, o);
  ASSERT_TRUE(backend.ok()) << backend.status();
  EngineOptions eo;
  eo.model_path = model;
  eo.threads = 2;
  eo.n_ctx = 128;
  auto local = Engine::Load(eo);
  ASSERT_TRUE(local.ok()) << local.status();
  eo.experts = backend->get();
  auto cluster = Engine::Load(eo);
  ASSERT_TRUE(cluster.ok()) << cluster.status();

  std::vector<int32_t> tokens = (*local)->Tokenize("The capital of France is Paris, and");
  const size_t n_prompt = tokens.size();
  for (int i = 0; i < 60; ++i) tokens.push_back(static_cast<int32_t>(100 + 37 * i));
  auto want = PromptThenDecode(**local, tokens, n_prompt, [](size_t) {});
  ASSERT_TRUE(want.ok()) << want.status();

  std::atomic<size_t> step{0};
  std::thread killer([&] {
    while (step.load() < 10) std::this_thread::yield();
    a.Kill();  // while the coordinator keeps decoding
  });
  auto got = PromptThenDecode(**cluster, tokens, n_prompt, [&](size_t i) { step.store(i); });
  killer.join();
  ASSERT_TRUE(got.ok()) << got.status();
  ASSERT_EQ(got->size(), want->size());
  EXPECT_EQ(std::memcmp(got->data(), want->data(), want->size() * 4), 0);
  const ClusterStats st = (*backend)->Stats();
  EXPECT_EQ(st.failed_steps, 0u);
  EXPECT_GE(st.retried_steps, 1u);
  EXPECT_FALSE(st.workers[0].up);
}

}  // namespace
}  // namespace moepool
