// ShardCache: the files of worker/shard_cache.h (checksums and the manifest checks are in
// shard_manifest.cc).
//
// Materialize works on `<name>.gguf.partial`, created at its full size with the header in place,
// so every tensor has a fixed place (GgufWriter::Layout) where it can be written, verified and
// resumed on its own; the rename to `<name>.gguf` is the commit. A file is trusted only as far as
// its bytes verify: the header against the image this manifest makes, each tensor against its
// checksum.
#include "worker/shard_cache.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"
#include "engine/gguf_writer.h"
#include "engine/status_macros.h"

namespace moepool::worker {
namespace {

constexpr char kPartialSuffix[] = ".partial";
constexpr size_t kIoChunk = size_t{4} << 20;
constexpr auto kProgressInterval = std::chrono::milliseconds(100);
constexpr int kFetchAttempts = 2;

absl::Status IoError(const std::string& path, const char* what, int err) {
  return absl::InternalError(absl::StrCat(path, ": ", what, ": ", std::strerror(err)));
}

std::string JoinPath(const std::string& dir, absl::string_view name) {
  return dir == "/" ? absl::StrCat("/", name) : absl::StrCat(dir, "/", name);
}

// Owns a file descriptor.
class Fd {
 public:
  explicit Fd(int fd = -1) : fd_(fd) {}
  ~Fd() {
    if (fd_ >= 0) ::close(fd_);
  }
  Fd(Fd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  Fd& operator=(Fd&& o) noexcept {
    if (this != &o) {
      if (fd_ >= 0) ::close(fd_);
      fd_ = std::exchange(o.fd_, -1);
    }
    return *this;
  }
  int get() const { return fd_; }
  // Some file systems report write-back errors only here, so the commit checks it.
  int Close() { return ::close(std::exchange(fd_, -1)); }

 private:
  int fd_;
};

// Reads up to `n` bytes at `offset`; fewer only at the end of the file.
absl::StatusOr<size_t> PreadFull(int fd, const std::string& path, char* buf, size_t n,
                                 uint64_t offset) {
  size_t done = 0;
  while (done < n) {
    const ssize_t r = ::pread(fd, buf + done, n - done, static_cast<off_t>(offset + done));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return IoError(path, "read failed", errno);
    if (r == 0) break;
    done += static_cast<size_t>(r);
  }
  return done;
}

absl::Status PwriteAll(int fd, const std::string& path, const void* data, uint64_t n,
                       uint64_t offset) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    const size_t chunk = static_cast<size_t>(std::min<uint64_t>(n, uint64_t{1} << 30));
    const ssize_t w = ::pwrite(fd, p, chunk, static_cast<off_t>(offset));
    if (w < 0 && errno == EINTR) continue;
    if (w < 0) return IoError(path, "write failed", errno);
    if (w == 0) return IoError(path, "write failed", ENOSPC);
    p += w;
    offset += static_cast<uint64_t>(w);
    n -= static_cast<uint64_t>(w);
  }
  return absl::OkStatus();
}

// Whether the `bytes` bytes at `offset` are there and have checksum `want`.
absl::StatusOr<bool> VerifyRange(int fd, const std::string& path, uint64_t offset, uint64_t bytes,
                                 const Checksum& want) {
  ChecksumStream sum;
  std::string buf(static_cast<size_t>(std::min<uint64_t>(bytes, kIoChunk)), '\0');
  for (uint64_t done = 0; done < bytes;) {
    const size_t n = static_cast<size_t>(std::min<uint64_t>(bytes - done, kIoChunk));
    ASSIGN_OR_RETURN(const size_t got, PreadFull(fd, path, buf.data(), n, offset + done));
    if (got < n) return false;
    sum.Update(buf.data(), n);
    done += n;
  }
  return sum.Digest() == want;
}

// Whether the file starts with `header`: then it was written for the same manifest (metadata,
// fingerprint and tensor index), and its tensors lie where the layout says.
absl::StatusOr<bool> HeaderMatches(int fd, const std::string& path, const std::string& header) {
  std::string buf(header.size(), '\0');
  ASSIGN_OR_RETURN(const size_t got, PreadFull(fd, path, buf.data(), buf.size(), 0));
  return got == header.size() && buf == header;
}

absl::StatusOr<GgufWriter::FileLayout> ShardLayout(const ShardManifest& manifest) {
  GgufWriter writer;
  for (const auto& [key, value] : manifest.metadata) writer.AddMetadata(key, value);
  writer.AddMetadata(kShardFingerprintKey, GgufValue::String(manifest.model_fingerprint));
  for (const ShardTensor& t : manifest.tensors) {
    RETURN_IF_ERROR(writer.AddTensor(t.name, t.type, t.dims));
  }
  return writer.Layout();
}

// The entries of `dir` other than "." and "..", sorted; none if it cannot be read (Inventory
// reports what it finds, and no file is deleted on a listing).
std::vector<std::string> ListDir(const std::string& dir) {
  std::vector<std::string> names;
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return names;
  while (const dirent* e = ::readdir(d)) {
    const absl::string_view name = e->d_name;
    if (name != "." && name != "..") names.emplace_back(name);
  }
  ::closedir(d);
  std::sort(names.begin(), names.end());
  return names;
}

bool IsHex(absl::string_view s, size_t n) {
  return s.size() == n && std::all_of(s.begin(), s.end(), [](char c) {
           return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
         });
}

// `<32 hex>-<16 hex>.gguf` or `.gguf.partial`: the only names Materialize ever deletes.
bool IsShardFileName(absl::string_view name, const std::string& fingerprint) {
  if (absl::EndsWith(name, kPartialSuffix)) name.remove_suffix(sizeof(kPartialSuffix) - 1);
  if (!absl::ConsumeSuffix(&name, ".gguf") || name.size() != 32 + 1 + 16) return false;
  return name.substr(0, 32) == fingerprint && name[32] == '-' && IsHex(name.substr(33), 16);
}

// A file of the cache directory that parses as a shard file.
struct OpenShard {
  std::string name;
  std::string path;
  std::string fingerprint;
  bool complete = false;
  std::unique_ptr<GgufFile> file;
};

std::vector<OpenShard> OpenShards(const std::string& dir) {
  std::vector<OpenShard> shards;
  for (std::string& name : ListDir(dir)) {
    const bool complete = absl::EndsWith(name, ".gguf");
    if (!complete && !absl::EndsWith(name, ".gguf.partial")) continue;
    OpenShard s;
    s.path = JoinPath(dir, name);
    absl::StatusOr<std::unique_ptr<GgufFile>> file = GgufFile::Open(s.path);
    if (!file.ok()) continue;
    const GgufValue* fp = (*file)->Find(kShardFingerprintKey);
    if (fp == nullptr || fp->type != GgufValueType::kString) continue;
    s.name = std::move(name);
    s.fingerprint = fp->string_value;
    s.complete = complete;
    s.file = *std::move(file);
    shards.push_back(std::move(s));
  }
  return shards;
}

// 0..65535 written as ValidateManifest makes it (no sign, no leading zero), or -1.
int ParseIndex(absl::string_view s) {
  if (s.empty() || s.size() > 5 || (s.size() > 1 && s[0] == '0')) return -1;
  int v = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return -1;
    v = v * 10 + (c - '0');
  }
  return v <= 65535 ? v : -1;
}

