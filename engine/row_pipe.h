// A point-to-point byte pipe that carries token rows outside the control messages of a cluster
// (--transport nccl): NcclPeer (engine/nccl_peer.h) is the real one; tests use in-memory pipes.
//
// Contract: the two ends agree on the order and sizes of what they send; Send(bytes) on one
// end matches Recv(bytes) on the other. A failed call leaves the pipe broken() for good.
// Threading: one thread at a time per end.
#ifndef MOEPOOL_ENGINE_ROW_PIPE_H_
#define MOEPOOL_ENGINE_ROW_PIPE_H_

#include <cstddef>

#include "absl/status/status.h"

namespace moepool {

class RowPipe {
 public:
  virtual ~RowPipe() = default;
  virtual bool broken() const = 0;
  // Sends `bytes` bytes at `data` (host memory) to the other end.
  virtual absl::Status Send(const void* data, size_t bytes) = 0;
  // Receives exactly `bytes` bytes from the other end into `data` (host memory).
  virtual absl::Status Recv(void* data, size_t bytes) = 0;
};

}  // namespace moepool

#endif  // MOEPOOL_ENGINE_ROW_PIPE_H_
