#include "engine/gguf_writer.h"

#include <cerrno>
#include <cstring>
#include <utility>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "engine/status_macros.h"

namespace moepool {
namespace {

constexpr uint32_t kGgufWriteVersion = 3;
constexpr char kAlignmentKey[] = "general.alignment";

uint64_t AlignUp(uint64_t x, uint64_t alignment) {
  return (x + alignment - 1) / alignment * alignment;
}

bool ValidAlignment(uint32_t a) { return a != 0 && (a & (a - 1)) == 0; }

template <typename T>
void Put(std::string& out, T v) {
  out.append(reinterpret_cast<const char*>(&v), sizeof(T));
}

void PutString(std::string& out, std::string_view s) {
  Put<uint64_t>(out, s.size());
  out.append(s.data(), s.size());
}

// Appends the encoding of `v` (no type tag).
void PutValue(std::string& out, const GgufValue& v) {
  switch (v.type) {
    case GgufValueType::kString:
      PutString(out, v.string_value);
      return;
    case GgufValueType::kArray:
      Put<uint32_t>(out, static_cast<uint32_t>(v.array_type));
      Put<uint64_t>(out, v.ArraySize());
      if (v.array_type == GgufValueType::kString) {
        for (const std::string& e : v.strings) PutString(out, e);
      } else {
        out += v.packed;
      }
      return;
    default:
      v.AppendScalar(&out);
      return;
  }
}

// Checks the types of a value and that an array's elements are whole values of its type.
absl::Status CheckValue(const std::string& key, const GgufValue& v) {
  if (static_cast<uint32_t>(v.type) > static_cast<uint32_t>(GgufValueType::kFloat64)) {
    return absl::InvalidArgumentError(absl::StrCat("metadata key '", key, "' has unknown type"));
  }
  if (v.type != GgufValueType::kArray) return absl::OkStatus();
  if (static_cast<uint32_t>(v.array_type) > static_cast<uint32_t>(GgufValueType::kFloat64) ||
      v.array_type == GgufValueType::kArray) {
    return absl::InvalidArgumentError(
        absl::StrCat("metadata key '", key, "': arrays of ", GgufValueTypeName(v.array_type),
                     " cannot be written (arrays of arrays are not supported)"));
  }
  const bool strings = v.array_type == GgufValueType::kString;
  const uint64_t elem = GgufScalarSize(v.array_type);
  if ((strings && !v.packed.empty()) || (!strings && !v.strings.empty()) ||
      (!strings && v.packed.size() % elem != 0)) {
    return absl::InvalidArgumentError(absl::StrCat("metadata key '", key,
                                                   "': the elements are not whole values of type ",
                                                   GgufValueTypeName(v.array_type)));
  }
  return absl::OkStatus();
}

}  // namespace

GgufWriter::GgufWriter(uint32_t alignment) : alignment_(alignment) {}

GgufWriter::~GgufWriter() {
  // An unfinished file is incomplete: do not leave it behind looking like a model.
  if (out_ != nullptr) {
    std::fclose(out_);
    std::remove(path_.c_str());
  }
}

void GgufWriter::AddMetadata(std::string key, GgufValue value) {
  for (auto& [k, v] : kv_) {
    if (k == key) {
      v = std::move(value);
      return;
    }
  }
  kv_.emplace_back(std::move(key), std::move(value));
}

absl::Status GgufWriter::AddTensor(std::string name, TensorType type, std::vector<int64_t> dims) {
  if (out_ != nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat("AddTensor('", name, "') after Begin(): the tensor index is already written"));
  }
  if (!ValidAlignment(alignment_)) {
    return absl::InvalidArgumentError(
        absl::StrCat("GGUF alignment ", alignment_, " is not a power of two"));
  }
  if (name.empty()) return absl::InvalidArgumentError("tensor name is empty");
  for (const PendingTensor& t : tensors_) {
    if (t.name == name) {
      return absl::AlreadyExistsError(absl::StrCat("tensor '", name, "' added twice"));
    }
  }
  if (dims.empty() || dims.size() > static_cast<size_t>(kGgufMaxDims)) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor '", name, "' has ", dims.size(), " dimensions (1..4 allowed)"));
  }
  for (int64_t d : dims) {
    if (d <= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor '", name, "' has non-positive dimension ", d));
    }
  }
  const TypeTraits* tr = FindTypeTraits(static_cast<uint32_t>(type));
  if (tr == nullptr || type == TensorType::kQ8_1 || type == TensorType::kQ8_K) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor '", name, "' has unsupported type ", static_cast<uint32_t>(type)));
  }
  if (dims[0] % tr->block_size != 0) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", name, "' row length ", dims[0],
                                                   " is not a multiple of the ", tr->name,
                                                   " block size ", tr->block_size));
  }
  uint64_t rows = 1;
  for (size_t i = 1; i < dims.size(); ++i) rows *= static_cast<uint64_t>(dims[i]);
  PendingTensor t;
  t.name = std::move(name);
  t.type = type;
  t.dims = std::move(dims);
  t.offset = AlignUp(data_size_, alignment_);
  t.size_bytes = RowBytes(type, t.dims[0]) * rows;
  data_size_ = t.offset + t.size_bytes;
  tensors_.push_back(std::move(t));
  return absl::OkStatus();
}

