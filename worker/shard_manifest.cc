// The parts of worker/shard_cache.h that need no file system: checksums, manifest validation and
// the shard file name.
#include <xxhash.h>

#include <cstdlib>
#include <set>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/status_macros.h"
#include "worker/shard_cache.h"

namespace moepool::worker {
namespace {

// GgufFile::Open rejects larger dimensions and row counts: a manifest asking for them would
// produce a file no reader accepts.
constexpr uint64_t kMaxDim = uint64_t{1} << 40;
constexpr uint64_t kMaxRows = uint64_t{1} << 42;
constexpr int kMaxLayerOrExpert = 65535;
constexpr size_t kQuoteLimit = 64;

XXH3_state_t* State(void* p) { return static_cast<XXH3_state_t*>(p); }

// Quotes text from the coordinator for an error message: escaped and cut, so a hostile manifest
// cannot flood the log or put control characters in it.
std::string Quote(const std::string& s) {
  const bool cut = s.size() > kQuoteLimit;
  return absl::StrCat("'", absl::CHexEscape(cut ? s.substr(0, kQuoteLimit) : s),
                      cut ? "...'" : "'");
}

absl::Status Invalid(const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat("shard manifest: ", what));
}

bool IsLowerHex(const std::string& s, size_t n) {
  if (s.size() != n) return false;
  for (char c : s) {
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  }
  return true;
}

absl::Status ValidateMetadataEntry(const std::string& key, const GgufValue& value,
                                   const ShardLimits& limits) {
  if (key.empty()) return Invalid("empty metadata key");
  if (key.size() > limits.max_string_bytes) {
    return Invalid(absl::StrCat("metadata key ", Quote(key), " is longer than ",
                                limits.max_string_bytes, " bytes"));
  }
  for (char c : key) {
    if (c < 0x20 || c > 0x7e || c == '/') {
      return Invalid(absl::StrCat("metadata key ", Quote(key),
                                  " has a character other than printable ASCII without '/'"));
    }
  }
  if (key == kShardFingerprintKey) {
    return Invalid(absl::StrCat("metadata key ", Quote(key), " is reserved for the cache"));
  }
  const auto type = static_cast<uint32_t>(value.type);
  if (type > static_cast<uint32_t>(GgufValueType::kFloat64) ||
      value.type == GgufValueType::kArray) {
    return Invalid(absl::StrCat("metadata key ", Quote(key), " has type ", type,
                                " (only scalar values are allowed)"));
  }
  if (value.type == GgufValueType::kString && value.string_value.size() > limits.max_string_bytes) {
    return Invalid(absl::StrCat("metadata value of ", Quote(key), " is longer than ",
                                limits.max_string_bytes, " bytes"));
  }
  return absl::OkStatus();
}

absl::Status ValidateMetadata(const ShardManifest& m, const ShardLimits& limits) {
  if (m.metadata.size() > limits.max_metadata) {
    return Invalid(absl::StrCat(m.metadata.size(), " metadata entries, more than the limit of ",
                                limits.max_metadata));
  }
  std::set<std::string> keys;
  for (const auto& [key, value] : m.metadata) {
    RETURN_IF_ERROR(ValidateMetadataEntry(key, value, limits));
    if (!keys.insert(key).second) {
      return Invalid(absl::StrCat("duplicate metadata key ", Quote(key)));
    }
  }
  return absl::OkStatus();
}

// The name must be exactly what the layer and expert fields say, so that the fields (which
// Inventory reads back from the name) and the name can never disagree.
absl::Status ValidateTensorName(const ShardTensor& t) {
  if (t.layer < 0 || t.layer > kMaxLayerOrExpert || t.expert < 0 || t.expert > kMaxLayerOrExpert) {
    return Invalid(absl::StrCat("tensor ", Quote(t.name), " has layer ", t.layer, " and expert ",
                                t.expert, " (each must be in [0, ", kMaxLayerOrExpert, "])"));
  }
  for (const char* kind : {"gate", "up", "down"}) {
    if (t.name == absl::StrCat("blk.", t.layer, ".ffn_", kind, ".", t.expert, ".weight")) {
      return absl::OkStatus();
    }
  }
  return Invalid(absl::StrCat("tensor name ", Quote(t.name), " is not blk.", t.layer,
                              ".ffn_{gate,up,down}.", t.expert, ".weight"));
}

// Dimensions, type and byte size; the size is computed without overflow from bounded factors.
absl::Status ValidateTensorShape(const ShardTensor& t) {
  const std::string name = Quote(t.name);
  if (t.dims.empty() || t.dims.size() > static_cast<size_t>(kGgufMaxDims)) {
    return Invalid(absl::StrCat("tensor ", name, " has ", t.dims.size(), " dimensions (1..",
                                kGgufMaxDims, ")"));
  }
  for (int64_t d : t.dims) {
    if (d < 1 || static_cast<uint64_t>(d) > kMaxDim) {
      return Invalid(absl::StrCat("tensor ", name, " has dimension ", d, " (1..2^40)"));
    }
  }
  const auto raw_type = static_cast<uint32_t>(t.type);
  const TypeTraits* tr = FindTypeTraits(raw_type);
  // Q8_1 and Q8_K only hold activations: no GGUF reader accepts them as weights.
  if (tr == nullptr || t.type == TensorType::kQ8_1 || t.type == TensorType::kQ8_K) {
    return Invalid(absl::StrCat("tensor ", name, " has unsupported type ", raw_type));
  }
  if (t.dims[0] % tr->block_size != 0) {
    return Invalid(absl::StrCat("tensor ", name, " row length ", t.dims[0],
                                " is not a multiple of the ", tr->name, " block size ",
                                tr->block_size));
  }
  uint64_t rows = 1;
  for (size_t i = 1; i < t.dims.size(); ++i) {
    const auto d = static_cast<uint64_t>(t.dims[i]);
    if (rows > kMaxRows / d) return Invalid(absl::StrCat("tensor ", name, " is too large"));
    rows *= d;
  }
  const uint64_t row_bytes = static_cast<uint64_t>(t.dims[0] / tr->block_size) * tr->block_bytes;
  if (row_bytes > UINT64_MAX / rows) return Invalid(absl::StrCat("tensor ", name, " is too large"));
  if (t.bytes != row_bytes * rows) {
    return Invalid(absl::StrCat("tensor ", name, " says ", t.bytes, " bytes, its type and dims ",
                                "make ", row_bytes * rows));
  }
  return absl::OkStatus();
}

absl::Status ValidateTensors(const ShardManifest& m, const ShardLimits& limits) {
  if (m.tensors.empty() || m.tensors.size() > limits.max_tensors) {
    return Invalid(absl::StrCat(m.tensors.size(), " tensors (1..", limits.max_tensors, ")"));
  }
  std::set<std::string> names;
  uint64_t total = 0;
  for (const ShardTensor& t : m.tensors) {
    RETURN_IF_ERROR(ValidateTensorName(t));
    RETURN_IF_ERROR(ValidateTensorShape(t));
    if (!names.insert(t.name).second) {
      return Invalid(absl::StrCat("duplicate tensor ", Quote(t.name)));
    }
    if (t.bytes > limits.max_total_bytes - total) {
      return Invalid(absl::StrCat("the tensors take more than the limit of ",
                                  limits.max_total_bytes, " bytes"));
    }
    total += t.bytes;
  }
  return absl::OkStatus();
}

template <typename T>
void PutLittleEndian(std::string& out, T v) {
  for (size_t i = 0; i < sizeof(T); ++i) {
    out.push_back(static_cast<char>((static_cast<uint64_t>(v) >> (8 * i)) & 0xff));
  }
}

}  // namespace

