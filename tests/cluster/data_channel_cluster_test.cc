// --transport tcp end to end: ClusterExpertBackend with real WorkerServers whose rows travel on
// the data channel: the same bits as gRPC and as a local run, fallback to gRPC where a worker
// has no data channel, a reconnect after the worker restarts, and TLS / mutual TLS with the
// workers' gRPC certificates.
#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "coordinator/cluster_expert_backend.h"
#include "engine/engine.h"
#include "gtest/gtest.h"
#include "tests/coordinator/cluster_process_util.h"
#include "tests/coordinator/cluster_run_util.h"
#include "tests/coordinator/fake_worker_util.h"
#include "tests/engine/tiny_model_util.h"
#include "tests/testdata.h"
#include "worker/expert_service.h"
#include "worker/worker_core.h"

namespace moepool {
namespace {

namespace pb = ::moepool::v1;
using ::moepool::testing::ReadFileOrDie;

struct RealWorker {
  std::unique_ptr<worker::WorkerCore> core;
  std::unique_ptr<worker::WorkerServer> server;
  std::string address() const { return "127.0.0.1:" + std::to_string(server->port()); }
  uint64_t data_requests() const {
    return server->data_server() != nullptr ? server->data_server()->requests() : 0;
  }
};

const std::string& Model() { return ::moepool::testing::TinyModelPath("Q4_K_M"); }

// A worker holding experts [lo, hi] of every layer; `so` gives the server's settings.
RealWorker StartWorker(int lo, int hi, worker::WorkerServerOptions so = {}) {
  RealWorker w;
  worker::WorkerCoreOptions o;
  o.model_path = Model();
  auto experts = worker::ExpertSetFromFlags(std::to_string(lo) + "-" + std::to_string(hi), "",
                                            /*n_layer=*/4, /*n_expert=*/8);
  EXPECT_TRUE(experts.ok()) << experts.status();
  o.experts = *experts;
  o.threads = 1;
  auto core = worker::WorkerCore::Create(o);
  EXPECT_TRUE(core.ok()) << core.status();
  if (!core.ok()) return w;
  w.core = *std::move(core);
  if (so.listen_address.empty()) so.listen_address = "127.0.0.1:0";
  auto server = worker::WorkerServer::Start(w.core.get(), so);
  EXPECT_TRUE(server.ok()) << server.status();
  if (server.ok()) w.server = *std::move(server);
  return w;
}

// Logits of a prompt and four greedy steps through `experts` (null: local).
std::vector<float> Logits(ExpertBackend* experts) {
  auto engine = ::moepool::testing::LoadEngineWithExperts(Model(), experts, 256);
  EXPECT_NE(engine, nullptr);
  if (engine == nullptr) return {};
  const std::vector<int32_t> prompt =
      ::moepool::testing::PseudoRandomPrompt(24, engine->config().n_vocab, 3);
  KvCache cache(engine->config(), engine->n_ctx());
  auto logits = engine->EvalPrompt(prompt, &cache, /*all_logits=*/true);
  EXPECT_TRUE(logits.ok()) << logits.status();
  if (!logits.ok()) return {};
  std::vector<float> all = *logits;
  const int64_t n_vocab = engine->config().n_vocab;
  for (int i = 0; i < 4; ++i) {
    const float* last = all.data() + all.size() - n_vocab;
    const int32_t tok = static_cast<int32_t>(std::max_element(last, last + n_vocab) - last);
    BatchRow row{tok, cache.n_past(), &cache, true};
    std::vector<float> step;
    EXPECT_TRUE(engine->transformer().Forward({&row, 1}, &step).ok());
    cache.set_n_past(cache.n_past() + 1);
    all.insert(all.end(), step.begin(), step.end());
  }
  return all;
}

ClusterOptions Options(const std::vector<const RealWorker*>& workers, wire::TransportKind t) {
  std::vector<std::string> addresses;
  for (const RealWorker* w : workers) addresses.push_back(w->address());
  ClusterOptions o = ::moepool::testing::TestClusterOptions(addresses);
  o.transport = t;
  return o;
}

TEST(DataChannelClusterTest, TcpRowsGiveTheLocalBitsAndTravelOnTheDataChannel) {
  RealWorker a = StartWorker(0, 3), b = StartWorker(4, 7);
  ASSERT_TRUE(a.server && b.server);
  const std::vector<float> local = Logits(nullptr);
  for (const auto t : {wire::TransportKind::kTcp, wire::TransportKind::kGrpc}) {
    SCOPED_TRACE(wire::TransportName(t));
    const uint64_t before = a.data_requests() + b.data_requests();
    auto backend = ClusterExpertBackend::Create(Model(), Options({&a, &b}, t));
    ASSERT_TRUE(backend.ok()) << backend.status();
    ::moepool::testing::ExpectBitIdentical(local, Logits(backend->get()));
    const uint64_t carried = a.data_requests() + b.data_requests() - before;
    if (t == wire::TransportKind::kTcp) {
      EXPECT_GT(a.data_requests(), 0u);
      EXPECT_GT(b.data_requests(), 0u);
    } else {
      EXPECT_EQ(carried, 0u);
    }
  }
}

TEST(DataChannelClusterTest, Q8RowsOnTheDataChannelMatchQ8RowsOverGrpc) {
  RealWorker a = StartWorker(0, 3), b = StartWorker(4, 7);
  ASSERT_TRUE(a.server && b.server);
  std::vector<std::vector<float>> results;
  for (const auto t : {wire::TransportKind::kTcp, wire::TransportKind::kGrpc}) {
    ClusterOptions o = Options({&a, &b}, t);
    o.wire_dtype = pb::DTYPE_Q8_0;
    auto backend = ClusterExpertBackend::Create(Model(), o);
    ASSERT_TRUE(backend.ok()) << backend.status();
    results.push_back(Logits(backend->get()));
  }
  ::moepool::testing::ExpectBitIdentical(results[0], results[1]);
}

TEST(DataChannelClusterTest, AWorkerWithoutADataChannelIsReachedOverGrpc) {
  worker::WorkerServerOptions off;
  off.data_port = -1;
  RealWorker a = StartWorker(0, 3, off), b = StartWorker(4, 7);
  ASSERT_TRUE(a.server && b.server);
  EXPECT_EQ(a.server->data_port(), 0);
  auto backend =
      ClusterExpertBackend::Create(Model(), Options({&a, &b}, wire::TransportKind::kTcp));
  ASSERT_TRUE(backend.ok()) << backend.status();
  ::moepool::testing::ExpectBitIdentical(Logits(nullptr), Logits(backend->get()));
  EXPECT_EQ(a.data_requests(), 0u);
  EXPECT_GT(b.data_requests(), 0u);
}

TEST(DataChannelClusterTest, ARestartedWorkerIsReachedOnItsNewDataChannel) {
  RealWorker a = StartWorker(0, 7);
  ASSERT_TRUE(a.server);
  const int port = a.server->port();
  ClusterOptions o = Options({&a}, wire::TransportKind::kTcp);
  o.local_fallback = false;
  o.links_per_worker = 1;
  auto backend = ClusterExpertBackend::Create(Model(), o);
  ASSERT_TRUE(backend.ok()) << backend.status();
  const std::vector<float> want = Logits(backend->get());
  a.server.reset();  // the worker goes away mid-conversation
  worker::WorkerServerOptions so;
  so.listen_address = "127.0.0.1:" + std::to_string(port);
  auto restarted = worker::WorkerServer::Start(a.core.get(), so);
  ASSERT_TRUE(restarted.ok()) << restarted.status();
  a.server = *std::move(restarted);
  // The first step finds the data channel gone and fails; the link reconnects.
  std::vector<float> x(256, 0.25f), out(256);
  const int32_t expert[2] = {1, 6};
  const float weight[2] = {0.5f, 0.5f};
  const ExpertRoutes routes{0, 1, 256, 2, x.data(), expert, weight};
  absl::Status s = (*backend)->Compute(routes, out.data());
  for (int i = 0; i < 200 && !s.ok(); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    s = (*backend)->Compute(routes, out.data());
  }
  ASSERT_TRUE(s.ok()) << s;
  const uint64_t before = a.data_requests();
  ::moepool::testing::ExpectBitIdentical(want, Logits(backend->get()));
  EXPECT_GT(a.data_requests(), before);  // on the new data channel
  EXPECT_NE(a.server->data_port(), 0);
}

class DataChannelTlsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (std::system("openssl version >/dev/null 2>&1") != 0) GTEST_SKIP() << "no openssl tool";
    ASSERT_FALSE(::moepool::testing::TestCertDir().empty());
  }
  static std::string Cert(const std::string& name) {
    return ::moepool::testing::TestCertDir() + "/" + name;
  }
};

