// How token rows travel between the coordinator and a worker (--transport tcp|grpc|nccl).
//
// tcp (default): each layer's ForwardRequest and ForwardResponse go as one frame each on the
// worker's data channel (wire/data_channel.h), a plain or TLS TCP connection; gRPC carries
// the control calls. Workers that offer no data channel are reached over gRPC.
// grpc: rows ride inside the ForwardRequest / ForwardResponse messages of a gRPC stream.
// nccl: the Forward stream stays the control channel (routing, step ids, errors), but the rows
// go GPU to GPU over a two-rank NCCL communicator per worker (wire/nccl_peer.h): the
// coordinator makes an ncclUniqueId, hands it to the worker with the SetupNccl RPC, and both
// join; then each Forward request names the session and its rows follow it with ncclSend.
// See docs/protocol.md ("NCCL rows") and docs/gpu-cluster.md.
//
// Fallback: when NCCL cannot be used (a build without CUDA, no libnccl.so.2, no GPU, the worker
// does not offer it, joining fails or times out), one line on stderr says why and that link
// stays on gRPC; a link whose NCCL pipe breaks later (RowSession::broken) goes back to gRPC,
// and a link that reconnects (a restarted worker, or after a broken pipe) sets up a new session
// (NcclSessionFactory). Nothing here is fatal.
//
// Threading: ConnectNcclSessions blocks (it joins communicators) and is called once at
// startup; NcclSessionFactory's factories block the same way on a reconnecting link's thread. A
// RowSession is used by one link at a time.
#ifndef MOEPOOL_WIRE_TRANSPORT_H_
#define MOEPOOL_WIRE_TRANSPORT_H_

#include <grpcpp/grpcpp.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "moepool/v1/expert_service.pb.h"
#include "wire/nccl_peer.h"
#include "wire/row_pipe.h"

namespace moepool::wire {

enum class TransportKind { kGrpc, kTcp, kNccl };

// "grpc", "tcp" or "nccl"; INVALID_ARGUMENT naming the text otherwise.
absl::StatusOr<TransportKind> ParseTransport(std::string_view text);
const char* TransportName(TransportKind kind);

// The transport name a worker lists in DescribeResponse.transports when it offers NCCL.
inline constexpr char kNcclTransportName[] = "nccl";

// One worker as the coordinator reaches it (the same channel settings as its WorkerLink).
struct TransportEndpoint {
  std::string address;
  moepool::v1::DescribeResponse describe;  // the accepted startup answer
  std::shared_ptr<grpc::ChannelCredentials> credentials;
  grpc::ChannelArguments channel_args;
  std::string token;              // bearer token; empty: none
  uint64_t replaces_session = 0;  // NcclSetupRequest.replaces_session
};

struct NcclSessionOptions {
  int device = 0;  // the coordinator's CUDA device for the pipes
  NcclOptions nccl;
};

// Makes a link's row transport again for a worker that answered `describe` on reconnect; null
// means gRPC (see WorkerLink::SetRowSession). `replaces_session`: the link's previous session
// (0: none), which the worker is asked to close.
using RowSessionFactory = std::function<std::shared_ptr<RowSession>(
    const moepool::v1::DescribeResponse& describe, uint64_t replaces_session)>;

// For each endpoint, an NCCL pipe or null (gRPC). Prints one line on stderr per fallback (or a
// single line when NCCL is not usable here at all) and one line per pipe set up.
std::vector<std::shared_ptr<RowSession>> ConnectNcclSessions(
    const std::vector<TransportEndpoint>& endpoints, const NcclSessionOptions& options);

// A factory that sets up a new NCCL session with `endpoint`'s worker as ConnectNcclSessions
// does (blocking while both ends join; one line on stderr either way).
RowSessionFactory NcclSessionFactory(TransportEndpoint endpoint, NcclSessionOptions options);

}  // namespace moepool::wire

#endif  // MOEPOOL_WIRE_TRANSPORT_H_
