// TokenConstraint over the real Mistral vocabulary: the trie walk allows exactly the tokens a
// token-by-token check of the matcher allows (the reference), end tokens follow CanEnd, and a
// state seen before is answered from the cache.
#include "coordinator/token_constraint.h"

#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "coordinator/json_schema.h"
#include "gtest/gtest.h"
#include "tests/coordinator/serve_test_util.h"

namespace moepool {
namespace {

using ::moepool::testing::LoadTinyEngine;

std::shared_ptr<const JsonGrammar> Compile(const std::string& schema) {
  auto g = GrammarForJsonSchema(nlohmann::ordered_json::parse(schema));
  EXPECT_TRUE(g.ok()) << g.status();
  return g.ok() ? *g : nullptr;
}

// The reference: token t is allowed iff the matcher takes its whole piece.
std::vector<bool> ReferenceAllowed(const JsonGrammar& g, const MatchState& state,
                                   const VocabTrie& trie) {
  std::vector<bool> allowed(static_cast<size_t>(trie.n_vocab()), false);
  for (int32_t id = 0; id < trie.n_vocab(); ++id) {
    const std::string& piece = trie.piece(id);
    if (piece.empty()) continue;
    MatchState s = state, next;
    bool ok = true;
    for (char c : piece) {
      ok = JsonMatcher::Step(g, s, static_cast<uint8_t>(c), &next);
      if (!ok) break;
      std::swap(s, next);
    }
    allowed[static_cast<size_t>(id)] = ok;
  }
  return allowed;
}

TEST(TokenConstraintTest, TrieWalkAllowsExactlyWhatTheMatcherTakes) {
  auto engine = LoadTinyEngine(64);
  ASSERT_NE(engine, nullptr);
  const Tokenizer& tok = engine->tokenizer();
  VocabTrie trie(tok);
  std::shared_ptr<const JsonGrammar> g = Compile(R"({"type":"object","properties":{
      "name":{"type":"string","maxLength":4},"n":{"type":"integer","minimum":-3,"maximum":250},
      "ok":{"type":["boolean","null"]},"xs":{"type":"array","items":{"type":"number"}}},
      "required":["name","n"]})");
  ASSERT_NE(g, nullptr);
  const std::string text = R"( {"name":"ab\u00e9","n":-3,"ok":null,"xs":[1.5e3,-0.25]})";
  TokenConstraint constraint(g, &trie, {tok.eos_id()});
  JsonMatcher walker(g.get());
  std::vector<float> logits(static_cast<size_t>(tok.n_vocab()));
  for (size_t i = 0; i <= text.size(); ++i) {
    // After each prefix of the text: the constraint's mask against the reference.
    std::fill(logits.begin(), logits.end(), 0.0f);
    ASSERT_TRUE(constraint.Mask(logits.data(), tok.n_vocab()));
    const std::vector<bool> ref = ReferenceAllowed(*g, walker.state(), trie);
    int allowed = 0;
    for (int32_t id = 0; id < tok.n_vocab(); ++id) {
      const bool end = id == tok.eos_id() && walker.CanEnd();
      ASSERT_EQ(std::isfinite(logits[static_cast<size_t>(id)]), ref[static_cast<size_t>(id)] || end)
          << "after " << text.substr(0, i) << " token " << id << " '" << trie.piece(id) << "'";
      allowed += ref[static_cast<size_t>(id)];
    }
    EXPECT_GT(allowed + walker.CanEnd(), 0);
    if (i == text.size()) break;
    // Advance both by one byte (a byte token where the vocabulary has one).
    const int32_t byte_token = tok.PieceToId(absl::StrFormat("<0x%02X>", text[i] & 0xFF));
    ASSERT_GE(byte_token, 0);
    ASSERT_TRUE(constraint.Accept(byte_token)) << text.substr(0, i + 1);
    ASSERT_TRUE(walker.Advance(text.substr(i, 1)));
  }
  EXPECT_TRUE(constraint.Finished());
  EXPECT_TRUE(constraint.Accept(tok.eos_id()));
  EXPECT_FALSE(constraint.Accept(tok.PieceToId("<0x20>")));  // nothing after the object
}

TEST(TokenConstraintTest, RepeatedStatesComeFromTheCache) {
  auto engine = LoadTinyEngine(64);
  ASSERT_NE(engine, nullptr);
  const Tokenizer& tok = engine->tokenizer();
  VocabTrie trie(tok);
  std::shared_ptr<const JsonGrammar> g = Compile(R"({"type":"array","items":{"type":"string"}})");
  TokenConstraint constraint(g, &trie, {tok.eos_id()});
  std::vector<float> logits(static_cast<size_t>(tok.n_vocab()), 0.0f);
  const std::vector<int32_t> ids = tok.Encode(R"(["a","b","c")", /*add_bos=*/false);
  for (int32_t id : ids) {
    std::fill(logits.begin(), logits.end(), 0.0f);
    ASSERT_TRUE(constraint.Mask(logits.data(), tok.n_vocab()));
    ASSERT_TRUE(std::isfinite(logits[static_cast<size_t>(id)])) << trie.piece(id);
    ASSERT_TRUE(constraint.Accept(id)) << trie.piece(id);
  }
  EXPECT_GT(constraint.masks_cached(), 0u);
  EXPECT_LT(constraint.masks_computed(), ids.size() + 1);
  EXPECT_FALSE(constraint.Accept(tok.PieceToId("<0x7D>")));  // '}' cannot close an array
}

TEST(TokenConstraintTest, FreeTextIsUnconstrained) {
  auto engine = LoadTinyEngine(64);
  ASSERT_NE(engine, nullptr);
  const Tokenizer& tok = engine->tokenizer();
  VocabTrie trie(tok);
  auto g = std::make_shared<JsonGrammar>();
  GrammarNode root{.kind = GrammarNode::Kind::kPrefixed};
  root.prefix = "[TOOL_CALLS]";
  root.child = g->AddLiterals({{"1", 0}});
  root.free_text_escape = true;
  g->root = g->Add(root);
  TokenConstraint constraint(g, &trie, {tok.eos_id()});
  for (int32_t id : tok.Encode("Hello", /*add_bos=*/false)) ASSERT_TRUE(constraint.Accept(id));
  std::vector<float> logits(static_cast<size_t>(tok.n_vocab()), 0.5f);
  ASSERT_TRUE(constraint.Mask(logits.data(), tok.n_vocab()));
  for (float l : logits) ASSERT_EQ(l, 0.5f);
}

}  // namespace
}  // namespace moepool