struct ExpertTensorName {
  int layer = 0;
  int expert = 0;
  int matrix = 0;  // 0 gate, 1 up, 2 down
};

std::optional<ExpertTensorName> ParseExpertTensorName(absl::string_view name) {
  const std::vector<absl::string_view> parts = absl::StrSplit(name, '.');
  if (parts.size() != 5 || parts[0] != "blk" || parts[4] != "weight") return std::nullopt;
  static constexpr absl::string_view kMatrices[] = {"ffn_gate", "ffn_up", "ffn_down"};
  const auto* m = std::find(std::begin(kMatrices), std::end(kMatrices), parts[2]);
  ExpertTensorName out{ParseIndex(parts[1]), ParseIndex(parts[3]),
                       static_cast<int>(m - std::begin(kMatrices))};
  if (out.layer < 0 || out.expert < 0 || m == std::end(kMatrices)) return std::nullopt;
  return out;
}

bool SameShape(const GgufTensorInfo& info, const ShardTensor& t) {
  if (info.type != t.type || info.n_dims != static_cast<int>(t.dims.size()) ||
      info.size_bytes != t.bytes) {
    return false;
  }
  return std::equal(t.dims.begin(), t.dims.end(), info.dims);
}

struct ShardPaths {
  std::string complete;
  std::string partial;
};

