// json_schema.h: what is refused (by name and place), and the choices it makes.
#include "coordinator/json_schema.h"

#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace moepool {
namespace {

using ojson = nlohmann::ordered_json;

absl::Status CompileStatus(const std::string& schema, const JsonSchemaLimits& limits = {}) {
  return GrammarForJsonSchema(ojson::parse(schema), limits).status();
}

bool Accepts(const std::string& schema, const std::string& text) {
  auto g = GrammarForJsonSchema(ojson::parse(schema));
  EXPECT_TRUE(g.ok()) << g.status();
  if (!g.ok()) return false;
  JsonMatcher m(g->get());
  return m.Advance(text) && m.CanEnd();
}

TEST(JsonSchemaTest, RefusesWhatItCannotEnforceByName) {
  struct Bad {
    const char* schema;
    const char* expect;  // in the message
  };
  const std::vector<Bad> cases = {
      {R"({"type":"string","pattern":"^a+$"})", "'pattern' is not supported"},
      {R"({"type":"string","format":"date-time"})", "'format' is not supported"},
      {R"({"oneOf":[{"type":"string"},{"type":"null"}]})", "'oneOf' is not supported"},
      {R"({"type":"array","uniqueItems":true})", "'uniqueItems' is not supported"},
      {R"({"type":"number","minimum":0})", "'minimum' is supported for type integer"},
      {R"({"type":"strin"})", "'type' \"strin\" is not a JSON type"},
      {R"({"type":[]})", "'type' must not be an empty list"},
      {R"({"type":"object","properties":{},"required":["x"]})",
       "required property 'x' is not in 'properties'"},
      {R"({"type":"string","minLength":5,"maxLength":2})", "'minLength' is above 'maxLength'"},
      {R"({"type":"array","minItems":3,"maxItems":1})", "'minItems' is above 'maxItems'"},
      {R"({"type":"string","maxLength":-1})", "'maxLength' must be a non-negative integer"},
      {R"({"$ref":"#/$defs/missing"})", "does not resolve"},
      {R"({"$ref":"http://example.com/s.json"})", "only references inside the schema"},
      {R"({"$defs":{"n":{"type":"object","properties":{"next":{"$ref":"#/$defs/n"}}}},
           "$ref":"#/$defs/n"})",
       "is recursive"},
      {R"({"type":"integer","minimum":5,"maximum":4})", "no integer"},
      {R"({"type":"array","items":[{"type":"string"}]})", "'items' as a list"},
      {R"({"allOf":[{"type":"string"},{"maxLength":3}]})", "exactly one schema"},
      {R"({"anyOf":[]})", "'anyOf' must be a non-empty array"},
      {R"({"enum":[1,2],"type":"string"})", "no 'enum' value has the schema's 'type'"},
      {"false", "accepts no value"},
      {"3", "must be an object or a boolean"},
      {R"({"type":"object","properties":{"a":{"type":"object","properties":{"b":{"type":"bogus"}}}}})",
       "$.properties.a.properties.b"},
  };
  for (const Bad& c : cases) {
    const absl::Status s = CompileStatus(c.schema);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << c.schema;
    EXPECT_NE(std::string(s.message()).find(c.expect), std::string::npos)
        << c.schema << " -> " << s.message();
  }
}

TEST(JsonSchemaTest, HostileSchemasHitLimits) {
  std::string deep = R"({"type":"string"})";
  for (int i = 0; i < 40; ++i) deep = R"({"type":"array","items":)" + deep + "}";
  EXPECT_NE(std::string(CompileStatus(deep).message()).find("nested too deeply"),
            std::string::npos);
  // Exponential $ref fan-out is compiled once per definition, not once per use.
  std::string defs = R"({"$defs":{"d0":{"type":"integer"})";
  for (int i = 1; i < 10; ++i) {
    defs += ",\"d" + std::to_string(i) +
            "\":{\"type\":\"array\",\"items\":{\"anyOf\":[{\"$ref\":\"#/$defs/d" +
            std::to_string(i - 1) + "\"},{\"$ref\":\"#/$defs/d" + std::to_string(i - 1) + "\"}]}}";
  }
  defs += R"(},"$ref":"#/$defs/d9"})";
  JsonGrammar g;
  const ojson parsed = ojson::parse(defs);
  ASSERT_TRUE(AddJsonSchema(parsed, parsed, "$", &g).ok());
  EXPECT_LT(g.nodes.size(), 40u);  // 2^9 uses of d0, one node
  JsonSchemaLimits small;
  small.max_literal_bytes = 10;
  EXPECT_FALSE(CompileStatus(R"({"enum":["aaaaaaaaaa","bbbbbbbbbb"]})", small).ok());
}

TEST(JsonSchemaTest, ChoicesWhereTheStandardLeavesRoom) {
  // Annotations are ignored; types are inferred from keywords.
  EXPECT_TRUE(Accepts(R"({"title":"t","description":"d","default":1,"maxLength":2})", R"("ab")"));
  EXPECT_TRUE(Accepts(R"({"properties":{"a":{"const":1}},"required":["a"]})", R"({"a":1})"));
  // Properties come in the listed order (not sorted), and no others are generated even when
  // additionalProperties allows them.
  EXPECT_TRUE(Accepts(R"({"type":"object","properties":{"z":{"type":"null"},"a":{"type":"null"}},
                          "required":["z","a"]})",
                      R"({"z":null,"a":null})"));
  EXPECT_FALSE(Accepts(R"({"type":"object","properties":{"a":{"type":"null"}}})", R"({"b":1})"));
  // nullable, one-element allOf, integer-valued enum filtering, a $ref used twice.
  EXPECT_TRUE(Accepts(R"({"type":"integer","nullable":true})", "null"));
  EXPECT_TRUE(Accepts(R"({"allOf":[{"type":"boolean"}]})", "true"));
  EXPECT_TRUE(Accepts(R"({"type":"integer","enum":[1,"1",2.0]})", "2.0"));
  EXPECT_FALSE(Accepts(R"({"type":"integer","enum":[1,"1",2.0]})", R"("1")"));
  EXPECT_TRUE(Accepts(R"({"$defs":{"c":{"enum":["r","g"]}},"type":"array",
                          "items":{"anyOf":[{"$ref":"#/$defs/c"},{"$ref":"#/$defs/c"}]}})",
                      R"(["r","g"])"));
  EXPECT_TRUE(Accepts("true", R"({"any":[1,"x",null]})"));
}

}  // namespace
}  // namespace moepool
