#include "wire/row_codec.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "engine/quant/fp16.h"
#include "engine/quant/types.h"

namespace moepool::wire {
namespace {

static_assert(sizeof(BlockQ8_0) == kQ8BlockBytes && kQK8_0 == kQ8BlockValues);

// The engine's fastest row conversions for this CPU (bit-identical to the scalar ones).
const TypeTraits& Q8Traits() {
  static const TypeTraits& traits = GetTypeTraits(TensorType::kQ8_0);
  return traits;
}
const TypeTraits& F16Traits() {
  static const TypeTraits& traits = GetTypeTraits(TensorType::kF16);
  return traits;
}

}  // namespace

absl::StatusOr<DType> ParseDType(std::string_view name) {
  if (name == "f32") return moepool::v1::DTYPE_F32;
  if (name == "f16") return moepool::v1::DTYPE_F16;
  if (name == "bf16") return moepool::v1::DTYPE_BF16;
  if (name == "q8_0") return moepool::v1::DTYPE_Q8_0;
  return absl::InvalidArgumentError(
      absl::StrCat("wire dtype must be f32, f16, bf16 or q8_0, not '", std::string(name), "'"));
}

const char* DTypeName(DType dtype) {
  switch (dtype) {
    case moepool::v1::DTYPE_F32:
      return "f32";
    case moepool::v1::DTYPE_F16:
      return "f16";
    case moepool::v1::DTYPE_BF16:
      return "bf16";
    case moepool::v1::DTYPE_Q8_0:
      return "q8_0";
    default:
      return "unspecified";
  }
}

bool KnownDType(DType dtype) { return EncodedBytes(dtype, kQ8BlockValues) != 0; }

absl::Status CheckRowDType(DType dtype, int64_t n_embd) {
  if (!KnownDType(dtype)) {
    return absl::InvalidArgumentError(absl::StrCat("unknown dtype ", static_cast<int>(dtype)));
  }
  if (dtype == moepool::v1::DTYPE_Q8_0 && n_embd % kQ8BlockValues != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "q8_0 rows need an embedding length that is a multiple of 32; this one is ", n_embd));
  }
  return absl::OkStatus();
}

int64_t EncodedBytes(DType dtype, int64_t n) {
  switch (dtype) {
    case moepool::v1::DTYPE_F32:
      return n * 4;
    case moepool::v1::DTYPE_F16:
    case moepool::v1::DTYPE_BF16:
      return n * 2;
    case moepool::v1::DTYPE_Q8_0:
      return n / kQ8BlockValues * kQ8BlockBytes;
    default:
      return 0;
  }
}

void EncodeRows(DType dtype, const float* x, int64_t n, std::string* out) {
  const size_t base = out->size();
  out->resize(base + static_cast<size_t>(EncodedBytes(dtype, n)));
  char* p = out->data() + base;
  switch (dtype) {
    case moepool::v1::DTYPE_F32:
      std::memcpy(p, x, static_cast<size_t>(n) * 4);
      return;
    case moepool::v1::DTYPE_F16:
      F16Traits().quantize(x, p, n);
      return;
    case moepool::v1::DTYPE_Q8_0:
      if (n % kQ8BlockValues != 0) {  // a programmer error: CheckRowDType comes first
        std::fprintf(stderr, "EncodeRows: q8_0 rows of %lld values\n", static_cast<long long>(n));
        std::abort();
      }
      Q8Traits().quantize(x, p, n);
      return;
    default:
      break;
  }
  for (int64_t i = 0; i < n; ++i) {  // bf16
    const uint16_t h = Fp32ToBf16(x[i]);
    std::memcpy(p + i * 2, &h, 2);
  }
}

void EncodeGatheredRows(DType dtype, const float* x, int64_t n_embd, absl::Span<const int64_t> rows,
                        std::string* out) {
  out->reserve(out->size() + rows.size() * static_cast<size_t>(EncodedBytes(dtype, n_embd)));
  for (const int64_t row : rows) EncodeRows(dtype, x + row * n_embd, n_embd, out);
}

absl::Status DecodeRows(DType dtype, std::string_view bytes, int64_t n, float* out) {
  if (!KnownDType(dtype)) {
    return absl::InvalidArgumentError(absl::StrCat("unknown dtype ", static_cast<int>(dtype)));
  }
  if (dtype == moepool::v1::DTYPE_Q8_0 && n % kQ8BlockValues != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(n, " values are not a whole number of q8_0 blocks of 32"));
  }
  if (bytes.size() != static_cast<size_t>(EncodedBytes(dtype, n))) {
    return absl::InvalidArgumentError(absl::StrCat("expected ", n, " ", DTypeName(dtype),
                                                   " values, got ", bytes.size(), " bytes"));
  }
  const char* p = bytes.data();
  switch (dtype) {
    case moepool::v1::DTYPE_F32:
      std::memcpy(out, p, static_cast<size_t>(n) * 4);
      return absl::OkStatus();
    case moepool::v1::DTYPE_F16:
      F16Traits().dequantize(p, out, n);
      return absl::OkStatus();
    case moepool::v1::DTYPE_Q8_0:
      Q8Traits().dequantize(p, out, n);
      return absl::OkStatus();
    default:
      break;
  }
  for (int64_t i = 0; i < n; ++i) {  // bf16
    uint16_t h;
    std::memcpy(&h, p + i * 2, 2);
    out[i] = Bf16ToFp32(h);
  }
  return absl::OkStatus();
}

}  // namespace moepool::wire