// Step 2 of Materialize: true when the complete file matches and every tensor verifies (it is
// only read). A file whose header matches but whose tensors do not becomes the partial file, so
// the tensors that still verify are kept. One whose header does not match stays while it parses
// (its tensors may be copied; the commit replaces it) and is deleted otherwise.
absl::StatusOr<bool> UseCompleteFile(const ShardManifest& manifest,
                                     const GgufWriter::FileLayout& layout,
                                     const ShardPaths& paths) {
  const std::string& path = paths.complete;
  Fd fd(::open(path.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC));
  if (fd.get() < 0) {
    if (errno == ENOENT) return false;
    return IoError(path, "cannot open", errno);
  }
  struct stat st;
  if (::fstat(fd.get(), &st) != 0) return IoError(path, "cannot stat", errno);
  ASSIGN_OR_RETURN(const bool header_ok, HeaderMatches(fd.get(), path, layout.header));
  if (!header_ok) {
    fd = Fd();
    if (!GgufFile::Open(path).ok() && ::unlink(path.c_str()) != 0 && errno != ENOENT) {
      return IoError(path, "cannot delete", errno);
    }
    return false;
  }
  bool intact = S_ISREG(st.st_mode) && static_cast<uint64_t>(st.st_size) == layout.file_size;
  for (size_t i = 0; intact && i < manifest.tensors.size(); ++i) {
    const ShardTensor& t = manifest.tensors[i];
    ASSIGN_OR_RETURN(intact,
                     VerifyRange(fd.get(), path, layout.data_offsets[i], t.bytes, t.checksum));
  }
  if (intact) return true;
  if (::rename(path.c_str(), paths.partial.c_str()) != 0) {
    return IoError(path, "cannot rename to .partial", errno);
  }
  return false;
}

struct PartialFile {
  Fd fd;
  bool fresh = false;  // just created: no tensor is there yet
};

// Step 3: the partial file with this manifest's header, at its full size.
absl::StatusOr<PartialFile> OpenPartial(const GgufWriter::FileLayout& layout,
                                        const std::string& path) {
  PartialFile p;
  p.fd = Fd(::open(path.c_str(), O_RDWR | O_NOFOLLOW | O_CLOEXEC));
  if (p.fd.get() >= 0) {
    ASSIGN_OR_RETURN(const bool same, HeaderMatches(p.fd.get(), path, layout.header));
    if (same) {
      // A file cut short grows back; the tensors in the lost tail then fail verification.
      if (::ftruncate(p.fd.get(), static_cast<off_t>(layout.file_size)) != 0) {
        return IoError(path, "cannot resize", errno);
      }
      return p;
    }
  } else if (errno != ENOENT) {
    return IoError(path, "cannot open", errno);
  }
  p.fd = Fd(::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0644));
  if (p.fd.get() < 0) return IoError(path, "cannot create", errno);
  RETURN_IF_ERROR(PwriteAll(p.fd.get(), path, layout.header.data(), layout.header.size(), 0));
  // Full size at once: every tensor's place exists before its data, and the file parses
  // (Inventory lists it) while it is being filled.
  if (::ftruncate(p.fd.get(), static_cast<off_t>(layout.file_size)) != 0) {
    return IoError(path, "cannot resize", errno);
  }
  p.fresh = true;
  return p;
}

// The complete shard files of one model, opened on first use, as sources of tensors.
class SourceShards {
 public:
  SourceShards(const std::string& dir, const std::string& fingerprint)
      : dir_(dir), fingerprint_(fingerprint) {}

  // Writes `t` at `offset` of `fd` from a source where its bytes verify; false if none has it.
  absl::StatusOr<bool> CopyInto(const ShardTensor& t, int fd, const std::string& path,
                                uint64_t offset) {
    if (!opened_) {
      for (OpenShard& s : OpenShards(dir_)) {
        if (s.complete && s.fingerprint == fingerprint_) shards_.push_back(std::move(s));
      }
      opened_ = true;
    }
    for (const OpenShard& s : shards_) {
      const GgufTensorInfo* info = s.file->FindTensor(t.name);
      if (info == nullptr || !SameShape(*info, t)) continue;
      if (ChecksumOf(info->data, t.bytes) != t.checksum) continue;
      RETURN_IF_ERROR(PwriteAll(fd, path, info->data, t.bytes, offset));
      return true;
    }
    return false;
  }

 private:
  const std::string& dir_;
  const std::string& fingerprint_;
  bool opened_ = false;
  std::vector<OpenShard> shards_;
};

// Step 4, first half: keeps or copies every tensor that can be had without the fetcher; returns
// the indices of the others.
absl::StatusOr<std::vector<size_t>> ReuseTensors(
    const std::string& dir, const ShardManifest& manifest, const GgufWriter::FileLayout& layout,
    const PartialFile& partial, const std::string& path, MaterializeResult* result) {
  SourceShards sources(dir, manifest.model_fingerprint);
  std::vector<size_t> to_fetch;
  for (size_t i = 0; i < manifest.tensors.size(); ++i) {
    const ShardTensor& t = manifest.tensors[i];
    const uint64_t offset = layout.data_offsets[i];
    bool have = false;
    if (!partial.fresh) {
      ASSIGN_OR_RETURN(have, VerifyRange(partial.fd.get(), path, offset, t.bytes, t.checksum));
    }
    if (!have) {
      ASSIGN_OR_RETURN(have, sources.CopyInto(t, partial.fd.get(), path, offset));
    }
    if (have) {
      result->bytes_reused += t.bytes;
    } else {
      to_fetch.push_back(i);
    }
  }
  return to_fetch;
}

