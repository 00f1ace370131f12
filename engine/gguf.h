// GGUF (v2, v3) reader over a read-only memory map.
//
// GgufFile::Open validates the whole header before returning: magic, version, every metadata
// value, the tensor index (names unique, types supported, dimensions sane, data inside the file,
// aligned and non-overlapping). Errors are absl::Status values naming the file and, where it
// applies, the key or tensor; malformed input never crashes the process.
//
// Ownership: a GgufFile owns its mapping; tensor data pointers stay valid while it lives.
// Threading: immutable after Open, so any number of threads may read it concurrently.
#ifndef MOEPOOL_ENGINE_GGUF_H_
#define MOEPOOL_ENGINE_GGUF_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/quant/types.h"

namespace moepool {

inline constexpr uint32_t kGgufMagic = 0x46554747;  // "GGUF" little-endian
inline constexpr uint32_t kGgufDefaultAlignment = 32;

enum class GgufValueType : uint32_t {
  kUint8 = 0,
  kInt8 = 1,
  kUint16 = 2,
  kInt16 = 3,
  kUint32 = 4,
  kInt32 = 5,
  kFloat32 = 6,
  kBool = 7,
  kString = 8,
  kArray = 9,
  kUint64 = 10,
  kInt64 = 11,
  kFloat64 = 12,
};

const char* GgufValueTypeName(GgufValueType type);

// True for the eight integer types.
bool GgufIsIntegerType(GgufValueType type);

// Bytes of one value of a fixed-size type (numbers, bool); 0 for kString and kArray.
uint64_t GgufScalarSize(GgufValueType type);

// One metadata value. Integers are widened to int64/uint64, floats to double, keeping `type`
// so a writer can reproduce the original encoding.
//
// An array holds elements of one type other than kArray (arrays of arrays are rejected, as the
// reference reader does): strings in `strings`, numbers and bools packed in their little-endian
// file encoding in `packed`. So an array costs about its size in the file, not a full GgufValue
// per element.
struct GgufValue {
  GgufValueType type = GgufValueType::kUint32;
  uint64_t uint_value = 0;                            // kUint8/16/32/64, kBool (0/1)
  int64_t int_value = 0;                              // kInt8/16/32/64
  double float_value = 0;                             // kFloat32/64
  std::string string_value;                           // kString
  GgufValueType array_type = GgufValueType::kUint32;  // element type when type == kArray
  std::vector<std::string> strings;                   // elements of an array of kString
  std::string packed;  // elements of any other array, GgufScalarSize(array_type) bytes each

  bool IsInteger() const;
  bool IsFloat() const;
  // Numeric view of an integer, bool or float value.
  double AsDouble() const;

  // Number of elements of an array (0 for other values).
  uint64_t ArraySize() const;
  // Element `i` (< ArraySize()) of an array, as a value of type array_type.
  GgufValue ArrayElement(uint64_t i) const;
  // Appends the little-endian encoding of a fixed-size value (GgufScalarSize(type) bytes).
  void AppendScalar(std::string* out) const;
  // The fixed-size value of `type` encoded at `bytes` (GgufScalarSize(type) of them).
  static GgufValue DecodeScalar(GgufValueType type, const uint8_t* bytes);

  static GgufValue Uint32(uint32_t v);
  static GgufValue Int32(int32_t v);
  static GgufValue Uint64(uint64_t v);
  static GgufValue Float32(float v);
  static GgufValue Bool(bool v);
  static GgufValue String(std::string v);
  static GgufValue StringArray(const std::vector<std::string>& v);
  static GgufValue Float32Array(const std::vector<float>& v);
  static GgufValue Int32Array(const std::vector<int32_t>& v);
  // An array of `element_type` (not kArray) holding, for each element, its field for that type
  // (uint_value, int_value, float_value or string_value), whatever the element's own type.
  static GgufValue Array(GgufValueType element_type, const std::vector<GgufValue>& elements);
};

inline constexpr int kGgufMaxDims = 4;

struct GgufTensorInfo {
  std::string name;
  TensorType type = TensorType::kF32;
  int n_dims = 0;
  // dims[0] is the row length (contiguous); unused dims are 1.
  int64_t dims[kGgufMaxDims] = {1, 1, 1, 1};
  uint64_t offset = 0;            // relative to the start of the data section
  uint64_t size_bytes = 0;        // bytes of data
  const uint8_t* data = nullptr;  // points into the mapping

