#include "coordinator/grpc_worker_link.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "wire/row_codec.h"

namespace moepool {
namespace {

using Clock = std::chrono::steady_clock;

uint64_t MicrosBetween(Clock::time_point a, Clock::time_point b) {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::microseconds>(b - a).count());
}

std::string GrpcStatusText(const grpc::Status& s) {
  return absl::StrCat(absl::StatusCodeToString(static_cast<absl::StatusCode>(s.error_code())),
                      s.error_message().empty() ? "" : ": ", s.error_message());
}

void AddToken(const std::string& token, grpc::ClientContext* ctx) {
  if (!token.empty()) ctx->AddMetadata("authorization", "Bearer " + token);
}

}  // namespace

GrpcWorkerLink::GrpcWorkerLink(WorkerLinkConfig config) : config_(std::move(config)) {
  stats_.address = config_.address;
  NewChannel();
}

GrpcWorkerLink::~GrpcWorkerLink() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
    if (stream_context_ != nullptr) stream_context_->TryCancel();
    if (describe_context_ != nullptr) describe_context_->TryCancel();
    if (data_ != nullptr) data_->Abort();
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void GrpcWorkerLink::NewChannel() {
  grpc::ChannelArguments args = config_.channel_args;
  // One small message each way per layer: HTTP/2 bandwidth-delay probing only adds PING frames
  // (and wake-ups on both ends) to the exchange.
  args.SetInt(GRPC_ARG_HTTP2_BDP_PROBE, 0);
  // A large flow-control window: WINDOW_UPDATE frames (each a write and a wake-up of the peer)
  // become rare instead of following every few messages.
  args.SetInt(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, 8 << 20);
  channel_ = grpc::CreateCustomChannel(config_.address, config_.credentials, args);
  stub_ = moepool::v1::ExpertService::NewStub(channel_);
}

absl::StatusOr<moepool::v1::DescribeResponse> GrpcWorkerLink::Describe(double timeout_s,
                                                                       bool wait_for_ready) {
  grpc::ClientContext ctx;
  AddToken(config_.token, &ctx);
  ctx.set_wait_for_ready(wait_for_ready);
  ctx.set_deadline(std::chrono::system_clock::now() +
                   std::chrono::microseconds(static_cast<int64_t>(timeout_s * 1e6)));
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stop_) return absl::CancelledError("shutting down");
    describe_context_ = &ctx;
  }
  moepool::v1::DescribeResponse response;
  const grpc::Status s = stub_->Describe(&ctx, moepool::v1::DescribeRequest(), &response);
  {
    std::lock_guard<std::mutex> lock(mu_);
    describe_context_ = nullptr;
  }
  if (s.ok()) return response;
  const auto code = static_cast<absl::StatusCode>(s.error_code());
  switch (code) {
    case absl::StatusCode::kUnauthenticated:
    case absl::StatusCode::kPermissionDenied:
      return absl::Status(code, absl::StrCat("worker ", config_.address,
                                             " refused the cluster token (", GrpcStatusText(s),
                                             "); check --cluster-token / MOEPOOL_CLUSTER_TOKEN"));
    case absl::StatusCode::kDeadlineExceeded:
      return absl::Status(code,
                          absl::StrFormat("worker %s did not answer Describe within %g s (%s)",
                                          config_.address, timeout_s, GrpcStatusText(s)));
    default:
      return absl::Status(
          code, absl::StrCat("worker ", config_.address, ": Describe failed: ", GrpcStatusText(s)));
  }
}

void GrpcWorkerLink::Start(const moepool::v1::DescribeResponse& describe, AcceptWorker accept) {
  OpenDataChannel(describe);  // no I/O thread yet: this thread owns the link
  std::lock_guard<std::mutex> lock(mu_);
  accept_ = std::move(accept);
  accepted_ = describe;
  up_ = true;
  started_ = true;
  stats_.up = true;
  stats_.worker_id = describe.worker_id();
  thread_ = std::thread([this] { Loop(); });
}

bool GrpcWorkerLink::up() const {
  std::lock_guard<std::mutex> lock(mu_);
  return up_;
}

