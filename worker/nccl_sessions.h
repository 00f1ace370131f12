// The worker's NCCL sessions (--transport nccl): communicators joined on the coordinator's
// request (SetupNccl), each a two-rank pipe for the rows of Forward requests that name it.
// See wire/transport.h for the whole scheme and wire/nccl_peer.h for the pipe.
//
// Threading: all methods are thread-safe. A session is used by one Forward request at a time
// (Lock holds its mutex). Ownership: a session lives until its coordinator replaces it (Close, on
// a SetupNccl that names it) or the worker exits; a Forward holding it keeps it alive until done.
// Session ids start at a random value, so a restarted worker does not hand out the ids of its
// previous run (a reconnecting coordinator names its old session for closing).
#ifndef MOEPOOL_WORKER_NCCL_SESSIONS_H_
#define MOEPOOL_WORKER_NCCL_SESSIONS_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "wire/nccl_peer.h"
#include "wire/row_pipe.h"

namespace moepool::worker {

class NcclSessions {
 public:
  // Sessions on CUDA device `device`.
  NcclSessions(int device, wire::NcclOptions options);

  int device() const { return device_; }

  // Joins communicator `unique_id` as rank 1 (blocks until the coordinator has joined too, or
  // `timeout_s` passes; <= 0: the options' timeout) and returns the new session's id (> 0).
  // Errors: NcclPeer::Connect's.
  absl::StatusOr<uint64_t> Join(const std::string& unique_id, double timeout_s);
  // Adds a session over `pipe` (Join's NcclPeer, or a test's pipe) and returns its id (> 0).
  uint64_t Add(std::unique_ptr<wire::RowPipe> pipe);

  // Closes a session (its communicator is released once no Forward uses it). False for an
  // unknown session.
  bool Close(uint64_t session);

  // A session's pipe with its lock held, or nullptr for an unknown session.
  struct Locked {
    std::shared_ptr<void> keep_alive;  // the session: outlives the lock below
    std::shared_ptr<wire::RowPipe> peer;
    std::unique_ptr<absl::MutexLock> lock;
  };
  Locked Lock(uint64_t session);

 private:
  struct Session {
    absl::Mutex mu;
    std::shared_ptr<wire::RowPipe> peer;
  };
  const int device_;
  const wire::NcclOptions options_;
  absl::Mutex mu_;
  uint64_t next_id_ ABSL_GUARDED_BY(mu_);
  std::map<uint64_t, std::shared_ptr<Session>> sessions_ ABSL_GUARDED_BY(mu_);
};

}  // namespace moepool::worker

#endif  // MOEPOOL_WORKER_NCCL_SESSIONS_H_
