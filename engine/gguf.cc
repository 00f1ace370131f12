#include "engine/gguf.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/status_macros.h"

namespace moepool {
namespace {

// Caps that keep a malformed header from making us allocate absurd amounts of memory. Beyond
// them, every count is checked against the bytes left in the file before anything is allocated
// for it: each item takes at least its smallest encoding, so what a header makes us allocate is
// a small multiple of its own size (docs/engine.md, "Robustness").
constexpr uint64_t kMaxStringBytes = 1u << 26;  // 64 MiB per string
constexpr uint64_t kMaxArrayElems = 1u << 26;   // 64M elements per array
constexpr uint64_t kMaxTensorCount = 1u << 20;
constexpr uint64_t kMaxKvCount = 1u << 20;
// Smallest encodings: a string (its length), a metadata entry (a one-byte key, its type, a
// one-byte value), a tensor entry (a one-byte name, one dimension, its type and offset).
constexpr uint64_t kMinStringBytes = 8;
constexpr uint64_t kMinKvBytes = 8 + 1 + 4 + 1;
constexpr uint64_t kMinTensorBytes = 8 + 1 + 4 + 8 + 4 + 8;

}  // namespace

// Bounds-checked little-endian cursor over the header bytes.
class GgufCursor {
 public:
  GgufCursor(const uint8_t* data, uint64_t size, const std::string& path)
      : data_(data), size_(size), path_(path) {}

  uint64_t pos() const { return pos_; }
  uint64_t remaining() const { return size_ - pos_; }

  absl::Status Error(absl::string_view what) const {
    return absl::InvalidArgumentError(
        absl::StrCat(path_, ": ", what, " (at byte offset ", pos_, ")"));
  }

