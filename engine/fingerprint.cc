#include "engine/fingerprint.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "absl/strings/str_format.h"

namespace moepool {
namespace {

// Two independent 64-bit streams (multiply-xorshift mixing of 8-byte words).
class Digest {
 public:
  void Update(const uint8_t* p, size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
      uint64_t w;
      std::memcpy(&w, p + i, 8);
      Mix(w);
    }
    uint64_t tail = 0;
    std::memcpy(&tail, p + i, n - i);
    Mix(tail ^ (static_cast<uint64_t>(n - i) << 56));
  }
  void Update(uint64_t v) { Mix(v); }
  std::string Hex() const { return absl::StrFormat("%016x%016x", Fin(a_), Fin(b_)); }

 private:
  void Mix(uint64_t w) {
    a_ = (a_ ^ w) * 0x9e3779b97f4a7c15ull;
    a_ ^= a_ >> 29;
    b_ = (b_ + w) * 0xc2b2ae3d27d4eb4full;
    b_ ^= b_ >> 31;
  }
  static uint64_t Fin(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    return x;
  }
  uint64_t a_ = 0x243f6a8885a308d3ull;
  uint64_t b_ = 0x13198a2e03707344ull;
};

// Reads sampled bytes with pread when the file can be opened, so that sampling a few bytes of
// every expert does not fault (and read ahead) pages of the mapping into this process's RSS;
// otherwise reads the mapping.
class SampleReader {
 public:
  explicit SampleReader(const GgufFile& f) : file_(f) {
    if (f.mapped()) fd_ = ::open(f.path().c_str(), O_RDONLY | O_CLOEXEC);
  }
  ~SampleReader() {
    if (fd_ >= 0) ::close(fd_);
  }
  void Read(const uint8_t* p, size_t n, uint8_t* out) const {
    const uint8_t* base = file_.base();
    if (fd_ >= 0 && p >= base && p + n <= base + file_.file_size()) {
      const ssize_t got = ::pread(fd_, out, n, static_cast<off_t>(p - base));
      if (got == static_cast<ssize_t>(n)) return;
    }
    std::memcpy(out, p, n);
  }

 private:
  const GgufFile& file_;
  int fd_ = -1;
};

void SampleMatrix(const WeightMatrix& m, const SampleReader& reader, Digest* d) {
  if (m.data == nullptr) {
    d->Update(0xab5e47ull);
    return;
  }
  const uint64_t size = m.SizeBytes();
  constexpr uint64_t kSample = 256;
  d->Update(size);
  for (int s = 0; s < 4; ++s) {
    const uint64_t off = size <= kSample ? 0 : (size - kSample) * static_cast<uint64_t>(s) / 3;
    uint8_t buf[kSample];
    const size_t n = static_cast<size_t>(std::min(kSample, size - off));
    reader.Read(m.data + off, n, buf);
    d->Update(buf, n);
  }
}

}  // namespace

std::string ModelFingerprint(const Model& model, const std::vector<std::pair<int, int>>& experts) {
  Digest d;
  const GgufFile& f = model.file();
  const SampleReader reader(f);
  d.Update(f.base(), static_cast<size_t>(f.data_offset()));
  d.Update(f.file_size());
  for (const auto& [layer, expert] : experts) {
    d.Update((static_cast<uint64_t>(layer) << 32) | static_cast<uint32_t>(expert));
    if (layer < 0 || layer >= model.config().n_layer || expert < 0 ||
        expert >= model.config().n_expert) {
      d.Update(0xbadull);
      continue;
    }
    const ExpertWeights& e = model.layer(layer).experts[static_cast<size_t>(expert)];
    SampleMatrix(e.gate, reader, &d);
    SampleMatrix(e.up, reader, &d);
    SampleMatrix(e.down, reader, &d);
  }
  return d.Hex();
}

}  // namespace moepool
