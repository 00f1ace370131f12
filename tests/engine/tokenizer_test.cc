#include "engine/tokenizer.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/gguf_writer.h"
#include "gtest/gtest.h"
#include "tests/testdata.h"

namespace moepool {
namespace {

using ::moepool::testing::ReadFileOrDie;
using ::moepool::testing::SharedTestdataPath;

// ---------------------------------------------------------------------------------------------
// Reference vectors: .inp holds strings, each followed by "\n__ggml_vocab_test__\n" (the last one
// may lack it); .out holds one line of space-separated ids (without BOS) per string.

struct VocabCase {
  std::string text;
  std::vector<int32_t> ids;
};

std::vector<VocabCase> ReadVocabCases(const std::string& gguf_path) {
  const std::string inp = ReadFileOrDie(gguf_path + ".inp");
  const std::string out = ReadFileOrDie(gguf_path + ".out");
  const std::string separator = "\n__ggml_vocab_test__\n";
  std::vector<std::string> texts;
  size_t pos = 0;
  while (true) {
    const size_t hit = inp.find(separator, pos);
    if (hit == std::string::npos) break;
    texts.push_back(inp.substr(pos, hit - pos));
    pos = hit + separator.size();
  }
  if (pos < inp.size()) texts.push_back(inp.substr(pos));

  std::vector<std::vector<int32_t>> id_lines;
  pos = 0;
  while (pos < out.size()) {
    size_t end = out.find('\n', pos);
    if (end == std::string::npos) end = out.size();
    std::istringstream line(out.substr(pos, end - pos));
    std::vector<int32_t> ids;
    int32_t id;
    while (line >> id) ids.push_back(id);
    id_lines.push_back(std::move(ids));
    pos = end + 1;
  }
  EXPECT_EQ(texts.size(), id_lines.size()) << gguf_path;
  std::vector<VocabCase> cases;
  for (size_t i = 0; i < texts.size() && i < id_lines.size(); ++i) {
    cases.push_back({texts[i], id_lines[i]});
  }
  return cases;
}

std::unique_ptr<Tokenizer> LoadTokenizerOrDie(const std::string& path) {
  auto file = GgufFile::Open(path);
  EXPECT_TRUE(file.ok()) << file.status();
  if (!file.ok()) return nullptr;
  auto tokenizer = Tokenizer::FromGguf(**file);
  EXPECT_TRUE(tokenizer.ok()) << tokenizer.status();
  if (!tokenizer.ok()) return nullptr;
  return std::move(*tokenizer);
}

class ReferenceVocabTest : public ::testing::TestWithParam<const char*> {};

TEST_P(ReferenceVocabTest, EncodesEveryReferenceStringExactly) {
  const std::string path = SharedTestdataPath(std::string("vocab/") + GetParam());
  REQUIRE_TESTDATA(path);
  auto tokenizer = LoadTokenizerOrDie(path);
  ASSERT_NE(tokenizer, nullptr);
  const std::vector<VocabCase> cases = ReadVocabCases(path);
  ASSERT_GT(cases.size(), 40u);
  int failures = 0;
  for (size_t i = 0; i < cases.size(); ++i) {
    const std::vector<int32_t> ids = tokenizer->Encode(cases[i].text, /*add_bos=*/false);
    if (ids != cases[i].ids) {
      ++failures;
      ADD_FAILURE() << "string " << i << " \"" << cases[i].text << "\"\n  expected "
                    << absl::StrJoin(cases[i].ids, " ") << "\n  got      "
                    << absl::StrJoin(ids, " ");
    }
  }
  EXPECT_EQ(failures, 0) << "of " << cases.size();
}

TEST_P(ReferenceVocabTest, DecodeInvertsEncode) {
  const std::string path = SharedTestdataPath(std::string("vocab/") + GetParam());
  REQUIRE_TESTDATA(path);
  auto tokenizer = LoadTokenizerOrDie(path);
  ASSERT_NE(tokenizer, nullptr);
  for (const VocabCase& c : ReadVocabCases(path)) {
    EXPECT_EQ(tokenizer->Decode(tokenizer->Encode(c.text, /*add_bos=*/true)), c.text);
    EXPECT_EQ(tokenizer->Decode(tokenizer->Encode(c.text, /*add_bos=*/false)), c.text);
  }
}

INSTANTIATE_TEST_SUITE_P(Vocabularies, ReferenceVocabTest,
                         ::testing::Values("mistral-vocab.gguf", "ggml-vocab-llama-spm.gguf"));

// The prompts of the conformance models, tokenized by the reference with the vocabulary stored
// in the model file itself (BOS first).
TEST(ConformancePromptTest, EncodesPromptsLikeTheReference) {
  const std::string model_path = SharedTestdataPath("conformance/tiny-F16.gguf");
  REQUIRE_TESTDATA(model_path);
  auto tokenizer = LoadTokenizerOrDie(model_path);
  ASSERT_NE(tokenizer, nullptr);
  for (const char* prompt : {"p1", "p2"}) {
    const std::string json =
        ReadFileOrDie(SharedTestdataPath(absl::StrCat("conformance/tiny-F16.", prompt, ".json")));
    const size_t key = json.find("\"prompt_tokens\"");
    ASSERT_NE(key, std::string::npos);
    const size_t open = json.find('[', key);
    const size_t close = json.find(']', open);
    ASSERT_NE(close, std::string::npos);
    std::string list = json.substr(open + 1, close - open - 1);
    std::replace(list.begin(), list.end(), ',', ' ');
    std::istringstream stream(list);
    std::vector<int32_t> expected;
    int32_t id;
    while (stream >> id) expected.push_back(id);
    ASSERT_GT(expected.size(), 10u);
    const std::string text =
        ReadFileOrDie(SharedTestdataPath(absl::StrCat("conformance/", prompt, ".txt")));
    EXPECT_EQ(tokenizer->Encode(text, tokenizer->add_bos_default()), expected) << prompt;
  }
}

class MistralTokenizerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string path = SharedTestdataPath("vocab/mistral-vocab.gguf");
    REQUIRE_TESTDATA(path);
    tokenizer_ = LoadTokenizerOrDie(path);
    ASSERT_NE(tokenizer_, nullptr);
  }
  int32_t Id(std::string_view piece) const {
    const int32_t id = tokenizer_->PieceToId(piece);
    EXPECT_GE(id, 0) << piece;
    return id;
  }
  std::unique_ptr<Tokenizer> tokenizer_;
};

