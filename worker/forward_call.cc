#include "worker/forward_call.h"

#include <algorithm>
#include <chrono>
#include <cstdio>

#include "absl/strings/str_cat.h"

namespace moepool::worker {
namespace {

namespace pb = ::moepool::v1;

static_assert(static_cast<int>(RowDType::kF32) == pb::DTYPE_F32 &&
                  static_cast<int>(RowDType::kF16) == pb::DTYPE_F16 &&
                  static_cast<int>(RowDType::kBf16) == pb::DTYPE_BF16,
              "RowDType numbering must match moepool.v1.DType");

bool IsLastChunk(const pb::ForwardRequest& c) {
  return static_cast<int64_t>(c.row_offset()) + c.n_rows() >= c.total_rows();
}

// Checks a chunk on its own: the sizes that make its rows placeable. Semantic checks (experts
// held, weights finite, ...) are WorkerCore's, on the whole request.
absl::Status CheckChunk(const pb::ForwardRequest& c, const WorkerCore& core) {
  const size_t elem = RowDTypeSize(static_cast<RowDType>(c.dtype()));
  if (elem == 0) {
    return absl::InvalidArgumentError(absl::StrCat("unknown dtype ", c.dtype()));
  }
  if (c.n_embd() != core.config().n_embd) {
    return absl::InvalidArgumentError(absl::StrCat(
        "n_embd ", c.n_embd(), " != the model's embedding length ", core.config().n_embd));
  }
  if (c.total_rows() < 0 || c.total_rows() > core.max_rows()) {
    return absl::InvalidArgumentError(
        absl::StrCat("total_rows ", c.total_rows(), " is outside [0, ", core.max_rows(), "]"));
  }
  if (c.k() < 1 || c.k() > core.config().n_expert) {
    return absl::InvalidArgumentError(
        absl::StrCat("k ", c.k(), " is outside [1, ", core.config().n_expert, "]"));
  }
  const int64_t end = static_cast<int64_t>(c.row_offset()) + c.n_rows();
  if (c.row_offset() < 0 || c.n_rows() < 0 || end > c.total_rows() ||
      (c.n_rows() == 0 && c.total_rows() > 0)) {
    return absl::InvalidArgumentError(absl::StrCat("chunk rows [", c.row_offset(), ", ", end,
                                                   ") do not fit total_rows ", c.total_rows()));
  }
  const uint64_t want_bytes = static_cast<uint64_t>(c.n_rows()) * c.n_embd() * elem;
  if (c.nccl_session() != 0) {
    if (c.row_offset() != 0 || c.n_rows() != c.total_rows() || !c.rows().empty()) {
      return absl::InvalidArgumentError(
          "a request with its rows on NCCL is one message without rows (row_offset 0, n_rows = "
          "total_rows)");
    }
  } else if (c.rows().size() != want_bytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("chunk rows hold ", c.rows().size(), " bytes, expected ", want_bytes));
  }
  const int64_t pairs = static_cast<int64_t>(c.n_rows()) * c.k();
  if (c.expert_size() != pairs || c.weight_size() != pairs) {
    return absl::InvalidArgumentError(absl::StrCat("chunk has ", c.expert_size(),
                                                   " expert ids and ", c.weight_size(),
                                                   " weights, expected n_rows x k = ", pairs));
  }
  return absl::OkStatus();
}

bool SameRequest(const pb::ForwardRequest& a, const pb::ForwardRequest& b) {
  return a.step_id() == b.step_id() && a.layer() == b.layer() && a.dtype() == b.dtype() &&
         a.n_embd() == b.n_embd() && a.total_rows() == b.total_rows() && a.k() == b.k();
}

void SetHeader(const pb::ForwardRequest& request, pb::ForwardResponse* r) {
  r->set_step_id(request.step_id());
  r->set_layer(request.layer());
  r->set_dtype(request.dtype());
  r->set_total_rows(request.total_rows());
}

ComputeRequest ToCompute(const pb::ForwardRequest& h, const void* rows, size_t rows_bytes,
                         const int32_t* expert, const float* weight, size_t pairs) {
  ComputeRequest c;
  c.layer = h.layer();
  c.dtype = static_cast<RowDType>(h.dtype());
  c.rows = rows;
  c.rows_bytes = rows_bytes;
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

ForwardCall::ForwardCall(const ForwardCallEnv* env) : env_(env), stream_(&context_) {
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
    if (pending_.active) {
      Refuse(pending_.header, absl::InvalidArgumentError(
                                  absl::StrCat("stream closed at row ", pending_.next_row, " of ",
                                               pending_.header.total_rows(), " of the request")));
      pending_ = Assembly();
    }
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
      if (absl::Status sent = session.peer->Send(result_.data(), result_.size()); !sent.ok()) {
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
  SetHeader(request, r);
  r->set_error_code(static_cast<int>(error.code()));
  r->set_error_message(std::string(error.message()));
}

void ForwardCall::Answer(const ComputeRequest& compute, const pb::ForwardRequest& header) {
  const auto start = std::chrono::steady_clock::now();
  const absl::Status s = env_->core->Compute(compute, &result_);
  const auto micros = std::chrono::duration_cast<std::chrono::microseconds>(
                          std::chrono::steady_clock::now() - start)
                          .count();
  if (!s.ok()) return Refuse(header, s);
  const size_t row_bytes =
      static_cast<size_t>(compute.n_embd) * RowDTypeSize(static_cast<RowDType>(header.dtype()));
  const int64_t rows_per_message =
      std::max<int64_t>(1, static_cast<int64_t>(env_->response_chunk_bytes / row_bytes));
  int64_t offset = 0;
  do {
    const int64_t n = std::min(rows_per_message, compute.n_rows - offset);
    pb::ForwardResponse* r = NextResponse();
    SetHeader(header, r);
    r->set_row_offset(static_cast<int32_t>(offset));
    r->set_n_rows(static_cast<int32_t>(n));
    if (offset == 0 && n == compute.n_rows) {
      // The whole result fits one message: hand the buffer over instead of copying it (the
      // message's previous buffer comes back for the next computation).
      r->mutable_rows()->swap(result_);
    } else {
      r->set_rows(result_.data() + offset * row_bytes, static_cast<size_t>(n) * row_bytes);
    }
    r->set_compute_micros(static_cast<uint64_t>(micros));
    offset += n;
  } while (offset < compute.n_rows);
}

void ForwardCall::AnswerOverNccl(const pb::ForwardRequest& request) {
  NcclSessions::Locked session;
  if (env_->nccl != nullptr) session = env_->nccl->Lock(request.nccl_session());
  if (session.peer == nullptr || session.peer->broken()) {
    return Refuse(request, absl::FailedPreconditionError(
                               absl::StrCat("NCCL session ", request.nccl_session(),
                                            " is unknown or broken here (worker restarted?)")));
  }
  const size_t elem = RowDTypeSize(static_cast<RowDType>(request.dtype()));
  nccl_rows_.resize(static_cast<size_t>(request.total_rows()) * request.n_embd() * elem);
  if (absl::Status s = session.peer->Recv(nccl_rows_.data(), nccl_rows_.size()); !s.ok()) {
    return Refuse(request, absl::UnavailableError(
                               absl::StrCat("NCCL receive of the rows failed: ", s.message())));
  }
  const auto start = std::chrono::steady_clock::now();
  const absl::Status s = env_->core->Compute(
      ToCompute(request, nccl_rows_.data(), nccl_rows_.size(), request.expert().data(),
                request.weight().data(), static_cast<size_t>(request.expert_size())),
      &result_);
  if (!s.ok()) return Refuse(request, s);
  pb::ForwardResponse* r = NextResponse();
  SetHeader(request, r);
  r->set_row_offset(0);
  r->set_n_rows(request.total_rows());
  r->set_rows_via_nccl(true);
  r->set_compute_micros(static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::microseconds>(
                                                  std::chrono::steady_clock::now() - start)
                                                  .count()));
  nccl_send_session_ = request.nccl_session();
}

void ForwardCall::HandleChunk() {
  const pb::ForwardRequest& chunk = chunk_;
  if (discarding_) {
    discarding_ = false;
    if (chunk.step_id() == discarded_step_ && chunk.row_offset() > 0) {
      discarding_ = !IsLastChunk(chunk);
      return;
    }
  }
  if (pending_.active && chunk.step_id() != pending_.header.step_id()) {
    // The previous request never got its last chunk.
    Refuse(pending_.header,
           absl::InvalidArgumentError(absl::StrCat(
               "request ended at row ", pending_.next_row, " of ", pending_.header.total_rows(),
               ": the next chunk belongs to step ", chunk.step_id())));
    pending_ = Assembly();
  }
  absl::Status framing = CheckChunk(chunk, *env_->core);
  if (framing.ok() && pending_.active &&
      (!SameRequest(chunk, pending_.header) || chunk.row_offset() != pending_.next_row)) {
    framing = absl::InvalidArgumentError(absl::StrCat(
        "chunk at row ", chunk.row_offset(), " does not continue the request (expected row ",
        pending_.next_row, " with the first chunk's layer, dtype, n_embd, total_rows and k)"));
  }
  if (framing.ok() && !pending_.active && chunk.row_offset() != 0) {
    framing = absl::InvalidArgumentError(
        absl::StrCat("chunk starts at row ", chunk.row_offset(), " but no request is in progress"));
  }
  if (!framing.ok()) {
    Refuse(pending_.active ? pending_.header : chunk, framing);
    discarding_ = !IsLastChunk(chunk);
    discarded_step_ = chunk.step_id();
    pending_ = Assembly();
    return;
  }
  const size_t pairs = static_cast<size_t>(chunk.expert_size());
  if (chunk.nccl_session() != 0) {
    AnswerOverNccl(chunk);
    return;
  }
  if (!pending_.active && chunk.n_rows() == chunk.total_rows()) {
    // Whole request in one message: compute straight from it.
    Answer(ToCompute(chunk, chunk.rows().data(), chunk.rows().size(), chunk.expert().data(),
                     chunk.weight().data(), pairs),
           chunk);
    return;
  }
  if (!pending_.active) {
    pending_.active = true;
    pending_.header = chunk;
    pending_.header.clear_rows();
    pending_.header.clear_expert();
    pending_.header.clear_weight();
    const size_t total = static_cast<size_t>(chunk.total_rows());
    pending_.rows.reserve(total * (chunk.rows().size() / static_cast<size_t>(chunk.n_rows())));
    pending_.expert.reserve(total * static_cast<size_t>(chunk.k()));
    pending_.weight.reserve(total * static_cast<size_t>(chunk.k()));
  }
  pending_.rows.append(chunk.rows());
  pending_.expert.insert(pending_.expert.end(), chunk.expert().begin(), chunk.expert().end());
  pending_.weight.insert(pending_.weight.end(), chunk.weight().begin(), chunk.weight().end());
  pending_.next_row += chunk.n_rows();
  if (pending_.next_row == pending_.header.total_rows()) {
    Answer(ToCompute(pending_.header, pending_.rows.data(), pending_.rows.size(),
                     pending_.expert.data(), pending_.weight.data(), pending_.expert.size()),
           pending_.header);
    pending_ = Assembly();
  }
}

}  // namespace moepool::worker
