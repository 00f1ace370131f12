#include "worker/expert_service.h"

#include <algorithm>
#include <chrono>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/ext/health_check_service_server_builder_option.h"
#include "worker/forward_call.h"
#include "worker/server_call.h"

namespace moepool::worker {
namespace {

namespace pb = ::moepool::v1;
namespace health = ::grpc::health::v1;

constexpr char kBearerPrefix[] = "Bearer ";

grpc::Status ToGrpc(const absl::Status& s) {
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), std::string(s.message()));
}

}  // namespace

bool ConstantTimeEquals(const std::string& a, const std::string& b) {
  // Walk b's length whatever a holds; fold every difference (and the length difference) in.
  volatile unsigned char diff = a.size() == b.size() ? 0 : 1;
  for (size_t i = 0; i < b.size(); ++i) {
    const unsigned char x = i < a.size() ? static_cast<unsigned char>(a[i]) : 0;
    diff = diff | (x ^ static_cast<unsigned char>(b[i]));
  }
  return diff == 0;
}

// Everything the calls of one server share; lives as long as the server.
struct ServerState {
  WorkerCore* core = nullptr;
  ExpertServiceOptions options;
  pb::ExpertService::AsyncService service;
  health::Health::AsyncService health;
  ForwardCallEnv forward;
  OpGate gate;
  int data_port = 0;  // the data channel's port; 0: none
};

namespace {

grpc::Status CheckToken(const std::string& token, const grpc::ServerContext& context) {
  if (token.empty()) return grpc::Status::OK;
  const auto& metadata = context.client_metadata();
  const auto it = metadata.find("authorization");
  if (it == metadata.end()) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                        "this worker requires the cluster token (metadata 'authorization: Bearer "
                        "<token>')");
  }
  const std::string value(it->second.data(), it->second.size());
  const std::string expected = std::string(kBearerPrefix) + token;
  if (!ConstantTimeEquals(value, expected)) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, "wrong cluster token");
  }
  return grpc::Status::OK;
}

grpc::Status FillDescribe(const ServerState& state, pb::DescribeResponse* response) {
  absl::StatusOr<WorkerDescription> d = state.core->Describe();
  if (!d.ok()) return ToGrpc(d.status());
  *response = DescribeResponseOf(*d);
  if (state.data_port > 0) {
    response->add_transports(wire::kTcpTransportName);
    response->set_data_port(state.data_port);
  }
  return grpc::Status::OK;
}

grpc::Status JoinNccl(NcclSessions* nccl, const pb::NcclSetupRequest& request,
                      pb::NcclSetupResponse* response) {
  if (nccl == nullptr) {
    return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                        "this worker does not offer NCCL (start it with --transport nccl)");
  }
  // The coordinator has dropped its end of the session this one replaces.
  if (request.replaces_session() != 0) nccl->Close(request.replaces_session());
  absl::StatusOr<uint64_t> session = nccl->Join(request.unique_id(), request.timeout_s());
  if (!session.ok()) return ToGrpc(session.status());
  response->set_session(*session);
  response->set_device(nccl->device());
  return grpc::Status::OK;
}

// The serving status the health service reports for `service`.
health::HealthCheckResponse::ServingStatus HealthOf(const std::string& service) {
  return service.empty() || service == pb::ExpertService::service_full_name()
             ? health::HealthCheckResponse::SERVING
             : health::HealthCheckResponse::SERVICE_UNKNOWN;
}

// A unary call (Describe or Health/Check): accepted, answered, finished.
template <typename Request, typename Response>
class UnaryCall final : public ServerCall {
 public:
  using Answer = grpc::Status (*)(ServerState* state, const grpc::ServerContext& context,
                                  const Request& request, Response* response);
  using RequestFn = void (*)(ServerState* state, grpc::ServerContext* context, Request* request,
                             grpc::ServerAsyncResponseWriter<Response>* writer,
                             grpc::ServerCompletionQueue* cq, void* tag);

  static void Listen(ServerState* state, RequestFn request_fn, Answer answer) {
    auto* call = new UnaryCall(state, request_fn, answer);
    if (!state->gate.Run([&] {
          request_fn(state, &call->context_, &call->request_, &call->writer_, state->forward.cq,
                     &call->accepted_);
        })) {
      delete call;
    }
  }

