#include "tests/fuzz/gguf_seeds.h"

#include <cstdint>
#include <cstring>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/gguf_writer.h"
#include "engine/status_macros.h"
#include "engine/synth.h"

namespace moepool::testing {
namespace {

// Overwrites the 8-byte count that follows `key`'s entry header (key, value type and, for an
// array, its element type) in `image`.
absl::Status PatchArrayCount(std::string* image, const std::string& key, uint64_t count) {
  std::string needle(8, '\0');
  const uint64_t len = key.size();
  std::memcpy(needle.data(), &len, 8);
  needle += key;
  const size_t at = image->find(needle);
  if (at == std::string::npos) return absl::NotFoundError(absl::StrCat("no key ", key));
  std::memcpy(image->data() + at + needle.size() + 4 + 4, &count, 8);
  return absl::OkStatus();
}

// A header of magic, version and the two counts, and nothing else.
std::string BareHeader(uint64_t n_tensors, uint64_t n_kv) {
  std::string out;
  const uint32_t magic = kGgufMagic, version = 3;
  out.append(reinterpret_cast<const char*>(&magic), 4);
  out.append(reinterpret_cast<const char*>(&version), 4);
  out.append(reinterpret_cast<const char*>(&n_tensors), 8);
  out.append(reinterpret_cast<const char*>(&n_kv), 8);
  return out;
}

absl::Status WriteFile(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  out.close();
  if (!out) return absl::InternalError(absl::StrCat("cannot write ", path));
  return absl::OkStatus();
}

SynthShape MicroShape() {
  SynthShape s;
  s.name = "micro";
  s.n_embd = 32;
  s.n_ff = 32;
  s.n_layer = 1;
  s.n_head = 4;
  s.n_head_kv = 2;
  s.n_expert = 4;
  s.n_expert_used = 2;
  s.n_ctx = 64;
  return s;
}

}  // namespace

absl::StatusOr<std::string> ToyVocabImage() {
  std::vector<std::string> tokens = {"<unk>", "<s>", "</s>"};
  std::vector<float> scores = {0, 0, 0};
  std::vector<int32_t> types = {2, 3, 3};
  for (int b : {0x0A, 0x20, 0x41, 0xE2, 0x96, 0x81}) {
    tokens.push_back(absl::StrFormat("<0x%02X>", b));
    scores.push_back(0);
    types.push_back(6);
  }
  const std::string sp = "\xe2\x96\x81";  // SentencePiece's word-start marker
  const std::vector<std::string> pieces = {
      sp,   "a",      "b",  "c",  "d",      "e",      sp + "a", "ab",  "cd",   sp + "ab", "abc",
      "de", "e" + sp, "ba", "dc", sp + "b", sp + "c", sp + "d", "cab", "abcd", "aa",      "bb",
      "cc", "dd",     "ee", "ea", sp + sp,  sp + "e", "ad",     "be",  "ca"};
  for (const std::string& p : pieces) {
    tokens.push_back(p);
    scores.push_back(-static_cast<float>(tokens.size()));
    types.push_back(1);
  }
  GgufWriter w;
  w.AddMetadata("general.architecture", GgufValue::String("llama"));
  w.AddMetadata("tokenizer.ggml.model", GgufValue::String("llama"));
  w.AddMetadata("tokenizer.ggml.tokens", GgufValue::StringArray(tokens));
  w.AddMetadata("tokenizer.ggml.scores", GgufValue::Float32Array(scores));
  w.AddMetadata("tokenizer.ggml.token_type", GgufValue::Int32Array(types));
  w.AddMetadata("tokenizer.ggml.bos_token_id", GgufValue::Uint32(1));
  w.AddMetadata("tokenizer.ggml.eos_token_id", GgufValue::Uint32(2));
  w.AddMetadata("tokenizer.ggml.add_bos_token", GgufValue::Bool(true));
  return GgufWriter::BuildImage(w, {});
}

absl::StatusOr<std::vector<std::pair<std::string, std::string>>> HostileGgufImages() {
  std::vector<std::pair<std::string, std::string>> out;
  ASSIGN_OR_RETURN(std::string vocab, ToyVocabImage());
  std::string strings = vocab;
  RETURN_IF_ERROR(PatchArrayCount(&strings, "tokenizer.ggml.tokens", (uint64_t{1} << 26) - 1));
  out.emplace_back("huge-string-array", std::move(strings));
  std::string scores = vocab;
  RETURN_IF_ERROR(PatchArrayCount(&scores, "tokenizer.ggml.scores", (uint64_t{1} << 26) - 1));
  out.emplace_back("huge-float-array", std::move(scores));
  out.emplace_back("huge-metadata-count", BareHeader(0, uint64_t{1} << 20));
  out.emplace_back("huge-tensor-count", BareHeader(uint64_t{1} << 20, 0));
  GgufWriter nested;
  nested.AddMetadata("general.architecture", GgufValue::String("llama"));
  nested.AddMetadata("nested", GgufValue::Int32Array({1, 2, 3}));
  ASSIGN_OR_RETURN(std::string arrays, GgufWriter::BuildImage(nested, {}));
  // The element type of "nested" becomes kArray: three inner arrays of int32 would follow.
  const size_t at = arrays.find("nested") + 6 + 4;
  const uint32_t array_type = static_cast<uint32_t>(GgufValueType::kArray);
  std::memcpy(arrays.data() + at, &array_type, 4);
  out.emplace_back("array-of-arrays", std::move(arrays));
  return out;
}

absl::Status WriteGgufSeeds(const std::string& dir, const std::string& scratch) {
  ASSIGN_OR_RETURN(const std::string vocab, ToyVocabImage());
  RETURN_IF_ERROR(WriteFile(dir + "/toy-vocab.gguf", vocab));
  const std::string vocab_path = scratch + "/toy-vocab.gguf";
  RETURN_IF_ERROR(WriteFile(vocab_path, vocab));
  for (const auto& [type, per_expert] :
       {std::pair<const char*, bool>{"Q4_0", false}, std::pair<const char*, bool>{"Q8_0", true}}) {
    SynthOptions o;
    o.shape = MicroShape();
    o.type = type;
    o.seed = 1;
    o.vocab_path = vocab_path;
    o.per_expert_layout = per_expert;
    o.out_path = absl::StrCat(dir, "/micro-", type, per_expert ? "-per-expert" : "", ".gguf");
    RETURN_IF_ERROR(SynthesizeModel(o));
  }
  ASSIGN_OR_RETURN(const auto hostile, HostileGgufImages());
  for (const auto& [name, image] : hostile) {
    RETURN_IF_ERROR(WriteFile(absl::StrCat(dir, "/", name, ".gguf"), image));
  }
  return absl::OkStatus();
}

}  // namespace moepool::testing