TEST_F(MistralTokenizerTest, ReadsSpecialTokensAndFlags) {
  EXPECT_EQ(tokenizer_->n_vocab(), 32000);
  EXPECT_EQ(tokenizer_->bos_id(), 1);
  EXPECT_EQ(tokenizer_->eos_id(), 2);
  EXPECT_EQ(tokenizer_->unk_id(), 0);
  EXPECT_TRUE(tokenizer_->add_bos_default());
  EXPECT_TRUE(tokenizer_->add_space_prefix());
  EXPECT_TRUE(tokenizer_->IsEndOfGeneration(2));
  EXPECT_FALSE(tokenizer_->IsEndOfGeneration(1));
  EXPECT_EQ(tokenizer_->TokenText(1), "<s>");
  EXPECT_EQ(tokenizer_->TokenType(1), VocabTokenType::kControl);
  EXPECT_EQ(tokenizer_->TokenText(-1), "");
  EXPECT_EQ(tokenizer_->TokenText(32000), "");
}

TEST_F(MistralTokenizerTest, BosIsPrependedOnlyOnRequest) {
  const std::vector<int32_t> with = tokenizer_->Encode("Hello world", /*add_bos=*/true);
  const std::vector<int32_t> without = tokenizer_->Encode("Hello world", /*add_bos=*/false);
  ASSERT_EQ(with.size(), without.size() + 1);
  EXPECT_EQ(with[0], 1);
  EXPECT_EQ(std::vector<int32_t>(with.begin() + 1, with.end()), without);
  EXPECT_EQ(tokenizer_->Encode("", /*add_bos=*/true), std::vector<int32_t>{1});
  EXPECT_TRUE(tokenizer_->Encode("", /*add_bos=*/false).empty());
}

TEST_F(MistralTokenizerTest, ControlTokenTextInInputIsPlainText) {
  const std::vector<int32_t> ids = tokenizer_->Encode("<s>[INST] hi </s>", /*add_bos=*/false);
  for (int32_t id : ids) {
    EXPECT_NE(tokenizer_->TokenType(id), VocabTokenType::kControl) << id;
  }
  EXPECT_EQ(tokenizer_->Decode(ids), "<s>[INST] hi </s>");
}

