// One Forward stream on the worker, served with gRPC's asynchronous API on the server's
// completion-queue thread: reads request chunks, reassembles chunked requests, computes each
// complete request on the WorkerCore right there (no hand-off to another thread) and writes the
// result (chunked) back, then reads the next request. At most one read or one write is
// outstanding at a time.
//
// Protocol behaviour (see docs/protocol.md): a refused request is answered with error_code /
// error_message set and the stream keeps serving; after an error in a chunked request its
// remaining chunks are dropped without further responses; the stream ends with OK when the
// client half-closes, CANCELLED when a write fails, or the token check's error.
//
// Threading: OnEvent runs on the server's completion-queue thread; a computation blocks that
// thread (and so every other call of this server) for its duration.
// Ownership: see server_call.h; borrows the ForwardCallEnv, which outlives every call.
#ifndef MOEPOOL_WORKER_FORWARD_CALL_H_
#define MOEPOOL_WORKER_FORWARD_CALL_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "grpcpp/grpcpp.h"
#include "moepool/v1/expert_service.grpc.pb.h"
#include "wire/forward_chunks.h"
#include "worker/nccl_sessions.h"
#include "worker/server_call.h"
#include "worker/worker_core.h"

namespace moepool::worker {

// What Forward calls need from the server. Borrowed by every call; outlives them.
struct ForwardCallEnv {
  WorkerCore* core = nullptr;
  size_t response_chunk_bytes = 0;  // > 0: the largest payload of result rows in one response
  std::function<grpc::Status(const grpc::ServerContext&)> check_token;
  moepool::v1::ExpertService::AsyncService* service = nullptr;
  grpc::ServerCompletionQueue* cq = nullptr;
  OpGate* gate = nullptr;
  NcclSessions* nccl = nullptr;  // null: no NCCL sessions (requests naming one are refused)
};

class ForwardCall final : public ServerCall {
 public:
  // Asks the server for the next Forward call (a new ForwardCall waits for it).
  static void Listen(const ForwardCallEnv* env);

  void OnEvent(int event, bool ok) override;

 private:
  enum Event { kAccepted, kRead, kWritten, kFinished, kEventCount };

  explicit ForwardCall(const ForwardCallEnv* env);
  void OnAccepted(bool ok);
  void OnRead(bool ok);
  void OnWritten(bool ok);
  void* Tag(Event e) { return &tags_[e]; }
  // Starts one operation through the gate; deletes this call if the server has shut down.
  template <typename Op>
  void Start(Op op);

  // Handles chunk_, queueing the responses it calls for.
  void HandleChunk();
  // Queues an error response for `request`.
  void Refuse(const moepool::v1::ForwardRequest& request, const absl::Status& error);
  // A request whose rows come over NCCL session request.nccl_session(): receives them, computes
  // and queues a header-only response; the result goes out on the session once that response
  // is written (the coordinator reads the header, then receives).
  void AnswerOverNccl(const moepool::v1::ForwardRequest& request);
  // Computes a complete request and queues its result in chunks.
  void Answer(const ComputeRequest& compute, const moepool::v1::ForwardRequest& round);
  // A cleared response at the end of the queue (reused across requests).
  moepool::v1::ForwardResponse* NextResponse();
  // Writes the next queued response, else reads the next chunk, else finishes with OK.
  void Continue();

  const ForwardCallEnv* const env_;
  CallTag tags_[kEventCount];
  grpc::ServerContext context_;
  grpc::ServerAsyncReaderWriter<moepool::v1::ForwardResponse, moepool::v1::ForwardRequest> stream_;
  moepool::v1::ForwardRequest chunk_;  // the chunk being read (reused)
  wire::RequestAssembler assembler_;
  bool reads_done_ = false;                        // the client half-closed (or the call ended)
  std::vector<float> result_;                      // WorkerCore's output (reused)
  std::vector<moepool::v1::ForwardResponse> out_;  // queue slots [0, out_count_), reused
  size_t out_count_ = 0;
  size_t out_next_ = 0;             // the slot being written
  uint64_t nccl_send_session_ = 0;  // > 0: nccl_bytes_ go out on this session after the writes
  std::string nccl_bytes_;          // rows received, then the result sent, over NCCL (reused)
  std::vector<float> nccl_x_;       // the received rows decoded (reused)
};

}  // namespace moepool::worker

#endif  // MOEPOOL_WORKER_FORWARD_CALL_H_
