#include "worker/expert_service.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"

namespace moepool::worker {
namespace {

namespace pb = ::moepool::v1;

static_assert(static_cast<int>(RowDType::kF32) == pb::DTYPE_F32 &&
                  static_cast<int>(RowDType::kF16) == pb::DTYPE_F16 &&
                  static_cast<int>(RowDType::kBf16) == pb::DTYPE_BF16,
              "RowDType numbering must match moepool.v1.DType");

constexpr char kBearerPrefix[] = "Bearer ";

grpc::Status ToGrpc(const absl::Status& s) {
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), std::string(s.message()));
}

// A request being reassembled from its chunks.
struct Assembly {
  bool active = false;
  pb::ForwardRequest header;  // first chunk's fields, without its payload
  int64_t next_row = 0;
  std::string rows;
  std::vector<int32_t> expert;
  std::vector<float> weight;
};

bool IsLastChunk(const pb::ForwardRequest& c) {
  return static_cast<int64_t>(c.row_offset()) + c.n_rows() >= c.total_rows();
}

// Checks a chunk on its own: the sizes that make its rows placeable. Semantic checks (experts
// held, weights finite, ...) are WorkerCore's, on the whole request.
absl::Status CheckChunk(const pb::ForwardRequest& c, const WorkerCore& core) {
  const size_t elem = RowDTypeSize(static_cast<RowDType>(c.dtype()));
  if (elem == 0) {
    return absl::InvalidArgumentError(absl::StrCat("unknown dtype ", c.dtype()));
  }
  if (c.n_embd() != core.config().n_embd) {
    return absl::InvalidArgumentError(absl::StrCat(
        "n_embd ", c.n_embd(), " != the model's embedding length ", core.config().n_embd));
  }
  if (c.total_rows() < 0 || c.total_rows() > core.max_rows()) {
    return absl::InvalidArgumentError(
        absl::StrCat("total_rows ", c.total_rows(), " is outside [0, ", core.max_rows(), "]"));
  }
  if (c.k() < 1 || c.k() > core.config().n_expert) {
    return absl::InvalidArgumentError(
        absl::StrCat("k ", c.k(), " is outside [1, ", core.config().n_expert, "]"));
  }
  const int64_t end = static_cast<int64_t>(c.row_offset()) + c.n_rows();
  if (c.row_offset() < 0 || c.n_rows() < 0 || end > c.total_rows() ||
      (c.n_rows() == 0 && c.total_rows() > 0)) {
    return absl::InvalidArgumentError(absl::StrCat("chunk rows [", c.row_offset(), ", ", end,
                                                   ") do not fit total_rows ", c.total_rows()));
  }
  const uint64_t want_bytes = static_cast<uint64_t>(c.n_rows()) * c.n_embd() * elem;
  if (c.nccl_session() != 0) {
    if (c.row_offset() != 0 || c.n_rows() != c.total_rows() || !c.rows().empty()) {
      return absl::InvalidArgumentError(
          "a request with its rows on NCCL is one message without rows (row_offset 0, n_rows = "
          "total_rows)");
    }
  } else if (c.rows().size() != want_bytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("chunk rows hold ", c.rows().size(), " bytes, expected ", want_bytes));
  }
  const int64_t pairs = static_cast<int64_t>(c.n_rows()) * c.k();
  if (c.expert_size() != pairs || c.weight_size() != pairs) {
    return absl::InvalidArgumentError(absl::StrCat("chunk has ", c.expert_size(),
                                                   " expert ids and ", c.weight_size(),
                                                   " weights, expected n_rows x k = ", pairs));
  }
  return absl::OkStatus();
}

bool SameRequest(const pb::ForwardRequest& a, const pb::ForwardRequest& b) {
  return a.step_id() == b.step_id() && a.layer() == b.layer() && a.dtype() == b.dtype() &&
         a.n_embd() == b.n_embd() && a.total_rows() == b.total_rows() && a.k() == b.k();
}

pb::ForwardResponse ResponseHeader(const pb::ForwardRequest& request) {
  pb::ForwardResponse r;
  r.set_step_id(request.step_id());
  r.set_layer(request.layer());
  r.set_dtype(request.dtype());
  r.set_total_rows(request.total_rows());
  return r;
}