void GrpcWorkerLink::Post(LinkJob* job, RoundLatch* latch) {
  bool write_here = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (job_ != nullptr || inline_ || !started_) {
      job->status = absl::InternalError(
          absl::StrCat("worker ", config_.address, ": a request is already in flight"));
      latch->CountDown();
      return;
    }
    // With the stream open and idle (no job, no RunInline: nobody else touches it) a request
    // that fits one message is written right here, so it leaves without waiting for the link
    // thread to wake up; the link thread then only reads the answer.
    // Rows on an NCCL pipe go through Exchange on the link thread (ExchangeOutOfBand).
    // A request on the data channel is always one frame.
    const bool rows_out_of_band = row_session_ != nullptr && !row_session_->broken();
    const bool one_message =
        data_ != nullptr || (stream_ != nullptr && !rows_out_of_band &&
                             wire::RowsPerChunk(config_.max_message_bytes, job->n_embd, job->dtype,
                                                job->k) >= static_cast<int64_t>(job->rows->size()));
    if (up_ && one_message) {
      write_here = true;
      inline_ = true;  // this thread owns the stream while it writes
      in_flight_round_ = job->round;
      cancelled_ = false;
    } else {
      job_ = job;
      latch_ = latch;
    }
  }
  if (!write_here) {
    cv_.notify_all();
    return;
  }
  Written written;
  written.t0 = Clock::now();
  const absl::Status s = WriteRequest(job, &written.request_bytes);
  {
    std::lock_guard<std::mutex> lock(mu_);
    inline_ = false;
    if (s.ok()) {
      job_ = job;
      latch_ = latch;
      written_ = written;
    } else {
      in_flight_round_ = 0;
      ++stats_.failures;
      stats_.last_error = std::string(s.message());
    }
  }
  cv_.notify_all();  // the link thread reads the answer, or reconnects after a failed write
  if (!s.ok()) {
    job->status = s;
    latch->CountDown();
  }
}

void GrpcWorkerLink::CancelRound(uint64_t step_id) {
  std::lock_guard<std::mutex> lock(mu_);
  if (in_flight_round_ != step_id || step_id == 0) return;
  cancelled_ = true;
  if (stream_context_ != nullptr) stream_context_->TryCancel();
  if (data_ != nullptr) data_->Abort();
}

WorkerStats GrpcWorkerLink::Stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  WorkerStats s = stats_;
  s.recent.assign(samples_.begin(), samples_.end());
  return s;
}

void GrpcWorkerLink::ResetStats() {
  std::lock_guard<std::mutex> lock(mu_);
  WorkerStats fresh;
  fresh.address = stats_.address;
  fresh.worker_id = stats_.worker_id;
  fresh.up = stats_.up;
  fresh.last_error = stats_.last_error;
  stats_ = fresh;
  samples_.clear();
}

void GrpcWorkerLink::Loop() {
  std::unique_lock<std::mutex> lock(mu_);
  while (!stop_) {
    if (inline_) {  // the caller's thread owns the stream until RunInline returns
      cv_.wait(lock, [&] { return stop_ || !inline_; });
      continue;
    }
    if (job_ != nullptr) {
      LinkJob* job = job_;
      RoundLatch* latch = latch_;
      const std::optional<Written> written = written_;
      written_.reset();
      if (!up_) {
        job->status = DownError();
      } else {
        if (!written) {  // else Post set these before writing
          in_flight_round_ = job->round;
          cancelled_ = false;
        }
        lock.unlock();
        RunJob(job, written ? &*written : nullptr);
        lock.lock();
      }
      in_flight_round_ = 0;
      job_ = nullptr;
      latch_ = nullptr;
      lock.unlock();
      latch->CountDown();
      lock.lock();
      continue;
    }
    if (!up_) {
      if (Clock::now() >= next_attempt_) {
        lock.unlock();
        TryReconnect();
        lock.lock();
      } else {
        cv_.wait_until(lock, next_attempt_, [&] { return stop_ || inline_ || job_ != nullptr; });
      }
      continue;
    }
    cv_.wait(lock, [&] { return stop_ || inline_ || job_ != nullptr || !up_; });
  }
  lock.unlock();
  if (stream_ != nullptr) CloseStream(/*cancel=*/true);
}

absl::Status GrpcWorkerLink::DownError() const {
  return absl::UnavailableError(absl::StrCat("worker ", config_.address, " is down (",
                                             stats_.last_error,
                                             "); reconnecting in the background"));
}

void GrpcWorkerLink::RunInline(LinkJob* job) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!started_ || inline_ || job_ != nullptr) {
      job->status = absl::InternalError(
          absl::StrCat("worker ", config_.address, ": a request is already in flight"));
      return;
    }
    if (!up_) {
      job->status = DownError();
      return;
    }
    inline_ = true;
    in_flight_round_ = job->round;
    cancelled_ = false;
  }
  RunJob(job, nullptr);
  bool wake;
  {
    std::lock_guard<std::mutex> lock(mu_);
    inline_ = false;
    in_flight_round_ = 0;
    // The link thread only has work if the job marked the link down (reconnect) or if it is
    // stopping; waking it after every job would cost a context switch per layer.
    wake = !up_ || stop_;
  }
  if (wake) cv_.notify_all();
}

