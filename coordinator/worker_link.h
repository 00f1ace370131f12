// The coordinator's connection to one worker: a gRPC channel, one long-lived Forward stream, an
// I/O thread that runs one layer request at a time on it, reconnection with exponential backoff
// after a failure, and round-trip metrics.
//
// Ownership: ClusterExpertBackend owns its links; a LinkJob and its StepLatch belong to the
// caller of Post and must stay alive until the latch has been counted down for it.
// Threading: Post, RunInline, CancelStep, up() and Stats() may be called from any thread; the
// stream I/O runs on the link's own thread or on a RunInline caller's, reconnects on the link's
// thread. At most one job is in flight per link.
// Errors: a job fails with UNAVAILABLE (connection lost, stream broken, or the worker was down
// when the job arrived), DEADLINE_EXCEEDED (cancelled by the step watchdog) or the code the
// worker put in its response (bad request); every message names the worker's address. A
// transport failure marks the link down until a reconnect's Describe is accepted again.
#ifndef MOEPOOL_COORDINATOR_WORKER_LINK_H_
#define MOEPOOL_COORDINATOR_WORKER_LINK_H_

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "moepool/v1/expert_service.grpc.pb.h"
#include "wire/forward_chunks.h"
#include "wire/transport.h"

namespace moepool {

// One request/response exchange with a worker, as measured on the link's I/O thread.
struct RoundTripSample {
  int layer = 0;
  int64_t rows = 0;
  uint64_t round_trip_micros = 0;  // first request chunk written .. last response chunk read
  uint64_t compute_micros = 0;     // as reported by the worker
  uint64_t request_bytes = 0;      // serialized request messages
  uint64_t response_bytes = 0;     // serialized response messages
};

struct WorkerStats {
  std::string address;
  std::string worker_id;  // from Describe
  bool up = false;
  std::string last_error;
  uint64_t requests = 0;  // successful exchanges
  uint64_t failures = 0;
  uint64_t reconnects = 0;  // times the link came back up after being down
  uint64_t rows = 0;
  uint64_t request_bytes = 0;
  uint64_t response_bytes = 0;
  uint64_t round_trip_micros = 0;
  uint64_t compute_micros = 0;
  std::vector<RoundTripSample> recent;  // the latest exchanges, oldest first
};

// Counts down once per finished job; the step waits on it.
class StepLatch {
 public:
  explicit StepLatch(int count) : count_(count) {}
  void CountDown();
  void Wait();

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int count_;
};

// One layer's request for one worker. Inputs are borrowed for the job's lifetime.
struct LinkJob {
  uint64_t step_id = 0;
  int layer = 0;
  moepool::v1::DType dtype = moepool::v1::DTYPE_F32;
  int64_t n_embd = 0;
  int k = 0;
  const float* x = nullptr;                      // all rows of the step [* x n_embd]
  const std::vector<int64_t>* rows = nullptr;    // which rows of x go to this worker
  const std::vector<int32_t>* expert = nullptr;  // [rows x k], -1 for experts held elsewhere
  const std::vector<float>* weight = nullptr;    // [rows x k]
  // Results, valid after the latch counted down for this job.
  absl::Status status;
  std::vector<float> partial;  // [rows x n_embd]
  RoundTripSample sample;
};

struct WorkerLinkConfig {
  std::string address;  // host:port
  std::shared_ptr<grpc::ChannelCredentials> credentials;
  grpc::ChannelArguments channel_args;
  std::string token;  // sent as `authorization: Bearer <token>` when not empty
  int64_t max_message_bytes = 4 << 20;
  double step_timeout_s = 30;      // only used in messages
  double describe_timeout_s = 5;   // per reconnect attempt
  double backoff_initial_s = 0.1;  // first reconnect delay, doubled per failed attempt
  double backoff_max_s = 5;
  size_t max_samples = 4096;
};

// Decides whether a reconnected worker may be used again (same model, same experts).
using AcceptWorker = std::function<absl::Status(const moepool::v1::DescribeResponse&)>;

class WorkerLink {
 public:
  explicit WorkerLink(WorkerLinkConfig config);
  ~WorkerLink();  // cancels the stream and joins the thread
  WorkerLink(const WorkerLink&) = delete;
  WorkerLink& operator=(const WorkerLink&) = delete;

  const std::string& address() const { return config_.address; }

  // A Describe call on the current channel (startup: wait_for_ready waits for the worker to
  // come up until the timeout). The status names the worker; a refused token reads so.
  absl::StatusOr<moepool::v1::DescribeResponse> Describe(double timeout_s, bool wait_for_ready);

  // Starts the I/O thread, the worker being usable (after a successful startup Describe).
  // `accept` is called on the link's thread for each reconnect's Describe answer.
  void Start(const moepool::v1::DescribeResponse& describe, AcceptWorker accept);

  bool up() const;

