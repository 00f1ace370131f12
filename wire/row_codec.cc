#include "wire/row_codec.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "engine/quant/fp16.h"

namespace moepool::wire {

absl::StatusOr<DType> ParseDType(std::string_view name) {
  if (name == "f32") return moepool::v1::DTYPE_F32;
  if (name == "f16") return moepool::v1::DTYPE_F16;
  if (name == "bf16") return moepool::v1::DTYPE_BF16;
  return absl::InvalidArgumentError(
      absl::StrCat("wire dtype must be f32, f16 or bf16, not '", std::string(name), "'"));
}

const char* DTypeName(DType dtype) {
  switch (dtype) {
    case moepool::v1::DTYPE_F32:
      return "f32";
    case moepool::v1::DTYPE_F16:
      return "f16";
    case moepool::v1::DTYPE_BF16:
      return "bf16";
    default:
      return "unspecified";
  }
}

int DTypeBytes(DType dtype) {
  switch (dtype) {
    case moepool::v1::DTYPE_F32:
      return 4;
    case moepool::v1::DTYPE_F16:
    case moepool::v1::DTYPE_BF16:
      return 2;
    default:
      return 0;
  }
}

void EncodeRows(DType dtype, const float* x, int64_t n, std::string* out) {
  const size_t base = out->size();
  const int bytes = DTypeBytes(dtype);
  out->resize(base + static_cast<size_t>(n) * static_cast<size_t>(bytes));
  char* p = out->data() + base;
  if (dtype == moepool::v1::DTYPE_F32) {
    std::memcpy(p, x, static_cast<size_t>(n) * 4);
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    const uint16_t h = dtype == moepool::v1::DTYPE_F16 ? Fp32ToFp16(x[i]) : Fp32ToBf16(x[i]);
    std::memcpy(p + i * 2, &h, 2);
  }
}

void EncodeGatheredRows(DType dtype, const float* x, int64_t n_embd, absl::Span<const int64_t> rows,
                        std::string* out) {
  out->reserve(out->size() + rows.size() * static_cast<size_t>(n_embd * DTypeBytes(dtype)));
  for (const int64_t row : rows) EncodeRows(dtype, x + row * n_embd, n_embd, out);
}

absl::Status DecodeRows(DType dtype, std::string_view bytes, int64_t n, float* out) {
  const int width = DTypeBytes(dtype);
  if (width == 0) {
    return absl::InvalidArgumentError(absl::StrCat("unknown dtype ", static_cast<int>(dtype)));
  }
  if (bytes.size() != static_cast<size_t>(n) * static_cast<size_t>(width)) {
    return absl::InvalidArgumentError(absl::StrCat("expected ", n, " ", DTypeName(dtype),
                                                   " values, got ", bytes.size(), " bytes"));
  }
  const char* p = bytes.data();
  if (dtype == moepool::v1::DTYPE_F32) {
    std::memcpy(out, p, static_cast<size_t>(n) * 4);
    return absl::OkStatus();
  }
  for (int64_t i = 0; i < n; ++i) {
    uint16_t h;
    std::memcpy(&h, p + i * 2, 2);
    out[i] = dtype == moepool::v1::DTYPE_F16 ? Fp16ToFp32(h) : Bf16ToFp32(h);
  }
  return absl::OkStatus();
}

}  // namespace moepool::wire