void GrpcWorkerLink::RunJob(LinkJob* job, const Written* written) {
  const absl::Status s = Exchange(job, written);
  bool close = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (s.ok()) {
      ++stats_.requests;
      stats_.rows += static_cast<uint64_t>(job->sample.rows);
      stats_.request_bytes += job->sample.request_bytes;
      stats_.response_bytes += job->sample.response_bytes;
      stats_.round_trip_micros += job->sample.round_trip_micros;
      stats_.compute_micros += job->sample.compute_micros;
      samples_.push_back(job->sample);
      while (samples_.size() > config_.max_samples) samples_.pop_front();
      // The watchdog fired just as the answer arrived: the stream is cancelled, open a new one
      // for the next step.
      close = cancelled_;
    } else {
      ++stats_.failures;
      stats_.last_error = std::string(s.message());
    }
  }
  if (close && stream_ != nullptr) CloseStream(/*cancel=*/true);
  job->status = s;
}

absl::Status GrpcWorkerLink::OpenStream() {
  auto ctx = std::make_unique<grpc::ClientContext>();
  AddToken(config_.token, ctx.get());
  grpc::ClientContext* raw = ctx.get();
  {
    std::lock_guard<std::mutex> lock(mu_);
    stream_context_ = std::move(ctx);
  }
  stream_ = stub_->Forward(raw);
  if (stream_ == nullptr) {
    std::lock_guard<std::mutex> lock(mu_);
    stream_context_.reset();
    return absl::UnavailableError(
        absl::StrCat("worker ", config_.address, ": cannot open the Forward stream"));
  }
  return absl::OkStatus();
}

grpc::Status GrpcWorkerLink::CloseStream(bool cancel) {
  if (cancel) {
    std::lock_guard<std::mutex> lock(mu_);
    if (stream_context_ != nullptr) stream_context_->TryCancel();
  }
  grpc::Status s = grpc::Status::OK;
  if (stream_ != nullptr) s = stream_->Finish();
  stream_.reset();
  std::lock_guard<std::mutex> lock(mu_);
  stream_context_.reset();
  return s;
}

absl::Status GrpcWorkerLink::CheckAnswer(const LinkJob& job,
                                         const moepool::v1::ForwardResponse& resp) {
  if (resp.step_id() != job.round || resp.layer() != job.layer) {
    return Broken(job,
                  absl::StrCat("answered step ", resp.step_id(), " layer ", resp.layer(),
                               " to a request for step ", job.round, " layer ", job.layer),
                  true);
  }
  if (resp.error_code() != 0) {
    return absl::Status(static_cast<absl::StatusCode>(resp.error_code()),
                        absl::StrCat("worker ", config_.address, " refused layer ", job.layer, ": ",
                                     resp.error_message()));
  }
  return absl::OkStatus();
}

absl::Status GrpcWorkerLink::Broken(const LinkJob& job, const std::string& what, bool cancel) {
  bool by_watchdog;
  {
    std::lock_guard<std::mutex> lock(mu_);
    by_watchdog = cancelled_;
  }
  const grpc::Status gs = CloseStream(cancel || by_watchdog);
  const absl::Status s =
      LostError(job, by_watchdog, absl::StrCat(what, " (", GrpcStatusText(gs), ")"));
  MarkDown(s);
  return s;
}

wire::RoundHeader GrpcWorkerLink::RoundOf(const LinkJob& job) {
  wire::RoundHeader h;
  h.round = job.round;
  h.layer = job.layer;
  h.dtype = job.dtype;
  h.return_dtype = job.answer_dtype();
  h.n_embd = job.n_embd;
  h.total_rows = static_cast<int64_t>(job.rows->size());
  h.k = job.k;
  return h;
}

wire::RequestRows GrpcWorkerLink::RowsOf(const LinkJob& job) {
  return wire::RequestRows{job.x, *job.rows, *job.expert, *job.weight};
}

absl::Status GrpcWorkerLink::WriteRequest(LinkJob* job, uint64_t* request_bytes) {
  if (data_ != nullptr) return WriteDataRequest(job, request_bytes);
  *request_bytes = 0;
  const bool written = wire::WriteRequestChunks(
      RoundOf(*job), RowsOf(*job),
      wire::RowsPerChunk(config_.max_message_bytes, job->n_embd, job->dtype, job->k),
      [&](const moepool::v1::ForwardRequest& chunk) { return stream_->Write(chunk); }, &request_,
      request_bytes);
  if (!written) {
    return Broken(*job, absl::StrCat("connection lost while sending layer ", job->layer), false);
  }
  return absl::OkStatus();
}

