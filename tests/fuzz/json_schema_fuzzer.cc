// The structured-output grammar (coordinator/json_schema.h, json_grammar.h) under hostile
// schemas: an input is a schema's text, then a NUL, then choice bytes. The schema is compiled
// (any error is a clear INVALID_ARGUMENT, never a crash); if it compiles, the choice bytes drive
// a walk through the matcher, each picking one of the bytes it accepts next. Whenever the walk
// may end, its text must be valid JSON; the walk must not stall where it cannot end.
//
// Replay build (ctest JsonSchemaFuzzerReplay): the seeds below, corruptions of them and
// tests/fuzz/corpus/schema. libFuzzer build: tests/fuzz/run_fuzz.sh SECONDS WORKERS schema.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "coordinator/json_grammar.h"
#include "coordinator/json_schema.h"
#include "nlohmann/json.hpp"
#ifndef MOEPOOL_LIBFUZZER
#include "tests/fuzz/replay_driver.h"
#endif

namespace {

constexpr int kMaxSteps = 2048;

void Check(bool ok, const char* what, const std::string& text) {
  if (ok) return;
  std::fprintf(stderr, "json_schema_fuzzer: %s; text so far: %s\n", what, text.c_str());
  std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const char* begin = reinterpret_cast<const char*>(data);
  const char* nul = static_cast<const char*>(std::memchr(begin, 0, size));
  const std::string schema_text(begin, nul != nullptr ? nul : begin + size);
  const std::string choices = nul != nullptr ? std::string(nul + 1, begin + size) : "";
  const nlohmann::ordered_json schema =
      nlohmann::ordered_json::parse(schema_text, nullptr, /*allow_exceptions=*/false);
  if (schema.is_discarded()) return 0;
  moepool::JsonSchemaLimits limits;
  limits.max_nodes = 2000;  // keep one input fast; the limit logic is the same
  auto grammar = moepool::GrammarForJsonSchema(schema, limits);
  if (!grammar.ok()) {
    Check(grammar.status().code() == absl::StatusCode::kInvalidArgument, "a non-400 error", "");
    return 0;
  }
  moepool::JsonMatcher matcher(grammar->get());
  std::string text;
  moepool::MatchState next;
  for (int step = 0; step < kMaxSteps; ++step) {
    if (matcher.CanEnd()) {
      const auto parsed = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
      Check(!parsed.is_discarded(), "the matcher may end on text that is not JSON", text);
    }
    std::vector<uint8_t> allowed;
    for (int c = 0; c < 256; ++c) {
      if (moepool::JsonMatcher::Step(**grammar, matcher.state(), static_cast<uint8_t>(c), &next)) {
        allowed.push_back(static_cast<uint8_t>(c));
      }
    }
    if (allowed.empty()) {
      // Nothing may follow: the text must be complete (a dead end would stall a reply).
      Check(matcher.CanEnd(), "no byte may follow, yet the text cannot end", text);
      break;
    }
    const size_t i = static_cast<size_t>(step);
    // Past the choices: stop where the text may end, else take the first byte allowed.
    if (i >= choices.size() && matcher.CanEnd()) break;
    const uint8_t pick = i < choices.size() ? static_cast<uint8_t>(choices[i]) : 0;
    const uint8_t c = allowed[pick % allowed.size()];
    Check(matcher.Advance(std::string(1, static_cast<char>(c))), "an allowed byte refused", text);
    text += static_cast<char>(c);
  }
  return 0;
}

#ifndef MOEPOOL_LIBFUZZER
int main(int argc, char** argv) {
  moepool::testing::ReplayOptions options;
  options.target = "json_schema_fuzzer";
  const std::pair<const char*, const char*> seeds[] = {
      {"object", R"({"type":"object","properties":{"a":{"type":"integer","minimum":-3,
         "maximum":70},"b":{"type":["string","null"],"maxLength":3}},"required":["b"]})"},
      {"array", R"({"type":"array","items":{"enum":["x",1,null,{"k":[true]}]},"minItems":1,
         "maxItems":3})"},
      {"anyof", R"({"anyOf":[{"type":"number"},{"type":"object","properties":{"n":{"const":1}},
         "required":["n"]},{"type":"array","items":{"type":"boolean"}}]})"},
      {"refs", R"({"$defs":{"p":{"type":"object","properties":{"x":{"type":"integer"}},
         "required":["x"]}},"type":"array","items":{"$ref":"#/$defs/p"},"maxItems":2})"},
      {"any", R"({"type":"object"})"},
      {"string", R"({"type":"string","minLength":2,"maxLength":5})"},
  };
  for (const auto& [name, schema] : seeds) {
    std::string input = schema;
    input.push_back('\0');
    for (int i = 0; i < 64; ++i) input.push_back(static_cast<char>((i * 37 + 11) & 0xff));
    options.seeds.emplace_back(name, input);
  }
  return moepool::testing::RunReplayDriver(argc, argv, options);
}
#endif