std::string GgufWriter::HeaderBytes() const {
  const GgufValue* user_alignment = nullptr;
  for (const auto& [k, v] : kv_) {
    if (k == kAlignmentKey) user_alignment = &v;
  }
  const bool add_alignment = user_alignment == nullptr && alignment_ != kGgufDefaultAlignment;

  std::string out;
  Put<uint32_t>(out, kGgufMagic);
  Put<uint32_t>(out, kGgufWriteVersion);
  Put<uint64_t>(out, tensors_.size());
  Put<uint64_t>(out, kv_.size() + (add_alignment ? 1 : 0));
  for (const auto& [k, v] : kv_) {
    PutString(out, k);
    Put<uint32_t>(out, static_cast<uint32_t>(v.type));
    PutValue(out, v);
  }
  if (add_alignment) {
    PutString(out, kAlignmentKey);
    Put<uint32_t>(out, static_cast<uint32_t>(GgufValueType::kUint32));
    Put<uint32_t>(out, alignment_);
  }
  for (const PendingTensor& t : tensors_) {
    PutString(out, t.name);
    Put<uint32_t>(out, static_cast<uint32_t>(t.dims.size()));
    for (int64_t d : t.dims) Put<uint64_t>(out, static_cast<uint64_t>(d));
    Put<uint32_t>(out, static_cast<uint32_t>(t.type));
    Put<uint64_t>(out, t.offset);
  }
  out.resize(AlignUp(out.size(), alignment_), '\0');
  return out;
}

namespace {

// Validation shared by Begin and BuildImage.
absl::Status CheckLayout(uint32_t alignment,
                         const std::vector<std::pair<std::string, GgufValue>>& kv) {
  if (!ValidAlignment(alignment)) {
    return absl::InvalidArgumentError(
        absl::StrCat("GGUF alignment ", alignment, " is not a power of two"));
  }
  for (const auto& [k, v] : kv) {
    if (k.empty()) return absl::InvalidArgumentError("empty metadata key");
    RETURN_IF_ERROR(CheckValue(k, v));
    if (k == kAlignmentKey && (!v.IsInteger() || v.uint_value != alignment)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "metadata general.alignment disagrees with the writer's alignment ", alignment));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status GgufWriter::Begin(const std::string& path) {
  if (out_ != nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat("Begin('", path, "') while '", path_, "' is still being written"));
  }
  RETURN_IF_ERROR(CheckLayout(alignment_, kv_));
  const std::string header = HeaderBytes();
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) {
    return absl::UnavailableError(absl::StrCat(path, ": cannot create: ", std::strerror(errno)));
  }
  out_ = f;
  path_ = path;
  next_tensor_ = 0;
  written_ = 0;
  if (std::fwrite(header.data(), 1, header.size(), out_) != header.size()) {
    const int err = errno;
    std::fclose(out_);
    out_ = nullptr;
    std::remove(path.c_str());
    return absl::DataLossError(absl::StrCat(path, ": write failed: ", std::strerror(err)));
  }
  return absl::OkStatus();
}