absl::Status GrpcWorkerLink::Exchange(LinkJob* job, const Written* written) {
  if (data_ != nullptr) return ExchangeOverData(job, written);
  Written w;
  if (written != nullptr) {
    w = *written;
  } else {
    if (stream_ == nullptr) {
      const absl::Status s = OpenStream();
      if (!s.ok()) {
        MarkDown(s);
        return s;
      }
    }
    if (row_session_ != nullptr && !row_session_->broken()) return ExchangeOutOfBand(job);
    w.t0 = Clock::now();
    const absl::Status s = WriteRequest(job, &w.request_bytes);
    if (!s.ok()) return s;
  }
  const auto t0 = w.t0;
  const uint64_t request_bytes = w.request_bytes;
  wire::ResponseAssembler rows(RoundOf(*job));
  moepool::v1::ForwardResponse& resp = response_;
  uint64_t response_bytes = 0;
  uint64_t compute_micros = 0;
  while (!rows.complete()) {
    if (!stream_->Read(&resp)) {
      return Broken(*job, absl::StrCat("connection lost while waiting for layer ", job->layer),
                    false);
    }
    response_bytes += resp.ByteSizeLong();
    if (resp.step_id() < job->round) continue;  // the rest of an answer to an abandoned step
    if (absl::Status s = CheckAnswer(*job, resp); !s.ok()) return s;
    if (absl::Status s = rows.Add(resp); !s.ok()) {
      return Broken(
          *job, absl::StrCat("malformed answer for layer ", job->layer, ": ", s.message()), true);
    }
    compute_micros = std::max<uint64_t>(compute_micros, resp.compute_micros());
  }
  const auto t1 = Clock::now();
  job->partial = std::move(rows.values());
  job->sample.layer = job->layer;
  job->sample.rows = static_cast<int64_t>(job->rows->size());
  job->sample.round_trip_micros = MicrosBetween(t0, t1);
  job->sample.compute_micros = compute_micros;
  job->sample.request_bytes = request_bytes;
  job->sample.response_bytes = response_bytes;
  return absl::OkStatus();
}

absl::Status GrpcWorkerLink::LostError(const LinkJob& job, bool by_watchdog,
                                       const std::string& what) const {
  if (by_watchdog) {
    return absl::DeadlineExceededError(absl::StrFormat(
        "worker %s did not answer layer %d within the step timeout of %g s; marked down, "
        "reconnecting in the background",
        config_.address, job.layer, config_.step_timeout_s));
  }
  return absl::UnavailableError(absl::StrCat("worker ", config_.address, ": ", what,
                                             "; marked down, reconnecting in the background"));
}

void GrpcWorkerLink::MarkDown(const absl::Status& why) {
  std::lock_guard<std::mutex> lock(mu_);
  up_ = false;
  stats_.up = false;
  stats_.last_error = std::string(why.message());
  backoff_s_ = config_.backoff_initial_s;
  next_attempt_ = Clock::now() + std::chrono::microseconds(static_cast<int64_t>(backoff_s_ * 1e6));
}

void GrpcWorkerLink::TryReconnect() {
  NewChannel();
  absl::StatusOr<moepool::v1::DescribeResponse> d =
      Describe(config_.describe_timeout_s, /*wait_for_ready=*/false);
  absl::Status s = d.ok() ? (accept_ ? accept_(*d) : absl::OkStatus()) : d.status();
  // A new row session before the link is up again (this may block while both ends join).
  if (s.ok()) OpenDataChannel(*d);  // the link is down: no job, this thread owns it
  std::shared_ptr<wire::RowSession> renewed;
  if (s.ok() && renew_session_) {
    renewed = renew_session_(*d, previous_session_);
    previous_session_ = renewed != nullptr ? renewed->session() : 0;
  }
  std::shared_ptr<wire::RowSession> old;  // released after the lock (an NCCL pipe aborts its comm)
  std::lock_guard<std::mutex> lock(mu_);
  if (s.ok()) {
    if (renew_session_) {
      old = std::move(row_session_);
      row_session_ = std::move(renewed);
    }
    up_ = true;
    stats_.up = true;
    ++stats_.reconnects;
    stats_.worker_id = d->worker_id();
    accepted_ = *d;
    return;
  }
  stats_.last_error = std::string(s.message());
  backoff_s_ = std::min(backoff_s_ * 2, config_.backoff_max_s);
  next_attempt_ = Clock::now() + std::chrono::microseconds(static_cast<int64_t>(backoff_s_ * 1e6));
}

}  // namespace moepool
