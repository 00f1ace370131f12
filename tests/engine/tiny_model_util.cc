#include "tests/engine/tiny_model_util.h"

#include <algorithm>
#include <cstdio>
#include <map>
#include <memory>

#include "absl/strings/str_cat.h"
#include "engine/gguf_writer.h"
#include "engine/status_macros.h"
#include "gtest/gtest.h"
#include "tests/testdata.h"

namespace moepool::testing {
SynthOptions TinySynthOptions(const std::string& type, uint64_t seed, bool per_expert,
                              const std::string& file) {
  SynthOptions o;
  o.shape = *SynthShapeByName("tiny");
  o.type = type;
  o.seed = seed;
  o.vocab_path = std::string(MOEPOOL_SOURCE_DIR) + "/" + kDefaultSynthVocabPath;
  o.per_expert_layout = per_expert;
  o.out_path = TempDir() + "/" + file;
  return o;
}

const std::string& TinyModelPath(const std::string& type, uint64_t seed, bool per_expert) {
  static auto* paths = new std::map<std::string, std::string>;
  const std::string file =
      absl::StrCat("tiny-", type, "-s", seed, per_expert ? "-per-expert" : "", ".gguf");
  auto it = paths->find(file);
  if (it != paths->end()) return it->second;
  const SynthOptions o = TinySynthOptions(type, seed, per_expert, file);
  const absl::Status s = SynthesizeModel(o);
  EXPECT_TRUE(s.ok()) << s;
  return paths->emplace(file, s.ok() ? o.out_path : "").first->second;
}

absl::Status CopyGgufWithEdits(const std::string& src, const std::string& dst,
                               const GgufEdits& edits) {
  ASSIGN_OR_RETURN(std::unique_ptr<GgufFile> in, GgufFile::Open(src));
  std::vector<std::pair<std::string, GgufValue>> metadata = in->metadata();
  if (edits.metadata) edits.metadata(&metadata);
  GgufWriter writer(in->alignment());
  for (auto& [key, value] : metadata) writer.AddMetadata(key, value);
  struct Kept {
    std::string name;
    size_t bytes;
    const uint8_t* data;
    size_t data_bytes;
  };
  std::vector<Kept> kept;
  for (const GgufTensorInfo& original : in->tensors()) {
    GgufTensorInfo t = original;
    if (edits.tensor && !edits.tensor(&t)) continue;
    RETURN_IF_ERROR(
        writer.AddTensor(t.name, t.type, std::vector<int64_t>(t.dims, t.dims + t.n_dims)));
    const size_t bytes = RowBytes(t.type, t.dims[0]) * static_cast<size_t>(t.NumRows());
    kept.push_back({t.name, bytes, original.data, original.size_bytes});
  }
  RETURN_IF_ERROR(writer.Begin(dst));
  std::string buffer;
  for (const Kept& k : kept) {
    buffer.assign(reinterpret_cast<const char*>(k.data), std::min(k.bytes, k.data_bytes));
    buffer.resize(k.bytes, '\0');
    RETURN_IF_ERROR(writer.WriteTensorData(k.name, buffer.data(), buffer.size()));
  }
  return writer.Finish();
}

std::vector<int32_t> PseudoRandomPrompt(int n, int64_t n_vocab, uint64_t seed) {
  std::vector<int32_t> tokens = {1};
  uint64_t s = seed * 0x9E3779B97F4A7C15ull + 12345;
  while (static_cast<int>(tokens.size()) < n) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    tokens.push_back(static_cast<int32_t>(3 + (s >> 33) % static_cast<uint64_t>(n_vocab - 3)));
  }
  return tokens;
}

}  // namespace moepool::testing