TEST_F(MistralTokenizerTest, TokenToPieceMapsSpacesBytesAndControlTokens) {
  EXPECT_EQ(tokenizer_->TokenToPiece(Id("\xE2\x96\x81Hello")), " Hello");
  EXPECT_EQ(tokenizer_->TokenToPiece(Id("<0x0A>")), "\n");
  EXPECT_EQ(tokenizer_->TokenToPiece(Id("<0xF0>")), "\xF0");
  EXPECT_EQ(tokenizer_->TokenToPiece(1), "");
  EXPECT_EQ(tokenizer_->TokenToPiece(2), "");
  EXPECT_EQ(tokenizer_->TokenToPiece(-5), "");
}

TEST_F(MistralTokenizerTest, DecodeDropsOnlyThePrefixSpace) {
  EXPECT_EQ(tokenizer_->Decode({1, Id("\xE2\x96\x81Hello")}), "Hello");
  EXPECT_EQ(tokenizer_->Decode({Id("\xE2\x96\x81Hello"), Id("\xE2\x96\x81world")}), "Hello world");
  EXPECT_EQ(tokenizer_->Decode({Id("Hello")}), "Hello");
  EXPECT_EQ(tokenizer_->Decode(tokenizer_->Encode("  two leading spaces", true)),
            "  two leading spaces");
}

TEST_F(MistralTokenizerTest, CharactersMissingFromTheVocabularyFallBackToBytes) {
  // U+1F999 (llama) is not a piece of this vocabulary: it comes out as its four UTF-8 bytes.
  const std::string llama = "\xF0\x9F\xA6\x99";
  ASSERT_EQ(tokenizer_->PieceToId(llama), -1);
  const std::vector<int32_t> ids = tokenizer_->Encode(llama, /*add_bos=*/false);
  const std::vector<int32_t> expected = {Id("\xE2\x96\x81"), Id("<0xF0>"), Id("<0x9F>"),
                                         Id("<0xA6>"), Id("<0x99>")};
  EXPECT_EQ(ids, expected);
  // Invalid UTF-8 input also survives the round trip through byte tokens.
  const std::string invalid = "a\xFF\xC3(b\x80";
  EXPECT_EQ(tokenizer_->Decode(tokenizer_->Encode(invalid, true)), invalid);
}

TEST_F(MistralTokenizerTest, StreamingHoldsBackSplitCharacterUntilComplete) {
  StreamingDetokenizer stream(*tokenizer_);
  EXPECT_EQ(stream.Push(Id("\xE2\x96\x81Hi")), " Hi");
  EXPECT_EQ(stream.Push(Id("<0xF0>")), "");
  EXPECT_EQ(stream.Push(Id("<0x9F>")), "");
  EXPECT_EQ(stream.Push(Id("<0x98>")), "");
  EXPECT_EQ(stream.Push(Id("<0x80>")), "\xF0\x9F\x98\x80");
  EXPECT_EQ(stream.Push(2), "");
  EXPECT_EQ(stream.Flush(), "");
}

TEST_F(MistralTokenizerTest, StreamingFlushReplacesIncompleteCharacter) {
  StreamingDetokenizer stream(*tokenizer_);
  EXPECT_EQ(stream.Push(Id("<0xF0>")), "");
  EXPECT_EQ(stream.Push(Id("<0x9F>")), "");
  EXPECT_EQ(stream.Flush(), "\xEF\xBF\xBD");
  // The stream is usable again after a flush.
  EXPECT_EQ(stream.Push(Id("<0x41>")), "A");
}

TEST_F(MistralTokenizerTest, StreamingReplacesInvalidBytesMidStream) {
  StreamingDetokenizer stream(*tokenizer_);
  // A stray continuation byte, then a lead byte interrupted by a normal token.
  EXPECT_EQ(stream.Push(Id("<0x80>")), "\xEF\xBF\xBD");
  EXPECT_EQ(stream.Push(Id("<0xE2>")), "");
  EXPECT_EQ(stream.Push(Id("\xE2\x96\x81ok")), "\xEF\xBF\xBD ok");
  // Overlong encodings and surrogates are invalid, not held back.
  EXPECT_EQ(stream.Push(Id("<0xC0>")), "\xEF\xBF\xBD");
  EXPECT_EQ(stream.Push(Id("<0xED>")), "");
  EXPECT_EQ(stream.Push(Id("<0xA0>")), "\xEF\xBF\xBD\xEF\xBF\xBD");
  EXPECT_EQ(stream.Flush(), "");
}

