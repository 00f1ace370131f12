// The worker's end of the data channel (wire/data_channel.h): every accepted stream is served on
// its connection's thread. Frames are ForwardRequest chunks, reassembled and checked exactly as on
// a gRPC Forward stream (wire::RequestAssembler; a decode step's request is one frame); a
// complete request is computed on the WorkerCore and answered with ForwardResponse frames (one
// unless the result exceeds the chunk size), or with the refusal in error_code /
// error_message, after which the stream keeps serving. A frame that does not parse or exceeds
// the limit, or a peer that goes away, ends that connection only.
//
// Threading: one thread per connection (DataListener); WorkerCore serialises the computations.
// Ownership: borrows the WorkerCore, which must outlive the server.
#ifndef MOEPOOL_WORKER_DATA_SERVER_H_
#define MOEPOOL_WORKER_DATA_SERVER_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "wire/data_channel.h"
#include "worker/worker_core.h"

namespace moepool::worker {

class DataServer {
 public:
  // Listens on options.host:options.port (port 0: a free one). The token, TLS material and
  // limits are the listener's (see wire::DataListenerOptions).
  // response_chunk_bytes: the largest payload of result rows in one response frame.
  static absl::StatusOr<std::unique_ptr<DataServer>> Start(WorkerCore* core,
                                                           const wire::DataListenerOptions& options,
                                                           size_t response_chunk_bytes);
  int port() const { return listener_->port(); }
  // Closes every connection and stops accepting. Idempotent.
  void Stop() { listener_->Stop(); }
  uint64_t requests() const { return requests_.load(); }  // frames answered
  uint64_t refused_connections() const { return listener_->refused(); }

 private:
  DataServer(WorkerCore* core, size_t response_chunk_bytes)
      : core_(core), response_chunk_bytes_(response_chunk_bytes) {}
  void Serve(wire::DataStream* stream);

  WorkerCore* const core_;
  const size_t response_chunk_bytes_;
  std::atomic<uint64_t> requests_{0};
  std::unique_ptr<wire::DataListener> listener_;
};

}  // namespace moepool::worker

#endif  // MOEPOOL_WORKER_DATA_SERVER_H_
