#include "coordinator/cluster_service.h"

#include <atomic>
#include <chrono>

#include "absl/strings/str_cat.h"
#include "moepool/v1/cluster_service.grpc.pb.h"

namespace moepool {
namespace {

namespace pb = moepool::v1;

grpc::Status ToGrpc(const absl::Status& s) {
  if (s.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), std::string(s.message()));
}

bool SameBytes(const std::string& a, const std::string& b) {
  if (a.size() != b.size()) return false;
  unsigned char diff = 0;
  for (size_t i = 0; i < a.size(); ++i) diff |= static_cast<unsigned char>(a[i] ^ b[i]);
  return diff == 0;
}

// "ipv4:10.0.0.2:5123" / "ipv6:[fd00::2]:5123" -> "10.0.0.2" / "[fd00::2]".
std::string PeerHost(const std::string& peer) {
  std::string rest = peer;
  const size_t scheme = rest.find(':');
  if (scheme != std::string::npos) rest = rest.substr(scheme + 1);
  const size_t colon = rest.rfind(':');
  return colon == std::string::npos ? rest : rest.substr(0, colon);
}

}  // namespace

class ClusterServer::Service final : public pb::ClusterService::Service {
 public:
  Service(ClusterControl* control, std::string token)
      : control_(control), token_(std::move(token)) {}

  grpc::Status Join(grpc::ServerContext* context, const pb::JoinRequest* request,
                    pb::JoinResponse* response) override {
    if (grpc::Status auth = CheckToken(*context); !auth.ok()) return auth;
    absl::StatusOr<pb::JoinResponse> r = control_->Join(*request, PeerHost(context->peer()));
    if (!r.ok()) return ToGrpc(r.status());
    *response = *std::move(r);
    return grpc::Status::OK;
  }

  grpc::Status Fetch(grpc::ServerContext* context, const pb::FetchRequest* request,
                     grpc::ServerWriter<pb::FetchChunk>* writer) override {
    if (grpc::Status auth = CheckToken(*context); !auth.ok()) return auth;
    return ToGrpc(control_->Fetch(*request, [&](const pb::FetchChunk& chunk) {
      return !context->IsCancelled() && writer->Write(chunk);
    }));
  }

  grpc::Status Ready(grpc::ServerContext* context, const pb::ReadyRequest* request,
                     pb::ReadyResponse* response) override {
    if (grpc::Status auth = CheckToken(*context); !auth.ok()) return auth;
    absl::StatusOr<pb::ReadyResponse> r = control_->Ready(*request);
    if (!r.ok()) return ToGrpc(r.status());
    *response = *std::move(r);
    return grpc::Status::OK;
  }

  grpc::Status Watch(grpc::ServerContext* context, const pb::WatchRequest* request,
                     grpc::ServerWriter<pb::WatchEvent>* writer) override {
    if (grpc::Status auth = CheckToken(*context); !auth.ok()) return auth;
    return ToGrpc(control_->Watch(
        *request, [&](const pb::WatchEvent& event) { return writer->Write(event); },
        [&] { return context->IsCancelled() || stopping_.load(); }));
  }

  grpc::Status Leave(grpc::ServerContext* context, const pb::LeaveRequest* request,
                     pb::LeaveResponse*) override {
    if (grpc::Status auth = CheckToken(*context); !auth.ok()) return auth;
    const std::string reason =
        request->reason().empty() ? "the worker asked to leave" : request->reason().substr(0, 200);
    return ToGrpc(control_->Drain(request->worker_id(), reason));
  }

  void Stop() { stopping_.store(true); }

 private:
  grpc::Status CheckToken(const grpc::ServerContext& context) const {
    if (token_.empty()) return grpc::Status::OK;
    const auto& metadata = context.client_metadata();
    const auto it = metadata.find("authorization");
    if (it == metadata.end()) {
      return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                          "this coordinator requires the cluster token (--cluster-token-file)");
    }
    if (!SameBytes(std::string(it->second.data(), it->second.size()), "Bearer " + token_)) {
      return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, "wrong cluster token");
    }
    return grpc::Status::OK;
  }

  ClusterControl* const control_;
  const std::string token_;
  std::atomic<bool> stopping_{false};
};

absl::StatusOr<std::unique_ptr<ClusterServer>> ClusterServer::Start(
    ClusterControl* control, const ClusterServerOptions& options) {
  if (options.tls_cert_pem.empty() != options.tls_key_pem.empty()) {
    return absl::InvalidArgumentError("--cluster-tls-cert and --cluster-tls-key go together");
  }
  auto server = std::unique_ptr<ClusterServer>(new ClusterServer);
  server->service_ = std::make_unique<Service>(control, options.cluster_token);
  std::shared_ptr<grpc::ServerCredentials> creds = grpc::InsecureServerCredentials();
  if (!options.tls_cert_pem.empty()) {
    grpc::SslServerCredentialsOptions ssl;
    ssl.pem_key_cert_pairs.push_back({options.tls_key_pem, options.tls_cert_pem});
    creds = grpc::SslServerCredentials(ssl);
    server->tls_ = true;
  }
  grpc::ServerBuilder builder;
  builder.AddListeningPort(options.listen_address, creds, &server->port_);
  builder.RegisterService(server->service_.get());
  builder.SetMaxReceiveMessageSize(1 << 20);  // requests are small
  builder.SetMaxSendMessageSize(8 << 20);
  server->server_ = builder.BuildAndStart();
  if (server->server_ == nullptr || server->port_ == 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot listen on ", options.listen_address, " (--cluster-listen)"));
  }
  return server;
}

ClusterServer::~ClusterServer() { Shutdown(); }

void ClusterServer::Shutdown(double grace_s) {
  if (server_ == nullptr) return;
  service_->Stop();
  server_->Shutdown(std::chrono::system_clock::now() +
                    std::chrono::milliseconds(static_cast<int64_t>(grace_s * 1000)));
  server_->Wait();
  server_.reset();
}

}  // namespace moepool
