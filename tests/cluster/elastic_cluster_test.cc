// The elastic cluster in one process: ClusterControl (join, fetch, ready, watch, drain) over a
// ClusterExpertBackend whose links call in-process WorkerCores (in_process_link_util.h), each
// serving a shard file its ShardCache built from the control's Fetch. No sockets: the gRPC
// front is a thin translation (coordinator/cluster_service.cc), covered by the process tests.
#include <sys/stat.h>

#include <atomic>
#include <chrono>
#include <deque>
#include <filesystem>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "coordinator/cluster_control.h"
#include "coordinator/cluster_expert_backend.h"
#include "coordinator/expert_placement.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/cluster/in_process_link_util.h"
#include "tests/coordinator/cluster_run_util.h"
#include "tests/coordinator/fake_worker_util.h"
#include "tests/testdata.h"
#include "worker/joiner.h"
#include "worker/shard_cache.h"
#include "worker/worker_core.h"

namespace moepool {
namespace {

namespace pb = moepool::v1;
using ::moepool::testing::ExpectBitIdentical;
using ::moepool::testing::InProcessWorkers;
using ::moepool::testing::RunThree;
using ::moepool::testing::SmallModel;
using ::testing::HasSubstr;
using Pair = std::pair<int, int>;

pb::JoinRequest JoinRequestFor(const std::string& address, uint64_t memory,
                               const worker::ShardCache* cache) {
  pb::JoinRequest r;
  r.set_protocol_version(pb::CLUSTER_PROTOCOL_VERSION_CURRENT);
  r.set_advertise_address(address);
  r.mutable_capacity()->set_device("cpu");
  r.mutable_capacity()->set_memory_bytes(memory);
  r.mutable_capacity()->set_threads(1);
  if (cache != nullptr) {
    for (const worker::CachedShard& s : cache->Inventory()) {
      pb::CachedModel* c = r.add_cache();
      c->set_model_fingerprint(s.model_fingerprint);
      for (const auto& [l, e] : s.pairs) c->mutable_experts()->add_packed(l * 65536 + e);
    }
  }
  return r;
}

// A worker's control stream on its own thread, its events kept; ends (the worker counts as
// gone) when destroyed.
class Watcher {
 public:
  Watcher(ClusterControl* control, const std::string& id) {
    thread_ = std::thread([this, control, id] {
      pb::WatchRequest r;
      r.set_worker_id(id);
      control
          ->Watch(
              r,
              [this](const pb::WatchEvent& e) {
                std::lock_guard<std::mutex> lock(mu_);
                events_.push_back(e);
                return true;
              },
              [this] { return stop_.load(); })
          .IgnoreError();
    });
  }
  ~Watcher() {
    stop_ = true;
    thread_.join();
  }
  // The next event of `kind` within 10 s (others before it are dropped).
  std::optional<pb::WatchEvent> Next(pb::WatchEvent::Kind kind) {
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (std::chrono::steady_clock::now() < until) {
      {
        std::lock_guard<std::mutex> lock(mu_);
        while (!events_.empty()) {
          pb::WatchEvent e = events_.front();
          events_.pop_front();
          if (e.kind() == kind) return e;
        }
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return std::nullopt;
  }

 private:
  std::mutex mu_;
  std::deque<pb::WatchEvent> events_;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

// A worker that joined: its cache, shard and core.
struct Joined {
  std::string id;
  std::vector<Pair> pairs;
  worker::MaterializeResult shard;
  std::unique_ptr<worker::WorkerCore> core;
  int fetch_calls = 0;
};

class ElasticClusterTest : public ::testing::Test {
 protected:
  void SetUp() override {
    model_ = SmallModel("Q8_0");
    ClusterOptions o = ::moepool::testing::TestClusterOptions({});
    o.elastic = true;
    o.local_fallback = true;
    o.make_link = registry_.Factory();
    auto backend = ClusterExpertBackend::Create(model_, o);
    ASSERT_TRUE(backend.ok()) << backend.status();
    backend_ = *std::move(backend);
    control_ = std::make_unique<ClusterControl>(backend_.get());
    root_ = ::moepool::testing::TempDir() + "/elastic-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name();
    std::filesystem::remove_all(root_);
  }

  // Join, fetch into `cache_dir`, serve in-process under `address`, Ready.
  absl::StatusOr<Joined> Join(const std::string& address, const std::string& cache_dir,
                              uint64_t memory = uint64_t{1} << 30) {
    auto cache = worker::ShardCache::Open(root_ + "/" + cache_dir);
    if (!cache.ok()) return cache.status();
    auto response = control_->Join(JoinRequestFor(address, memory, &*cache), "127.0.0.1");
    if (!response.ok()) return response.status();
    Joined j;
    j.id = response->worker_id();
    for (const uint32_t p : response->experts().packed()) j.pairs.emplace_back(p >> 16, p & 0xffff);
    auto manifest = worker::ManifestFromJoin(*response);
    if (!manifest.ok()) return manifest.status();
    auto shard = cache->Materialize(
        *manifest, [&](const worker::ShardTensor& t, uint64_t offset,
                       const std::function<absl::Status(const char*, size_t)>& sink) {
          ++j.fetch_calls;
          pb::FetchRequest f;
          f.set_worker_id(j.id);
          f.set_tensor(t.name);
          f.set_offset(offset);
          return control_->Fetch(f, [&](const pb::FetchChunk& c) {
            return sink(c.data().data(), c.data().size()).ok();
          });
        });
    if (!shard.ok()) return shard.status();
    j.shard = *shard;
    worker::WorkerCoreOptions o;
    o.model_path = shard->path;
    o.experts = worker::ExpertSet(j.pairs);
    o.threads = 1;
    o.worker_id = address;
    o.reported_fingerprint = response->model().fingerprint();
    auto core = worker::WorkerCore::Create(o);
    if (!core.ok()) return core.status();
    j.core = *std::move(core);
    registry_.Add(address, j.core.get());
    pb::ReadyRequest ready;
    ready.set_worker_id(j.id);
    auto r = control_->Ready(ready);
    if (!r.ok()) return r.status();
    return j;
  }

  // The worker side of a placement change: the assignment on its control stream, the shard of
  // it (fetching what the cache lacks), the running core adopting it, Ready.
  absl::Status Follow(Joined* j, const std::string& cache_dir, Watcher* watcher) {
    const std::optional<pb::WatchEvent> event = watcher->Next(pb::WatchEvent::KIND_REASSIGN);
    if (!event.has_value()) return absl::DeadlineExceededError("no KIND_REASSIGN");
    auto cache = worker::ShardCache::Open(root_ + "/" + cache_dir);
    if (!cache.ok()) return cache.status();
    auto manifest = worker::ManifestFromJoin(event->assignment());
    if (!manifest.ok()) return manifest.status();
    j->fetch_calls = 0;
    auto shard = cache->Materialize(
        *manifest, [&](const worker::ShardTensor& t, uint64_t offset,
                       const std::function<absl::Status(const char*, size_t)>& sink) {
          ++j->fetch_calls;
          pb::FetchRequest f;
          f.set_worker_id(j->id);
          f.set_tensor(t.name);
          f.set_offset(offset);
          return control_->Fetch(f, [&](const pb::FetchChunk& c) {
            return sink(c.data().data(), c.data().size()).ok();
          });
        });
    if (!shard.ok()) return shard.status();
    j->pairs.clear();
    for (const uint32_t p : event->assignment().experts().packed()) {
      j->pairs.emplace_back(p >> 16, p & 0xffff);
    }
    if (absl::Status s = j->core->Adopt(shard->path, worker::ExpertSet(j->pairs)); !s.ok()) {
      return s;
    }
    pb::ReadyRequest ready;
    ready.set_worker_id(j->id);
    return control_->Ready(ready).status();
  }

  std::vector<float> Logits() {
    auto engine = ::moepool::testing::LoadEngineWithExperts(model_, backend_.get(), 128);
    auto logits = RunThree(*engine, /*pipelined=*/true);
    EXPECT_TRUE(logits.ok()) << logits.status();
    return logits.ok() ? *logits : std::vector<float>();
  }

  std::vector<float> LocalLogits() {
    auto engine = ::moepool::testing::LoadEngineWithExperts(model_, nullptr, 128);
    auto logits = RunThree(*engine, true);
    EXPECT_TRUE(logits.ok()) << logits.status();
    return logits.ok() ? *logits : std::vector<float>();
  }

  std::string State(const std::string& id) const {
    const nlohmann::json view = control_->View();
    for (const auto& w : view["workers"]) {
      if (w["id"] == id) return w["state"];
    }
    return "absent";
  }

  std::string model_;
  std::string root_;
  InProcessWorkers registry_;
  std::unique_ptr<ClusterExpertBackend> backend_;
  std::unique_ptr<ClusterControl> control_;
};

TEST_F(ElasticClusterTest, AloneThenTwoWorkersJoinWithTheSameBitsAndShareTheExperts) {
  const std::vector<float> want = LocalLogits();
  ExpectBitIdentical(want, Logits());  // no worker: the fallback computes everything
  EXPECT_GT(backend_->Stats().fallback_rows, 0u);

  auto a = Join("a:1", "a");
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->pairs.size(), 16u);  // alone, it takes all 2 layers x 8 experts
  EXPECT_EQ(a->fetch_calls, 48);    // three matrices each
  backend_->ResetStats();
  ExpectBitIdentical(want, Logits());
  EXPECT_EQ(backend_->Stats().fallback_rows, 0u);

  auto b = Join("b:1", "b");
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(b->pairs.size(), 8u);  // half, taken over from a
  ExpectBitIdentical(want, Logits());
  nlohmann::json view = control_->View();
  ASSERT_EQ(view["workers"].size(), 2u);
  std::set<std::vector<int>> held;
  for (const auto& w : view["workers"]) {
    EXPECT_EQ(w["state"], "ready");
    EXPECT_EQ(w["experts"].size(), 8u) << w.dump();
    for (const auto& p : w["experts"]) held.insert(p.get<std::vector<int>>());
  }
  EXPECT_EQ(held.size(), 16u);  // disjoint halves
  EXPECT_EQ(view["fallback_expert_pairs"], 0);
  EXPECT_GE(view["placement_version"].get<int>(), 4);
  // a's control stream tells it which pairs it no longer serves: exactly b's.
  pb::WatchRequest watch;
  watch.set_worker_id(a->id);
  std::vector<pb::WatchEvent> events;
  control_
      ->Watch(
          watch, [&](const pb::WatchEvent& e) { return events.push_back(e), true; },
          [&] { return !events.empty(); })
      .IgnoreError();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].kind(), pb::WatchEvent::KIND_RELEASED);
  std::vector<Pair> released;
  for (const uint32_t p : events[0].experts().packed()) released.emplace_back(p >> 16, p & 0xffff);
  EXPECT_EQ(released, b->pairs);
  // b's cache holds about its share of the expert bytes.
  const uint64_t total = a->core->expert_bytes();
  EXPECT_NEAR(static_cast<double>(std::filesystem::file_size(b->shard.path)),
              static_cast<double>(total) / 2, static_cast<double>(total) * 0.05);
}

TEST_F(ElasticClusterTest, AWorkerRestartedWithACompleteCacheFetchesNothing) {
  auto a = Join("a:1", "a");
  ASSERT_TRUE(a.ok()) << a.status();
  struct stat before {};
  ASSERT_EQ(stat(a->shard.path.c_str(), &before), 0);
  // Its control stream breaks (killed): gone, its experts back to the fallback.
  pb::WatchRequest watch;
  watch.set_worker_id(a->id);
  const absl::Status watched = control_->Watch(
      watch, [](const pb::WatchEvent&) { return true; }, [] { return true; });
  EXPECT_EQ(watched.code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(State(a->id), "gone");
  EXPECT_EQ(backend_->UncoveredPairs().size(), 16u);
  ExpectBitIdentical(LocalLogits(), Logits());

  auto again = Join("a:1", "a");
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->id, a->id);  // same address, same id
  EXPECT_EQ(again->fetch_calls, 0);
  EXPECT_TRUE(again->shard.untouched);
  struct stat after {};
  ASSERT_EQ(stat(again->shard.path.c_str(), &after), 0);
  EXPECT_EQ(after.st_ino, before.st_ino);
  EXPECT_EQ(after.st_mtim.tv_sec, before.st_mtim.tv_sec);
  EXPECT_EQ(after.st_mtim.tv_nsec, before.st_mtim.tv_nsec);
  EXPECT_TRUE(backend_->UncoveredPairs().empty());
}

TEST_F(ElasticClusterTest, ALostWorkersExpertsGoToAWorkerWithRoomAfterTheGrace) {
  control_ = std::make_unique<ClusterControl>(backend_.get(),
                                              ClusterControlOptions{.reassign_after_s = 0.05});
  auto a = Join("a:1", "a");
  ASSERT_TRUE(a.ok()) << a.status();
  auto b = Join("b:1", "b");
  ASSERT_TRUE(b.ok()) << b.status();
  const auto watch = [&](const std::string& id, bool lost) {
    pb::WatchRequest r;
    r.set_worker_id(id);
    std::vector<pb::WatchEvent> events;
    control_
        ->Watch(
            r, [&](const pb::WatchEvent& e) { return events.push_back(e), true; },
            [&] { return lost || !events.empty(); })
        .IgnoreError();
    return events;
  };
  watch(b->id, /*lost=*/true);  // b's stream breaks: gone, its experts on the fallback
  EXPECT_EQ(backend_->UncoveredPairs().size(), 8u);
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  std::vector<pb::WatchEvent> events;
  for (int i = 0; i < 3 && (events.empty() || events.back().kind() != pb::WatchEvent::KIND_REJOIN);
       ++i) {
    events = watch(a->id, false);
  }
  ASSERT_FALSE(events.empty());
  EXPECT_EQ(events.back().kind(), pb::WatchEvent::KIND_REJOIN);
  // a joins again and takes all 16 pairs; its cache still holds the 8 it handed to b (it
  // held everything before b came), so nothing is fetched.
  auto again = Join("a:1", "a");
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->id, a->id);
  EXPECT_EQ(again->pairs.size(), 16u);
  EXPECT_EQ(again->fetch_calls, 0);
  EXPECT_TRUE(backend_->UncoveredPairs().empty());
  ExpectBitIdentical(LocalLogits(), Logits());
}

TEST_F(ElasticClusterTest, DrainStopsRoutingAndTellsTheWorker) {
  auto a = Join("a:1", "a");
  ASSERT_TRUE(a.ok()) << a.status();
  const std::vector<float> want = LocalLogits();
  ExpectBitIdentical(want, Logits());
  ASSERT_TRUE(control_->Drain(a->id, "test").ok());
  EXPECT_EQ(State(a->id), "gone");
  const int jobs_before = registry_.JobsPerLink("a:1")[0] + registry_.JobsPerLink("a:1")[1];
  ExpectBitIdentical(want, Logits());
  EXPECT_EQ(registry_.JobsPerLink("a:1")[0] + registry_.JobsPerLink("a:1")[1], jobs_before);
  pb::WatchRequest watch;
  watch.set_worker_id(a->id);
  std::vector<pb::WatchEvent> events;
  const absl::Status watched = control_->Watch(
      watch, [&](const pb::WatchEvent& e) { return events.push_back(e), true; },
      [] { return false; });
  EXPECT_TRUE(watched.ok()) << watched;
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].kind(), pb::WatchEvent::KIND_DRAINED);
  EXPECT_EQ(control_->Drain(a->id, "again").code(), absl::StatusCode::kNotFound);
}

