// The coordinator's view of one worker, the seam between ClusterExpertBackend and the wire: a
// WorkerLink takes one layer's job at a time (rows, experts, weights for that worker), answers
// with the partial sums or an error, reports whether the worker is up, and keeps round-trip
// statistics. GrpcWorkerLink (grpc_worker_link.h) is the real one, over one gRPC Forward
// stream; tests use an in-process link that calls a WorkerCore directly
// (tests/cluster/in_process_link_util.h), so retry, link and combine behaviour can be tested
// without sockets.
//
// Contract for implementations:
// Ownership: ClusterExpertBackend owns its links; a LinkJob and its RoundLatch belong to the
// caller of Post and must stay alive until the latch has been counted down for it.
// Threading: Post, RunInline, CancelRound, up() and Stats() may be called from any thread. At
// most one job is in flight per link.
// Errors: a job fails with UNAVAILABLE (connection lost, or the worker was down when the job
// arrived), DEADLINE_EXCEEDED (cancelled by the step watchdog) or the code the worker put in its
// answer (bad request); every message names the worker's address. A transport failure marks the
// link down until the worker is accepted again (AcceptWorker).
#ifndef MOEPOOL_COORDINATOR_WORKER_LINK_H_
#define MOEPOOL_COORDINATOR_WORKER_LINK_H_

#include <grpcpp/grpcpp.h>

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "moepool/v1/expert_service.pb.h"
#include "wire/data_channel.h"
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
class RoundLatch {
 public:
  explicit RoundLatch(int count) : count_(count) {}
  void CountDown();
  void Wait();

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int count_;
};

// One layer's request for one worker. Inputs are borrowed for the job's lifetime.
struct LinkJob {
  uint64_t round = 0;
  int layer = 0;
  moepool::v1::DType dtype = moepool::v1::DTYPE_F32;  // of the rows sent
  // Of the sums returned; DTYPE_UNSPECIFIED: `dtype` (see answer_dtype()).
  moepool::v1::DType return_dtype = moepool::v1::DTYPE_UNSPECIFIED;
  int64_t n_embd = 0;
  int k = 0;
  const float* x = nullptr;                      // all rows of the step [* x n_embd]
  const std::vector<int64_t>* rows = nullptr;    // which rows of x go to this worker
  const std::vector<int32_t>* expert = nullptr;  // [rows x k], -1 for experts held elsewhere
  const std::vector<float>* weight = nullptr;    // [rows x k]
  moepool::v1::DType answer_dtype() const {
    return return_dtype == moepool::v1::DTYPE_UNSPECIFIED ? dtype : return_dtype;
  }
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
  // Forward exchanges over the worker's data channel when it offers one (--transport tcp); the
  // token and TLS settings of the dial (host and port come from the address and Describe).
  bool data_channel = false;
  wire::DataDialOptions data_dial;
};

// Decides whether a reconnected worker may be used again (same model, same experts).
using AcceptWorker = std::function<absl::Status(const moepool::v1::DescribeResponse&)>;

class WorkerLink {
 public:
  virtual ~WorkerLink() = default;

  virtual const std::string& address() const = 0;

  // The worker's identity and holdings (startup: wait_for_ready waits for the worker to come up
  // until the timeout). The status names the worker; a refused token reads so.
  virtual absl::StatusOr<moepool::v1::DescribeResponse> Describe(double timeout_s,
                                                                 bool wait_for_ready) = 0;

  // Starts serving jobs, the worker being usable (after a successful startup Describe).
  // `accept` decides whether the worker may be used again after it was lost.
  virtual void Start(const moepool::v1::DescribeResponse& describe, AcceptWorker accept) = 0;

  virtual bool up() const = 0;

  // Rows travel over `session` (--transport nccl) while it works, over the link's own messages
  // once it broke; `renew` makes a new session when the worker is accepted again (null from it:
  // none). Call before Start. Links without pipes ignore it.
  virtual void SetRowSession(std::shared_ptr<wire::RowSession> session,
                             wire::RowSessionFactory renew) = 0;

  // Hands a job to the link; latch->CountDown() when it is finished (ok or not).
  virtual void Post(LinkJob* job, RoundLatch* latch) = 0;

  // Runs a job on the calling thread. Fails at once, like a posted job, if the worker is down.
  virtual void RunInline(LinkJob* job) = 0;

  // The step watchdog: if the job of `round` is still in flight, cancels it so it fails with
  // DEADLINE_EXCEEDED (the worker is then marked down).
  virtual void CancelRound(uint64_t round) = 0;

  virtual WorkerStats Stats() const = 0;
  virtual void ResetStats() = 0;
};

// Makes the link to the worker of `config.address` (ClusterOptions::make_link).
using WorkerLinkFactory = std::function<std::unique_ptr<WorkerLink>(const WorkerLinkConfig&)>;

}  // namespace moepool

#endif  // MOEPOOL_COORDINATOR_WORKER_LINK_H_
