// The gRPC face of a worker: moepool.v1.ExpertService over a WorkerCore, and the server that
// hosts it (see docs/protocol.md for the wire protocol).
//
// ExpertServiceImpl only translates: protobuf <-> WorkerCore, chunk reassembly of requests,
// chunking of responses, and the cluster-token check. A refused request is answered on the same
// stream with error_code / error_message set, and the stream keeps serving.
//
// Auth: with a non-empty cluster token every Describe and Forward call must carry the metadata
// `authorization: Bearer <token>` (compared in constant time), else it fails with
// UNAUTHENTICATED. The standard health service (grpc.health.v1) is not token-protected, so load
// balancers and orchestrators can probe it.
//
// Threading: the gRPC sync server calls the handlers on its own threads, one per active stream;
// WorkerCore serialises the computations. Ownership: the service and the server borrow the
// WorkerCore, which must outlive them.
#ifndef MOEPOOL_WORKER_EXPERT_SERVICE_H_
#define MOEPOOL_WORKER_EXPERT_SERVICE_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "grpcpp/grpcpp.h"
#include "moepool/v1/expert_service.grpc.pb.h"
#include "worker/nccl_sessions.h"
#include "worker/worker_core.h"

namespace moepool::worker {

struct ExpertServiceOptions {
  std::string cluster_token;  // empty: no token required
  // Largest payload of result rows in one ForwardResponse message (at least one row is always
  // sent per message); the whole result is split into consecutive-row chunks of this size.
  size_t response_chunk_bytes = size_t{4} << 20;
  // Non-null (--transport nccl, NCCL usable here): Describe lists "nccl" in transports,
  // SetupNccl joins communicators, and Forward requests naming a session get their rows over it.
  std::shared_ptr<NcclSessions> nccl;
};

// True if a and b are equal; the time taken depends only on the lengths, not on where they
// differ.
bool ConstantTimeEquals(const std::string& a, const std::string& b);

class ExpertServiceImpl final : public moepool::v1::ExpertService::Service {
 public:
  ExpertServiceImpl(WorkerCore* core, ExpertServiceOptions options);

  grpc::Status Describe(grpc::ServerContext* context, const moepool::v1::DescribeRequest* request,
                        moepool::v1::DescribeResponse* response) override;
  grpc::Status SetupNccl(grpc::ServerContext* context, const moepool::v1::NcclSetupRequest* request,
                         moepool::v1::NcclSetupResponse* response) override;
  grpc::Status Forward(grpc::ServerContext* context,
                       grpc::ServerReaderWriter<moepool::v1::ForwardResponse,
                                                moepool::v1::ForwardRequest>* stream) override;

 private:
  grpc::Status CheckToken(const grpc::ServerContext& context) const;

  WorkerCore* core_;
  ExpertServiceOptions options_;
};

struct WorkerServerOptions {
  std::string listen_address;  // "host:port"; port 0 picks a free port (see WorkerServer::port)
  ExpertServiceOptions service;
  // gRPC's limit on one received or sent message (default 64 MiB instead of gRPC's 4 MiB).
  int max_message_bytes = 64 << 20;
  // TLS: PEM contents (not paths). With a certificate and key the server speaks TLS only; with a
  // client CA as well it requires every client to present a certificate signed by that CA.
  std::string tls_cert_pem;
  std::string tls_key_pem;
  std::string tls_client_ca_pem;
};

// A started gRPC server hosting ExpertServiceImpl and grpc.health.v1 (SERVING while up).
class WorkerServer {
 public:
  // Builds and starts the server. Errors: INVALID_ARGUMENT for inconsistent TLS options or a bad
  // message limit, UNAVAILABLE when the address cannot be bound.
  static absl::StatusOr<std::unique_ptr<WorkerServer>> Start(WorkerCore* core,
                                                             const WorkerServerOptions& options);
  ~WorkerServer();  // Shutdown(0) and Wait()
  WorkerServer(const WorkerServer&) = delete;
  WorkerServer& operator=(const WorkerServer&) = delete;

  int port() const { return port_; }  // the bound port
  bool tls() const { return tls_; }
  // Stops accepting calls; calls still running after `grace_seconds` are cancelled (open Forward
  // streams end with CANCELLED). Idempotent; thread-safe.
  void Shutdown(double grace_seconds);
  // Blocks until the server has shut down.
  void Wait();

 private:
  WorkerServer() = default;

  std::unique_ptr<ExpertServiceImpl> service_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
  bool tls_ = false;
};

}  // namespace moepool::worker

#endif  // MOEPOOL_WORKER_EXPERT_SERVICE_H_