  template <typename T>
  absl::Status Read(T* out, absl::string_view what) {
    if (size_ - pos_ < sizeof(T)) {
      return Error(absl::StrCat("file truncated while reading ", what));
    }
    std::memcpy(out, data_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return absl::OkStatus();
  }

  absl::Status ReadString(std::string* out, absl::string_view what) {
    uint64_t len = 0;
    RETURN_IF_ERROR(Read(&len, what));
    if (len > kMaxStringBytes) return Error(absl::StrCat("string too long in ", what));
    if (size_ - pos_ < len) return Error(absl::StrCat("file truncated while reading ", what));
    out->assign(reinterpret_cast<const char*>(data_ + pos_), len);
    pos_ += len;
    return absl::OkStatus();
  }

  const uint8_t* here() const { return data_ + pos_; }

  absl::Status Skip(uint64_t n, absl::string_view what) {
    if (size_ - pos_ < n) return Error(absl::StrCat("file truncated while reading ", what));
    pos_ += n;
    return absl::OkStatus();
  }

 private:
  const uint8_t* data_;
  uint64_t size_;
  const std::string& path_;
  uint64_t pos_ = 0;
};

namespace {

bool ValidValueType(uint32_t t) { return t <= static_cast<uint32_t>(GgufValueType::kFloat64); }

// Fails unless `count` items of at least `min_bytes` each fit in what is left of the file.
absl::Status CheckCountFits(const GgufCursor& c, uint64_t count, uint64_t min_bytes,
                            absl::string_view what) {
  if (count > c.remaining() / min_bytes) {
    return c.Error(absl::StrCat(what, " claims ", count, " entries, more than the ", c.remaining(),
                                " bytes left in the file can hold"));
  }
  return absl::OkStatus();
}

absl::Status ReadArray(GgufCursor& c, GgufValue* v, const std::string& key) {
  uint32_t et = 0;
  uint64_t n = 0;
  RETURN_IF_ERROR(c.Read(&et, key));
  if (!ValidValueType(et)) {
    return c.Error(absl::StrCat("unknown array element type ", et, " in key '", key, "'"));
  }
  if (et == static_cast<uint32_t>(GgufValueType::kArray)) {
    return c.Error(absl::StrCat("key '", key, "' is an array of arrays (not supported)"));
  }
  RETURN_IF_ERROR(c.Read(&n, key));
  if (n > kMaxArrayElems) return c.Error(absl::StrCat("array too long in key '", key, "'"));
  v->array_type = static_cast<GgufValueType>(et);
  const std::string what = absl::StrCat("array of key '", key, "'");
  if (v->array_type == GgufValueType::kString) {
    RETURN_IF_ERROR(CheckCountFits(c, n, kMinStringBytes, what));
    v->strings.resize(n);
    for (uint64_t i = 0; i < n; ++i) RETURN_IF_ERROR(c.ReadString(&v->strings[i], what));
    return absl::OkStatus();
  }
  const uint64_t elem = GgufScalarSize(v->array_type);
  RETURN_IF_ERROR(CheckCountFits(c, n, elem, what));
  v->packed.assign(reinterpret_cast<const char*>(c.here()), n * elem);
  if (v->array_type == GgufValueType::kBool) {
    for (char& b : v->packed) b = b != 0 ? 1 : 0;
  }
  return c.Skip(n * elem, what);
}

absl::Status ReadValue(GgufCursor& c, GgufValueType type, GgufValue* v, const std::string& key) {
  v->type = type;
  if (type == GgufValueType::kString) {
    return c.ReadString(&v->string_value, absl::StrCat("value of key '", key, "'"));
  }
  if (type == GgufValueType::kArray) return ReadArray(c, v, key);
  const uint64_t size = GgufScalarSize(type);
  if (size == 0) {
    return c.Error(
        absl::StrCat("unknown value type ", static_cast<uint32_t>(type), " for key '", key, "'"));
  }
  if (c.remaining() < size) {
    return c.Error(absl::StrCat("file truncated while reading value of key '", key, "'"));
  }
  *v = GgufValue::DecodeScalar(type, c.here());
  return c.Skip(size, key);
}

}  // namespace

GgufFile::~GgufFile() {
  if (mapped_ && base_ != nullptr) munmap(const_cast<uint8_t*>(base_), size_);
}

absl::StatusOr<std::unique_ptr<GgufFile>> GgufFile::Open(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return absl::NotFoundError(absl::StrCat(path, ": cannot open: ", std::strerror(errno)));
  }
  struct stat st;
  if (fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    return absl::InternalError(absl::StrCat(path, ": cannot stat: ", std::strerror(err)));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a regular file"));
  }
  auto file = std::unique_ptr<GgufFile>(new GgufFile);
  file->path_ = path;
  file->size_ = static_cast<uint64_t>(st.st_size);
  if (file->size_ == 0) {
    ::close(fd);
    return absl::InvalidArgumentError(absl::StrCat(path, ": empty file, not a GGUF model"));
  }
  void* p = mmap(nullptr, file->size_, PROT_READ, MAP_SHARED, fd, 0);
  const int err = errno;
  ::close(fd);
  if (p == MAP_FAILED) {
    return absl::InternalError(absl::StrCat(path, ": mmap failed: ", std::strerror(err)));
  }
  file->base_ = static_cast<const uint8_t*>(p);
  file->mapped_ = true;
  RETURN_IF_ERROR(file->Parse());
  return file;
}

absl::StatusOr<std::unique_ptr<GgufFile>> GgufFile::FromBuffer(std::string_view bytes,
                                                               const std::string& name) {
  auto file = std::unique_ptr<GgufFile>(new GgufFile);
  file->path_ = name;
  // Keep the copy 64-byte aligned like a mapping would be (data alignment checks rely on it).
  file->owned_.assign(bytes.size() + 64, '\0');
  uintptr_t addr = reinterpret_cast<uintptr_t>(file->owned_.data());
  const size_t shift = (64 - addr % 64) % 64;
  std::memcpy(file->owned_.data() + shift, bytes.data(), bytes.size());
  file->base_ = reinterpret_cast<const uint8_t*>(file->owned_.data() + shift);
  file->size_ = bytes.size();
  RETURN_IF_ERROR(file->Parse());
  return file;
}

absl::Status GgufFile::Parse() {
  GgufCursor c(base_, size_, path_);
  uint32_t magic = 0;
  RETURN_IF_ERROR(c.Read(&magic, "magic"));
  if (magic != kGgufMagic) {
    return absl::InvalidArgumentError(
        absl::StrCat(path_, ": not a GGUF file (bad magic 0x", absl::Hex(magic), ")"));
  }
  RETURN_IF_ERROR(c.Read(&version_, "version"));
  if (version_ != 2 && version_ != 3) {
    return absl::InvalidArgumentError(
        absl::StrCat(path_, ": unsupported GGUF version ", version_, " (supported: 2 and 3)"));
  }
  uint64_t n_tensors = 0, n_kv = 0;
  RETURN_IF_ERROR(c.Read(&n_tensors, "tensor count"));
  RETURN_IF_ERROR(c.Read(&n_kv, "metadata count"));
  if (n_tensors > kMaxTensorCount)
    return c.Error(absl::StrCat("implausible tensor count ", n_tensors));
  if (n_kv > kMaxKvCount) return c.Error(absl::StrCat("implausible metadata count ", n_kv));
  RETURN_IF_ERROR(CheckCountFits(c, n_kv, kMinKvBytes, "the metadata count"));
  RETURN_IF_ERROR(ParseMetadata(c, n_kv));
  RETURN_IF_ERROR(ParseTensorIndex(c, n_tensors));
  return PlaceTensors(c.pos());
}

namespace {

// Sorts `order` (positions into `items`) by name; returns a position whose name repeats, or -1.
template <typename T, typename NameOf>
int64_t SortByName(const std::vector<T>& items, NameOf name_of, std::vector<uint32_t>* order) {
  order->resize(items.size());
  for (size_t i = 0; i < items.size(); ++i) (*order)[i] = static_cast<uint32_t>(i);
  std::sort(order->begin(), order->end(),
            [&](uint32_t a, uint32_t b) { return name_of(items[a]) < name_of(items[b]); });
  for (size_t i = 1; i < order->size(); ++i) {
    if (name_of(items[(*order)[i - 1]]) == name_of(items[(*order)[i]])) return (*order)[i];
  }
  return -1;
}

// The position in `items` of the entry named `name` (binary search of `order`), or -1.
template <typename T, typename NameOf>
int64_t FindByName(const std::vector<T>& items, NameOf name_of, const std::vector<uint32_t>& order,
                   std::string_view name) {
  auto it = std::lower_bound(order.begin(), order.end(), name, [&](uint32_t i, std::string_view n) {
    return std::string_view(name_of(items[i])) < n;
  });
  if (it == order.end() || std::string_view(name_of(items[*it])) != name) return -1;
  return *it;
}

const std::string& KeyOf(const std::pair<std::string, GgufValue>& kv) { return kv.first; }
const std::string& NameOf(const GgufTensorInfo& t) { return t.name; }

}  // namespace

absl::Status GgufFile::ParseMetadata(GgufCursor& c, uint64_t n_kv) {
  kv_.reserve(n_kv);
  for (uint64_t i = 0; i < n_kv; ++i) {
    std::string key;
    RETURN_IF_ERROR(c.ReadString(&key, absl::StrCat("metadata key #", i)));
    if (key.empty()) return c.Error(absl::StrCat("metadata key #", i, " is empty"));
    uint32_t t = 0;
    RETURN_IF_ERROR(c.Read(&t, key));
    if (!ValidValueType(t)) {
      return c.Error(absl::StrCat("unknown value type ", t, " for key '", key, "'"));
    }
    GgufValue v;
    RETURN_IF_ERROR(ReadValue(c, static_cast<GgufValueType>(t), &v, key));
    kv_.emplace_back(std::move(key), std::move(v));
  }
  if (const int64_t dup = SortByName(kv_, KeyOf, &kv_order_); dup >= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(path_, ": duplicate metadata key '", kv_[dup].first, "'"));
  }
  if (const GgufValue* a = Find("general.alignment")) {
    if (!a->IsInteger() || a->uint_value == 0 || a->uint_value > (1u << 20) ||
        (a->uint_value & (a->uint_value - 1)) != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(path_, ": general.alignment must be a power of two integer"));
    }
    alignment_ = static_cast<uint32_t>(a->uint_value);
  }
  return absl::OkStatus();
}