// Calls the caller's progress function at most every kProgressInterval, and at the end.
class ProgressReporter {
 public:
  using Clock = std::chrono::steady_clock;
  explicit ProgressReporter(const std::function<void(const FetchProgress&)>& fn)
      : fn_(fn), start_(Clock::now()), last_(start_) {}

  void AddTotal(uint64_t bytes) { progress_.bytes_total += bytes; }
  void AddDone(uint64_t bytes) {
    progress_.bytes_done += bytes;
    if (!fn_) return;
    const Clock::time_point now = Clock::now();
    if (now - last_ < kProgressInterval) return;
    last_ = now;
    Report(now);
  }
  void Finish() {
    if (fn_) Report(Clock::now());
  }

 private:
  void Report(Clock::time_point now) {
    progress_.seconds = std::chrono::duration<double>(now - start_).count();
    fn_(progress_);
  }

  const std::function<void(const FetchProgress&)>& fn_;
  Clock::time_point start_;
  Clock::time_point last_;
  FetchProgress progress_;
};

// Where a fetched tensor goes.
struct Slot {
  int fd;
  const std::string& path;
  uint64_t offset;
};

// One transfer of `t` into `slot`; the checksum of what arrived.
absl::StatusOr<Checksum> FetchOnce(const ShardTensor& t, const Slot& slot,
                                   const TensorFetcher& fetch, ProgressReporter& reporter,
                                   MaterializeResult* result) {
  ChecksumStream sum;
  uint64_t got = 0;
  absl::Status sink_error;
  auto sink = [&](const char* data, size_t bytes) -> absl::Status {
    if (bytes > t.bytes - got) {
      sink_error = absl::DataLossError(absl::StrCat(
          "tensor '", t.name, "': the fetcher sent more than its ", t.bytes, " bytes"));
      return sink_error;
    }
    sink_error = PwriteAll(slot.fd, slot.path, data, bytes, slot.offset + got);
    if (!sink_error.ok()) return sink_error;
    sum.Update(data, bytes);
    got += bytes;
    result->bytes_fetched += bytes;
    reporter.AddDone(bytes);
    return absl::OkStatus();
  };
  const absl::Status status = fetch(t, 0, sink);
  // The sink's own error wins, even over a fetcher that swallowed it.
  if (!sink_error.ok()) return sink_error;
  RETURN_IF_ERROR(status);
  if (got != t.bytes) {
    return absl::DataLossError(absl::StrCat("tensor '", t.name, "': the fetcher sent ", got,
                                            " of its ", t.bytes, " bytes"));
  }
  return sum.Digest();
}

absl::Status FetchTensor(const ShardTensor& t, const Slot& slot, const TensorFetcher& fetch,
                         ProgressReporter& reporter, MaterializeResult* result) {
  Checksum got;
  for (int attempt = 0; attempt < kFetchAttempts; ++attempt) {
    // A retry is more to fetch: bytes_done never passes bytes_total.
    if (attempt > 0) reporter.AddTotal(t.bytes);
    ASSIGN_OR_RETURN(got, FetchOnce(t, slot, fetch, reporter, result));
    if (got == t.checksum) {
      ++result->tensors_fetched;
      return absl::OkStatus();
    }
  }
  return absl::DataLossError(absl::StrCat("tensor '", t.name, "' does not verify after ",
                                          kFetchAttempts, " fetches: expected checksum ",
                                          t.checksum.Hex(), ", got ", got.Hex()));
}

