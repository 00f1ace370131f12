// TLS and mutual TLS between ClusterExpertBackend and a worker (certificates made with the
// openssl command-line tool; skipped where it is missing).
#include <cstdlib>
#include <string>

#include "absl/strings/str_cat.h"
#include "coordinator/cluster_expert_backend.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/coordinator/cluster_process_util.h"
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

const std::string& CertDir() { return ::moepool::testing::TestCertDir(); }

std::shared_ptr<grpc::ServerCredentials> ServerCredentials(bool require_client_cert) {
  const std::string& d = CertDir();
  grpc::SslServerCredentialsOptions o(
      require_client_cert ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
                          : GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
  o.pem_root_certs = ReadFileOrDie(d + "/ca.pem");
  o.pem_key_cert_pairs.push_back(
      {ReadFileOrDie(d + "/server.key"), ReadFileOrDie(d + "/server.pem")});
  return grpc::SslServerCredentials(o);
}

class ClusterTlsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (std::system("openssl version >/dev/null 2>&1") != 0) GTEST_SKIP() << "no openssl tool";
    ASSERT_FALSE(CertDir().empty()) << "openssl failed; see " << TempDir() << "/certs/log";
  }

  std::unique_ptr<FakeWorker> Start(bool require_client_cert) {
    FakeWorkerOptions o;
    o.model_path = SmallModel("F16");
    o.pairs = PairsForExperts(2, 0, 7);
    o.credentials = ServerCredentials(require_client_cert);
    auto w = FakeWorker::Start(o);
    EXPECT_TRUE(w.ok()) << w.status();
    return w.ok() ? *std::move(w) : nullptr;
  }

  ClusterOptions Options(const FakeWorker& w) {
    ClusterOptions o;
    o.workers = {w.address()};
    o.connect_timeout_s = 5;
    o.tls_ca_path = CertDir() + "/ca.pem";
    return o;
  }

  // One MoE step through the backend succeeds.
  void ExpectComputes(ClusterExpertBackend& b) {
    std::vector<float> x(64, 0.5f), out(64);
    const int32_t expert[2] = {1, 6};
    const float weight[2] = {0.5f, 0.5f};
    ExpertRoutes r{0, 1, 64, 2, x.data(), expert, weight};
    const absl::Status s = b.Compute(r, out.data());
    EXPECT_TRUE(s.ok()) << s;
  }
};

TEST_F(ClusterTlsTest, ServerVerifiedWithTheClusterCa) {
  auto w = Start(/*require_client_cert=*/false);
  ASSERT_NE(w, nullptr);
  auto b = ClusterExpertBackend::Create(SmallModel("F16"), Options(*w));
  ASSERT_TRUE(b.ok()) << b.status();
  ExpectComputes(**b);
  // A plaintext coordinator cannot talk to a TLS worker.
  ClusterOptions plain = Options(*w);
  plain.tls_ca_path.clear();
  plain.connect_timeout_s = 0.5;
  auto p = ClusterExpertBackend::Create(SmallModel("F16"), plain);
  ASSERT_FALSE(p.ok());
  EXPECT_THAT(std::string(p.status().message()), HasSubstr("worker " + w->address()));
}

TEST_F(ClusterTlsTest, MutualTlsNeedsTheClientCertificate) {
  auto w = Start(/*require_client_cert=*/true);
  ASSERT_NE(w, nullptr);
  ClusterOptions o = Options(*w);
  o.connect_timeout_s = 0.5;
  auto without = ClusterExpertBackend::Create(SmallModel("F16"), o);
  ASSERT_FALSE(without.ok());
  EXPECT_THAT(std::string(without.status().message()), HasSubstr("worker " + w->address()));
  o.connect_timeout_s = 5;
  o.tls_cert_path = CertDir() + "/client.pem";
  o.tls_key_path = CertDir() + "/client.key";
  auto with = ClusterExpertBackend::Create(SmallModel("F16"), o);
  ASSERT_TRUE(with.ok()) << with.status();
  ExpectComputes(**with);
  o.tls_key_path.clear();
  EXPECT_EQ(ClusterExpertBackend::Create(SmallModel("F16"), o).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace moepool