absl::Status GgufFile::ParseTensorIndex(GgufCursor& c, uint64_t n_tensors) {
  RETURN_IF_ERROR(CheckCountFits(c, n_tensors, kMinTensorBytes, "the tensor count"));
  tensors_.reserve(n_tensors);
  for (uint64_t i = 0; i < n_tensors; ++i) {
    GgufTensorInfo t;
    RETURN_IF_ERROR(c.ReadString(&t.name, absl::StrCat("name of tensor #", i)));
    RETURN_IF_ERROR(ReadTensorInfo(c, &t));
    tensors_.push_back(std::move(t));
  }
  if (const int64_t dup = SortByName(tensors_, NameOf, &tensor_order_); dup >= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(path_, ": duplicate tensor name '", tensors_[dup].name, "'"));
  }
  return absl::OkStatus();
}

absl::Status GgufFile::ReadTensorInfo(GgufCursor& c, GgufTensorInfo* t) {
  uint32_t n_dims = 0;
  RETURN_IF_ERROR(c.Read(&n_dims, t->name));
  if (n_dims == 0 || n_dims > kGgufMaxDims) {
    return c.Error(absl::StrCat("tensor '", t->name, "' has ", n_dims, " dimensions (1..4)"));
  }
  t->n_dims = static_cast<int>(n_dims);
  for (uint32_t d = 0; d < n_dims; ++d) {
    uint64_t dim = 0;
    RETURN_IF_ERROR(c.Read(&dim, t->name));
    if (dim == 0 || dim > (uint64_t{1} << 40)) {
      return c.Error(absl::StrCat("tensor '", t->name, "' has invalid dimension ", dim));
    }
    t->dims[d] = static_cast<int64_t>(dim);
  }
  uint32_t raw_type = 0;
  RETURN_IF_ERROR(c.Read(&raw_type, t->name));
  const TypeTraits* tr = FindTypeTraits(raw_type);
  if (tr == nullptr || raw_type == static_cast<uint32_t>(TensorType::kQ8_1) ||
      raw_type == static_cast<uint32_t>(TensorType::kQ8_K)) {
    return c.Error(absl::StrCat("tensor '", t->name, "' has unsupported type id ", raw_type));
  }
  t->type = tr->type;
  RETURN_IF_ERROR(c.Read(&t->offset, t->name));
  if (t->dims[0] % tr->block_size != 0) {
    return c.Error(absl::StrCat("tensor '", t->name, "' row length ", t->dims[0],
                                " is not a multiple of the ", tr->name, " block size ",
                                tr->block_size));
  }
  // Overflow-safe size: elements <= 2^40 per dim product checked stepwise.
  uint64_t rows = 1;
  for (int d = 1; d < kGgufMaxDims; ++d) {
    if (rows > (uint64_t{1} << 42) / static_cast<uint64_t>(t->dims[d])) {
      return c.Error(absl::StrCat("tensor '", t->name, "' is implausibly large"));
    }
    rows *= static_cast<uint64_t>(t->dims[d]);
  }
  const uint64_t row_bytes = static_cast<uint64_t>(t->dims[0] / tr->block_size) * tr->block_bytes;
  if (rows != 0 && row_bytes > std::numeric_limits<uint64_t>::max() / 4 / rows) {
    return c.Error(absl::StrCat("tensor '", t->name, "' is implausibly large"));
  }
  t->size_bytes = row_bytes * rows;
  return absl::OkStatus();
}