// Step 5: the data is durable before the name says the file is complete, and the name is
// durable before anything else is deleted.
absl::Status Commit(Fd fd, const ShardPaths& paths, const std::string& dir) {
  if (::fsync(fd.get()) != 0) return IoError(paths.partial, "fsync failed", errno);
  if (fd.Close() != 0) return IoError(paths.partial, "close failed", errno);
  if (::rename(paths.partial.c_str(), paths.complete.c_str()) != 0) {
    return IoError(paths.partial, "cannot rename to .gguf", errno);
  }
  Fd d(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (d.get() < 0) return IoError(dir, "cannot open", errno);
  if (::fsync(d.get()) != 0) return IoError(dir, "fsync failed", errno);
  return absl::OkStatus();
}

// Best effort: a file left behind costs disk space, not correctness.
void RemoveOtherShards(const std::string& dir, const std::string& fingerprint,
                       const std::string& keep) {
  for (OpenShard& s : OpenShards(dir)) {
    if (s.fingerprint != fingerprint || s.path == keep || !IsShardFileName(s.name, fingerprint)) {
      continue;
    }
    s.file.reset();
    ::unlink(s.path.c_str());
  }
}

// Creates `path` and its missing parents (mode 0700).
absl::Status MakeDirs(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) == 0) {
    if (S_ISDIR(st.st_mode)) return absl::OkStatus();
    return absl::ErrnoToStatus(ENOTDIR, path);
  }
  if (errno != ENOENT) return absl::ErrnoToStatus(errno, path);
  const size_t slash = path.find_last_of('/');
  if (slash != std::string::npos && slash > 0) RETURN_IF_ERROR(MakeDirs(path.substr(0, slash)));
  if (::mkdir(path.c_str(), 0700) != 0 && errno != EEXIST) {
    return absl::ErrnoToStatus(errno, absl::StrCat(path, ": cannot create"));
  }
  if (::stat(path.c_str(), &st) != 0) return absl::ErrnoToStatus(errno, path);
  if (!S_ISDIR(st.st_mode)) return absl::ErrnoToStatus(ENOTDIR, path);
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ShardCache> ShardCache::Open(const std::string& dir, ShardLimits limits) {
  if (dir.empty()) return absl::InvalidArgumentError("shard cache: empty directory path");
  std::string clean = dir;
  while (clean.size() > 1 && clean.back() == '/') clean.pop_back();
  RETURN_IF_ERROR(MakeDirs(clean));
  return ShardCache(std::move(clean), limits);
}

std::vector<CachedShard> ShardCache::Inventory() const {
  std::vector<CachedShard> out;
  for (const OpenShard& s : OpenShards(dir_)) {
    std::map<std::pair<int, int>, int> matrices;  // (layer, expert) -> bit per matrix
    for (const GgufTensorInfo& info : s.file->tensors()) {
      if (const std::optional<ExpertTensorName> n = ParseExpertTensorName(info.name)) {
        matrices[{n->layer, n->expert}] |= 1 << n->matrix;
      }
    }
    CachedShard c;
    c.path = s.path;
    c.model_fingerprint = s.fingerprint;
    c.complete = s.complete;
    for (const auto& [pair, bits] : matrices) {
      if (bits == 0b111) c.pairs.push_back(pair);
    }
    out.push_back(std::move(c));
  }
  return out;
}

absl::StatusOr<MaterializeResult> ShardCache::Materialize(
    const ShardManifest& manifest, const TensorFetcher& fetch,
    const std::function<void(const FetchProgress&)>& progress) {
  RETURN_IF_ERROR(ValidateManifest(manifest, limits_));
  ASSIGN_OR_RETURN(const GgufWriter::FileLayout layout, ShardLayout(manifest));
  const std::string name = FileNameFor(manifest);
  const ShardPaths paths{JoinPath(dir_, name), JoinPath(dir_, name + kPartialSuffix)};
  MaterializeResult result;
  result.path = paths.complete;
  ASSIGN_OR_RETURN(result.untouched, UseCompleteFile(manifest, layout, paths));
  if (result.untouched) {
    for (const ShardTensor& t : manifest.tensors) result.bytes_reused += t.bytes;
    ProgressReporter(progress).Finish();
  } else {
    ASSIGN_OR_RETURN(PartialFile partial, OpenPartial(layout, paths.partial));
    ASSIGN_OR_RETURN(const std::vector<size_t> to_fetch,
                     ReuseTensors(dir_, manifest, layout, partial, paths.partial, &result));
    if (!to_fetch.empty() && !fetch) {
      return absl::InvalidArgumentError(
          absl::StrCat(paths.partial, ": ", to_fetch.size(), " tensors to fetch, no fetcher"));
    }
    ProgressReporter reporter(progress);
    for (size_t i : to_fetch) reporter.AddTotal(manifest.tensors[i].bytes);
    for (size_t i : to_fetch) {
      const Slot slot{partial.fd.get(), paths.partial, layout.data_offsets[i]};
      RETURN_IF_ERROR(FetchTensor(manifest.tensors[i], slot, fetch, reporter, &result));
    }
    RETURN_IF_ERROR(Commit(std::move(partial.fd), paths, dir_));
    reporter.Finish();
  }
  RemoveOtherShards(dir_, manifest.model_fingerprint, paths.complete);
  return result;
}

}  // namespace moepool::worker