  // Rows travel over `transport` (--transport nccl) while it works, over gRPC once it broke.
  // With `renew`, every reconnect (a restarted worker has lost its sessions; after a lost stream
  // the old pipe's state is unknown) asks it for a fresh transport for the accepted worker, on the
  // link's thread before the link is up again; null from it means gRPC. Call before Start.
  void SetRowSession(std::shared_ptr<wire::RowSession> transport,
                     wire::RowSessionFactory renew = nullptr) {
    previous_session_ = transport != nullptr ? transport->session() : 0;
    row_session_ = std::move(transport);
    renew_session_ = std::move(renew);
  }

  // Hands a job to the I/O thread; latch->CountDown() when it is finished (ok or not). A request
  // that fits one message on an open stream is written by the calling thread before Post
  // returns (the I/O thread only reads the answer), so it leaves without a thread hand-off.
  void Post(LinkJob* job, StepLatch* latch);

  // Runs a job on the calling thread (saving the hand-offs to and from the I/O thread), which
  // owns the stream meanwhile. Fails at once, like a posted job, if the worker is down.
  void RunInline(LinkJob* job);

  // The step watchdog: if the job of `step_id` is still in flight, cancels the stream so it
  // fails with DEADLINE_EXCEEDED (the worker is then marked down and reconnected).
  void CancelStep(uint64_t step_id);

  WorkerStats Stats() const;
  void ResetStats();

 private:
  // A request already written by Post on the caller's thread.
  struct Written {
    std::chrono::steady_clock::time_point t0;  // when its first byte was handed to gRPC
    uint64_t request_bytes = 0;
  };

  void Loop();
  void RunJob(LinkJob* job, const Written* written);
  absl::Status DownError() const;  // mu_ held
  // Writes the job's request (in chunks); on failure the stream is closed and the link down.
  // The round a job sends, and its rows as the wire reads them.
  static wire::RoundHeader RoundOf(const LinkJob& job);
  static wire::RequestRows RowsOf(const LinkJob& job);
  absl::Status WriteRequest(LinkJob* job, uint64_t* request_bytes);
  // Writes the request unless `written`, then reads and reassembles the answer.
  absl::Status Exchange(LinkJob* job, const Written* written);
  // Exchange with the rows on row_session_ (worker_link_rows.cc).
  absl::Status ExchangeOutOfBand(LinkJob* job);
  absl::Status OpenStream();
  // Finishes the stream (cancelling it first if `cancel`); returns its final status.
  grpc::Status CloseStream(bool cancel);
  // Closes the broken stream, marks the link down and returns the job's error: UNAVAILABLE
  // saying `what`, or DEADLINE_EXCEEDED when the watchdog cancelled the step.
  // An answer's header against its job: a mismatched step or layer breaks the stream (Broken);
  // a refusal is the worker's status naming the worker. OK otherwise.
  absl::Status CheckAnswer(const LinkJob& job, const moepool::v1::ForwardResponse& resp);
  absl::Status Broken(const LinkJob& job, const std::string& what, bool cancel);
  void MarkDown(const absl::Status& why);
  void TryReconnect();
  void NewChannel();

  const WorkerLinkConfig config_;
  AcceptWorker accept_;                            // set by Start
  std::shared_ptr<wire::RowSession> row_session_;  // null: gRPC; used by the I/O owner only
  wire::RowSessionFactory renew_session_;          // may be null; set before Start
  // The session of the last row transport set up (kept after the pipe broke), so a renewal can
  // ask the worker to close it. Written by the link's thread only (and before Start).
  uint64_t previous_session_ = 0;

  // Channel and stream: used by the I/O thread (and Describe before Start).
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<moepool::v1::ExpertService::Stub> stub_;
  std::unique_ptr<
      grpc::ClientReaderWriter<moepool::v1::ForwardRequest, moepool::v1::ForwardResponse>>
      stream_;
  moepool::v1::ForwardRequest request_;    // reused by the stream's owner
  moepool::v1::ForwardResponse response_;  // reused by the stream's owner

  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  bool started_ = false;
  bool up_ = false;
  LinkJob* job_ = nullptr;
  bool inline_ = false;             // a RunInline caller (or a Post caller writing) owns the stream
  std::optional<Written> written_;  // the posted job_'s request is on the wire already
  StepLatch* latch_ = nullptr;
  uint64_t in_flight_step_ = 0;                          // step of the job on the wire; 0 = none
  bool cancelled_ = false;                               // by CancelStep, for the job in flight
  std::unique_ptr<grpc::ClientContext> stream_context_;  // guarded by mu_ (for TryCancel)
  grpc::ClientContext* describe_context_ = nullptr;      // a Describe in progress
  std::chrono::steady_clock::time_point next_attempt_;
  double backoff_s_ = 0;
  moepool::v1::DescribeResponse accepted_;
  WorkerStats stats_;
  std::deque<RoundTripSample> samples_;

  std::thread thread_;
};

}  // namespace moepool

#endif  // MOEPOOL_COORDINATOR_WORKER_LINK_H_
