#include "wire/forward_chunks.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace moepool::wire {
namespace {

namespace pb = ::moepool::v1;

bool IsLastChunk(const pb::ForwardRequest& c) {
  return static_cast<int64_t>(c.row_offset()) + c.n_rows() >= c.total_rows();
}

bool SameRound(const pb::ForwardRequest& a, const pb::ForwardRequest& b) {
  return a.step_id() == b.step_id() && a.layer() == b.layer() && a.dtype() == b.dtype() &&
         a.return_dtype() == b.return_dtype() && a.n_embd() == b.n_embd() &&
         a.total_rows() == b.total_rows() && a.k() == b.k();
}

void SetRequestHeader(const RoundHeader& h, pb::ForwardRequest* r) {
  r->set_step_id(h.round);
  r->set_layer(h.layer);
  r->set_dtype(h.dtype);
  if (h.return_dtype != h.dtype) r->set_return_dtype(h.return_dtype);
  r->set_n_embd(static_cast<int32_t>(h.n_embd));
  r->set_total_rows(static_cast<int32_t>(h.total_rows));
  r->set_k(h.k);
}

}  // namespace

DType ReturnDTypeOf(const pb::ForwardRequest& r) {
  return r.return_dtype() == pb::DTYPE_UNSPECIFIED ? r.dtype() : r.return_dtype();
}

RoundHeader HeaderOf(const pb::ForwardRequest& r) {
  RoundHeader h;
  h.round = r.step_id();
  h.layer = r.layer();
  h.dtype = r.dtype();
  h.return_dtype = ReturnDTypeOf(r);
  h.n_embd = r.n_embd();
  h.total_rows = r.total_rows();
  h.k = r.k();
  return h;
}

int64_t RowsPerChunk(int64_t max_message_bytes, int64_t n_embd, DType dtype, int k) {
  // Per row: the values, and at most 11 bytes of varint expert id + 4 bytes of weight per pair;
  // 1 KiB for the fixed fields and framing.
  const int64_t per_row = EncodedBytes(dtype, n_embd) + static_cast<int64_t>(k) * 15;
  return std::max<int64_t>(1, (max_message_bytes - 1024) / std::max<int64_t>(1, per_row));
}

int64_t RowsPerPayload(int64_t payload_bytes, int64_t n_embd, DType dtype) {
  return std::max<int64_t>(1, payload_bytes / std::max<int64_t>(1, EncodedBytes(dtype, n_embd)));
}

bool WriteRequestChunks(const RoundHeader& header, const RequestRows& rows, int64_t rows_per_chunk,
                        absl::FunctionRef<bool(const pb::ForwardRequest&)> write,
                        pb::ForwardRequest* scratch, uint64_t* bytes) {
  const int64_t n = header.total_rows;
  const int k = header.k;
  int64_t off = 0;
  do {
    const int64_t m = std::min(rows_per_chunk, n - off);
    pb::ForwardRequest& req = *scratch;
    req.Clear();
    SetRequestHeader(header, &req);
    req.set_row_offset(static_cast<int32_t>(off));
    req.set_n_rows(static_cast<int32_t>(m));
    EncodeGatheredRows(header.dtype, rows.x, header.n_embd, rows.rows.subspan(off, m),
                       req.mutable_rows());
    req.mutable_expert()->Add(rows.expert.begin() + off * k, rows.expert.begin() + (off + m) * k);
    req.mutable_weight()->Add(rows.weight.begin() + off * k, rows.weight.begin() + (off + m) * k);
    *bytes += req.ByteSizeLong();
    if (!write(req)) return false;
    off += m;
  } while (off < n);
  return true;
}

void BuildPipeRequest(const RoundHeader& header, const RequestRows& rows, uint64_t session,
                      pb::ForwardRequest* request, std::string* pipe_bytes) {
  request->Clear();
  SetRequestHeader(header, request);
  request->set_row_offset(0);
  request->set_n_rows(static_cast<int32_t>(header.total_rows));
  request->set_nccl_session(session);
  request->mutable_expert()->Add(rows.expert.begin(), rows.expert.end());
  request->mutable_weight()->Add(rows.weight.begin(), rows.weight.end());
  pipe_bytes->clear();
  EncodeGatheredRows(header.dtype, rows.x, header.n_embd, rows.rows, pipe_bytes);
}

