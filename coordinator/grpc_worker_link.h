// GrpcWorkerLink: the WorkerLink of a real worker (worker_link.h): a gRPC channel, one
// long-lived Forward stream, an I/O thread that runs one layer request at a time on it,
// reconnection with exponential backoff after a failure, and round-trip metrics. The rounds go
// on the wire through wire/forward_chunks.h; with --transport nccl the rows travel on a
// RowSession instead (grpc_worker_link_rows.cc).
//
// Three ways a job gets onto the stream: a request that fits one message on an open stream is
// written by the thread that posts it (Post), so it leaves without a thread hand-off, and the I/O
// thread only reads the answer; a larger or out-of-band one is handed to the I/O thread; RunInline
// runs the whole exchange on the caller's thread.
// Threading: see worker_link.h; the stream I/O runs on the link's own thread or on a RunInline
// (or writing Post) caller's; reconnects run on the link's thread.
#ifndef MOEPOOL_COORDINATOR_GRPC_WORKER_LINK_H_
#define MOEPOOL_COORDINATOR_GRPC_WORKER_LINK_H_

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>

#include "coordinator/worker_link.h"
#include "moepool/v1/expert_service.grpc.pb.h"
#include "wire/forward_chunks.h"
#include "wire/transport.h"

namespace moepool {

class GrpcWorkerLink final : public WorkerLink {
 public:
  explicit GrpcWorkerLink(WorkerLinkConfig config);
  ~GrpcWorkerLink() override;  // cancels the stream and joins the thread
  GrpcWorkerLink(const GrpcWorkerLink&) = delete;
  GrpcWorkerLink& operator=(const GrpcWorkerLink&) = delete;

  const std::string& address() const override { return config_.address; }
  absl::StatusOr<moepool::v1::DescribeResponse> Describe(double timeout_s,
                                                         bool wait_for_ready) override;
  // Starts the I/O thread; `accept` is called on it for each reconnect's Describe answer.
  void Start(const moepool::v1::DescribeResponse& describe, AcceptWorker accept) override;
  bool up() const override;
  // A broken session: back to gRPC. With `renew`, every reconnect (a restarted worker has lost
  // its sessions; after a lost stream the old pipe's state is unknown) asks it for a fresh
  // session, on the link's thread before the link is up again.
  void SetRowSession(std::shared_ptr<wire::RowSession> session,
                     wire::RowSessionFactory renew) override {
    previous_session_ = session != nullptr ? session->session() : 0;
    row_session_ = std::move(session);
    renew_session_ = std::move(renew);
  }
  // A request that fits one message on an open stream is written by the calling thread before
  // Post returns (the I/O thread only reads the answer); otherwise the I/O thread writes it.
  void Post(LinkJob* job, RoundLatch* latch) override;
  // The caller's thread owns the stream meanwhile (no hand-off to and from the I/O thread).
  void RunInline(LinkJob* job) override;
  // Cancels the stream; the link is then marked down and reconnected.
  void CancelRound(uint64_t step_id) override;
  WorkerStats Stats() const override;
  void ResetStats() override;

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
  // The data channel (grpc_worker_link_data.cc): opens it when `describe` offers one and the
  // config asks for it (a line on stderr if that fails: gRPC meanwhile), on the I/O owner.
  void OpenDataChannel(const moepool::v1::DescribeResponse& describe);
  bool HasDataChannel() const { return data_ != nullptr; }
  // One frame out; on failure the channel is dropped and the link down.
  absl::Status WriteDataRequest(LinkJob* job, uint64_t* request_bytes);
  // Reads the answer to a written request (writes it first unless `written`).
  absl::Status ExchangeOverData(LinkJob* job, const Written* written);
  // Drops the data channel, marks the link down and returns the job's error (as Broken does).
  absl::Status DataBroken(const LinkJob& job, const std::string& what);
  absl::Status OpenStream();
  // Finishes the stream (cancelling it first if `cancel`); returns its final status.
  grpc::Status CloseStream(bool cancel);
  // Closes the broken stream, marks the link down and returns the job's error: UNAVAILABLE
  // saying `what`, or DEADLINE_EXCEEDED when the watchdog cancelled the step.
  // An answer's header against its job: a mismatched step or layer breaks the stream (Broken);
  // a refusal is the worker's status naming the worker. OK otherwise.
  absl::Status CheckAnswer(const LinkJob& job, const moepool::v1::ForwardResponse& resp);
  absl::Status Broken(const LinkJob& job, const std::string& what, bool cancel);
  // The job's error when the link was lost: DEADLINE_EXCEEDED if the watchdog cancelled it,
  // else UNAVAILABLE saying `what`; both name the worker.
  absl::Status LostError(const LinkJob& job, bool by_watchdog, const std::string& what) const;
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
  // The data channel; null: Forward streams. Used by the I/O owner; replaced under mu_ (which
  // CancelRound holds to abort it).
  std::unique_ptr<wire::DataStream> data_;
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
  RoundLatch* latch_ = nullptr;
  uint64_t in_flight_round_ = 0;                         // step of the job on the wire; 0 = none
  bool cancelled_ = false;                               // by CancelRound, for the job in flight
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

#endif  // MOEPOOL_COORDINATOR_GRPC_WORKER_LINK_H_
