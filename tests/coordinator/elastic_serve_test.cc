// An elastic cluster of real processes on loopback: `moepool serve --cluster-listen` alone,
// then `moepool worker --join` workers with empty caches and no model file. Completions (f32
// wire, greedy) equal the coordinator alone before, during and after the joins; a worker
// restarted with its cache fetches nothing and leaves the file as it was; drains (HTTP and
// SIGTERM) end the workers cleanly; a wrong token or a worker of another cluster is refused.
// The chaos test: 16 concurrent streaming clients while workers join, drain, are killed and
// come back; no request fails and every completion equals the coordinator alone.
#include <sys/stat.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "httplib.h"
#include "nlohmann/json.hpp"
#include "tests/coordinator/cluster_process_util.h"
#include "tests/coordinator/fake_worker_util.h"
#include "tests/testdata.h"

namespace moepool {
namespace {

using ::moepool::testing::ElasticServeProcess;
using ::moepool::testing::GetJson;
using ::moepool::testing::JoinedWorkerProcess;
using ::moepool::testing::SmallModel;
using ::testing::HasSubstr;

// The text of a greedy completion of `prompt`, streamed (SSE) or not; "" on any failure, with
// the reason in `*error`.
std::string Complete(const httplib::Client& c0, const std::string& prompt, bool stream,
                     std::string* error) {
  httplib::Client& c = const_cast<httplib::Client&>(c0);
  const nlohmann::json req = {
      {"prompt", prompt}, {"max_tokens", 10}, {"temperature", 0}, {"stream", stream}};
  auto r = c.Post("/v1/completions", req.dump(), "application/json");
  if (!r || r->status != 200) {
    *error = r ? absl::StrCat(r->status, " ", r->body)
               : absl::StrCat("no answer: ", httplib::to_string(r.error()));
    return "";
  }
  if (!stream) return nlohmann::json::parse(r->body)["choices"][0]["text"];
  std::string text;
  bool done = false;
  size_t at = 0;
  while ((at = r->body.find("data: ", at)) != std::string::npos) {
    const size_t end = r->body.find("\n", at);
    const std::string data = r->body.substr(at + 6, end - at - 6);
    at = end;
    if (data == "[DONE]") {
      done = true;
      break;
    }
    const nlohmann::json event = nlohmann::json::parse(data, nullptr, false);
    if (event.is_discarded() || event.contains("error")) {
      *error = data;
      return "";
    }
    if (!event["choices"].empty()) text += event["choices"][0]["text"].get<std::string>();
  }
  if (!done) *error = "stream without [DONE]: " + r->body;
  return done ? text : "";
}

std::string Cache(const std::string& name) {
  const std::string dir =
      absl::StrCat(::moepool::testing::TempDir(), "/elastic-cache-", getpid(), "-", name);
  std::filesystem::remove_all(dir);
  return dir;
}

nlohmann::json View(ElasticServeProcess& s) { return GetJson(s.as_serve(), "/v1/cluster").second; }

std::string StateOf(ElasticServeProcess& s, const std::string& id) {
  const nlohmann::json view = View(s);
  for (const auto& w : view["workers"]) {
    if (w["id"] == id) return w["state"];
  }
  return "absent";
}

uint64_t ShardBytes(const std::string& dir) {
  uint64_t n = 0;
  for (const auto& f : std::filesystem::directory_iterator(dir)) {
    if (f.path().extension() == ".gguf") n += f.file_size();
  }
  return n;
}

const std::vector<std::string> kPrompts = {"In a hole in the ground there lived",
                                           "The quick brown fox", "Once upon a time",
                                           "It was a bright cold day in April"};

TEST(ElasticServeTest, WorkersJoinFetchServeRestartAndDrainWithTheSameCompletions) {
  const std::string& model = SmallModel("Q8_0");
  ElasticServeProcess s;
  ASSERT_TRUE(s.Start(model));
  httplib::Client c = s.Client();
  std::string error;
  std::vector<std::string> want;
  for (const auto& p : kPrompts) {
    want.push_back(Complete(c, p, false, &error));
    ASSERT_FALSE(want.back().empty()) << error;
  }
  const auto same = [&] {
    for (size_t i = 0; i < kPrompts.size(); ++i) {
      EXPECT_EQ(Complete(c, kPrompts[i], i % 2 == 1, &error), want[i]) << error;
    }
  };

  JoinedWorkerProcess a, b;
  const std::string cache_a = Cache("a"), cache_b = Cache("b");
  ASSERT_TRUE(a.Start(s.control_address(), cache_a));
  same();
  ASSERT_TRUE(b.Start(s.control_address(), cache_b));
  same();
  nlohmann::json view = View(s);
  ASSERT_EQ(view["workers"].size(), 2u) << view;
  for (const auto& w : view["workers"]) {
    EXPECT_EQ(w["state"], "ready") << view;
    EXPECT_EQ(w["experts"].size(), 8u) << view;  // 2 layers x 8 experts, halved
  }
  EXPECT_EQ(view["fallback_expert_pairs"], 0) << view;
  EXPECT_GT(view["workers"][1]["bytes_fetched"].get<uint64_t>(), 0u);
  // b's cache holds its half of the expert bytes (a's still holds what it handed over).
  EXPECT_NEAR(static_cast<double>(ShardBytes(cache_b)), ShardBytes(cache_a) / 2.0,
              ShardBytes(cache_a) * 0.05);

  // Killed and restarted with its cache: nothing fetched, the file untouched.
  const std::string b_file = std::filesystem::directory_iterator(cache_b)->path();
  struct stat before {};
  ASSERT_EQ(stat(b_file.c_str(), &before), 0);
  b.Kill();
  same();  // its experts fall back to the coordinator meanwhile
  ASSERT_TRUE(b.Start(s.control_address(), cache_b));
  EXPECT_THAT(::moepool::testing::ReadFileOrDie(b.log_path()), HasSubstr("fetched 0.0 MiB"));
  struct stat after {};
  ASSERT_EQ(stat(b_file.c_str(), &after), 0);
  EXPECT_EQ(before.st_ino, after.st_ino);
  EXPECT_EQ(before.st_mtim.tv_sec, after.st_mtim.tv_sec);
  EXPECT_EQ(before.st_mtim.tv_nsec, after.st_mtim.tv_nsec);
  same();

  // Drained over HTTP: the worker exits by itself.
  auto drained = c.Post("/v1/cluster/workers/w1/drain", "", "application/json");
  ASSERT_TRUE(drained);
  EXPECT_EQ(drained->status, 200) << drained->body;
  EXPECT_EQ(b.Wait(20), 0) << ::moepool::testing::ReadFileOrDie(b.log_path());
  EXPECT_EQ(StateOf(s, "w1"), "gone");
  same();
  // SIGTERM: it leaves (drained at a step boundary) and exits 0.
  a.Terminate();
  EXPECT_EQ(a.Wait(20), 0) << ::moepool::testing::ReadFileOrDie(a.log_path());
  EXPECT_THAT(::moepool::testing::ReadFileOrDie(a.log_path()), HasSubstr("drained; exiting"));
  EXPECT_EQ(StateOf(s, "w0"), "gone");
  same();
  auto unknown = c.Post("/v1/cluster/workers/w7/drain", "", "application/json");
  ASSERT_TRUE(unknown);
  EXPECT_EQ(unknown->status, 404);
  const std::string log = ::moepool::testing::ReadFileOrDie(s.log_path());
  EXPECT_THAT(log, HasSubstr("worker w1 (" + b.address() + ") fetching -> ready"));
  EXPECT_THAT(log, HasSubstr("ready -> draining"));
}

TEST(ElasticServeTest, AWrongTokenIsRefusedAndTheWorkerSaysSo) {
  const std::string& model = SmallModel("Q8_0");
  ElasticServeProcess s;
  ASSERT_TRUE(s.Start(model, {"--cluster-token", "right"}));
  JoinedWorkerProcess w;
  ASSERT_TRUE(w.Spawn(s.control_address(), Cache("token"), {"--cluster-token", "wrong"}));
  EXPECT_NE(w.Wait(30), 0);
  EXPECT_THAT(::moepool::testing::ReadFileOrDie(w.log_path()), HasSubstr("wrong cluster token"));
  JoinedWorkerProcess none;
  ASSERT_TRUE(none.Spawn(s.control_address(), Cache("token2")));
  EXPECT_NE(none.Wait(30), 0);
  EXPECT_THAT(::moepool::testing::ReadFileOrDie(none.log_path()),
              HasSubstr("requires the cluster token"));
  EXPECT_TRUE(View(s)["workers"].empty());
}

TEST(ElasticServeTest, OffLoopbackTheControlPortGetsAGeneratedTokenFile) {
  const std::string home = Cache("home");
  std::filesystem::create_directories(home);
  const std::string log = home + "/serve.log";
  setenv("HOME", home.c_str(), 1);
  const pid_t pid = ::moepool::testing::SpawnMoepoolLogged(
      {"serve", "--model", SmallModel("Q8_0"), "--listen", "127.0.0.1:0", "--cluster-listen",
       "0.0.0.0:0", "--threads", "1"},
      log);
  std::string line;
  ASSERT_TRUE(::moepool::testing::WaitForLog(log, "--join ", 60, &line))
      << ::moepool::testing::ReadFileOrDie(log);
  const std::string token_file = home + "/.config/moepool/cluster.token";
  EXPECT_THAT(line, HasSubstr("--cluster-token-file " + token_file));
  struct stat st {};
  ASSERT_EQ(stat(token_file.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  EXPECT_GE(st.st_size, 40);  // 32 random bytes, base64
  kill(pid, SIGTERM);
  waitpid(pid, nullptr, 0);
  // Where the token cannot be stored: a clear error, no crash.
  const auto unwritable = ::moepool::testing::RunMoepool(
      absl::StrCat("serve --model ", SmallModel("Q8_0"),
                   " --listen 127.0.0.1:0 --cluster-listen 0.0.0.0:0 --threads 1"),
      "HOME=/proc/nonexistent ");
  EXPECT_EQ(unwritable.exit_code, 1) << unwritable.err;
  EXPECT_THAT(unwritable.err, HasSubstr("cannot write the cluster token"));
}

TEST(ElasticServeTest, TheControlPortSpeaksTlsToWorkersThatTrustItsCa) {
  if (std::system("openssl version >/dev/null 2>&1") != 0) GTEST_SKIP() << "no openssl tool";
  const std::string& certs = ::moepool::testing::TestCertDir();
  ASSERT_FALSE(certs.empty());
  ElasticServeProcess s;
  ASSERT_TRUE(s.Start(SmallModel("Q8_0"), {"--cluster-tls-cert", certs + "/server.pem",
                                           "--cluster-tls-key", certs + "/server.key"}));
  EXPECT_THAT(::moepool::testing::ReadFileOrDie(s.log_path()), HasSubstr("(TLS)"));
  JoinedWorkerProcess trusting;
  ASSERT_TRUE(
      trusting.Start(s.control_address(), Cache("tls"), {"--join-tls-ca", certs + "/ca.pem"}));
  // Without the CA the worker speaks plain gRPC to a TLS port: it never joins.
  JoinedWorkerProcess plain;
  ASSERT_TRUE(plain.Spawn(s.control_address(), Cache("plain")));
  EXPECT_FALSE(::moepool::testing::WaitForLog(plain.log_path(), "ready as", 3));
  const nlohmann::json view = View(s);
  ASSERT_EQ(view["workers"].size(), 1u) << view;
  EXPECT_EQ(view["workers"][0]["state"], "ready");
}

// 16 concurrent streaming clients while workers join, drain, are killed and come back.
std::vector<std::vector<int>> ExpertsOf(const nlohmann::json& view) {
  std::vector<std::vector<int>> out;
  for (const auto& w : view["workers"]) {
    for (const auto& p : w["experts"]) out.push_back({p[0].get<int>(), p[1].get<int>()});
    out.push_back({-1, -1});  // between workers
  }
  return out;
}

// POST /v1/cluster/rebalance on a model whose router prefers pairs the balanced split separates:
// the dry run predicts fewer round trips and changes nothing; the real one moves experts while
// clients stream, and every completion stays the same. Bad bodies are clear errors.
TEST(ElasticServeTest, RebalanceOverHttpMovesExpertsWhileServingWithTheSameCompletions) {
  const std::string& model = SmallModel("Q8_0", 2, 1, 1.0f);
  ElasticServeProcess s;
  ASSERT_TRUE(s.Start(model, {"--parallel", "4", "--rebalance", "off", "--rebalance-min-gain", "0",
                              "--rebalance-min-rows", "1"}));
  httplib::Client c = s.Client();
  std::vector<std::string> want;
  std::string error;
  for (const auto& p : kPrompts) want.push_back(Complete(c, p, false, &error));
  for (const char* body : {"nope", R"({"dry_run": 3})", "[]"}) {
    auto bad = c.Post("/v1/cluster/rebalance", body, "application/json");
    ASSERT_TRUE(bad);
    EXPECT_EQ(bad->status, 400) << body << ": " << bad->body;
  }
  JoinedWorkerProcess a, b;
  ASSERT_TRUE(a.Start(s.control_address(), Cache("rebalance-a")));
  ASSERT_TRUE(b.Start(s.control_address(), Cache("rebalance-b")));
  for (int round = 0; round < 2; ++round) {  // routing statistics
    for (size_t i = 0; i < kPrompts.size(); ++i) {
      EXPECT_EQ(Complete(c, kPrompts[i], false, &error), want[i]) << error;
    }
  }
  const auto before = ExpertsOf(View(s));
  auto dry = c.Post("/v1/cluster/rebalance", R"({"dry_run": true})", "application/json");
  ASSERT_TRUE(dry);
  ASSERT_EQ(dry->status, 200) << dry->body;
  const nlohmann::json plan = nlohmann::json::parse(dry->body);
  EXPECT_TRUE(plan["changes"].get<bool>()) << plan.dump();
  EXPECT_FALSE(plan["applied"].get<bool>());
  EXPECT_EQ(plan["micros_per_row"].size(), 2u) << plan.dump();  // both workers measured
  EXPECT_LT(plan["after"]["round_trips_per_token"].get<double>(),
            plan["before"]["round_trips_per_token"].get<double>())
      << plan.dump();
  EXPECT_EQ(ExpertsOf(View(s)), before);

  std::atomic<bool> stop{false};
  std::atomic<int> failed{0}, different{0};
  std::vector<std::thread> clients;
  for (int t = 0; t < 4; ++t) {
    clients.emplace_back([&, t] {
      httplib::Client client = s.Client();
      for (size_t i = static_cast<size_t>(t); !stop.load(); ++i) {
        std::string e;
        const std::string got = Complete(client, kPrompts[i % kPrompts.size()], true, &e);
        failed += e.empty() ? 0 : 1;
        different += e.empty() && got != want[i % kPrompts.size()] ? 1 : 0;
      }
    });
  }
  auto applied = c.Post("/v1/cluster/rebalance", "{}", "application/json");
  ASSERT_TRUE(applied);
  ASSERT_EQ(applied->status, 200) << applied->body;
  EXPECT_TRUE(nlohmann::json::parse(applied->body)["applied"].get<bool>());
  nlohmann::json view;
  for (int i = 0; i < 300; ++i) {  // up to 30 s
    view = View(s);
    if (!view["placement_changing"].get<bool>()) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(500));  // streams over the new placement
  stop = true;
  for (auto& t : clients) t.join();
  EXPECT_FALSE(view["placement_changing"].get<bool>()) << view.dump();
  EXPECT_NE(ExpertsOf(view), before) << view.dump();
  EXPECT_EQ(view["fallback_expert_pairs"], 0) << view.dump();
  EXPECT_EQ(view["rebalance"]["applied"], 1);
  EXPECT_EQ(failed.load(), 0);
  EXPECT_EQ(different.load(), 0);
  for (size_t i = 0; i < kPrompts.size(); ++i) {
    EXPECT_EQ(Complete(c, kPrompts[i], false, &error), want[i]) << error;
  }
  EXPECT_THAT(::moepool::testing::ReadFileOrDie(a.log_path()) +
                  ::moepool::testing::ReadFileOrDie(b.log_path()),
              HasSubstr("placement change"));
}

// 16 streaming clients while workers join, are killed mid-stream, drained by signal and over
// HTTP and come back; `flags` are added to serve's; `pause_ms` is the time between two events
// worker's first join. Returns the final /v1/cluster.
nlohmann::json RunChaos(const std::string& model, const std::vector<std::string>& flags,
                        int pause_ms) {
  ElasticServeProcess s;
  std::vector<std::string> all = {"--parallel", "16", "--step-timeout", "5"};
  all.insert(all.end(), flags.begin(), flags.end());
  EXPECT_TRUE(s.Start(model, all));
  std::vector<std::string> want;
  std::string error;
  {
    httplib::Client c = s.Client();
    for (const auto& p : kPrompts) want.push_back(Complete(c, p, false, &error));
  }
  std::atomic<bool> stop{false};
  std::atomic<int> served{0}, failed{0}, different{0};
  std::vector<std::string> errors(16);
  std::vector<std::thread> clients;
  for (int t = 0; t < 16; ++t) {
    clients.emplace_back([&, t] {
      httplib::Client c = s.Client();
      for (size_t i = static_cast<size_t>(t); !stop.load(); ++i) {
        std::string e;
        const std::string got = Complete(c, kPrompts[i % kPrompts.size()], true, &e);
        if (!e.empty()) {
          ++failed;
          errors[static_cast<size_t>(t)] = e;
        } else if (got != want[i % kPrompts.size()]) {
          ++different;
        }
        ++served;
      }
    });
  }
  const auto pause = [pause_ms] {
    std::this_thread::sleep_for(std::chrono::milliseconds(pause_ms));
  };
  JoinedWorkerProcess a, b;
  const std::string cache_a = Cache("chaos-a"), cache_b = Cache("chaos-b");
  EXPECT_TRUE(a.Start(s.control_address(), cache_a));
  pause();
  EXPECT_TRUE(b.Start(s.control_address(), cache_b));
  pause();
  b.Kill();  // mid-stream
  pause();
  EXPECT_TRUE(b.Start(s.control_address(), cache_b));
  EXPECT_THAT(::moepool::testing::ReadFileOrDie(b.log_path()), HasSubstr("fetched 0.0 MiB"));
  pause();
  a.Terminate();  // drain by signal
  EXPECT_EQ(a.Wait(20), 0);
  pause();
  EXPECT_TRUE(a.Start(s.control_address(), cache_a));
  pause();
  {
    httplib::Client c = s.Client();
    auto r = c.Post("/v1/cluster/workers/w1/drain", "", "application/json");
    EXPECT_TRUE(r);
    if (r) {
      EXPECT_EQ(r->status, 200) << r->body;
    }
  }
  EXPECT_EQ(b.Wait(20), 0);
  pause();
  a.Kill();
  pause();
  stop = true;
  for (auto& t : clients) t.join();
  EXPECT_EQ(failed.load(), 0) << [&] {
    std::string all;
    for (const auto& e : errors) all += e + "\n";
    const std::string log = ::moepool::testing::ReadFileOrDie(s.log_path());
    return all + "serve log (end):\n" + log.substr(log.size() > 4000 ? log.size() - 4000 : 0);
  }();
  EXPECT_EQ(different.load(), 0);
  EXPECT_GT(served.load(), 16);
  const auto health = GetJson(s.as_serve(), "/health").second;
  EXPECT_EQ(health["kv_blocks_free"], health["kv_blocks_total"]) << health;
  EXPECT_EQ(health["active_sequences"], 0) << health;
  std::printf("chaos: %d requests served, %d failed\n", served.load(), failed.load());
  return View(s);
}

TEST(ElasticServeTest, ChaosSixteenStreamingClientsNoFailureSameCompletions) {
  RunChaos(SmallModel("Q8_0"), {}, 700);
}

// The same, slower, with the rebalancer planning every second (any gain, replicas on) on a
// model whose router prefers pairs the balanced split separates.
TEST(ElasticServeTest, ChaosWithTheRebalancerOnNoFailureSameCompletions) {
  const nlohmann::json view =
      RunChaos(SmallModel("Q8_0", 2, 1, 1.0f),
               {"--rebalance", "on", "--rebalance-interval", "1", "--rebalance-min-gain", "0",
                "--rebalance-min-rows", "1", "--rebalance-replicas", "on"},
               1500);
  EXPECT_GE(view["rebalance"]["applied"].get<int>(), 1) << view["rebalance"].dump();
  std::printf("chaos with the rebalancer: %d plans, %d changes applied\n",
              view["rebalance"]["plans"].get<int>(), view["rebalance"]["applied"].get<int>());
}

}  // namespace
}  // namespace moepool