std::string Checksum::Hex() const { return absl::StrFormat("%016x%016x", high, low); }

Checksum ChecksumOf(const void* data, size_t bytes) {
  const XXH128_hash_t h = XXH3_128bits(data, bytes);
  return Checksum{h.high64, h.low64};
}

ChecksumStream::ChecksumStream() : state_(XXH3_createState()) {
  // Like a failed operator new: nothing sensible can go on without the memory.
  if (state_ == nullptr) std::abort();
  XXH3_128bits_reset(State(state_));
}

ChecksumStream::~ChecksumStream() { XXH3_freeState(State(state_)); }

void ChecksumStream::Update(const void* data, size_t bytes) {
  if (bytes != 0) XXH3_128bits_update(State(state_), data, bytes);
}

Checksum ChecksumStream::Digest() const {
  const XXH128_hash_t h = XXH3_128bits_digest(State(state_));
  return Checksum{h.high64, h.low64};
}

absl::Status ValidateManifest(const ShardManifest& manifest, const ShardLimits& limits) {
  // The fingerprint becomes part of a file name: only this form keeps it inside the cache.
  if (!IsLowerHex(manifest.model_fingerprint, 32)) {
    return Invalid(absl::StrCat("model fingerprint ", Quote(manifest.model_fingerprint),
                                " is not 32 lowercase hex digits"));
  }
  RETURN_IF_ERROR(ValidateMetadata(manifest, limits));
  return ValidateTensors(manifest, limits);
}

std::string ShardCache::FileNameFor(const ShardManifest& manifest) {
  // A fixed little-endian encoding of the index, so the name is the same on every host.
  std::string index;
  for (const ShardTensor& t : manifest.tensors) {
    PutLittleEndian<uint64_t>(index, t.name.size());
    index += t.name;
    PutLittleEndian<uint32_t>(index, static_cast<uint32_t>(t.type));
    PutLittleEndian<uint32_t>(index, static_cast<uint32_t>(t.dims.size()));
    for (int64_t d : t.dims) PutLittleEndian<uint64_t>(index, static_cast<uint64_t>(d));
  }
  return absl::StrFormat("%s-%016x.gguf", manifest.model_fingerprint,
                         XXH3_64bits(index.data(), index.size()));
}

}  // namespace moepool::worker
