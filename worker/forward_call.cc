#include "worker/forward_call.h"

#include <algorithm>
#include <chrono>
#include <cstdio>

#include "absl/strings/str_cat.h"

namespace moepool::worker {
namespace {

namespace pb = ::moepool::v1;

uint64_t MicrosSince(std::chrono::steady_clock::time_point t0) {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - t0)
          .count());
}

ComputeRequest ToCompute(const pb::ForwardRequest& h, const float* x, const int32_t* expert,
                         const float* weight, size_t pairs) {
  ComputeRequest c;
  c.layer = h.layer();
  c.x = x;
  c.n_rows = h.total_rows();
  c.n_embd = h.n_embd();
  c.k = h.k();
  c.expert = expert;
  c.expert_count = pairs;
  c.weight = weight;
  c.weight_count = pairs;
  return c;
}

}  // namespace

void ForwardCall::Listen(const ForwardCallEnv* env) {
  auto* call = new ForwardCall(env);
  if (!env->gate->Run([&] {
        env->service->RequestForward(&call->context_, &call->stream_, env->cq, env->cq,
                                     call->Tag(kAccepted));
      })) {
    delete call;
  }
}

ForwardCall::ForwardCall(const ForwardCallEnv* env)
    : env_(env),
      stream_(&context_),
      assembler_(wire::RequestLimits{env->core->config().n_embd, env->core->max_rows(),
                                     static_cast<int>(env->core->config().n_expert)}) {
  for (int e = 0; e < kEventCount; ++e) tags_[e] = {this, e};
}

void ForwardCall::OnEvent(int event, bool ok) {
  switch (event) {
    case kAccepted:
      return OnAccepted(ok);
    case kRead:
      return OnRead(ok);
    case kWritten:
      return OnWritten(ok);
    default:
      delete this;  // kFinished: nothing is outstanding any more
  }
}

void ForwardCall::OnAccepted(bool ok) {
  if (!ok) {  // the server is shutting down
    delete this;
    return;
  }
  Listen(env_);
  const grpc::Status auth = env_->check_token(context_);
  if (!auth.ok()) {
    Start([&] { stream_.Finish(auth, Tag(kFinished)); });
    return;
  }
  Start([&] { stream_.Read(&chunk_, Tag(kRead)); });
}

template <typename Op>
void ForwardCall::Start(Op op) {
  if (!env_->gate->Run(op)) delete this;  // the server has shut down: no event will come
}

void ForwardCall::OnRead(bool ok) {
  if (!ok) {
    reads_done_ = true;
    if (wire::RequestAssembler::Refusal r; assembler_.Abandon(&r)) Refuse(r.header, r.status);
  } else {
    HandleChunk();
  }
  Continue();
}

void ForwardCall::OnWritten(bool ok) {
  if (!ok) {
    Start([&] {
      stream_.Finish(grpc::Status(grpc::StatusCode::CANCELLED, "the client went away"),
                     Tag(kFinished));
    });
    return;
  }
  ++out_next_;
  if (out_next_ == out_count_ && nccl_send_session_ != 0) {
    // The header-only answer is out: the result follows on the NCCL session.
    NcclSessions::Locked session;
    if (env_->nccl != nullptr) session = env_->nccl->Lock(nccl_send_session_);
    nccl_send_session_ = 0;
    if (session.peer != nullptr) {
      if (absl::Status sent = session.peer->Send(nccl_bytes_.data(), nccl_bytes_.size());
          !sent.ok()) {
        std::fprintf(stderr, "moepool worker: NCCL send of a result failed: %s\n",
                     std::string(sent.message()).c_str());
      }
    }
  }
  Continue();
}

void ForwardCall::Continue() {
  if (out_next_ < out_count_) {
    Start([&] { stream_.Write(out_[out_next_], Tag(kWritten)); });
    return;
  }
  out_count_ = 0;
  out_next_ = 0;
  if (!reads_done_) {
    Start([&] { stream_.Read(&chunk_, Tag(kRead)); });
    return;
  }
  Start([&] { stream_.Finish(grpc::Status::OK, Tag(kFinished)); });
}