  int64_t NumElements() const { return dims[0] * dims[1] * dims[2] * dims[3]; }
  int64_t NumRows() const { return dims[1] * dims[2] * dims[3]; }
  std::string ShapeString() const;  // "[256, 768, 8]"
};

class GgufCursor;  // gguf.cc

class GgufFile {
 public:
  // Maps and validates `path`.
  static absl::StatusOr<std::unique_ptr<GgufFile>> Open(const std::string& path);
  // Parses an in-memory image (copied); `name` is used in error messages. For tests and fuzzing.
  static absl::StatusOr<std::unique_ptr<GgufFile>> FromBuffer(std::string_view bytes,
                                                              const std::string& name);

  ~GgufFile();
  GgufFile(const GgufFile&) = delete;
  GgufFile& operator=(const GgufFile&) = delete;

  const std::string& path() const { return path_; }
  uint32_t version() const { return version_; }
  uint32_t alignment() const { return alignment_; }
  uint64_t file_size() const { return size_; }
  uint64_t data_offset() const { return data_offset_; }
  const uint8_t* base() const { return base_; }
  // True when the bytes are a mapping of path() (Open), false for FromBuffer images.
  bool mapped() const { return mapped_; }

  // Metadata, in file order.
  const std::vector<std::pair<std::string, GgufValue>>& metadata() const { return kv_; }
  const GgufValue* Find(std::string_view key) const;
  bool Has(std::string_view key) const { return Find(key) != nullptr; }

  // Typed getters: NOT_FOUND if absent, INVALID_ARGUMENT (naming file and key) if of the wrong
  // type or out of range.
  absl::StatusOr<uint64_t> GetUint(std::string_view key) const;
  absl::StatusOr<double> GetFloat(std::string_view key) const;  // any numeric value
  absl::StatusOr<std::string> GetString(std::string_view key) const;
  absl::StatusOr<bool> GetBool(std::string_view key) const;
  absl::StatusOr<std::vector<std::string>> GetStringArray(std::string_view key) const;
  absl::StatusOr<std::vector<float>> GetFloatArray(std::string_view key) const;
  absl::StatusOr<std::vector<int64_t>> GetIntArray(std::string_view key) const;

  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }
  const GgufTensorInfo* FindTensor(std::string_view name) const;

  // Makes `bytes` bytes of the image from `p` resident now: read into the page cache and mapped
  // into this process (MADV_POPULATE_READ; one read per page on kernels before 5.14), so that
  // later reads neither wait for the disk nor fault. OK at once for FromBuffer images.
  // INTERNAL naming the file if the kernel cannot read it (an I/O error, a file truncated under
  // the mapping).
  absl::Status Populate(const uint8_t* p, uint64_t bytes) const;
  // How many of the `bytes` bytes from `p` are resident now (mincore; whole pages), for
  // watching whether the weights stay in memory. `bytes` for FromBuffer images.
  uint64_t ResidentBytes(const uint8_t* p, uint64_t bytes) const;

 private:
  GgufFile() = default;
  absl::Status Parse();
  absl::Status ParseMetadata(GgufCursor& c, uint64_t n_kv);
  absl::Status ParseTensorIndex(GgufCursor& c, uint64_t n_tensors);
  // One tensor's index entry after its name: dimensions, type, offset; sets size_bytes.
  absl::Status ReadTensorInfo(GgufCursor& c, GgufTensorInfo* t);
  // Data offset, and each tensor's data inside the file, aligned, not overlapping.
  absl::Status PlaceTensors(uint64_t header_end);

  std::string path_;
  const uint8_t* base_ = nullptr;
  uint64_t size_ = 0;
  bool mapped_ = false;
  std::string owned_;  // backing store for FromBuffer
  uint32_t version_ = 0;
  uint32_t alignment_ = kGgufDefaultAlignment;
  uint64_t data_offset_ = 0;
  std::vector<std::pair<std::string, GgufValue>> kv_;
  std::vector<uint32_t> kv_order_;  // positions in kv_ sorted by key (Find)
  std::vector<GgufTensorInfo> tensors_;
  std::vector<uint32_t> tensor_order_;  // positions in tensors_ sorted by name (FindTensor)
};

}  // namespace moepool

#endif  // MOEPOOL_ENGINE_GGUF_H_
