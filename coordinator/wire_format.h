// Encoding of moepool.v1 Forward messages: row values in f32/f16/bf16, splitting a request or a
// response into chunks that fit the maximum message size, and reassembling chunks.
//
// Pure functions and a small value type; thread-compatible.
#ifndef MOEPOOL_COORDINATOR_WIRE_FORMAT_H_
#define MOEPOOL_COORDINATOR_WIRE_FORMAT_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "moepool/v1/expert_service.pb.h"

namespace moepool {

// "f32" | "f16" | "bf16" -> DType. INVALID_ARGUMENT otherwise.
absl::StatusOr<moepool::v1::DType> ParseWireDType(std::string_view name);
const char* WireDTypeName(moepool::v1::DType dtype);
// Bytes per value: 4, 2, 2; 0 for DTYPE_UNSPECIFIED or unknown values.
int WireDTypeBytes(moepool::v1::DType dtype);

// Appends n values of `x` in `dtype` (little-endian; f16/bf16 rounded to nearest even).
void EncodeRows(moepool::v1::DType dtype, const float* x, int64_t n, std::string* out);
// Decodes n values. INVALID_ARGUMENT if `bytes` does not hold exactly n values of `dtype`.
absl::Status DecodeRows(moepool::v1::DType dtype, std::string_view bytes, int64_t n, float* out);

// Rows per chunk so that one message of rows of `n_embd` values of `dtype` plus k
// (expert, weight) pairs per row stays under max_message_bytes (at least 1).
int64_t RowsPerChunk(int64_t max_message_bytes, int64_t n_embd, moepool::v1::DType dtype, int k);

// Collects the chunks of one response (or request) of `total_rows` rows x n_embd values.
class RowAssembler {
 public:
  RowAssembler(int64_t total_rows, int64_t n_embd)
      : total_rows_(total_rows), n_embd_(n_embd), values_(total_rows * n_embd) {}
  // Decodes one chunk into place. INVALID_ARGUMENT for a chunk outside the rows, overlapping a
  // chunk already received, or of the wrong size.
  absl::Status Add(moepool::v1::DType dtype, int64_t row_offset, int64_t n_rows,
                   std::string_view bytes);
  bool complete() const { return received_ == total_rows_; }
  std::vector<float>& values() { return values_; }

 private:
  int64_t total_rows_;
  int64_t n_embd_;
  int64_t received_ = 0;
  std::vector<float> values_;
  std::vector<std::pair<int64_t, int64_t>> ranges_;  // received [begin, end)
};

}  // namespace moepool

#endif  // MOEPOOL_COORDINATOR_WIRE_FORMAT_H_
