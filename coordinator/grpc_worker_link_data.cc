// GrpcWorkerLink's exchange over the worker's data channel (wire/data_channel.h, --transport
// tcp): the round as one ForwardRequest frame, its answer as one ForwardResponse frame, on a
// plain (or TLS) TCP connection opened after Describe. A failed channel drops the link to down
// like a lost stream; the reconnect opens a new channel. Kept apart from grpc_worker_link.cc so
// the gRPC path reads as before.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "coordinator/grpc_worker_link.h"

namespace moepool {
namespace {

bool Offers(const moepool::v1::DescribeResponse& d, const char* transport) {
  for (const std::string& t : d.transports()) {
    if (t == transport) return true;
  }
  return false;
}

}  // namespace

void GrpcWorkerLink::OpenDataChannel(const moepool::v1::DescribeResponse& describe) {
  std::unique_ptr<wire::DataStream> old;
  {
    std::lock_guard<std::mutex> lock(mu_);
    old = std::move(data_);
  }
  old.reset();
  if (!config_.data_channel || !Offers(describe, wire::kTcpTransportName) ||
      describe.data_port() <= 0) {
    return;
  }
  absl::StatusOr<std::unique_ptr<wire::DataStream>> opened = wire::DialDataChannel(
      wire::HostOfAddress(config_.address), describe.data_port(), config_.data_dial);
  if (!opened.ok()) {
    std::fprintf(stderr, "moepool: worker %s: %s; its rows travel over gRPC until it reconnects\n",
                 config_.address.c_str(), std::string(opened.status().message()).c_str());
    return;
  }
  std::lock_guard<std::mutex> lock(mu_);
  data_ = *std::move(opened);
}

absl::Status GrpcWorkerLink::DataBroken(const LinkJob& job, const std::string& what) {
  bool by_watchdog;
  std::unique_ptr<wire::DataStream> old;
  {
    std::lock_guard<std::mutex> lock(mu_);
    by_watchdog = cancelled_;
    old = std::move(data_);
  }
  old.reset();
  const absl::Status s = LostError(job, by_watchdog, what);
  MarkDown(s);
  return s;
}

absl::Status GrpcWorkerLink::WriteDataRequest(LinkJob* job, uint64_t* request_bytes) {
  *request_bytes = 0;
  absl::Status sent = absl::OkStatus();
  uint64_t message_bytes = 0;  // the frames' sizes are what counts here
  wire::WriteRequestChunks(
      RoundOf(*job), RowsOf(*job),
      wire::RowsPerChunk(config_.max_message_bytes, job->n_embd, job->dtype, job->k),
      [&](const moepool::v1::ForwardRequest& frame) {
        uint64_t frame_bytes = 0;
        sent = data_->Write(frame, &frame_bytes);
        *request_bytes += frame_bytes;
        return sent.ok();
      },
      &request_, &message_bytes);
  if (!sent.ok()) {
    return DataBroken(*job, absl::StrCat("data channel lost while sending layer ", job->layer, " (",
                                         sent.message(), ")"));
  }
  return absl::OkStatus();
}

absl::Status GrpcWorkerLink::ExchangeOverData(LinkJob* job, const Written* written) {
  Written w;
  if (written != nullptr) {
    w = *written;
  } else {
    w.t0 = std::chrono::steady_clock::now();
    if (absl::Status s = WriteDataRequest(job, &w.request_bytes); !s.ok()) return s;
  }
  moepool::v1::ForwardResponse& resp = response_;
  wire::ResponseAssembler rows(RoundOf(*job));
  uint64_t response_bytes = 0;
  uint64_t compute_micros = 0;
  while (!rows.complete()) {
    uint64_t frame_bytes = 0;
    if (absl::Status s = data_->Read(&resp, &frame_bytes); !s.ok()) {
      return DataBroken(*job, absl::StrCat("data channel lost while waiting for layer ", job->layer,
                                           " (", s.message(), ")"));
    }
    response_bytes += frame_bytes;
    if (resp.step_id() != job->round || resp.layer() != job->layer) {
      return DataBroken(*job,
                        absl::StrCat("answered step ", resp.step_id(), " layer ", resp.layer(),
                                     " to a request for step ", job->round, " layer ", job->layer));
    }
    if (resp.error_code() != 0) {
      return absl::Status(static_cast<absl::StatusCode>(resp.error_code()),
                          absl::StrCat("worker ", config_.address, " refused layer ", job->layer,
                                       ": ", resp.error_message()));
    }
    if (absl::Status s = rows.Add(resp); !s.ok()) {
      return DataBroken(*job,
                        absl::StrCat("malformed answer for layer ", job->layer, ": ", s.message()));
    }
    compute_micros = std::max<uint64_t>(compute_micros, resp.compute_micros());
  }
  const auto t1 = std::chrono::steady_clock::now();
  job->partial = std::move(rows.values());
  job->sample.layer = job->layer;
  job->sample.rows = static_cast<int64_t>(job->rows->size());
  job->sample.round_trip_micros = static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::microseconds>(t1 - w.t0).count());
  job->sample.compute_micros = compute_micros;
  job->sample.request_bytes = w.request_bytes;
  job->sample.response_bytes = response_bytes;
  return absl::OkStatus();
}

}  // namespace moepool