  void OnEvent(int event, bool ok) override {
    if (event == 1 || !ok) {  // finished, or not accepted (shutting down)
      delete this;
      return;
    }
    Listen(state_, request_fn_, answer_);
    Response response;
    const grpc::Status s = answer_(state_, context_, request_, &response);
    const bool started = state_->gate.Run([&] {
      if (s.ok()) {
        writer_.Finish(response, s, &finished_);
      } else {
        writer_.FinishWithError(s, &finished_);
      }
    });
    if (!started) delete this;
  }

 private:
  UnaryCall(ServerState* state, RequestFn request_fn, Answer answer)
      : state_(state), request_fn_(request_fn), answer_(answer), writer_(&context_) {}

  ServerState* const state_;
  const RequestFn request_fn_;
  const Answer answer_;
  CallTag accepted_{this, 0};
  CallTag finished_{this, 1};
  grpc::ServerContext context_;
  Request request_;
  grpc::ServerAsyncResponseWriter<Response> writer_;
};

using DescribeCall = UnaryCall<pb::DescribeRequest, pb::DescribeResponse>;
using HealthCheckCall = UnaryCall<health::HealthCheckRequest, health::HealthCheckResponse>;

void ListenDescribe(ServerState* state) {
  DescribeCall::Listen(
      state,
      [](ServerState* st, grpc::ServerContext* context, pb::DescribeRequest* request,
         grpc::ServerAsyncResponseWriter<pb::DescribeResponse>* writer,
         grpc::ServerCompletionQueue* cq,
         void* tag) { st->service.RequestDescribe(context, request, writer, cq, cq, tag); },
      [](ServerState* st, const grpc::ServerContext& context, const pb::DescribeRequest&,
         pb::DescribeResponse* response) {
        grpc::Status s = CheckToken(st->options.cluster_token, context);
        if (s.ok()) s = FillDescribe(*st, response);
        if (s.ok() && st->options.nccl != nullptr) response->add_transports("nccl");
        return s;
      });
}

using SetupNcclCall = UnaryCall<pb::NcclSetupRequest, pb::NcclSetupResponse>;

void ListenSetupNccl(ServerState* state) {
  SetupNcclCall::Listen(
      state,
      [](ServerState* st, grpc::ServerContext* context, pb::NcclSetupRequest* request,
         grpc::ServerAsyncResponseWriter<pb::NcclSetupResponse>* writer,
         grpc::ServerCompletionQueue* cq,
         void* tag) { st->service.RequestSetupNccl(context, request, writer, cq, cq, tag); },
      [](ServerState* st, const grpc::ServerContext& context, const pb::NcclSetupRequest& request,
         pb::NcclSetupResponse* response) {
        grpc::Status s = CheckToken(st->options.cluster_token, context);
        if (s.ok()) s = JoinNccl(st->options.nccl.get(), request, response);
        return s;
      });
}

void ListenHealthCheck(ServerState* state) {
  HealthCheckCall::Listen(
      state,
      [](ServerState* st, grpc::ServerContext* context, health::HealthCheckRequest* request,
         grpc::ServerAsyncResponseWriter<health::HealthCheckResponse>* writer,
         grpc::ServerCompletionQueue* cq,
         void* tag) { st->health.RequestCheck(context, request, writer, cq, cq, tag); },
      [](ServerState*, const grpc::ServerContext&, const health::HealthCheckRequest& request,
         health::HealthCheckResponse* response) {
        const auto status = HealthOf(request.service());
        if (status == health::HealthCheckResponse::SERVICE_UNKNOWN) {
          return grpc::Status(grpc::StatusCode::NOT_FOUND,
                              absl::StrCat("unknown service '", request.service(), "'"));
        }
        response->set_status(status);
        return grpc::Status::OK;
      });
}

// Health/Watch: sends the status once (it does not change while the server is up) and keeps the
// stream open until the client cancels it or the server shuts down.
class HealthWatchCall final : public ServerCall {
 public:
  static void Listen(ServerState* state) {
    auto* call = new HealthWatchCall(state);
    call->context_.AsyncNotifyWhenDone(&call->done_);
    state->health.RequestWatch(&call->context_, &call->request_, &call->writer_, state->forward.cq,
                               state->forward.cq, &call->accepted_);
  }