TEST_F(MistralTokenizerTest, StreamingMatchesDecodeOnValidText) {
  const std::string text = "Grüße, 世界! \xF0\x9F\x98\x80 done";
  std::vector<int32_t> ids = tokenizer_->Encode(text, /*add_bos=*/false);
  StreamingDetokenizer stream(*tokenizer_);
  std::string streamed;
  for (int32_t id : ids) streamed += stream.Push(id);
  streamed += stream.Flush();
  EXPECT_EQ(streamed, " " + text);  // the stream keeps the prefix space
}

// ---------------------------------------------------------------------------------------------
// Small in-memory vocabularies: merge order and metadata validation.

// A metadata-only GGUF image of `kv`.
std::string BuildMetadataGguf(const std::vector<std::pair<std::string, GgufValue>>& kv) {
  GgufWriter w;
  for (const auto& [key, value] : kv) w.AddMetadata(key, value);
  absl::StatusOr<std::string> image = GgufWriter::BuildImage(w, {});
  EXPECT_TRUE(image.ok()) << image.status();
  return image.ok() ? *image : std::string();
}

// A toy vocabulary: "<unk>", "<s>", "</s>", then pieces with the given scores.
struct ToyVocab {
  std::vector<std::pair<std::string, GgufValue>> kv;

  ToyVocab(const std::vector<std::string>& pieces, const std::vector<float>& scores) {
    std::vector<std::string> tokens = {"<unk>", "<s>", "</s>"};
    std::vector<float> all_scores = {0, 0, 0};
    std::vector<int32_t> types = {2, 3, 3};
    for (size_t i = 0; i < pieces.size(); ++i) {
      tokens.push_back(pieces[i]);
      all_scores.push_back(scores[i]);
      types.push_back(pieces[i].rfind("<0x", 0) == 0 ? 6 : 1);
    }
    kv = {{"tokenizer.ggml.model", GgufValue::String("llama")},
          {"tokenizer.ggml.tokens", GgufValue::StringArray(tokens)},
          {"tokenizer.ggml.scores", GgufValue::Float32Array(all_scores)},
          {"tokenizer.ggml.token_type", GgufValue::Int32Array(types)},
          {"tokenizer.ggml.bos_token_id", GgufValue::Uint32(1)},
          {"tokenizer.ggml.eos_token_id", GgufValue::Uint32(2)},
          {"tokenizer.ggml.add_space_prefix", GgufValue::Bool(false)}};
  }
  void Set(const std::string& key, GgufValue value) {
    for (auto& [k, v] : kv) {
      if (k == key) {
        v = std::move(value);
        return;
      }
    }
    kv.emplace_back(key, std::move(value));
  }
  absl::StatusOr<std::unique_ptr<Tokenizer>> Load() const {
    auto file = GgufFile::FromBuffer(BuildMetadataGguf(kv), "toy.gguf");
    if (!file.ok()) return file.status();
    return Tokenizer::FromGguf(**file);
  }
};

TEST(ToyTokenizerTest, MergesHighestScoringPairFirstAndLeftmostOnTies) {
  // ids: a=3 b=4 c=5 ab=6 bc=7
  auto bc_wins = ToyVocab({"a", "b", "c", "ab", "bc"}, {-1, -1, -1, -5, -2}).Load();
  ASSERT_TRUE(bc_wins.ok()) << bc_wins.status();
  EXPECT_EQ((*bc_wins)->Encode("abc", false), (std::vector<int32_t>{3, 7}));
  auto ab_wins = ToyVocab({"a", "b", "c", "ab", "bc"}, {-1, -1, -1, -2, -5}).Load();
  ASSERT_TRUE(ab_wins.ok());
  EXPECT_EQ((*ab_wins)->Encode("abc", false), (std::vector<int32_t>{6, 5}));
  auto tie = ToyVocab({"a", "b", "c", "ab", "bc"}, {-1, -1, -1, -3, -3}).Load();
  ASSERT_TRUE(tie.ok());
  EXPECT_EQ((*tie)->Encode("abc", false), (std::vector<int32_t>{6, 5}));
  EXPECT_EQ((*tie)->Encode("bcab", false), (std::vector<int32_t>{7, 6}));
}