void SetResponseHeader(const pb::ForwardRequest& request, pb::ForwardResponse* r) {
  r->set_step_id(request.step_id());
  r->set_layer(request.layer());
  r->set_dtype(ReturnDTypeOf(request));
  r->set_total_rows(request.total_rows());
}

void WriteResponseChunks(const RoundHeader& header, const float* y, int64_t rows_per_chunk,
                         uint64_t compute_micros, absl::FunctionRef<pb::ForwardResponse*()> next) {
  const int64_t n = header.total_rows;
  int64_t off = 0;
  do {
    const int64_t m = std::min(rows_per_chunk, n - off);
    pb::ForwardResponse* r = next();
    r->set_step_id(header.round);
    r->set_layer(header.layer);
    r->set_dtype(header.return_dtype);
    r->set_total_rows(static_cast<int32_t>(n));
    r->set_row_offset(static_cast<int32_t>(off));
    r->set_n_rows(static_cast<int32_t>(m));
    EncodeRows(header.return_dtype, y + off * header.n_embd, m * header.n_embd, r->mutable_rows());
    r->set_compute_micros(compute_micros);
    off += m;
  } while (off < n);
}

ResponseAssembler::ResponseAssembler(const RoundHeader& header)
    : header_(header), values_(static_cast<size_t>(header.total_rows * header.n_embd)) {}

absl::Status ResponseAssembler::Add(const pb::ForwardResponse& chunk) {
  if (chunk.dtype() != header_.return_dtype) {
    return absl::InvalidArgumentError(absl::StrCat("answer in ", DTypeName(chunk.dtype()),
                                                   " to a request for ",
                                                   DTypeName(header_.return_dtype), " rows"));
  }
  if (chunk.total_rows() != header_.total_rows) {
    return absl::InvalidArgumentError(absl::StrCat("answer of ", chunk.total_rows(),
                                                   " rows to a request of ", header_.total_rows));
  }
  const int64_t begin = chunk.row_offset();
  const int64_t end = begin + chunk.n_rows();
  if (begin < 0 || chunk.n_rows() <= 0 || end > header_.total_rows) {
    return absl::InvalidArgumentError(
        absl::StrCat("chunk rows [", begin, ", ", end, ") outside [0, ", header_.total_rows, ")"));
  }
  for (const auto& [b, e] : ranges_) {
    if (begin < e && b < end) {
      return absl::InvalidArgumentError(
          absl::StrCat("chunk rows [", begin, ", ", end, ") received twice"));
    }
  }
  const int64_t d = header_.n_embd;
  if (absl::Status s = DecodeRows(header_.return_dtype, chunk.rows(), chunk.n_rows() * d,
                                  values_.data() + begin * d);
      !s.ok()) {
    return s;
  }
  ranges_.emplace_back(begin, end);
  received_ += chunk.n_rows();
  return absl::OkStatus();
}

