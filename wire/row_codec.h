// The values of token rows on the wire (the dtypes of moepool.v1.DType): f32; f16 / bf16
// rounded to nearest even; q8_0, blocks of 32 values with one f16 scale, made by the engine's
// own Q8_0 quantizer (engine/quant), so that a worker whose weights take Q8_0 activations
// (Q4_0, Q5_0, Q8_0 files) computes on exactly the blocks the coordinator would have made for
// itself. Both ends of a Forward exchange (the coordinator's WorkerLink, the worker's
// ForwardCall), the data channel and the NCCL pipe use these functions and no other
// conversion, so the bits of a row on the wire are defined here once.
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

// Values per q8_0 block and bytes per block (f16 scale + 32 int8).
inline constexpr int64_t kQ8BlockValues = 32;
inline constexpr int64_t kQ8BlockBytes = 34;

// "f32" | "f16" | "bf16" | "q8_0" -> DType. INVALID_ARGUMENT otherwise.
absl::StatusOr<DType> ParseDType(std::string_view name);
// "f32", "f16", "bf16", "q8_0"; "unspecified" for anything else.
const char* DTypeName(DType dtype);
// True for the four dtypes above.
bool KnownDType(DType dtype);
// OK if rows of `n_embd` values can travel in `dtype`: a known dtype, and for q8_0 a multiple
// of 32 values. INVALID_ARGUMENT naming both otherwise.
absl::Status CheckRowDType(DType dtype, int64_t n_embd);
// Bytes of n values in `dtype` (n a multiple of 32 for q8_0); 0 for unknown dtypes.
int64_t EncodedBytes(DType dtype, int64_t n);

// Appends n values of `x` in `dtype` (little-endian). For q8_0, n must be a multiple of 32
// (CheckRowDType first; a programmer error otherwise).
void EncodeRows(DType dtype, const float* x, int64_t n, std::string* out);
// Appends rows x[rows[i] * n_embd, + n_embd) for each i, in order, in `dtype`.
void EncodeGatheredRows(DType dtype, const float* x, int64_t n_embd, absl::Span<const int64_t> rows,
                        std::string* out);
// Decodes n values (f16/bf16 widen exactly; q8_0 gives d * q). INVALID_ARGUMENT if `bytes` does
// not hold exactly n values of `dtype`, n is not a whole number of q8_0 blocks, or the dtype is
// unknown.
absl::Status DecodeRows(DType dtype, std::string_view bytes, int64_t n, float* out);

}  // namespace moepool::wire

#endif  // MOEPOOL_WIRE_ROW_CODEC_H_