pb::ForwardResponse ErrorResponse(const pb::ForwardRequest& request, const absl::Status& error) {
  pb::ForwardResponse r = ResponseHeader(request);
  r.set_error_code(static_cast<int>(error.code()));
  r.set_error_message(std::string(error.message()));
  return r;
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

ExpertServiceImpl::ExpertServiceImpl(WorkerCore* core, ExpertServiceOptions options)
    : core_(core), options_(std::move(options)) {}

grpc::Status ExpertServiceImpl::CheckToken(const grpc::ServerContext& context) const {
  if (options_.cluster_token.empty()) return grpc::Status::OK;
  const auto& metadata = context.client_metadata();
  const auto it = metadata.find("authorization");
  if (it == metadata.end()) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                        "this worker requires the cluster token (metadata 'authorization: Bearer "
                        "<token>')");
  }
  const std::string value(it->second.data(), it->second.size());
  const std::string expected = std::string(kBearerPrefix) + options_.cluster_token;
  if (!ConstantTimeEquals(value, expected)) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, "wrong cluster token");
  }
  return grpc::Status::OK;
}

grpc::Status ExpertServiceImpl::Describe(grpc::ServerContext* context,
                                         const pb::DescribeRequest* /*request*/,
                                         pb::DescribeResponse* response) {
  if (grpc::Status auth = CheckToken(*context); !auth.ok()) return auth;
  absl::StatusOr<WorkerDescription> d = core_->Describe();
  if (!d.ok()) return ToGrpc(d.status());
  response->set_protocol_version(pb::PROTOCOL_VERSION_CURRENT);
  pb::ModelIdentity* model = response->mutable_model();
  model->set_fingerprint(d->fingerprint);
  model->set_name(d->model_name);
  model->set_file_bytes(d->file_bytes);
  pb::Hyperparameters* h = response->mutable_hparams();
  h->set_n_embd(d->n_embd);
  h->set_n_ff(d->n_ff);
  h->set_n_layer(d->n_layer);
  h->set_n_expert(d->n_expert);
  h->set_n_expert_used(d->n_expert_used);
  response->mutable_experts()->mutable_packed()->Add(d->experts.begin(), d->experts.end());
  response->set_device(d->device);
  response->set_expert_bytes(d->expert_bytes);
  response->set_memory_used_bytes(d->memory_used_bytes);
  response->set_memory_free_bytes(d->memory_free_bytes);
  response->set_worker_id(d->worker_id);
  response->set_threads(d->threads);
  if (options_.nccl != nullptr) response->add_transports("nccl");
  return grpc::Status::OK;
}

grpc::Status ExpertServiceImpl::SetupNccl(grpc::ServerContext* context,
                                          const pb::NcclSetupRequest* request,
                                          pb::NcclSetupResponse* response) {
  if (grpc::Status auth = CheckToken(*context); !auth.ok()) return auth;
  if (options_.nccl == nullptr) {
    return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                        "this worker does not offer NCCL (start it with --transport nccl)");
  }
  absl::StatusOr<uint64_t> session =
      options_.nccl->Join(request->unique_id(), request->timeout_s());
  if (!session.ok()) return ToGrpc(session.status());
  response->set_session(*session);
  response->set_device(options_.nccl->device());
  return grpc::Status::OK;
}

