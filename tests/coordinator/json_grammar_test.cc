// JsonMatcher over schemas compiled by json_schema.h: which texts it accepts completely, which
// it refuses, and a random walk showing that every text it lets end is valid.
#include "coordinator/json_grammar.h"

#include <memory>
#include <random>
#include <string>
#include <vector>

#include "coordinator/json_schema.h"
#include "gtest/gtest.h"

namespace moepool {
namespace {

using ojson = nlohmann::ordered_json;

std::shared_ptr<const JsonGrammar> Compile(const std::string& schema) {
  absl::StatusOr<std::shared_ptr<const JsonGrammar>> g = GrammarForJsonSchema(ojson::parse(schema));
  EXPECT_TRUE(g.ok()) << g.status();
  return g.ok() ? *g : nullptr;
}

// True if the matcher takes all of `text` and may end there.
bool Accepts(const JsonGrammar& g, const std::string& text) {
  JsonMatcher m(&g);
  return m.Advance(text) && m.CanEnd();
}

struct Case {
  const char* schema;
  std::vector<const char*> valid;
  std::vector<const char*> invalid;  // refused, or not complete
};

class JsonGrammarCaseTest : public ::testing::TestWithParam<Case> {};

TEST_P(JsonGrammarCaseTest, AcceptsValidAndRefusesInvalid) {
  const Case& c = GetParam();
  std::shared_ptr<const JsonGrammar> g = Compile(c.schema);
  ASSERT_NE(g, nullptr);
  for (const char* text : c.valid) EXPECT_TRUE(Accepts(*g, text)) << c.schema << "  " << text;
  for (const char* text : c.invalid) EXPECT_FALSE(Accepts(*g, text)) << c.schema << "  " << text;
}

INSTANTIATE_TEST_SUITE_P(
    Schemas, JsonGrammarCaseTest,
    ::testing::Values(
        Case{R"({"type":"string","minLength":2,"maxLength":3})",
             {R"("ab")", R"("abc")", R"(  "é€")", R"("\n\"")", R"("\u00e9x")", R"("😀😀")"},
             {R"("a")", R"("abcd")", R"("ab" )", R"("a\qb")", "\"a\x01\"", "\"\xc3\"",
              R"("\ud800x")", "\"\xed\xa0\x80\"", "ab"}},
        Case{R"({"type":"integer","minimum":-5,"exclusiveMaximum":120})",
             {"0", "-5", "119", "7", "-1"},
             {"-6", "120", "007", "-0", "1.5", "1e2", "", "-"}},
        Case{R"({"type":"integer","minimum":10,"maximum":20})",
             {"10", "15", "20"},
             {"9", "21", "3", "100", "0"}},
        Case{R"({"type":"number"})",
             {"0", "-1.25", "3e10", "1.5E-3", "10"},
             {"01", ".5", "1.", "1e", "--1", "+1", "NaN", "1e100"}},
        Case{R"({"enum":["red","green",3,null]})",
             {R"("red")", R"("green")", "3", "null"},
             {R"("blue")", "4", R"("re")"}},
        Case{R"({"const":{"a":[1,2]}})", {R"({"a":[1,2]})"}, {R"({"a":[1]})", "{}"}},
        Case{R"({"type":["string","null"],"maxLength":2})",
             {"null", R"("hi")"},
             {R"("hey")", "nul", "0"}},
        Case{R"({"type":"array","items":{"type":"boolean"},"minItems":1,"maxItems":2})",
             {"[true]", "[ false , true ]", "[\n  true\n]"},
             {"[]", "[true,true,true]", "[1]"}},
        Case{R"({"type":"object","properties":{"a":{"type":"integer"},"b":{"type":"string"}},
                "required":["b"],"additionalProperties":false})",
             {R"({"b":"x"})", R"({"a":1,"b":"x"})", R"({ "a" : 1 , "b" : "" })"},
             {"{}", R"({"a":1})", R"({"b":"x","a":1})", R"({"b":"x","c":1})",
              R"({"a":1,"b":"x",})"}},
        Case{R"({"type":"object","additionalProperties":{"type":"integer"}})",
             {"{}", R"({"x":1,"y":-2})"},
             {R"({"x":"1"})"}},
        Case{R"({"anyOf":[{"type":"object","properties":{"kind":{"const":"a"},
                  "n":{"type":"integer"}},"required":["kind","n"]},
                 {"type":"object","properties":{"kind":{"const":"b"},
                  "s":{"type":"string"}},"required":["kind","s"]}]})",
             {R"({"kind":"a","n":1})", R"({"kind":"b","s":"x"})"},
             {R"({"kind":"a","s":"x"})", R"({"kind":"b","n":1})"}},
        Case{R"({"$defs":{"pt":{"type":"object","properties":{"x":{"type":"integer"}},
                  "required":["x"]}},
                "type":"array","items":{"$ref":"#/$defs/pt"}})",
             {R"([{"x":1},{"x":2}])", "[]"},
             {R"([{"y":1}])"}},
        Case{
            R"({"type":"object"})", {"{}", R"({"a":[1,{"b":null}],"c":"d"})"}, {"[]", R"({"a":})"}},
        Case{R"({"type":"object","properties":{},"additionalProperties":false})",
             {"{}"},
             {R"({"a":1})"}}));

