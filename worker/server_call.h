// The worker's gRPC calls are served with the asynchronous API on one completion queue, polled by
// one thread (see WorkerServer): every call is an object that receives the completion of each of
// its operations through ServerCall::OnEvent, on that thread.
//
// Ownership: a call object owns itself: it is created when it starts listening for a call and
// deletes itself when its last operation completed.
// Threading: OnEvent runs only on the server's completion-queue thread.
#ifndef MOEPOOL_WORKER_SERVER_CALL_H_
#define MOEPOOL_WORKER_SERVER_CALL_H_

#include <mutex>

#include "grpcpp/grpcpp.h"

namespace moepool::worker {

class ServerCall {
 public:
  virtual ~ServerCall() = default;
  // The operation tagged with `event` completed (`ok`: as gRPC reports it).
  virtual void OnEvent(int event, bool ok) = 0;
};

// The tag handed to gRPC for one kind of operation of a call.
struct CallTag {
  ServerCall* call = nullptr;
  int event = 0;
};

// Guards the start of operations against the completion queue's shutdown: the server shuts the
// queue down once grpc::Server::Shutdown returned, while events of cancelled calls may still be
// queued; a call that handles one of them must not start an operation on a shut-down queue (gRPC
// aborts). Thread-safe.
class OpGate {
 public:
  // Runs `start` (which starts one gRPC operation or call request) unless the queue is shut
  // down; returns whether it ran. A call whose operation could not start is over.
  template <typename Start>
  bool Run(Start start) {
    std::lock_guard<std::mutex> lock(mu_);
    if (closed_) return false;
    start();
    return true;
  }
  // Shuts the queue down; later Run calls do nothing. Idempotent.
  void Close(grpc::ServerCompletionQueue* cq) {
    std::lock_guard<std::mutex> lock(mu_);
    if (closed_) return;
    closed_ = true;
    cq->Shutdown();
  }

 private:
  std::mutex mu_;
  bool closed_ = false;
};

// Delivers a completion-queue event to its call.
inline void DispatchEvent(void* tag, bool ok) {
  const CallTag* t = static_cast<const CallTag*>(tag);
  t->call->OnEvent(t->event, ok);
}

}  // namespace moepool::worker

#endif  // MOEPOOL_WORKER_SERVER_CALL_H_
