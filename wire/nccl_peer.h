// A point-to-point NCCL link between two processes with one CUDA device each: the byte pipe
// that carries token rows GPU to GPU when a cluster runs with --transport nccl (the control
// messages stay on gRPC; see wire/transport.h and docs/protocol.md).
//
// NCCL is loaded at run time with dlopen (NcclOptions::library, "libnccl.so.2"), so neither the
// build nor the binary depends on it: a machine without it gets UNAVAILABLE here, and callers
// fall back to gRPC. A build without CUDA (no MOEPOOL_HAVE_CUDA) reports FAILED_PRECONDITION
// from every entry point.
//
// Host buffers in, host buffers out: Send copies the bytes into a device staging buffer and
// ncclSends them; Recv ncclRecvs into the staging buffer and copies them out (the expert
// backends take host rows today). Every wait is bounded by a timeout; a timeout or an NCCL error
// aborts the communicator and leaves the peer broken (every later call fails at once).
//
// Threading: NcclUsable and NcclNewUniqueId are thread-safe. One NcclPeer must be used by one
// thread at a time (any thread: the device is made current in every call).
#ifndef MOEPOOL_WIRE_NCCL_PEER_H_
#define MOEPOOL_WIRE_NCCL_PEER_H_

#include <cstddef>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "wire/row_pipe.h"

namespace moepool::wire {

struct NcclOptions {
  std::string library = "libnccl.so.2";  // dlopen name or path
  double timeout_s = 30;                 // bound on joining, and on each Send / Recv
};

// OK when NCCL can be used on CUDA device `device` here: a CUDA build, the library loads with
// the functions needed (NCCL >= 2.14), and the device exists. Otherwise the reason, naming the
// library or device: FAILED_PRECONDITION (no CUDA in this build), UNAVAILABLE (no library, too
// old, no such device).
absl::Status NcclUsable(const NcclOptions& options, int device);

// A new ncclUniqueId (NCCL_UNIQUE_ID_BYTES = 128 bytes) naming a communicator to be joined by
// both peers. Errors as NcclUsable's, or INTERNAL with NCCL's message.
absl::StatusOr<std::string> NcclNewUniqueId(const NcclOptions& options);

class NcclPeer : public RowPipe {
 public:
  // Joins the two-rank communicator `unique_id` as `rank` (0 or 1) on CUDA device `device`, and
  // blocks until the other rank has joined too (both must call Connect concurrently), or
  // options.timeout_s passes (DEADLINE_EXCEEDED). INVALID_ARGUMENT for a bad id or rank; NCCL's
  // errors as INTERNAL with its message; NcclUsable's errors.
  static absl::StatusOr<std::unique_ptr<NcclPeer>> Connect(const std::string& unique_id, int rank,
                                                           int device, const NcclOptions& options);
  ~NcclPeer() override;  // aborts the communicator, frees the staging buffer
  NcclPeer(const NcclPeer&) = delete;
  NcclPeer& operator=(const NcclPeer&) = delete;

  int device() const;
  int rank() const;
  bool broken() const override;

  // Sends `bytes` bytes at `data` (host memory) to the other rank, which must Recv the same
  // count. Returns when they have left this process's buffers.
  absl::Status Send(const void* data, size_t bytes) override;
  // Receives `bytes` bytes from the other rank into `data` (host memory).
  absl::Status Recv(void* data, size_t bytes) override;

  struct State;  // NCCL and CUDA handles (nccl_peer.cc)

 private:
  explicit NcclPeer(std::unique_ptr<State> state);
  std::unique_ptr<State> state_;
};

}  // namespace moepool::wire

#endif  // MOEPOOL_WIRE_NCCL_PEER_H_
