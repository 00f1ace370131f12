// The byte pipes that carry token rows outside the control messages of a cluster (--transport
// nccl): RowPipe is one point-to-point pipe (NcclPeer in wire/nccl_peer.h is the real one; tests
// use in-memory pipes); RowSession is a pipe together with the session number both ends know it
// by (ForwardRequest.nccl_session).
//
// Contract: the two ends agree on the order and sizes of what they send; Send(bytes) on one
// end matches Recv(bytes) on the other. A failed call leaves the pipe broken() for good.
// Threading: one thread at a time per end.
#ifndef MOEPOOL_WIRE_ROW_PIPE_H_
#define MOEPOOL_WIRE_ROW_PIPE_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <utility>

#include "absl/status/status.h"

namespace moepool::wire {

class RowPipe {
 public:
  virtual ~RowPipe() = default;
  virtual bool broken() const = 0;
  // Sends `bytes` bytes at `data` (host memory) to the other end.
  virtual absl::Status Send(const void* data, size_t bytes) = 0;
  // Receives exactly `bytes` bytes from the other end into `data` (host memory).
  virtual absl::Status Recv(void* data, size_t bytes) = 0;
};

// A pipe and its session number. Owns the pipe.
class RowSession {
 public:
  RowSession(std::unique_ptr<RowPipe> pipe, uint64_t session)
      : pipe_(std::move(pipe)), session_(session) {}
  uint64_t session() const { return session_; }
  // True after a failure: the link must use gRPC from then on.
  bool broken() const { return pipe_->broken(); }
  absl::Status Send(const void* data, size_t bytes) { return pipe_->Send(data, bytes); }
  absl::Status Recv(void* data, size_t bytes) { return pipe_->Recv(data, bytes); }

 private:
  std::unique_ptr<RowPipe> pipe_;
  uint64_t session_;
};

}  // namespace moepool::wire

#endif  // MOEPOOL_WIRE_ROW_PIPE_H_