TEST_F(DataChannelTlsTest, RowsTravelEncryptedWithTheWorkersCertificates) {
  for (const bool mutual : {false, true}) {
    SCOPED_TRACE(mutual ? "mutual TLS" : "TLS");
    worker::WorkerServerOptions so;
    so.tls_cert_pem = ReadFileOrDie(Cert("server.pem"));
    so.tls_key_pem = ReadFileOrDie(Cert("server.key"));
    if (mutual) so.tls_client_ca_pem = ReadFileOrDie(Cert("ca.pem"));
    so.service.cluster_token = "tls-token";
    RealWorker a = StartWorker(0, 7, so);
    ASSERT_TRUE(a.server);
    ClusterOptions o = Options({&a}, wire::TransportKind::kTcp);
    o.cluster_token = "tls-token";
    o.tls_ca_path = Cert("ca.pem");
    if (mutual) {
      o.tls_cert_path = Cert("client.pem");
      o.tls_key_path = Cert("client.key");
    }
    auto backend = ClusterExpertBackend::Create(Model(), o);
    ASSERT_TRUE(backend.ok()) << backend.status();
    ::moepool::testing::ExpectBitIdentical(Logits(nullptr), Logits(backend->get()));
    EXPECT_GT(a.data_requests(), 0u);
    // A plaintext dial to the TLS data port gets nowhere.
    wire::DataDialOptions plain;
    plain.token = "tls-token";
    plain.timeout_s = 1;
    EXPECT_FALSE(wire::DialDataChannel("127.0.0.1", a.server->data_port(), plain).ok());
    if (mutual) {  // TLS without the client certificate is refused too
      wire::DataDialOptions no_cert = plain;
      no_cert.tls = true;
      no_cert.tls_ca_pem = ReadFileOrDie(Cert("ca.pem"));
      EXPECT_FALSE(wire::DialDataChannel("127.0.0.1", a.server->data_port(), no_cert).ok());
    }
  }
}

}  // namespace
}  // namespace moepool
