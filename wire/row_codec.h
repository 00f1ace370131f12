// The values of token rows on the wire: f32, or f16 / bf16 rounded to nearest even (the dtypes
// of moepool.v1.DType; room for 8-bit blocks next). Both ends of a Forward exchange (the
// coordinator's WorkerLink, the worker's ForwardCall) and the NCCL pipe use these functions and
// no other conversion, so the bits of a row on the wire are defined here once.
//
// Pure functions; thread-safe.
#ifndef MOEPOOL_WIRE_ROW_CODEC_H_
#define MOEPOOL_WIRE_ROW_CODEC_H_

#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "moepool/v1/expert_service.pb.h"

namespace moepool::wire {

using DType = moepool::v1::DType;

// "f32" | "f16" | "bf16" -> DType. INVALID_ARGUMENT otherwise.
absl::StatusOr<DType> ParseDType(std::string_view name);
// "f32", "f16", "bf16"; "unspecified" for anything else.
const char* DTypeName(DType dtype);
// Bytes per value: 4, 2, 2; 0 for DTYPE_UNSPECIFIED or unknown values.
int DTypeBytes(DType dtype);

// Appends n values of `x` in `dtype` (little-endian; f16/bf16 rounded to nearest even).
void EncodeRows(DType dtype, const float* x, int64_t n, std::string* out);
// Appends rows x[rows[i] * n_embd, + n_embd) for each i, in order, in `dtype`.
void EncodeGatheredRows(DType dtype, const float* x, int64_t n_embd, absl::Span<const int64_t> rows,
                        std::string* out);
// Decodes n values (f16/bf16 widen exactly). INVALID_ARGUMENT if `bytes` does not hold exactly n
// values of `dtype` or the dtype is unknown.
absl::Status DecodeRows(DType dtype, std::string_view bytes, int64_t n, float* out);

}  // namespace moepool::wire

#endif  // MOEPOOL_WIRE_ROW_CODEC_H_
