#include "coordinator/wire_format.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "engine/quant/fp16.h"

namespace moepool {

using moepool::v1::DType;

absl::StatusOr<DType> ParseWireDType(std::string_view name) {
  if (name == "f32") return moepool::v1::DTYPE_F32;
  if (name == "f16") return moepool::v1::DTYPE_F16;
  if (name == "bf16") return moepool::v1::DTYPE_BF16;
  return absl::InvalidArgumentError(
      absl::StrCat("wire dtype must be f32, f16 or bf16, not '", std::string(name), "'"));
}

const char* WireDTypeName(DType dtype) {
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

int WireDTypeBytes(DType dtype) {
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
  const int bytes = WireDTypeBytes(dtype);
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

absl::Status DecodeRows(DType dtype, std::string_view bytes, int64_t n, float* out) {
  const int width = WireDTypeBytes(dtype);
  if (width == 0) {
    return absl::InvalidArgumentError(absl::StrCat("unknown dtype ", static_cast<int>(dtype)));
  }
  if (bytes.size() != static_cast<size_t>(n) * static_cast<size_t>(width)) {
    return absl::InvalidArgumentError(absl::StrCat("expected ", n, " ", WireDTypeName(dtype),
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

int64_t RowsPerChunk(int64_t max_message_bytes, int64_t n_embd, DType dtype, int k) {
  // Per row: the values, and at most 11 bytes of varint expert id + 4 bytes of weight per pair;
  // 1 KiB for the fixed fields and framing.
  const int64_t per_row = n_embd * WireDTypeBytes(dtype) + static_cast<int64_t>(k) * 15;
  return std::max<int64_t>(1, (max_message_bytes - 1024) / std::max<int64_t>(1, per_row));
}

absl::Status RowAssembler::Add(DType dtype, int64_t row_offset, int64_t n_rows,
                               std::string_view bytes) {
  if (row_offset < 0 || n_rows <= 0 || row_offset + n_rows > total_rows_) {
    return absl::InvalidArgumentError(absl::StrCat(
        "chunk rows [", row_offset, ", ", row_offset + n_rows, ") outside [0, ", total_rows_, ")"));
  }
  for (const auto& [b, e] : ranges_) {
    if (row_offset < e && b < row_offset + n_rows) {
      return absl::InvalidArgumentError(
          absl::StrCat("chunk rows [", row_offset, ", ", row_offset + n_rows, ") received twice"));
    }
  }
  const absl::Status s =
      DecodeRows(dtype, bytes, n_rows * n_embd_, values_.data() + row_offset * n_embd_);
  if (!s.ok()) return s;
  ranges_.emplace_back(row_offset, row_offset + n_rows);
  received_ += n_rows;
  return absl::OkStatus();
}

}  // namespace moepool
