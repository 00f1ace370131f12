// Test doubles for the coordinator tests: an in-process moepool.v1 ExpertService (a real gRPC
// server on 127.0.0.1) that computes with LocalExpertBackend over the pairs it is given, with
// knobs for misbehaviour (stalling, another protocol version or fingerprint, a required token,
// TLS); and small synthetic models.
//
// Ownership: FakeWorker owns its server and model. Threading: the server runs on gRPC's threads;
// Kill/destructor may be called from the test thread at any time.
#ifndef MOEPOOL_TESTS_COORDINATOR_FAKE_WORKER_UTIL_H_
#define MOEPOOL_TESTS_COORDINATOR_FAKE_WORKER_UTIL_H_

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "coordinator/cluster_expert_backend.h"
#include "engine/engine.h"
#include "engine/model.h"
#include "engine/moe_ffn.h"
#include "engine/thread_pool.h"
#include "moepool/v1/expert_service.grpc.pb.h"

namespace moepool::testing {

struct FakeWorkerOptions {
  std::string model_path;
  std::vector<std::pair<int, int>> pairs;  // (layer, expert) held, ascending
  std::string token;                       // required bearer token; empty: none
  bool stall = false;                      // read Forward requests but never answer
  int protocol_version = 1;
  std::string fingerprint_override;     // non-empty: reported instead of the real fingerprint
  int64_t max_message_bytes = 4 << 20;  // response chunk size limit
  int port = 0;                         // 0: any free port
  std::shared_ptr<grpc::ServerCredentials> credentials;  // null: insecure
};

// All (layer, expert) pairs for experts [lo, hi] on every layer.
std::vector<std::pair<int, int>> PairsForExperts(int n_layer, int lo, int hi);

class FakeWorker final : public moepool::v1::ExpertService::Service {
 public:
  static absl::StatusOr<std::unique_ptr<FakeWorker>> Start(const FakeWorkerOptions& options);
  ~FakeWorker() override;

  int port() const { return port_; }
  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }
  // Stops the server now, cancelling open streams (like a crashed worker).
  void Kill();
  int forward_requests() const { return forward_requests_.load(); }

  grpc::Status Describe(grpc::ServerContext* context, const moepool::v1::DescribeRequest* request,
                        moepool::v1::DescribeResponse* response) override;
  grpc::Status Forward(grpc::ServerContext* context,
                       grpc::ServerReaderWriter<moepool::v1::ForwardResponse,
                                                moepool::v1::ForwardRequest>* stream) override;

 private:
  FakeWorker() = default;
  grpc::Status CheckToken(grpc::ServerContext* context) const;

  FakeWorkerOptions options_;
  std::unique_ptr<Model> model_;
  std::unique_ptr<ThreadPool> pool_;
  std::unique_ptr<LocalExpertBackend> experts_;
  std::string fingerprint_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
  std::atomic<int> forward_requests_{0};
  std::atomic<bool> killed_{false};
};

// Cluster options for in-process tests: the workers' addresses, 2 local threads, short connect
// and reconnect times.
ClusterOptions TestClusterOptions(const std::vector<std::string>& addresses);

// An engine over `model` (2 threads, n_ctx positions) with its experts behind `experts`; null
// (with a test failure) if it cannot load.
std::unique_ptr<Engine> LoadEngineWithExperts(const std::string& model, ExpertBackend* experts,
                                              int64_t n_ctx);

// A small synthetic Mixtral model (n_embd 64, n_ff 128, 2 layers, 8 experts, k used) of the given
// tensor type, synthesized once per (type, k, seed, router skew: synth.h) and process under
// TempDir().
const std::string& SmallModel(const std::string& type, int k = 2, uint64_t seed = 1,
                              float router_skew = 0);

}  // namespace moepool::testing

#endif  // MOEPOOL_TESTS_COORDINATOR_FAKE_WORKER_UTIL_H_