TEST(ToyTokenizerTest, MissingByteTokensFallBackToUnknown) {
  // "x" and "y" are not pieces; only <0x78> ("x") exists as a byte token.
  auto tok = ToyVocab({"a", "<0x78>"}, {-1, 0}).Load();
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->Encode("axy", false), (std::vector<int32_t>{3, 4, 0}));
  EXPECT_EQ((*tok)->TokenToPiece(0), "\xE2\x96\x85");
  EXPECT_FALSE((*tok)->add_space_prefix());
  EXPECT_EQ((*tok)->Decode({1, 3, 4}), "ax");
}

void ExpectInvalid(const ToyVocab& vocab, const std::string& key) {
  auto tok = vocab.Load();
  ASSERT_FALSE(tok.ok());
  EXPECT_EQ(tok.status().code(), absl::StatusCode::kInvalidArgument) << tok.status();
  EXPECT_NE(tok.status().message().find(key), std::string::npos) << tok.status();
  EXPECT_NE(tok.status().message().find("toy.gguf"), std::string::npos) << tok.status();
}

TEST(ToyTokenizerTest, RejectsInconsistentMetadata) {
  const ToyVocab good({"a", "b"}, {-1, -2});
  ASSERT_TRUE(good.Load().ok());

  ToyVocab gpt2 = good;
  gpt2.Set("tokenizer.ggml.model", GgufValue::String("gpt2"));
  ExpectInvalid(gpt2, "tokenizer.ggml.model");

  ToyVocab no_model = good;
  no_model.kv.erase(no_model.kv.begin());
  ExpectInvalid(no_model, "tokenizer.ggml.model");

  ToyVocab short_scores = good;
  short_scores.Set("tokenizer.ggml.scores", GgufValue::Float32Array({0, 0, 0, -1}));
  ExpectInvalid(short_scores, "tokenizer.ggml.scores");

  ToyVocab short_types = good;
  short_types.Set("tokenizer.ggml.token_type", GgufValue::Int32Array({2, 3, 3, 1}));
  ExpectInvalid(short_types, "tokenizer.ggml.token_type");

  ToyVocab bad_type = good;
  bad_type.Set("tokenizer.ggml.token_type", GgufValue::Int32Array({2, 3, 3, 1, 9}));
  ExpectInvalid(bad_type, "tokenizer.ggml.token_type");

  ToyVocab bad_byte_text = good;
  bad_byte_text.Set("tokenizer.ggml.token_type", GgufValue::Int32Array({2, 3, 3, 1, 6}));
  ExpectInvalid(bad_byte_text, "tokenizer.ggml.token_type");

  ToyVocab bos_out_of_range = good;
  bos_out_of_range.Set("tokenizer.ggml.bos_token_id", GgufValue::Uint32(5));
  ExpectInvalid(bos_out_of_range, "tokenizer.ggml.bos_token_id");

  ToyVocab eos_out_of_range = good;
  eos_out_of_range.Set("tokenizer.ggml.eos_token_id", GgufValue::Uint32(1000));
  ExpectInvalid(eos_out_of_range, "tokenizer.ggml.eos_token_id");

  ToyVocab empty = good;
  empty.Set("tokenizer.ggml.tokens", GgufValue::StringArray({}));
  ExpectInvalid(empty, "tokenizer.ggml.tokens");

  ToyVocab wrong_kind = good;
  wrong_kind.Set("tokenizer.ggml.tokens", GgufValue::Uint32(3));
  ExpectInvalid(wrong_kind, "tokenizer.ggml.tokens");
}

TEST(ToyTokenizerTest, OptionalKeysTakeDefaults) {
  ToyVocab minimal({"a"}, {0});
  minimal.kv = {minimal.kv[0], minimal.kv[1]};  // model and tokens only
  auto tok = minimal.Load();
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->bos_id(), 1);
  EXPECT_EQ((*tok)->eos_id(), 2);
  EXPECT_EQ((*tok)->unk_id(), 0);
  EXPECT_TRUE((*tok)->add_bos_default());
  EXPECT_FALSE((*tok)->add_eos_default());
  EXPECT_TRUE((*tok)->add_space_prefix());
  EXPECT_EQ((*tok)->TokenScore(3), 0.0f);
  EXPECT_EQ((*tok)->TokenType(3), VocabTokenType::kNormal);
}

}  // namespace
}  // namespace moepool