absl::Status GgufFile::PlaceTensors(uint64_t header_end) {
  data_offset_ = (header_end + alignment_ - 1) / alignment_ * alignment_;
  if (data_offset_ > size_) {
    if (!tensors_.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat(path_, ": file truncated before the tensor data section"));
    }
    data_offset_ = size_;
  }
  const uint64_t data_size = size_ - data_offset_;

  // Bounds, alignment and overlap.
  std::vector<size_t> order(tensors_.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  for (auto& t : tensors_) {
    if (t.offset % alignment_ != 0) {
      return absl::InvalidArgumentError(absl::StrCat(path_, ": tensor '", t.name, "' data offset ",
                                                     t.offset, " is not aligned to ", alignment_));
    }
    if (t.offset > data_size || t.size_bytes > data_size - t.offset) {
      return absl::InvalidArgumentError(absl::StrCat(
          path_, ": tensor '", t.name, "' data [", t.offset, ", ", t.offset + t.size_bytes,
          ") lies outside the data section of ", data_size, " bytes (file truncated or corrupt)"));
    }
    t.data = base_ + data_offset_ + t.offset;
  }
  std::sort(order.begin(), order.end(),
            [&](size_t a, size_t b) { return tensors_[a].offset < tensors_[b].offset; });
  for (size_t i = 1; i < order.size(); ++i) {
    const auto& prev = tensors_[order[i - 1]];
    const auto& cur = tensors_[order[i]];
    if (prev.offset + prev.size_bytes > cur.offset) {
      return absl::InvalidArgumentError(absl::StrCat(path_, ": tensors '", prev.name, "' and '",
                                                     cur.name, "' overlap in the data section"));
    }
  }
  return absl::OkStatus();
}

