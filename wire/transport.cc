#include "wire/transport.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "moepool/v1/expert_service.grpc.pb.h"

namespace moepool::wire {
namespace {

bool OffersNccl(const moepool::v1::DescribeResponse& d) {
  return std::find(d.transports().begin(), d.transports().end(), kNcclTransportName) !=
         d.transports().end();
}

void Note(const std::string& line) {
  std::fprintf(stderr, "moepool: --transport nccl: %s\n", line.c_str());
}

// Asks the worker to join communicator `unique_id` (rank 1); blocks until it has joined.
absl::StatusOr<moepool::v1::NcclSetupResponse> SetupOnWorker(const TransportEndpoint& e,
                                                             const std::string& unique_id,
                                                             double timeout_s) {
  auto channel = grpc::CreateCustomChannel(e.address, e.credentials, e.channel_args);
  auto stub = moepool::v1::ExpertService::NewStub(channel);
  grpc::ClientContext context;
  if (!e.token.empty()) context.AddMetadata("authorization", "Bearer " + e.token);
  context.set_deadline(std::chrono::system_clock::now() +
                       std::chrono::microseconds(static_cast<int64_t>((timeout_s + 5) * 1e6)));
  moepool::v1::NcclSetupRequest request;
  request.set_unique_id(unique_id);
  request.set_timeout_s(timeout_s);
  request.set_replaces_session(e.replaces_session);
  moepool::v1::NcclSetupResponse response;
  const grpc::Status s = stub->SetupNccl(&context, request, &response);
  if (!s.ok()) {
    return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
  }
  if (response.session() == 0) return absl::InternalError("the worker answered session 0");
  return response;
}

}  // namespace

absl::StatusOr<TransportKind> ParseTransport(std::string_view text) {
  if (text == "grpc") return TransportKind::kGrpc;
  if (text == "tcp") return TransportKind::kTcp;
  if (text == "nccl") return TransportKind::kNccl;
  return absl::InvalidArgumentError(
      absl::StrCat("--transport: expected tcp, grpc or nccl, got '", std::string(text), "'"));
}

const char* TransportName(TransportKind kind) {
  switch (kind) {
    case TransportKind::kNccl:
      return "nccl";
    case TransportKind::kTcp:
      return "tcp";
    default:
      return "grpc";
  }
}

std::vector<std::shared_ptr<RowSession>> ConnectNcclSessions(
    const std::vector<TransportEndpoint>& endpoints, const NcclSessionOptions& options) {
  std::vector<std::shared_ptr<RowSession>> out(endpoints.size());
  if (const absl::Status usable = NcclUsable(options.nccl, options.device); !usable.ok()) {
    Note(absl::StrCat("NCCL cannot be used here (", usable.message(), "); rows travel over gRPC"));
    return out;
  }
  for (size_t i = 0; i < endpoints.size(); ++i) {
    const TransportEndpoint& e = endpoints[i];
    if (!OffersNccl(e.describe)) {
      Note(absl::StrCat("worker ", e.address,
                        " does not offer NCCL (start it with --transport nccl on a GPU); its "
                        "rows travel over gRPC"));
      continue;
    }
    absl::StatusOr<std::string> id = NcclNewUniqueId(options.nccl);
    if (!id.ok()) {
      Note(absl::StrCat(id.status().message(), "; rows travel over gRPC"));
      return out;
    }
    // Both ranks must join at once: the worker's in its RPC handler, ours here.
    absl::StatusOr<moepool::v1::NcclSetupResponse> remote = absl::UnknownError("not asked");
    std::thread ask([&] { remote = SetupOnWorker(e, *id, options.nccl.timeout_s); });
    absl::StatusOr<std::unique_ptr<NcclPeer>> local =
        NcclPeer::Connect(*id, /*rank=*/0, options.device, options.nccl);
    ask.join();
    if (!local.ok() || !remote.ok()) {
      const absl::Status why = !remote.ok() ? remote.status() : local.status();
      Note(absl::StrCat("worker ", e.address, ": NCCL setup failed (", why.message(),
                        "); its rows travel over gRPC"));
      continue;
    }
    std::fprintf(stderr, "moepool: worker %s: rows over NCCL (cuda:%d here, cuda:%d there)\n",
                 e.address.c_str(), options.device, remote->device());
    out[i] = std::make_shared<RowSession>(*std::move(local), remote->session());
  }
  return out;
}

RowSessionFactory NcclSessionFactory(TransportEndpoint endpoint, NcclSessionOptions options) {
  return [endpoint = std::move(endpoint), options = std::move(options)](
             const moepool::v1::DescribeResponse& describe, uint64_t replaces_session) {
    TransportEndpoint e = endpoint;
    e.describe = describe;
    e.replaces_session = replaces_session;
    return ConnectNcclSessions({e}, options)[0];
  };
}

}  // namespace moepool::wire
