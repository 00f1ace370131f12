// GrpcWorkerLink's exchange with the rows outside the gRPC messages (--transport nccl, see
// wire/transport.h): one request message without rows naming the NCCL session, the rows
// sent on the pipe, one response message without rows, the result received on the pipe. Kept
// apart from grpc_worker_link.cc so the gRPC path reads as before.
#include <chrono>
#include <cstdio>
#include <string>

#include "absl/strings/str_cat.h"
#include "coordinator/grpc_worker_link.h"
#include "wire/forward_chunks.h"

namespace moepool {
namespace {

uint64_t MicrosSince(std::chrono::steady_clock::time_point t0) {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - t0)
          .count());
}

}  // namespace

absl::Status GrpcWorkerLink::ExchangeOutOfBand(LinkJob* job) {
  const auto t0 = std::chrono::steady_clock::now();
  const int64_t n = static_cast<int64_t>(job->rows->size());
  const int64_t d = job->n_embd;
  // After a pipe failure the two ends may disagree on what is in flight: gRPC from now on.
  auto pipe_failed = [&](const absl::Status& why) {
    std::fprintf(stderr, "moepool: worker %s: NCCL rows failed (%s); using gRPC %s\n",
                 config_.address.c_str(), std::string(why.message()).c_str(),
                 renew_session_ ? "until a new session is set up on reconnect" : "from now on");
    row_session_.reset();
    return Broken(*job, absl::StrCat("NCCL rows of layer ", job->layer, " failed"), true);
  };

  moepool::v1::ForwardRequest req;
  std::string rows;
  wire::BuildPipeRequest(RoundOf(*job), RowsOf(*job), row_session_->session(), &req, &rows);
  const uint64_t request_bytes = req.ByteSizeLong();
  if (!stream_->Write(req)) {
    return Broken(*job, absl::StrCat("connection lost while sending layer ", job->layer), false);
  }
  if (absl::Status s = row_session_->Send(rows.data(), rows.size()); !s.ok()) {
    return pipe_failed(s);
  }

  moepool::v1::ForwardResponse resp;
  uint64_t response_bytes = 0;
  do {
    if (!stream_->Read(&resp)) {
      return Broken(*job, absl::StrCat("connection lost while waiting for layer ", job->layer),
                    false);
    }
    response_bytes += resp.ByteSizeLong();
  } while (resp.step_id() < job->round);  // the rest of an answer to an abandoned step
  if (absl::Status s = CheckAnswer(*job, resp); !s.ok()) return s;
  if (!resp.rows_via_nccl() || resp.dtype() != job->answer_dtype() || resp.total_rows() != n ||
      resp.row_offset() != 0 || resp.n_rows() != n) {
    return pipe_failed(
        absl::InternalError(absl::StrCat("the answer to layer ", job->layer, " does not announce ",
                                         n, " rows on the NCCL session")));
  }
  rows.resize(static_cast<size_t>(wire::EncodedBytes(job->answer_dtype(), n * d)));
  if (absl::Status s = row_session_->Recv(rows.data(), rows.size()); !s.ok()) {
    return pipe_failed(s);
  }
  job->partial.resize(static_cast<size_t>(n * d));
  if (absl::Status s = wire::DecodeRows(job->answer_dtype(), rows, n * d, job->partial.data());
      !s.ok()) {
    return Broken(*job, absl::StrCat("malformed answer for layer ", job->layer, ": ", s.message()),
                  true);
  }
  job->sample.layer = job->layer;
  job->sample.rows = n;
  job->sample.round_trip_micros = MicrosSince(t0);
  job->sample.compute_micros = resp.compute_micros();
  job->sample.request_bytes = request_bytes + rows.size();
  job->sample.response_bytes = response_bytes + rows.size();
  return absl::OkStatus();
}

}  // namespace moepool