// The rebalancer's make-before-break change: two workers trade one expert; each keeps serving
// until both serve their incoming pair, then each is routed its target and told to release the
// pair it gave. The bits never change.
TEST_F(ElasticClusterTest, APlacementChangeTradesExpertsMakeBeforeBreakWithTheSameBits) {
  const std::vector<float> want = LocalLogits();
  auto a = Join("a:1", "a");
  ASSERT_TRUE(a.ok()) << a.status();
  auto b = Join("b:1", "b");
  ASSERT_TRUE(b.ok()) << b.status();
  Watcher wa(control_.get(), a->id), wb(control_.get(), b->id);
  ASSERT_TRUE(wa.Next(pb::WatchEvent::KIND_RELEASED).has_value());  // what b took at its join
  const std::vector<RebalanceWorker> workers = control_->RebalanceWorkers();
  ASSERT_EQ(workers.size(), 2u);
  ASSERT_TRUE(workers[0].movable && workers[1].movable);
  std::vector<std::vector<ExpertPair>> target = {workers[0].pairs, workers[1].pairs};
  const ExpertPair from_a = target[0].front(), from_b = target[1].front();
  ASSERT_EQ(from_a.first, from_b.first);  // one layer: the same size
  target[0].front() = from_b;
  target[1].front() = from_a;
  ASSERT_TRUE(control_->StartPlacementChange(workers, target).ok());
  EXPECT_EQ(control_->StartPlacementChange(workers, target).code(),
            absl::StatusCode::kFailedPrecondition);  // one change at a time
  EXPECT_FALSE(control_->RebalanceWorkers()[0].movable);
  EXPECT_TRUE(control_->AdvancePlacementChange());
  ExpectBitIdentical(want, Logits());

  ASSERT_TRUE(Follow(&*a, "a", &wa).ok());
  // a held every pair before b joined: its shard file has the incoming one too.
  EXPECT_EQ(a->fetch_calls, 0);
  EXPECT_EQ(a->pairs.size(), 9u);
  EXPECT_TRUE(control_->AdvancePlacementChange());  // b does not serve its incoming pair yet
  ExpectBitIdentical(want, Logits());
  ASSERT_TRUE(Follow(&*b, "b", &wb).ok());
  EXPECT_EQ(b->fetch_calls, 3);  // only the incoming pair; the rest is copied from its shard
  EXPECT_FALSE(control_->AdvancePlacementChange());  // done

  const nlohmann::json view = control_->View();
  for (size_t w = 0; w < 2; ++w) {
    std::vector<ExpertPair> routed;
    for (const auto& p : view["workers"][w]["experts"]) routed.emplace_back(p[0], p[1]);
    std::sort(target[w].begin(), target[w].end());
    EXPECT_EQ(routed, target[w]) << w;
  }
  const std::optional<pb::WatchEvent> released = wa.Next(pb::WatchEvent::KIND_RELEASED);
  ASSERT_TRUE(released.has_value());
  ASSERT_EQ(released->experts().packed_size(), 1);
  EXPECT_EQ(released->experts().packed(0), PackExpertPair(from_a.first, from_a.second));
  a->core->Release({from_a});
  backend_->ResetStats();
  ExpectBitIdentical(want, Logits());
  EXPECT_EQ(backend_->Stats().fallback_rows, 0u);
  // A plan made before the change is stale now.
  EXPECT_EQ(control_->StartPlacementChange(workers, target).code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST_F(ElasticClusterTest, PlacementChangesWaitForTheEndOfAForwardPass) {
  auto a = Join("a:1", "a");
  ASSERT_TRUE(a.ok()) << a.status();
  const uint64_t version = backend_->placement_version();
  // Layer 0 of a pass: the change waits until the last layer (1) is done.
  const int64_t n_embd = backend_->config().n_embd;
  std::vector<float> x(static_cast<size_t>(n_embd), 0.5f), out(x.size());
  std::vector<int32_t> expert = {0, 5};
  std::vector<float> weight = {0.5f, 0.5f};
  ExpertRoutes routes;
  routes.x = x.data();
  routes.n_rows = 1;
  routes.n_embd = n_embd;
  routes.k = 2;
  routes.expert = expert.data();
  routes.weight = weight.data();
  routes.layer = 0;
  ASSERT_TRUE(backend_->Compute(routes, out.data()).ok());
  std::atomic<bool> applied{false};
  std::thread change([&] {
    backend_->SetWorkerPairs(0, {{0, 0}});
    applied = true;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_FALSE(applied.load());
  EXPECT_EQ(backend_->placement_version(), version);
  routes.layer = 1;
  ASSERT_TRUE(backend_->Compute(routes, out.data()).ok());
  change.join();
  EXPECT_TRUE(applied.load());
  EXPECT_EQ(backend_->placement_version(), version + 1);
}

TEST_F(ElasticClusterTest, BadRequestsAreClearErrorsAndChangeNothing) {
  pb::JoinRequest r = JoinRequestFor("a:1", 1 << 30, nullptr);
  r.set_protocol_version(pb::CLUSTER_PROTOCOL_VERSION_UNSPECIFIED);
  auto j = control_->Join(r, "127.0.0.1");
  EXPECT_EQ(j.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(j.status().message(), HasSubstr("protocol version 0"));
  r = JoinRequestFor("a:1", 0, nullptr);
  EXPECT_EQ(control_->Join(r, "h").status().code(), absl::StatusCode::kInvalidArgument);
  r = JoinRequestFor("no-port", 1 << 30, nullptr);
  EXPECT_EQ(control_->Join(r, "h").status().code(), absl::StatusCode::kInvalidArgument);
  r = JoinRequestFor(std::string(1000, 'x') + ":1", 1 << 30, nullptr);
  EXPECT_EQ(control_->Join(r, "h").status().code(), absl::StatusCode::kInvalidArgument);
  r = JoinRequestFor("a:1", 1 << 30, nullptr);
  for (int i = 0; i < 17; ++i) r.add_cache();
  EXPECT_EQ(control_->Join(r, "h").status().code(), absl::StatusCode::kInvalidArgument);
  r = JoinRequestFor("a:1", 1 << 30, nullptr);
  pb::CachedModel* c = r.add_cache();
  c->set_model_fingerprint(control_->model_fingerprint());
  c->mutable_experts()->add_packed(999 * 65536);
  EXPECT_EQ(control_->Join(r, "h").status().code(), absl::StatusCode::kInvalidArgument);
  r = JoinRequestFor("a:1", 1000, nullptr);  // no expert fits
  EXPECT_EQ(control_->Join(r, "h").status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(control_->View()["workers"].size(), 0u);

  // A joined (fetching) worker asking for what it was not given.
  auto joined = control_->Join(JoinRequestFor("a:1", uint64_t{1} << 30, nullptr), "h");
  ASSERT_TRUE(joined.ok()) << joined.status();
  const std::string id = joined->worker_id();
  const auto write = [](const pb::FetchChunk&) { return true; };
  pb::FetchRequest f;
  f.set_worker_id("nobody");
  f.set_tensor(joined->tensors(0).name());
  EXPECT_EQ(control_->Fetch(f, write).code(), absl::StatusCode::kNotFound);
  f.set_worker_id(id);
  f.set_tensor("token_embd.weight");
  EXPECT_EQ(control_->Fetch(f, write).code(), absl::StatusCode::kPermissionDenied);
  f.set_tensor("../../etc/passwd");
  EXPECT_EQ(control_->Fetch(f, write).code(), absl::StatusCode::kPermissionDenied);
  f.set_tensor(joined->tensors(0).name());
  f.set_offset(joined->tensors(0).bytes() + 1);
  EXPECT_EQ(control_->Fetch(f, write).code(), absl::StatusCode::kOutOfRange);
  f.set_offset(0);
  EXPECT_EQ(control_->Fetch(f, [](const pb::FetchChunk&) { return false; }).code(),
            absl::StatusCode::kCancelled);
  pb::ReadyRequest ready;
  ready.set_worker_id("nobody");
  EXPECT_EQ(control_->Ready(ready).status().code(), absl::StatusCode::kNotFound);
  // Ready while its server is down: the Describe fails, it is gone.
  worker::WorkerCoreOptions o;
  o.model_path = model_;
  o.experts = worker::ExpertSet({{0, 0}});
  o.threads = 1;
  auto core = worker::WorkerCore::Create(o);
  ASSERT_TRUE(core.ok()) << core.status();
  registry_.Add("a:1", core->get());
  registry_.SetDown("a:1", true);
  ready.set_worker_id(id);
  EXPECT_FALSE(control_->Ready(ready).ok());
  EXPECT_EQ(State(id), "gone");
  EXPECT_EQ(control_->Drain("nobody", "x").code(), absl::StatusCode::kNotFound);
}

TEST_F(ElasticClusterTest, AWorkerServingAnotherModelIsRefusedAtReady) {
  auto joined = control_->Join(JoinRequestFor("x:1", uint64_t{1} << 30, nullptr), "h");
  ASSERT_TRUE(joined.ok()) << joined.status();
  // Its core serves another file (another seed): its fingerprint differs.
  worker::WorkerCoreOptions o;
  o.model_path = SmallModel("Q8_0", 2, /*seed=*/9);
  o.experts = worker::ExpertSet({{0, 0}});
  o.threads = 1;
  auto core = worker::WorkerCore::Create(o);
  ASSERT_TRUE(core.ok()) << core.status();
  registry_.Add("x:1", core->get());
  pb::ReadyRequest ready;
  ready.set_worker_id(joined->worker_id());
  auto r = control_->Ready(ready);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(r.status().message(), HasSubstr("another model"));
  EXPECT_EQ(State(joined->worker_id()), "gone");
  EXPECT_EQ(backend_->UncoveredPairs().size(), 16u);
}

}  // namespace
}  // namespace moepool