grpc::Status ExpertServiceImpl::Forward(
    grpc::ServerContext* context,
    grpc::ServerReaderWriter<pb::ForwardResponse, pb::ForwardRequest>* stream) {
  if (grpc::Status auth = CheckToken(*context); !auth.ok()) return auth;
  Assembly pending;
  // After an error in a chunked request, its remaining chunks (same step, row_offset > 0) are
  // dropped without further responses.
  bool discarding = false;
  uint64_t discarded_step = 0;
  std::string result;
  pb::ForwardRequest chunk;
  bool stream_ok = true;

  auto refuse = [&](const pb::ForwardRequest& request, const absl::Status& error) {
    stream_ok = stream_ok && stream->Write(ErrorResponse(request, error));
  };
  // Computes a complete request and writes its result in chunks.
  auto answer = [&](const ComputeRequest& compute, const pb::ForwardRequest& header) {
    const auto start = std::chrono::steady_clock::now();
    const absl::Status s = core_->Compute(compute, &result);
    const auto micros = std::chrono::duration_cast<std::chrono::microseconds>(
                            std::chrono::steady_clock::now() - start)
                            .count();
    if (!s.ok()) return refuse(header, s);
    const size_t row_bytes =
        static_cast<size_t>(compute.n_embd) * RowDTypeSize(static_cast<RowDType>(header.dtype()));
    const int64_t rows_per_message =
        std::max<int64_t>(1, static_cast<int64_t>(options_.response_chunk_bytes / row_bytes));
    int64_t offset = 0;
    do {
      const int64_t n = std::min(rows_per_message, compute.n_rows - offset);
      pb::ForwardResponse r = ResponseHeader(header);
      r.set_row_offset(static_cast<int32_t>(offset));
      r.set_n_rows(static_cast<int32_t>(n));
      r.set_rows(result.data() + offset * row_bytes, static_cast<size_t>(n) * row_bytes);
      r.set_compute_micros(static_cast<uint64_t>(micros));
      stream_ok = stream_ok && stream->Write(r);
      offset += n;
    } while (stream_ok && offset < compute.n_rows);
  };
  auto compute_request = [](const pb::ForwardRequest& h, const void* rows, size_t rows_bytes,
                            const int32_t* expert, const float* weight, size_t pairs) {
    ComputeRequest c;
    c.layer = h.layer();
    c.dtype = static_cast<RowDType>(h.dtype());
    c.rows = rows;
    c.rows_bytes = rows_bytes;
    c.n_rows = h.total_rows();
    c.n_embd = h.n_embd();
    c.k = h.k();
    c.expert = expert;
    c.expert_count = pairs;
    c.weight = weight;
    c.weight_count = pairs;
    return c;
  };

  // A request whose rows come over an NCCL session (one message, checked by CheckChunk): receive
  // them, compute, answer with a header and send the result on the same session.
  std::string nccl_rows;
  auto answer_over_nccl = [&](const pb::ForwardRequest& request) {
    NcclSessions::Locked session;
    if (options_.nccl != nullptr) session = options_.nccl->Lock(request.nccl_session());
    if (session.peer == nullptr || session.peer->broken()) {
      return refuse(request, absl::FailedPreconditionError(
                                 absl::StrCat("NCCL session ", request.nccl_session(),
                                              " is unknown or broken here (worker restarted?)")));
    }
    const size_t elem = RowDTypeSize(static_cast<RowDType>(request.dtype()));
    nccl_rows.resize(static_cast<size_t>(request.total_rows()) * request.n_embd() * elem);
    if (absl::Status s = session.peer->Recv(nccl_rows.data(), nccl_rows.size()); !s.ok()) {
      return refuse(request, absl::UnavailableError(
                                 absl::StrCat("NCCL receive of the rows failed: ", s.message())));
    }
    const auto start = std::chrono::steady_clock::now();
    const size_t pairs = static_cast<size_t>(request.expert_size());
    const absl::Status s =
        core_->Compute(compute_request(request, nccl_rows.data(), nccl_rows.size(),
                                       request.expert().data(), request.weight().data(), pairs),
                       &result);
    if (!s.ok()) return refuse(request, s);
    pb::ForwardResponse r = ResponseHeader(request);
    r.set_row_offset(0);
    r.set_n_rows(request.total_rows());
    r.set_rows_via_nccl(true);
    r.set_compute_micros(
        static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::microseconds>(
                                  std::chrono::steady_clock::now() - start)
                                  .count()));
    stream_ok = stream_ok && stream->Write(r);
    if (!stream_ok) return;
    if (absl::Status sent = session.peer->Send(result.data(), result.size()); !sent.ok()) {
      std::fprintf(stderr, "moepool worker: NCCL send of layer %d failed: %s\n", request.layer(),
                   std::string(sent.message()).c_str());
    }
  };

  while (stream_ok && stream->Read(&chunk)) {
    if (discarding) {
      discarding = false;
      if (chunk.step_id() == discarded_step && chunk.row_offset() > 0) {
        discarding = !IsLastChunk(chunk);
        continue;
      }
    }
    if (pending.active && chunk.step_id() != pending.header.step_id()) {
      // The previous request never got its last chunk.
      refuse(pending.header,
             absl::InvalidArgumentError(absl::StrCat(
                 "request ended at row ", pending.next_row, " of ", pending.header.total_rows(),
                 ": the next chunk belongs to step ", chunk.step_id())));
      pending = Assembly();
    }
    absl::Status framing = CheckChunk(chunk, *core_);
    if (framing.ok() && pending.active &&
        (!SameRequest(chunk, pending.header) || chunk.row_offset() != pending.next_row)) {
      framing = absl::InvalidArgumentError(absl::StrCat(
          "chunk at row ", chunk.row_offset(), " does not continue the request (expected row ",
          pending.next_row, " with the first chunk's layer, dtype, n_embd, total_rows and k)"));
    }
    if (framing.ok() && !pending.active && chunk.row_offset() != 0) {
      framing = absl::InvalidArgumentError(absl::StrCat("chunk starts at row ", chunk.row_offset(),
                                                        " but no request is in progress"));
    }
    if (!framing.ok()) {
      refuse(pending.active ? pending.header : chunk, framing);
      discarding = !IsLastChunk(chunk);
      discarded_step = chunk.step_id();
      pending = Assembly();
      continue;
    }
    const size_t pairs = static_cast<size_t>(chunk.expert_size());
    if (chunk.nccl_session() != 0) {
      answer_over_nccl(chunk);
      continue;
    }
    if (!pending.active && chunk.n_rows() == chunk.total_rows()) {
      // Whole request in one message: compute straight from it.
      answer(compute_request(chunk, chunk.rows().data(), chunk.rows().size(), chunk.expert().data(),
                             chunk.weight().data(), pairs),
             chunk);
      continue;
    }
    if (!pending.active) {
      pending.active = true;
      pending.header = chunk;
      pending.header.clear_rows();
      pending.header.clear_expert();
      pending.header.clear_weight();
      const size_t total = static_cast<size_t>(chunk.total_rows());
      pending.rows.reserve(total * (chunk.rows().size() / static_cast<size_t>(chunk.n_rows())));
      pending.expert.reserve(total * static_cast<size_t>(chunk.k()));
      pending.weight.reserve(total * static_cast<size_t>(chunk.k()));
    }
    pending.rows.append(chunk.rows());
    pending.expert.insert(pending.expert.end(), chunk.expert().begin(), chunk.expert().end());
    pending.weight.insert(pending.weight.end(), chunk.weight().begin(), chunk.weight().end());
    pending.next_row += chunk.n_rows();
    if (pending.next_row == pending.header.total_rows()) {
      answer(compute_request(pending.header, pending.rows.data(), pending.rows.size(),
                             pending.expert.data(), pending.weight.data(), pending.expert.size()),
             pending.header);
      pending = Assembly();
    }
  }
  if (stream_ok && pending.active) {
    refuse(pending.header, absl::InvalidArgumentError(
                               absl::StrCat("stream closed at row ", pending.next_row, " of ",
                                            pending.header.total_rows(), " of the request")));
  }
  if (!stream_ok) return grpc::Status(grpc::StatusCode::CANCELLED, "the client went away");
  return grpc::Status::OK;
}

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
  server->service_ = std::make_unique<ExpertServiceImpl>(core, options.service);
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
  grpc::EnableDefaultHealthCheckService(true);
  grpc::ServerBuilder builder;
  builder.AddListeningPort(options.listen_address, credentials, &server->port_);
  builder.SetMaxReceiveMessageSize(options.max_message_bytes);
  builder.SetMaxSendMessageSize(options.max_message_bytes);
  builder.RegisterService(server->service_.get());
  server->server_ = builder.BuildAndStart();
  if (server->server_ == nullptr || server->port_ == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on '", options.listen_address,
                                               "' (address in use, or not HOST:PORT?)"));
  }
  return server;
}

WorkerServer::~WorkerServer() {
  if (server_ != nullptr) {
    Shutdown(0);
    Wait();
  }
}

void WorkerServer::Shutdown(double grace_seconds) {
  server_->Shutdown(std::chrono::system_clock::now() +
                    std::chrono::microseconds(static_cast<int64_t>(grace_seconds * 1e6)));
}

void WorkerServer::Wait() { server_->Wait(); }

}  // namespace moepool::worker
