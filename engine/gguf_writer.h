// Streaming GGUF v3 writer.
//
// Usage: AddMetadata(...) and AddTensor(name, type, dims) for every tensor, then Begin(path)
// writes the header and tensor index; then WriteTensorData(name, bytes) for each tensor in the
// order they were added (each exactly RowBytes(type, dims[0]) * rows bytes), then Finish().
// Only one tensor's data needs to be in memory at a time, so files larger than RAM can be written.
// Not thread-safe. Errors (I/O, misuse such as wrong order or size) are returned as Status.
// A file whose writing failed, or whose writer is destroyed before Finish(), is deleted.
// AddMetadata with a key already added replaces its value. `general.alignment` is written
// automatically when the alignment is not the default 32.
#ifndef MOEPOOL_ENGINE_GGUF_WRITER_H_
#define MOEPOOL_ENGINE_GGUF_WRITER_H_

#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/gguf.h"

namespace moepool {

class GgufWriter {
 public:
  explicit GgufWriter(uint32_t alignment = kGgufDefaultAlignment);
  ~GgufWriter();

  void AddMetadata(std::string key, GgufValue value);
  // dims[0] is the row length; dims.size() is the number of dimensions (1..4).
  absl::Status AddTensor(std::string name, TensorType type, std::vector<int64_t> dims);

  absl::Status Begin(const std::string& path);
  absl::Status WriteTensorData(std::string_view name, const void* data, size_t bytes);
  absl::Status Finish();

  // Where everything goes in a file of the metadata and tensors added so far, without writing
  // anything: for writers that place each tensor's data themselves (pwrite, in any order, e.g. to
  // resume an interrupted download). A file holding `header` at offset 0 and each tensor's data at
  // its offset, zero-filled elsewhere up to file_size, is byte-identical to what
  // Begin/WriteTensorData/Finish write.
  struct FileLayout {
    std::string header;                  // metadata and tensor index, padded to the alignment
    std::vector<uint64_t> data_offsets;  // absolute file offset of each tensor's data (AddTensor
                                         // order)
    uint64_t file_size = 0;
  };
  absl::StatusOr<FileLayout> Layout() const;

  // Serialises metadata + index + data of tensors already given to an in-memory image
  // (for tests): use instead of Begin/WriteTensorData/Finish, with all data passed here in order.
  static absl::StatusOr<std::string> BuildImage(const GgufWriter& layout,
                                                const std::vector<std::string>& tensor_data);

 private:
  struct PendingTensor {
    std::string name;
    TensorType type;
    std::vector<int64_t> dims;
    uint64_t offset;
    uint64_t size_bytes;
  };
  std::string HeaderBytes() const;

  uint32_t alignment_;
  std::vector<std::pair<std::string, GgufValue>> kv_;
  std::vector<PendingTensor> tensors_;
  uint64_t data_size_ = 0;
  std::FILE* out_ = nullptr;
  std::string path_;
  size_t next_tensor_ = 0;
  uint64_t written_ = 0;
};

}  // namespace moepool

#endif  // MOEPOOL_ENGINE_GGUF_WRITER_H_