const GgufValue* GgufFile::Find(std::string_view key) const {
  const int64_t i = FindByName(kv_, KeyOf, kv_order_, key);
  return i < 0 ? nullptr : &kv_[i].second;
}

const GgufTensorInfo* GgufFile::FindTensor(std::string_view name) const {
  const int64_t i = FindByName(tensors_, NameOf, tensor_order_, name);
  return i < 0 ? nullptr : &tensors_[i];
}

namespace {
absl::string_view AbslView(std::string_view s) { return absl::string_view(s.data(), s.size()); }
absl::Status MissingKey(const std::string& path, absl::string_view key) {
  return absl::NotFoundError(absl::StrCat(path, ": missing metadata key '", key, "'"));
}
absl::Status WrongType(const std::string& path, absl::string_view key, absl::string_view want,
                       const GgufValue& v) {
  return absl::InvalidArgumentError(absl::StrCat(path, ": metadata key '", key, "' should be ",
                                                 want, " but is ", GgufValueTypeName(v.type)));
}
}  // namespace

absl::StatusOr<uint64_t> GgufFile::GetUint(std::string_view key) const {
  const GgufValue* v = Find(key);
  if (v == nullptr) return MissingKey(path_, AbslView(key));
  if (!v->IsInteger()) return WrongType(path_, AbslView(key), "an integer", *v);
  switch (v->type) {
    case GgufValueType::kInt8:
    case GgufValueType::kInt16:
    case GgufValueType::kInt32:
    case GgufValueType::kInt64:
      if (v->int_value < 0) {
        return absl::InvalidArgumentError(absl::StrCat(path_, ": metadata key '", AbslView(key),
                                                       "' is negative (", v->int_value, ")"));
      }
      return static_cast<uint64_t>(v->int_value);
    default:
      return v->uint_value;
  }
}

absl::StatusOr<double> GgufFile::GetFloat(std::string_view key) const {
  const GgufValue* v = Find(key);
  if (v == nullptr) return MissingKey(path_, AbslView(key));
  if (!v->IsInteger() && !v->IsFloat()) return WrongType(path_, AbslView(key), "a number", *v);
  return v->AsDouble();
}

absl::StatusOr<std::string> GgufFile::GetString(std::string_view key) const {
  const GgufValue* v = Find(key);
  if (v == nullptr) return MissingKey(path_, AbslView(key));
  if (v->type != GgufValueType::kString) return WrongType(path_, AbslView(key), "a string", *v);
  return v->string_value;
}

absl::StatusOr<bool> GgufFile::GetBool(std::string_view key) const {
  const GgufValue* v = Find(key);
  if (v == nullptr) return MissingKey(path_, AbslView(key));
  if (v->type != GgufValueType::kBool) return WrongType(path_, AbslView(key), "a bool", *v);
  return v->uint_value != 0;
}