absl::Status GgufWriter::WriteTensorData(std::string_view name_view, const void* data,
                                         size_t bytes) {
  // This Abseil's string_view is not std::string_view.
  const absl::string_view name(name_view.data(), name_view.size());
  if (out_ == nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat("WriteTensorData('", name, "') without a Begin() in progress"));
  }
  if (next_tensor_ >= tensors_.size()) {
    return absl::FailedPreconditionError(
        absl::StrCat(path_, ": WriteTensorData('", name, "'): all tensors already written"));
  }
  const PendingTensor& t = tensors_[next_tensor_];
  if (t.name != name_view) {
    return absl::FailedPreconditionError(absl::StrCat(path_, ": WriteTensorData('", name,
                                                      "') out of order: expected '", t.name, "'"));
  }
  if (bytes != t.size_bytes) {
    return absl::InvalidArgumentError(
        absl::StrCat(path_, ": tensor '", name, "' needs ", t.size_bytes, " bytes, got ", bytes));
  }
  const std::string pad(t.offset - written_, '\0');
  if (std::fwrite(pad.data(), 1, pad.size(), out_) != pad.size() ||
      std::fwrite(data, 1, bytes, out_) != bytes) {
    const int err = errno;
    std::fclose(out_);
    out_ = nullptr;
    std::remove(path_.c_str());
    return absl::DataLossError(
        absl::StrCat(path_, ": write of tensor '", name, "' failed: ", std::strerror(err)));
  }
  written_ = t.offset + bytes;
  ++next_tensor_;
  return absl::OkStatus();
}

absl::Status GgufWriter::Finish() {
  if (out_ == nullptr) {
    return absl::FailedPreconditionError("Finish() without a Begin() in progress");
  }
  if (next_tensor_ != tensors_.size()) {
    return absl::FailedPreconditionError(
        absl::StrCat(path_, ": Finish() with ", tensors_.size() - next_tensor_,
                     " tensor(s) not written, next '", tensors_[next_tensor_].name, "'"));
  }
  const std::string pad(AlignUp(written_, alignment_) - written_, '\0');
  const bool write_ok = std::fwrite(pad.data(), 1, pad.size(), out_) == pad.size();
  const int write_err = errno;
  const bool close_ok = std::fclose(out_) == 0;
  const int close_err = errno;
  out_ = nullptr;
  if (!write_ok || !close_ok) {
    std::remove(path_.c_str());
    return absl::DataLossError(absl::StrCat(
        path_, ": finishing the file failed: ", std::strerror(write_ok ? close_err : write_err)));
  }
  return absl::OkStatus();
}

absl::StatusOr<GgufWriter::FileLayout> GgufWriter::Layout() const {
  RETURN_IF_ERROR(CheckLayout(alignment_, kv_));
  FileLayout layout;
  layout.header = HeaderBytes();
  const uint64_t data_start = layout.header.size();
  layout.data_offsets.reserve(tensors_.size());
  for (const PendingTensor& t : tensors_) layout.data_offsets.push_back(data_start + t.offset);
  layout.file_size = data_start + AlignUp(data_size_, alignment_);
  return layout;
}

absl::StatusOr<std::string> GgufWriter::BuildImage(const GgufWriter& layout,
                                                   const std::vector<std::string>& tensor_data) {
  RETURN_IF_ERROR(CheckLayout(layout.alignment_, layout.kv_));
  if (tensor_data.size() != layout.tensors_.size()) {
    return absl::InvalidArgumentError(absl::StrCat("BuildImage: ", layout.tensors_.size(),
                                                   " tensors but data for ", tensor_data.size()));
  }
  std::string image = layout.HeaderBytes();
  const size_t data_start = image.size();
  for (size_t i = 0; i < tensor_data.size(); ++i) {
    const PendingTensor& t = layout.tensors_[i];
    if (tensor_data[i].size() != t.size_bytes) {
      return absl::InvalidArgumentError(absl::StrCat("BuildImage: tensor '", t.name, "' needs ",
                                                     t.size_bytes, " bytes, got ",
                                                     tensor_data[i].size()));
    }
    image.resize(data_start + t.offset, '\0');
    image += tensor_data[i];
  }
  image.resize(data_start + AlignUp(image.size() - data_start, layout.alignment_), '\0');
  return image;
}

}  // namespace moepool
