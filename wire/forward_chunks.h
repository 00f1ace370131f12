// The framing of one Forward exchange (docs/protocol.md): a request for one round (one layer's
// rows for one worker) and its response each go as one or more chunk messages that repeat the
// round's header and carry consecutive row ranges. This file is the only place that splits a
// request or a response into chunks and the only place that puts chunks back together:
//
//   coordinator                                   worker
//   WriteRequestChunks --ForwardRequest chunks--> RequestAssembler -> rows, experts, weights
//   ResponseAssembler <-ForwardResponse chunks--- WriteResponseChunks <- the weighted sums
//
// "Round" is the wire's word for one request and its answer (ForwardRequest.step_id on the
// wire, a name the protocol keeps): one model step sends one round per layer per worker.
//
// Thread-compatible value types and pure functions.
#ifndef MOEPOOL_WIRE_FORWARD_CHUNKS_H_
#define MOEPOOL_WIRE_FORWARD_CHUNKS_H_

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "absl/types/span.h"
#include "moepool/v1/expert_service.pb.h"
#include "wire/row_codec.h"

namespace moepool::wire {

// What every chunk of one round repeats.
struct RoundHeader {
  uint64_t round = 0;  // ForwardRequest.step_id
  int layer = 0;
  DType dtype = moepool::v1::DTYPE_F32;         // of the request's rows
  DType return_dtype = moepool::v1::DTYPE_F32;  // of the answer's rows
  int64_t n_embd = 0;
  int64_t total_rows = 0;
  int k = 0;  // (expert, weight) pairs per row
};

// The header a request (chunk) carries (return_dtype: the request's dtype when unspecified).
RoundHeader HeaderOf(const moepool::v1::ForwardRequest& request);
// The dtype the answer to `request` is written in.
DType ReturnDTypeOf(const moepool::v1::ForwardRequest& request);

// Rows per request chunk so that one message of rows of `n_embd` values of `dtype` plus k
// (expert, weight) pairs per row stays under max_message_bytes (at least 1).
int64_t RowsPerChunk(int64_t max_message_bytes, int64_t n_embd, DType dtype, int k);
// Rows per response chunk whose row payload stays within payload_bytes (at least 1).
int64_t RowsPerPayload(int64_t payload_bytes, int64_t n_embd, DType dtype);

// The request's rows as the coordinator holds them: row i of the round is
// x[rows[i] * n_embd, + n_embd); expert and weight are [rows.size() x k]. Borrowed.
struct RequestRows {
  const float* x = nullptr;
  absl::Span<const int64_t> rows;
  absl::Span<const int32_t> expert;
  absl::Span<const float> weight;
};

// Writes one round as request chunks of at most `rows_per_chunk` rows through `write` (false:
// the stream failed; stop and return false). Adds each message's size to *bytes. A round of
// zero rows is one chunk.
bool WriteRequestChunks(const RoundHeader& header, const RequestRows& rows, int64_t rows_per_chunk,
                        absl::FunctionRef<bool(const moepool::v1::ForwardRequest&)> write,
                        moepool::v1::ForwardRequest* scratch, uint64_t* bytes);

// The one message of a round whose rows travel on pipe session `session` (no rows inside), and
// the encoded rows to send on the pipe after it.
void BuildPipeRequest(const RoundHeader& header, const RequestRows& rows, uint64_t session,
                      moepool::v1::ForwardRequest* request, std::string* pipe_bytes);

// Writes the result of a round, y [total_rows x n_embd] f32, as response chunks of at most
// `rows_per_chunk` rows in header.return_dtype; `next` hands out a cleared message to fill, which
// the caller writes later. Every chunk carries compute_micros.
void WriteResponseChunks(const RoundHeader& header, const float* y, int64_t rows_per_chunk,
                         uint64_t compute_micros,
                         absl::FunctionRef<moepool::v1::ForwardResponse*()> next);
// Sets the header fields of a response to `request` (round, layer, return dtype, total_rows).
void SetResponseHeader(const moepool::v1::ForwardRequest& request,
                       moepool::v1::ForwardResponse* response);

// Collects the response chunks of one round on the coordinator.
class ResponseAssembler {
 public:
  explicit ResponseAssembler(const RoundHeader& header);
  // Decodes one chunk into place. INVALID_ARGUMENT for another dtype than the round's
  // return_dtype or another row count than the
  // round's, a chunk outside the rows, overlapping a chunk already received, or of the wrong
  // size. (Round, layer and error fields are the caller's to check first.)
  absl::Status Add(const moepool::v1::ForwardResponse& chunk);
  bool complete() const { return received_ == header_.total_rows; }
  std::vector<float>& values() { return values_; }  // [total_rows x n_embd]

 private:
  RoundHeader header_;
  int64_t received_ = 0;
  std::vector<float> values_;
  std::vector<std::pair<int64_t, int64_t>> ranges_;  // received [begin, end)
};

// What a worker accepts (the framing checks of RequestAssembler).
struct RequestLimits {
  int64_t n_embd = 0;    // the model's embedding length
  int64_t max_rows = 0;  // the most rows of one round
  int n_expert = 0;      // k must be in [1, n_expert]
};

// Reassembles request chunks on the worker, in stream order. Checks the framing of every chunk
// (sizes, dtype, consecutive rows of one round); what the rows mean (experts held, weights
// finite, layer in range) is the compute's to check on the whole round.
//
// A refused chunk refuses its round: the rest of that round's chunks are dropped without
// further refusals. A round that a chunk of another round interrupts is refused too.
class RequestAssembler {
 public:
  enum class Outcome {
    kIncomplete,  // more chunks of this round follow
    kComplete,    // round() and the decoded rows are ready until the next Add
    kPipe,        // a header-only round whose rows come on pipe session chunk.nccl_session()
    kRefused,     // see refusals()
    kDropped,     // a later chunk of a refused round
  };
  struct Refusal {
    moepool::v1::ForwardRequest header;  // the round refused (no payload)
    absl::Status status;
  };

  explicit RequestAssembler(RequestLimits limits) : limits_(limits) {}

  // Takes the next chunk of the stream. refusals() lists what to answer with an error now
  // (possibly an interrupted round before this chunk's outcome).
  Outcome Add(const moepool::v1::ForwardRequest& chunk);
  const std::vector<Refusal>& refusals() const { return refusals_; }

  // The stream ended: the refusal of a round still missing chunks, if any.
  bool Abandon(Refusal* refusal);

  // After kComplete: the round's header (no payload), x [total_rows x n_embd] f32, and
  // [total_rows x k] expert ids and weights.
  const moepool::v1::ForwardRequest& round() const { return header_; }
  const std::vector<float>& x() const { return x_; }
  const std::vector<int32_t>& expert() const { return expert_; }
  const std::vector<float>& weight() const { return weight_; }

 private:
  absl::Status CheckChunk(const moepool::v1::ForwardRequest& chunk) const;
  void Refuse(const moepool::v1::ForwardRequest& round, absl::Status status);
  void Begin(const moepool::v1::ForwardRequest& chunk);

  RequestLimits limits_;
  std::vector<Refusal> refusals_;
  bool active_ = false;  // a round is being assembled
  moepool::v1::ForwardRequest header_;
  int64_t next_row_ = 0;
  std::vector<float> x_;
  std::vector<int32_t> expert_;
  std::vector<float> weight_;
  bool dropping_ = false;  // dropping the rest of a refused round
  uint64_t dropped_round_ = 0;
};

}  // namespace moepool::wire

#endif  // MOEPOOL_WIRE_FORWARD_CHUNKS_H_
