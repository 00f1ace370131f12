// The gRPC front of ClusterControl (`moepool serve --cluster-listen HOST:PORT`): checks the
// cluster token on every call, translates messages and hands them to ClusterControl.
//
// Threading: the server runs its own threads; Shutdown (also the destructor) from the owner.
// Errors: Start returns UNAVAILABLE when the address cannot be bound, INVALID_ARGUMENT for a
// half-given TLS pair.
#ifndef MOEPOOL_COORDINATOR_CLUSTER_SERVICE_H_
#define MOEPOOL_COORDINATOR_CLUSTER_SERVICE_H_

#include <grpcpp/grpcpp.h>

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "coordinator/cluster_control.h"

namespace moepool {

struct ClusterServerOptions {
  std::string listen_address;  // host:port; port 0 picks one (see port())
  std::string cluster_token;   // required as `authorization: Bearer <token>` when not empty
  std::string tls_cert_pem;    // with tls_key_pem: TLS only
  std::string tls_key_pem;
};

class ClusterServer {
 public:
  // `control` (not owned) must outlive the server.
  static absl::StatusOr<std::unique_ptr<ClusterServer>> Start(ClusterControl* control,
                                                              const ClusterServerOptions& options);
  ~ClusterServer();
  int port() const { return port_; }
  bool tls() const { return tls_; }
  // Ends open calls (Watch streams) within `grace_s` and stops. Idempotent.
  void Shutdown(double grace_s = 1.0);

 private:
  class Service;
  ClusterServer() = default;
  std::unique_ptr<Service> service_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
  bool tls_ = false;
};

}  // namespace moepool

#endif  // MOEPOOL_COORDINATOR_CLUSTER_SERVICE_H_
