#include "worker/nccl_sessions.h"

#include <random>
#include <utility>

namespace moepool::worker {

NcclSessions::NcclSessions(int device, wire::NcclOptions options)
    : device_(device), options_(std::move(options)) {
  std::random_device entropy;
  const uint64_t start = (uint64_t{entropy()} << 32) | entropy();
  absl::MutexLock lock(&mu_);
  next_id_ = (start >> 2) + 1;  // non-zero, and far from wrapping
}

absl::StatusOr<uint64_t> NcclSessions::Join(const std::string& unique_id, double timeout_s) {
  wire::NcclOptions options = options_;
  if (timeout_s > 0) options.timeout_s = timeout_s;
  absl::StatusOr<std::unique_ptr<wire::NcclPeer>> peer =
      wire::NcclPeer::Connect(unique_id, /*rank=*/1, device_, options);
  if (!peer.ok()) return peer.status();
  return Add(*std::move(peer));
}

uint64_t NcclSessions::Add(std::unique_ptr<wire::RowPipe> pipe) {
  auto session = std::make_shared<Session>();
  session->peer = std::move(pipe);
  absl::MutexLock lock(&mu_);
  const uint64_t id = next_id_++;
  sessions_[id] = std::move(session);
  return id;
}

bool NcclSessions::Close(uint64_t session) {
  std::shared_ptr<Session> closed;  // released after mu_
  absl::MutexLock lock(&mu_);
  auto it = sessions_.find(session);
  if (it == sessions_.end()) return false;
  closed = std::move(it->second);
  sessions_.erase(it);
  return true;
}

NcclSessions::Locked NcclSessions::Lock(uint64_t session) {
  std::shared_ptr<Session> s;
  {
    absl::MutexLock lock(&mu_);
    auto it = sessions_.find(session);
    if (it == sessions_.end()) return {};
    s = it->second;
  }
  Locked locked;
  locked.keep_alive = s;
  locked.lock = std::make_unique<absl::MutexLock>(&s->mu);
  locked.peer = s->peer;
  return locked;
}

}  // namespace moepool::worker
