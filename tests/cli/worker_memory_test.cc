// Memory of the cluster's processes, measured on a synthesized `mini`-shape model (Q8_0, so that
// it is quick to synthesize; the expert share of the bytes does not depend on the type): real
// `moepool worker` processes holding 4 of 8 experts and all 8 serve the same decode (two
// `moepool bench` runs with the same pseudo-random tokens), then each one's resident memory
// (VmRSS) is read.
//
//  - A worker holds its experts as soon as it is ready (--preload on, the default).
//  - RSS(4 of 8) <= 0.55 * RSS(8 of 8) + kWorkerFixedBytes, where kWorkerFixedBytes bounds a
//    worker's fixed overhead (binary, libraries, gRPC, buffers: measured ~27 MiB here); the test
//    checks that bound too, on a worker holding one expert of one layer, so the constant cannot
//    hide a worker that maps experts it does not serve (one more expert in every layer of mini
//    Q8_0 is ~84 MiB).
//  - The coordinator without local experts (bench's peak RSS) stays within the model's
//    non-expert bytes + its KV cache + kCoordinatorFixedBytes (process, gRPC channels,
//    activations and logits of the 64-token prompt: measured ~45 MiB here); one expert in every
//    layer would exceed it.
#include <signal.h>
#include <sys/wait.h>

#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/kv_cache.h"
#include "engine/model.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testdata.h"

namespace moepool {
namespace {

using ::moepool::testing::ReadFileOrDie;
using ::moepool::testing::RunMoepool;
using ::moepool::testing::TempDir;

constexpr uint64_t kMiB = uint64_t{1} << 20;
constexpr uint64_t kWorkerFixedBytes = 40 * kMiB;
constexpr uint64_t kCoordinatorFixedBytes = 64 * kMiB;
constexpr int kPromptTokens = 64;
constexpr int kDecodeTokens = 16;

// VmRSS of a process in bytes; 0 if it cannot be read.
uint64_t ResidentBytes(pid_t pid) {
  std::ifstream status(absl::StrCat("/proc/", pid, "/status"));
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmRSS:", 0) == 0) return std::strtoull(line.c_str() + 6, nullptr, 10) * 1024;
  }
  return 0;
}

// A `moepool worker` child process; its port is read from the ready line.
class Worker {
 public:
  ~Worker() {
    if (pid_ <= 0) return;
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
  }

  bool Start(const std::string& model, const std::vector<std::string>& selection) {
    static int n = 0;
    const std::string log = absl::StrCat(TempDir(), "/memory-worker", ++n, ".log");
    std::vector<std::string> args = {"worker",      "--model",   model, "--listen",
                                     "127.0.0.1:0", "--threads", "1"};
    args.insert(args.end(), selection.begin(), selection.end());
    std::string line;
    pid_ = ::moepool::testing::SpawnMoepool(args, log, &line);
    const size_t colon = line.rfind(':');
    if (pid_ <= 0 || colon == std::string::npos) {
      ADD_FAILURE() << "worker did not start: " << line << ReadFileOrDie(log);
      return false;
    }
    address_ = absl::StrCat("127.0.0.1:", std::atoi(line.c_str() + colon + 1));
    return true;
  }

  uint64_t rss() const { return ResidentBytes(pid_); }
  const std::string& address() const { return address_; }