TEST(JsonGrammarTest, WhitespaceIsBoundedAndNotTrailing) {
  std::shared_ptr<const JsonGrammar> g = Compile(R"({"type":"array","items":{"type":"null"}})");
  ASSERT_NE(g, nullptr);
  EXPECT_TRUE(Accepts(*g, "[" + std::string(kMaxGapWhitespace, ' ') + "null]"));
  EXPECT_FALSE(Accepts(*g, "[" + std::string(kMaxGapWhitespace + 1, ' ') + "null]"));
  EXPECT_FALSE(Accepts(*g, "[null] "));
}

TEST(JsonGrammarTest, FinishedOnlyWhenNothingMayFollow) {
  std::shared_ptr<const JsonGrammar> g = Compile(R"({"type":"integer"})");
  ASSERT_NE(g, nullptr);
  JsonMatcher m(g.get());
  ASSERT_TRUE(m.Advance("12"));
  EXPECT_TRUE(m.CanEnd());
  EXPECT_FALSE(m.Finished());  // "123" is possible
  std::shared_ptr<const JsonGrammar> obj = Compile(R"({"type":"object","properties":{}})");
  JsonMatcher o(obj.get());
  ASSERT_TRUE(o.Advance("{}"));
  EXPECT_TRUE(o.Finished());
}

TEST(JsonGrammarTest, RefusedBytesLeaveTheStateUnchanged) {
  std::shared_ptr<const JsonGrammar> g = Compile(R"({"enum":["ab","ac"]})");
  JsonMatcher m(g.get());
  ASSERT_TRUE(m.Advance("\"a"));
  EXPECT_FALSE(m.Advance("bx"));
  EXPECT_TRUE(m.Advance("c\""));
  EXPECT_TRUE(m.Finished());
}

TEST(JsonGrammarTest, PrefixedRootWithFreeTextEscape) {
  auto g = std::make_shared<JsonGrammar>();
  GrammarNode child{.kind = GrammarNode::Kind::kInteger};
  child.min_value = 0;
  child.max_value = 9;
  GrammarNode root{.kind = GrammarNode::Kind::kPrefixed};
  root.prefix = "[CALL]";
  root.child = g->Add(child);
  root.free_text_escape = true;
  g->root = g->Add(root);
  EXPECT_TRUE(Accepts(*g, " [CALL] 7"));
  EXPECT_TRUE(Accepts(*g, "hello [CALL]"));  // free text
  EXPECT_TRUE(Accepts(*g, ""));
  EXPECT_FALSE(Accepts(*g, "[CALL]x"));
  JsonMatcher m(g.get());
  ASSERT_TRUE(m.Advance("[CA"));
  EXPECT_FALSE(m.IsFreeText());
  ASSERT_TRUE(m.Advance("T"));
  EXPECT_TRUE(m.IsFreeText());
}

// Random walks over random allowed bytes: every text the matcher lets end parses as JSON and
// meets the schema's constraints checked here.
TEST(JsonGrammarTest, RandomWalksEndInValidJson) {
  std::shared_ptr<const JsonGrammar> g = Compile(R"({"type":"object","properties":{
      "id":{"type":"integer","minimum":1,"maximum":99},
      "tags":{"type":"array","items":{"enum":["x","y"]},"maxItems":3},
      "name":{"type":["string","null"],"maxLength":5}},
      "required":["id","name"],"additionalProperties":false})");
  ASSERT_NE(g, nullptr);
  std::mt19937 rng(7);
  int ended = 0;
  for (int walk = 0; walk < 300; ++walk) {
    JsonMatcher m(g.get());
    std::string text;
    for (int step = 0; step < 200 && !m.Finished(); ++step) {
      std::vector<uint8_t> allowed;
      for (int c = 1; c < 128; ++c) {
        MatchState out;
        if (JsonMatcher::Step(*g, m.state(), static_cast<uint8_t>(c), &out)) allowed.push_back(c);
      }
      if (allowed.empty() || (m.CanEnd() && rng() % 8 == 0)) break;
      const char c = static_cast<char>(allowed[rng() % allowed.size()]);
      ASSERT_TRUE(m.Advance(std::string(1, c)));
      text += c;
    }
    if (!m.CanEnd()) continue;
    ++ended;
    const ojson j = ojson::parse(text, nullptr, /*allow_exceptions=*/false);
    ASSERT_FALSE(j.is_discarded()) << text;
    ASSERT_TRUE(j.is_object()) << text;
    ASSERT_TRUE(j.contains("id") && j["id"].is_number_integer()) << text;
    EXPECT_GE(j["id"].get<int>(), 1) << text;
    EXPECT_LE(j["id"].get<int>(), 99) << text;
    ASSERT_TRUE(j.contains("name")) << text;
    if (j["name"].is_string()) {
      size_t code_points = 0;
      for (unsigned char ch : j["name"].get<std::string>()) code_points += (ch & 0xC0) != 0x80;
      EXPECT_LE(code_points, 5u) << text;
    } else {
      EXPECT_TRUE(j["name"].is_null()) << text;
    }
    if (j.contains("tags")) {
      EXPECT_LE(j["tags"].size(), 3u) << text;
    }
  }
  EXPECT_GT(ended, 100);
}

}  // namespace
}  // namespace moepool
