// What the GGUF reader, the model binder and the tokenizer allocate for a file is a small
// multiple of its size (GgufAllocationBound): hostile counts are refused before anything is
// allocated for them, and the most memory-hungry valid layouts stay under the bound. Its own
// binary, because alloc_counter.cc replaces the program's operator new.
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/gguf.h"
#include "engine/gguf_writer.h"
#include "engine/model.h"
#include "engine/tokenizer.h"
#include "gtest/gtest.h"
#include "tests/fuzz/alloc_counter.h"
#include "tests/fuzz/gguf_fuzz_input.h"
#include "tests/fuzz/gguf_seeds.h"
#include "tests/testdata.h"

namespace moepool::testing {
namespace {

const std::string kCorpusDir = std::string(MOEPOOL_SOURCE_DIR) + "/tests/fuzz/corpus/gguf";

// Peak bytes ParseGgufInput allocates for `image`, checked against the bound; prints the ratio.
uint64_t CheckedPeak(const std::string& name, const std::string& image) {
  bool ok = false;
  const uint64_t peak = PeakAllocatedDuring([&] { ok = ParseGgufInput(image); });
  EXPECT_TRUE(ok) << name;
  EXPECT_LE(peak, GgufAllocationBound(image.size()))
      << name << ": " << image.size() << " bytes of input";
  std::printf("%-28s %10zu bytes -> %11llu allocated (%.2fx)\n", name.c_str(), image.size(),
              static_cast<unsigned long long>(peak), static_cast<double>(peak) / image.size());
  return peak;
}

std::string Image(const GgufWriter& w) {
  absl::StatusOr<std::string> image = GgufWriter::BuildImage(w, {});
  EXPECT_TRUE(image.ok()) << image.status();
  return image.ok() ? *image : std::string();
}

TEST(GgufReaderMemoryTest, HostileCountsAreRefusedBeforeTheyAreAllocated) {
  absl::StatusOr<std::vector<std::pair<std::string, std::string>>> hostile = HostileGgufImages();
  ASSERT_TRUE(hostile.ok()) << hostile.status();
  for (const auto& [name, image] : *hostile) {
    SCOPED_TRACE(name);
    absl::StatusOr<std::unique_ptr<GgufFile>> file = GgufFile::FromBuffer(image, name);
    ASSERT_FALSE(file.ok());
    const std::string message(file.status().message());
    if (name == "array-of-arrays") {
      EXPECT_NE(message.find("array of arrays"), std::string::npos) << message;
    } else {
      EXPECT_NE(message.find("bytes left in the file can hold"), std::string::npos) << message;
    }
    // A few KB of input, so the bound is nearly all its constant; before the counts were
    // checked, huge-string-array alone allocated about 6 GB.
    const uint64_t peak = CheckedPeak(name, image);
    EXPECT_LT(peak, uint64_t{1} << 20) << name;
  }
}

TEST(GgufReaderMemoryTest, TheToyVocabularyAndTheSharedFilesStayWithinTheBound) {
  absl::StatusOr<std::string> vocab = ToyVocabImage();
  ASSERT_TRUE(vocab.ok()) << vocab.status();
  CheckedPeak("toy-vocab", *vocab);
  for (const char* rel : {"vocab/mistral-vocab.gguf", "conformance/tiny-Q4_K_M.gguf",
                          "conformance/quant-vectors.gguf"}) {
    const std::string path = SharedTestdataPath(rel);
    REQUIRE_TESTDATA(path);
    CheckedPeak(rel, ReadFileOrDie(path));
  }
}

// The valid layouts that cost the most memory per byte of file: a vocabulary of empty strings
// (8 bytes each in the file; a std::string in the reader and again in the tokenizer, plus its
// table entries) and many one-byte metadata entries.
TEST(GgufReaderMemoryTest, TheHungriestValidLayoutsStayWithinTheBound) {
  GgufWriter empty_strings;
  empty_strings.AddMetadata("tokenizer.ggml.model", GgufValue::String("llama"));
  empty_strings.AddMetadata("tokenizer.ggml.tokens",
                            GgufValue::StringArray(std::vector<std::string>(100000)));
  CheckedPeak("100k empty tokens", Image(empty_strings));

  GgufWriter many_keys;
  for (int i = 0; i < 20000; ++i) many_keys.AddMetadata(absl::StrCat(i), GgufValue::Bool(true));
  CheckedPeak("20k one-byte keys", Image(many_keys));

  GgufWriter bytes;
  bytes.AddMetadata("u8", GgufValue::Array(GgufValueType::kUint8,
                                           std::vector<GgufValue>(1 << 20, GgufValue::Uint32(7))));
  CheckedPeak("1M-element uint8 array", Image(bytes));
}

// The committed seed corpus is what WriteGgufSeeds writes today (regenerate it with
// `build/tests/fuzz/gguf_seed_corpus tests/fuzz/corpus/gguf` after changing the writer), and
// its valid files bind as models and tokenizers.
TEST(GgufReaderMemoryTest, TheSeedCorpusIsTheWritersOutput) {
  const std::string dir = TempDir() + "/seeds";
  std::filesystem::create_directories(dir);
  const absl::Status written = WriteGgufSeeds(dir, TempDir());
  ASSERT_TRUE(written.ok()) << written;
  int n = 0;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    const std::string name = e.path().filename().string();
    SCOPED_TRACE(name);
    const std::string committed = kCorpusDir + "/" + name;
    ASSERT_TRUE(std::filesystem::exists(committed)) << "not in the committed corpus";
    const std::string bytes = ReadFileOrDie(e.path().string());
    EXPECT_EQ(bytes, ReadFileOrDie(committed)) << "the committed seed is stale";
    EXPECT_LT(bytes.size(), 32u << 10) << "seeds stay small";
    ++n;
  }
  EXPECT_EQ(n, 8);
  for (const char* model : {"micro-Q4_0.gguf", "micro-Q8_0-per-expert.gguf"}) {
    absl::StatusOr<std::unique_ptr<Model>> m = Model::Load(kCorpusDir + "/" + model);
    ASSERT_TRUE(m.ok()) << m.status();
    EXPECT_EQ((*m)->config().n_expert, 4);
    EXPECT_TRUE(Tokenizer::FromGguf((*m)->file()).ok()) << model;
  }
}

}  // namespace
}  // namespace moepool::testing
