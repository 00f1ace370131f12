// The gRPC face of a worker: moepool.v1.ExpertService and grpc.health.v1.Health over a
// WorkerCore, and the server that hosts them (see docs/protocol.md for the wire protocol).
//
// The calls only translate: protobuf <-> WorkerCore, chunk reassembly of requests, chunking of
// responses, and the cluster-token check. A refused request is answered on the same stream with
// error_code / error_message set, and the stream keeps serving.
//
// Auth: with a non-empty cluster token every Describe and Forward call must carry the metadata
// `authorization: Bearer <token>` (compared in constant time), else it fails with
// UNAUTHENTICATED. The health service (grpc.health.v1: Check and Watch; SERVING for "" and
// "moepool.v1.ExpertService") is not token-protected, so load balancers and orchestrators can
// probe it.
//
// Threading: the server uses gRPC's asynchronous API with one completion queue and one thread
// that polls it and runs every call's work, computations included (worker/forward_call.h): a
// decode step's request wakes exactly that thread, which computes and answers without handing
// the message to another thread. WorkerCore's own thread pool (--threads) does the math.
// Ownership: the server borrows the WorkerCore, which must outlive it.
#ifndef MOEPOOL_WORKER_EXPERT_SERVICE_H_
#define MOEPOOL_WORKER_EXPERT_SERVICE_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "grpcpp/grpcpp.h"
#include "moepool/v1/expert_service.grpc.pb.h"
#include "worker/data_server.h"
#include "worker/nccl_sessions.h"
#include "worker/worker_core.h"

namespace moepool::worker {

struct ExpertServiceOptions {
  std::string cluster_token;  // empty: no token required
  // Largest payload of result rows in one ForwardResponse message (at least one row is always
  // sent per message); the whole result is split into consecutive-row chunks of this size.
  size_t response_chunk_bytes = size_t{4} << 20;
  // Non-null (--transport nccl, NCCL usable here): Describe lists "nccl" in transports,
  // SetupNccl joins communicators (blocking the queue thread for up to the request's timeout),
  // and Forward requests naming a session get their rows over it.
  std::shared_ptr<NcclSessions> nccl;
};

// True if a and b are equal; the time taken depends only on the lengths, not on where they
// differ.
bool ConstantTimeEquals(const std::string& a, const std::string& b);

// The Describe answer for a worker's description (protocol version: the current one).
moepool::v1::DescribeResponse DescribeResponseOf(const WorkerDescription& description);

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
  // The data channel (wire/data_channel.h) on the --listen host: -1 none, 0 a free port, else
  // that port. Same token and TLS material as the gRPC port; frames up to max_message_bytes.
  int data_port = 0;
  int64_t data_spin_us = 2000;  // how long a data stream polls for the next request
};

struct ServerState;  // worker/expert_service.cc

// A started gRPC server hosting moepool.v1.ExpertService and grpc.health.v1 (SERVING while up).
class WorkerServer {
 public:
  // Builds and starts the server. Errors: INVALID_ARGUMENT for inconsistent TLS options or a bad
  // message limit, UNAVAILABLE when the address cannot be bound.
  static absl::StatusOr<std::unique_ptr<WorkerServer>> Start(WorkerCore* core,
                                                             const WorkerServerOptions& options);
  ~WorkerServer();  // Shutdown(0) and Wait()
  WorkerServer(const WorkerServer&) = delete;
  WorkerServer& operator=(const WorkerServer&) = delete;

  int port() const { return port_; }                                      // the bound port
  int data_port() const { return data_ != nullptr ? data_->port() : 0; }  // 0: none
  const DataServer* data_server() const { return data_.get(); }
  bool tls() const { return tls_; }
  // Stops accepting calls; calls still running after `grace_seconds` are cancelled (open Forward
  // streams end with CANCELLED). Idempotent; thread-safe.
  void Shutdown(double grace_seconds);
  // Blocks until the server has shut down (Shutdown called and every call ended).
  void Wait();

 private:
  WorkerServer();
  void Serve();  // the completion-queue thread

  std::unique_ptr<ServerState> state_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<grpc::ServerCompletionQueue> cq_;
  std::unique_ptr<DataServer> data_;
  int port_ = 0;
  bool tls_ = false;
  std::mutex shutdown_mu_;  // serialises Shutdown and Wait
  std::thread thread_;
};

}  // namespace moepool::worker

#endif  // MOEPOOL_WORKER_EXPERT_SERVICE_H_