absl::Status RequestAssembler::CheckChunk(const pb::ForwardRequest& c) const {
  if (c.n_embd() != limits_.n_embd) {
    return absl::InvalidArgumentError(
        absl::StrCat("n_embd ", c.n_embd(), " != the model's embedding length ", limits_.n_embd));
  }
  if (absl::Status s = CheckRowDType(c.dtype(), c.n_embd()); !s.ok()) return s;
  if (absl::Status s = CheckRowDType(ReturnDTypeOf(c), c.n_embd()); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("return_dtype: ", s.message()));
  }
  if (c.total_rows() < 0 || c.total_rows() > limits_.max_rows) {
    return absl::InvalidArgumentError(
        absl::StrCat("total_rows ", c.total_rows(), " is outside [0, ", limits_.max_rows, "]"));
  }
  if (c.k() < 1 || c.k() > limits_.n_expert) {
    return absl::InvalidArgumentError(
        absl::StrCat("k ", c.k(), " is outside [1, ", limits_.n_expert, "]"));
  }
  const int64_t end = static_cast<int64_t>(c.row_offset()) + c.n_rows();
  if (c.row_offset() < 0 || c.n_rows() < 0 || end > c.total_rows() ||
      (c.n_rows() == 0 && c.total_rows() > 0)) {
    return absl::InvalidArgumentError(absl::StrCat("chunk rows [", c.row_offset(), ", ", end,
                                                   ") do not fit total_rows ", c.total_rows()));
  }
  const uint64_t want_bytes =
      static_cast<uint64_t>(EncodedBytes(c.dtype(), static_cast<int64_t>(c.n_rows()) * c.n_embd()));
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
  if (active_ && (!SameRound(c, header_) || c.row_offset() != next_row_)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "chunk at row ", c.row_offset(), " does not continue the request (expected row ", next_row_,
        " with the first chunk's layer, dtype, n_embd, total_rows and k)"));
  }
  if (!active_ && c.row_offset() != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("chunk starts at row ", c.row_offset(), " but no request is in progress"));
  }
  return absl::OkStatus();
}

void RequestAssembler::Refuse(const pb::ForwardRequest& round, absl::Status status) {
  Refusal& r = refusals_.emplace_back();
  r.header = round;
  r.header.clear_rows();
  r.header.clear_expert();
  r.header.clear_weight();
  r.status = std::move(status);
}

void RequestAssembler::Begin(const pb::ForwardRequest& chunk) {
  active_ = true;
  header_ = chunk;
  header_.clear_rows();
  header_.clear_expert();
  header_.clear_weight();
  next_row_ = 0;
  const size_t total = static_cast<size_t>(chunk.total_rows());
  x_.resize(total * static_cast<size_t>(chunk.n_embd()));
  expert_.clear();
  weight_.clear();
  expert_.reserve(total * static_cast<size_t>(chunk.k()));
  weight_.reserve(total * static_cast<size_t>(chunk.k()));
}

RequestAssembler::Outcome RequestAssembler::Add(const pb::ForwardRequest& chunk) {
  refusals_.clear();
  if (dropping_) {
    dropping_ = false;
    if (chunk.step_id() == dropped_round_ && chunk.row_offset() > 0) {
      dropping_ = !IsLastChunk(chunk);
      return Outcome::kDropped;
    }
  }
  if (active_ && chunk.step_id() != header_.step_id()) {  // the round never got its last chunk
    Refuse(header_, absl::InvalidArgumentError(absl::StrCat(
                        "request ended at row ", next_row_, " of ", header_.total_rows(),
                        ": the next chunk belongs to step ", chunk.step_id())));
    active_ = false;
  }
  if (absl::Status framing = CheckChunk(chunk); !framing.ok()) {
    Refuse(active_ ? header_ : chunk, std::move(framing));
    dropping_ = !IsLastChunk(chunk);
    dropped_round_ = chunk.step_id();
    active_ = false;
    return Outcome::kRefused;
  }
  if (chunk.nccl_session() != 0) return Outcome::kPipe;
  if (!active_) Begin(chunk);
  const int64_t d = chunk.n_embd();
  // Sizes were checked above, so decoding cannot fail.
  DecodeRows(chunk.dtype(), chunk.rows(), chunk.n_rows() * d, x_.data() + next_row_ * d)
      .IgnoreError();
  expert_.insert(expert_.end(), chunk.expert().begin(), chunk.expert().end());
  weight_.insert(weight_.end(), chunk.weight().begin(), chunk.weight().end());
  next_row_ += chunk.n_rows();
  if (next_row_ < header_.total_rows()) return Outcome::kIncomplete;
  active_ = false;
  return Outcome::kComplete;
}

bool RequestAssembler::Abandon(Refusal* refusal) {
  if (!active_) return false;
  active_ = false;
  refusal->header = header_;
  refusal->status = absl::InvalidArgumentError(absl::StrCat(
      "stream closed at row ", next_row_, " of ", header_.total_rows(), " of the request"));
  return true;
}

}  // namespace moepool::wire