absl::StatusOr<std::vector<std::string>> GgufFile::GetStringArray(std::string_view key) const {
  const GgufValue* v = Find(key);
  if (v == nullptr) return MissingKey(path_, AbslView(key));
  if (v->type != GgufValueType::kArray || v->array_type != GgufValueType::kString) {
    return WrongType(path_, AbslView(key), "an array of strings", *v);
  }
  return v->strings;
}

absl::StatusOr<std::vector<float>> GgufFile::GetFloatArray(std::string_view key) const {
  const GgufValue* v = Find(key);
  if (v == nullptr) return MissingKey(path_, AbslView(key));
  if (v->type != GgufValueType::kArray ||
      (v->array_type != GgufValueType::kFloat32 && v->array_type != GgufValueType::kFloat64)) {
    return WrongType(path_, AbslView(key), "an array of floats", *v);
  }
  std::vector<float> out(v->ArraySize());
  for (uint64_t i = 0; i < out.size(); ++i) {
    out[i] = static_cast<float>(v->ArrayElement(i).float_value);
  }
  return out;
}

absl::StatusOr<std::vector<int64_t>> GgufFile::GetIntArray(std::string_view key) const {
  const GgufValue* v = Find(key);
  if (v == nullptr) return MissingKey(path_, AbslView(key));
  if (v->type != GgufValueType::kArray)
    return WrongType(path_, AbslView(key), "an array of integers", *v);
  if (!GgufIsIntegerType(v->array_type))
    return WrongType(path_, AbslView(key), "an array of integers", *v);
  std::vector<int64_t> out(v->ArraySize());
  for (uint64_t i = 0; i < out.size(); ++i) {
    const GgufValue e = v->ArrayElement(i);
    out[i] = e.int_value != 0 ? e.int_value : static_cast<int64_t>(e.uint_value);
  }
  return out;
}

namespace {

// The page-aligned span [start, end) around `bytes` bytes from `p`.
struct PageSpan {
  uintptr_t start, end, page;
};
PageSpan PagesOf(const uint8_t* p, uint64_t bytes) {
  const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t begin = reinterpret_cast<uintptr_t>(p);
  return {begin & ~(page - 1), begin + bytes, page};
}

}  // namespace

absl::Status GgufFile::Populate(const uint8_t* p, uint64_t bytes) const {
  if (!mapped_ || bytes == 0) return absl::OkStatus();
  const PageSpan span = PagesOf(p, bytes);
  if (madvise(reinterpret_cast<void*>(span.start), span.end - span.start, MADV_POPULATE_READ) ==
      0) {
    return absl::OkStatus();
  }
  if (errno != EINVAL) {
    return absl::InternalError(absl::StrCat(path_, ": cannot read the weights at byte ", p - base_,
                                            ": ", std::strerror(errno)));
  }
  // Kernels before 5.14: one read per page faults the range in.
  for (uintptr_t a = span.start; a < span.end; a += span.page) {
    (void)*reinterpret_cast<const volatile uint8_t*>(a);
  }
  return absl::OkStatus();
}

uint64_t GgufFile::ResidentBytes(const uint8_t* p, uint64_t bytes) const {
  if (!mapped_ || bytes == 0) return bytes;
  const PageSpan span = PagesOf(p, bytes);
  std::vector<unsigned char> resident((span.end - span.start + span.page - 1) / span.page);
  if (mincore(reinterpret_cast<void*>(span.start), span.end - span.start, resident.data()) != 0) {
    return 0;
  }
  uint64_t pages = 0;
  for (unsigned char r : resident) pages += r & 1;
  return std::min<uint64_t>(bytes, pages * span.page);
}

std::string GgufTensorInfo::ShapeString() const {
  std::string s = "[";
  for (int d = 0; d < n_dims; ++d) {
    if (d) s += ", ";
    s += std::to_string(dims[d]);
  }
  return s + "]";
}

}  // namespace moepool