  void OnEvent(int event, bool ok) override {
    switch (event) {
      case kAccepted:
        if (!ok) {  // shutting down; the done tag never comes for a call that never started
          delete this;
          return;
        }
        Listen(state_);
        response_.set_status(HealthOf(request_.service()));
        // If the queue is shut down already, the done event still comes (the call started).
        writing_ = state_->gate.Run([&] { writer_.Write(response_, &written_); });
        return;
      case kWritten:
        writing_ = false;
        break;
      default:  // kDone: cancelled by the client or by the server's shutdown
        done_seen_ = true;
        break;
    }
    if (done_seen_ && !writing_) delete this;
  }

 private:
  enum Event { kAccepted, kWritten, kDone };
  explicit HealthWatchCall(ServerState* state) : state_(state), writer_(&context_) {}

  ServerState* const state_;
  CallTag accepted_{this, kAccepted};
  CallTag written_{this, kWritten};
  CallTag done_{this, kDone};
  grpc::ServerContext context_;
  health::HealthCheckRequest request_;
  health::HealthCheckResponse response_;
  grpc::ServerAsyncWriter<health::HealthCheckResponse> writer_;
  bool writing_ = false;
  bool done_seen_ = false;
};

}  // namespace

absl::StatusOr<std::unique_ptr<WorkerServer>> WorkerServer::Start(
    WorkerCore* core, const WorkerServerOptions& options) {
  if (options.max_message_bytes < (1 << 16)) {
    return absl::InvalidArgumentError(
        absl::StrCat("max message size ", options.max_message_bytes, " bytes is below 64 KiB"));
  }
  if (options.tls_cert_pem.empty() != options.tls_key_pem.empty()) {
    return absl::InvalidArgumentError("TLS needs both a certificate and its private key");
  }
  if (!options.tls_client_ca_pem.empty() && options.tls_cert_pem.empty()) {
    return absl::InvalidArgumentError(
        "a client CA (mutual TLS) needs the server's own certificate and key");
  }
  if (options.service.response_chunk_bytes == 0) {
    return absl::InvalidArgumentError("response chunk size must be positive");
  }
  auto server = std::unique_ptr<WorkerServer>(new WorkerServer);
  ServerState* state = server->state_.get();
  state->core = core;
  state->options = options.service;
  std::shared_ptr<grpc::ServerCredentials> credentials;
  if (!options.tls_cert_pem.empty()) {
    grpc::SslServerCredentialsOptions ssl(
        options.tls_client_ca_pem.empty()
            ? GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE
            : GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
    ssl.pem_root_certs = options.tls_client_ca_pem;
    ssl.pem_key_cert_pairs.push_back({options.tls_key_pem, options.tls_cert_pem});
    credentials = grpc::SslServerCredentials(ssl);
    server->tls_ = true;
  } else {
    credentials = grpc::InsecureServerCredentials();
  }
  grpc::ServerBuilder builder;
  builder.AddListeningPort(options.listen_address, credentials, &server->port_);
  builder.SetMaxReceiveMessageSize(options.max_message_bytes);
  builder.SetMaxSendMessageSize(options.max_message_bytes);
  // No HTTP/2 bandwidth-delay probing: it adds PING frames (and wake-ups) to the exchanges.
  builder.AddChannelArgument(GRPC_ARG_HTTP2_BDP_PROBE, 0);
  // A large flow-control window, so that WINDOW_UPDATE frames (each a write and a wake-up of the
  // peer) are rare instead of following every few messages.
  builder.AddChannelArgument(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, 8 << 20);
  // No default (callback-based) health service: its threads would poll too and take part in
  // every message's wake-ups. This server serves grpc.health.v1 itself, on its own queue.
  builder.SetOption(std::make_unique<grpc::HealthCheckServiceServerBuilderOption>(nullptr));
  builder.RegisterService(&state->service);
  builder.RegisterService(&state->health);
  server->cq_ = builder.AddCompletionQueue(/*is_frequently_polled=*/true);
  server->server_ = builder.BuildAndStart();
  if (server->server_ == nullptr || server->port_ == 0) {
    server->server_.reset();
    state->gate.Close(server->cq_.get());
    void* tag = nullptr;
    bool ok = false;
    while (server->cq_->Next(&tag, &ok)) {
    }
    return absl::UnavailableError(absl::StrCat("cannot listen on '", options.listen_address,
                                               "' (address in use, or not HOST:PORT?)"));
  }
  if (options.data_port >= 0) {
    wire::DataListenerOptions data;
    data.host = wire::HostOfAddress(options.listen_address);
    data.port = options.data_port;
    data.token = options.service.cluster_token;
    data.max_frame_bytes = static_cast<size_t>(options.max_message_bytes);
    data.spin_max_us = options.data_spin_us;
    data.tls_cert_pem = options.tls_cert_pem;
    data.tls_key_pem = options.tls_key_pem;
    data.tls_client_ca_pem = options.tls_client_ca_pem;
    absl::StatusOr<std::unique_ptr<DataServer>> started =
        DataServer::Start(core, data, options.service.response_chunk_bytes);
    if (!started.ok()) {
      server->server_->Shutdown();
      state->gate.Close(server->cq_.get());
      void* tag = nullptr;
      bool ok = false;
      while (server->cq_->Next(&tag, &ok)) {
      }
      server->server_.reset();
      return started.status();
    }
    server->data_ = *std::move(started);
    state->data_port = server->data_->port();
  }
  state->forward.core = core;
  state->forward.response_chunk_bytes = options.service.response_chunk_bytes;
  state->forward.check_token = [state](const grpc::ServerContext& context) {
    return CheckToken(state->options.cluster_token, context);
  };
  state->forward.service = &state->service;
  state->forward.cq = server->cq_.get();
  state->forward.gate = &state->gate;
  state->forward.nccl = state->options.nccl.get();
  ForwardCall::Listen(&state->forward);
  ListenDescribe(state);
  ListenSetupNccl(state);
  ListenHealthCheck(state);
  HealthWatchCall::Listen(state);
  server->thread_ = std::thread([s = server.get()] { s->Serve(); });
  return server;
}

WorkerServer::WorkerServer() : state_(std::make_unique<ServerState>()) {}

WorkerServer::~WorkerServer() {
  if (server_ != nullptr) {
    Shutdown(0);
    Wait();
  }
  server_.reset();  // before the completion queue
}

void WorkerServer::Serve() {
  void* tag = nullptr;
  bool ok = false;
  while (cq_->Next(&tag, &ok)) DispatchEvent(tag, ok);
}

void WorkerServer::Shutdown(double grace_seconds) {
  std::lock_guard<std::mutex> lock(shutdown_mu_);
  // Returns once every call has ended (calls still running at the deadline are cancelled); the
  // queue thread keeps serving meanwhile, so only then may the queue be shut down.
  if (data_ != nullptr) data_->Stop();
  server_->Shutdown(std::chrono::system_clock::now() +
                    std::chrono::microseconds(static_cast<int64_t>(grace_seconds * 1e6)));
  state_->gate.Close(cq_.get());
}

void WorkerServer::Wait() {
  server_->Wait();
  std::lock_guard<std::mutex> lock(shutdown_mu_);  // a Shutdown in progress completes first
  if (thread_.joinable()) thread_.join();
}

pb::DescribeResponse DescribeResponseOf(const WorkerDescription& d) {
  pb::DescribeResponse response;
  response.set_protocol_version(pb::PROTOCOL_VERSION_CURRENT);
  pb::ModelIdentity* model = response.mutable_model();
  model->set_fingerprint(d.fingerprint);
  model->set_name(d.model_name);
  model->set_file_bytes(d.file_bytes);
  pb::Hyperparameters* h = response.mutable_hparams();
  h->set_n_embd(d.n_embd);
  h->set_n_ff(d.n_ff);
  h->set_n_layer(d.n_layer);
  h->set_n_expert(d.n_expert);
  h->set_n_expert_used(d.n_expert_used);
  response.mutable_experts()->mutable_packed()->Add(d.experts.begin(), d.experts.end());
  response.set_device(d.device);
  response.set_expert_bytes(d.expert_bytes);
  response.set_memory_used_bytes(d.memory_used_bytes);
  response.set_memory_free_bytes(d.memory_free_bytes);
  response.set_worker_id(d.worker_id);
  response.set_threads(d.threads);
  return response;
}

}  // namespace moepool::worker