 private:
  pid_t pid_ = -1;
  std::string address_;
};

// Runs the same decode benchmark through `workers`; returns the coordinator's peak RSS (0 on
// failure, with a test failure).
uint64_t BenchPeakRss(const std::string& model, const std::string& workers) {
  const auto r = RunMoepool(absl::StrCat("bench --model '", model, "' --threads 1 --workers ",
                                         workers, " --prompt-tokens ", kPromptTokens,
                                         " --decode-tokens ", kDecodeTokens, " --json"));
  if (r.exit_code != 0) {
    ADD_FAILURE() << "bench failed: " << r.err;
    return 0;
  }
  const auto j = nlohmann::json::parse(r.out.substr(r.out.find('{')), nullptr, false);
  if (j.is_discarded() || !j.contains("peak_rss_bytes")) {
    ADD_FAILURE() << "no peak_rss_bytes in: " << r.out;
    return 0;
  }
  return j["peak_rss_bytes"].get<uint64_t>();
}

TEST(WorkerMemoryTest, WorkersHoldTheirShareAndTheCoordinatorNoExperts) {
  const std::string model = TempDir() + "/memory-mini-Q8_0.gguf";
  const auto synth = RunMoepool(absl::StrCat("synth --shape mini --type Q8_0 --out '", model, "'"));
  ASSERT_EQ(synth.exit_code, 0) << synth.err;

  Worker low, high, all, one;
  ASSERT_TRUE(low.Start(model, {"--experts", "0-3"}));
  ASSERT_TRUE(high.Start(model, {"--experts", "4-7"}));
  ASSERT_TRUE(all.Start(model, {"--experts", "0-7"}));
  ASSERT_TRUE(one.Start(model, {"--experts", "0", "--layers", "0"}));
  // --preload on (the default): a worker holds its share as soon as it says it is ready, before
  // any request. Lazily mapped, the first request read every weight it touched from the disk
  // page by page (34 s to the first token of a full-size Mixtral from a cold page cache).
  absl::StatusOr<std::unique_ptr<Model>> m = Model::Load(model, ExpertFilter{});
  ASSERT_TRUE(m.ok()) << m.status();
  const uint64_t share = (*m)->ExpertBytes() / 2;
  const uint64_t ready_low = low.rss();
  std::printf("RSS MiB of worker 0-3 when ready: %.1f; its experts %.1f\n",
              static_cast<double>(ready_low) / kMiB, static_cast<double>(share) / kMiB);
  EXPECT_GE(ready_low, share);

  // The same requests: every token's rows go to experts 0-3 (low) and 4-7 (high), or all to
  // `all`.
  const uint64_t coordinator_split =
      BenchPeakRss(model, absl::StrCat(low.address(), ",", high.address()));
  const uint64_t coordinator_single = BenchPeakRss(model, all.address());
  ASSERT_GT(coordinator_split, 0u);
  ASSERT_GT(coordinator_single, 0u);

  const uint64_t rss_low = low.rss(), rss_high = high.rss(), rss_all = all.rss();
  const uint64_t rss_one = one.rss();
  ASSERT_GT(rss_all, 0u);
  std::printf("RSS MiB: worker 0-3 %.1f, 4-7 %.1f, 0-7 %.1f, one expert %.1f\n",
              static_cast<double>(rss_low) / kMiB, static_cast<double>(rss_high) / kMiB,
              static_cast<double>(rss_all) / kMiB, static_cast<double>(rss_one) / kMiB);

  // The constant is honest: a worker's fixed overhead is within it.
  EXPECT_LE(rss_one, kWorkerFixedBytes);
  const double bound = 0.55 * static_cast<double>(rss_all) + kWorkerFixedBytes;
  EXPECT_LE(static_cast<double>(rss_low), bound);
  EXPECT_LE(static_cast<double>(rss_high), bound);

  // The coordinator: non-expert weights + KV cache of the bench's context + the fixed part.
  const uint64_t non_expert = (*m)->NonExpertBytes();
  const uint64_t kv = KvCache((*m)->config(), kPromptTokens).ReservedBytes();
  std::printf(
      "coordinator peak RSS MiB: %.1f (split), %.1f (one worker); non-expert %.1f, KV %.1f\n",
      static_cast<double>(coordinator_split) / kMiB, static_cast<double>(coordinator_single) / kMiB,
      static_cast<double>(non_expert) / kMiB, static_cast<double>(kv) / kMiB);
  EXPECT_LE(coordinator_split, non_expert + kv + kCoordinatorFixedBytes);
  EXPECT_LE(coordinator_single, non_expert + kv + kCoordinatorFixedBytes);
}

}  // namespace
}  // namespace moepool