pb::ForwardResponse* ForwardCall::NextResponse() {
  if (out_count_ == out_.size()) out_.emplace_back();
  pb::ForwardResponse* r = &out_[out_count_++];
  r->Clear();
  return r;
}

void ForwardCall::Refuse(const pb::ForwardRequest& request, const absl::Status& error) {
  pb::ForwardResponse* r = NextResponse();
  wire::SetResponseHeader(request, r);
  r->set_error_code(static_cast<int>(error.code()));
  r->set_error_message(std::string(error.message()));
}

void ForwardCall::Answer(const ComputeRequest& compute, const pb::ForwardRequest& round) {
  const auto start = std::chrono::steady_clock::now();
  const absl::Status s = env_->core->Compute(compute, &result_);
  const uint64_t micros = MicrosSince(start);
  if (!s.ok()) return Refuse(round, s);
  const wire::RoundHeader header = wire::HeaderOf(round);
  wire::WriteResponseChunks(header, result_.data(),
                            wire::RowsPerPayload(static_cast<int64_t>(env_->response_chunk_bytes),
                                                 header.n_embd, header.return_dtype),
                            micros, [&] { return NextResponse(); });
}

void ForwardCall::AnswerOverNccl(const pb::ForwardRequest& request) {
  NcclSessions::Locked session;
  if (env_->nccl != nullptr) session = env_->nccl->Lock(request.nccl_session());
  if (session.peer == nullptr || session.peer->broken()) {
    return Refuse(request, absl::FailedPreconditionError(
                               absl::StrCat("NCCL session ", request.nccl_session(),
                                            " is unknown or broken here (worker restarted?)")));
  }
  const int64_t n = static_cast<int64_t>(request.total_rows()) * request.n_embd();
  nccl_bytes_.resize(static_cast<size_t>(wire::EncodedBytes(request.dtype(), n)));
  if (absl::Status s = session.peer->Recv(nccl_bytes_.data(), nccl_bytes_.size()); !s.ok()) {
    return Refuse(request, absl::UnavailableError(
                               absl::StrCat("NCCL receive of the rows failed: ", s.message())));
  }
  nccl_x_.resize(static_cast<size_t>(n));
  // The size matches the checked header, so decoding cannot fail.
  wire::DecodeRows(request.dtype(), nccl_bytes_, n, nccl_x_.data()).IgnoreError();
  const auto start = std::chrono::steady_clock::now();
  const absl::Status s =
      env_->core->Compute(ToCompute(request, nccl_x_.data(), request.expert().data(),
                                    request.weight().data(), request.expert_size()),
                          &result_);
  if (!s.ok()) return Refuse(request, s);
  nccl_bytes_.clear();
  wire::EncodeRows(wire::ReturnDTypeOf(request), result_.data(), n, &nccl_bytes_);
  pb::ForwardResponse* r = NextResponse();
  wire::SetResponseHeader(request, r);
  r->set_row_offset(0);
  r->set_n_rows(request.total_rows());
  r->set_rows_via_nccl(true);
  r->set_compute_micros(MicrosSince(start));
  nccl_send_session_ = request.nccl_session();
}

void ForwardCall::HandleChunk() {
  const wire::RequestAssembler::Outcome outcome = assembler_.Add(chunk_);
  for (const auto& refusal : assembler_.refusals()) Refuse(refusal.header, refusal.status);
  switch (outcome) {
    case wire::RequestAssembler::Outcome::kPipe:
      return AnswerOverNccl(chunk_);
    case wire::RequestAssembler::Outcome::kComplete: {
      const pb::ForwardRequest& round = assembler_.round();
      return Answer(ToCompute(round, assembler_.x().data(), assembler_.expert().data(),
                              assembler_.weight().data(), assembler_.expert().size()),
                    round);
    }
    default:
      return;
  }
}

}  // namespace moepool::worker
