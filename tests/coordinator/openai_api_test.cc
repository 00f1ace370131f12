#include "coordinator/openai_api.h"

#include <memory>
#include <string>
#include <vector>

#include "engine/gguf.h"
#include "engine/synth.h"
#include "gtest/gtest.h"

namespace moepool {
namespace {

using json = nlohmann::json;

TEST(OpenAiApiTest, ParsesAFullChatRequest) {
  auto r = ParseChatCompletionRequest(R"({
    "model": "m", "stream": true, "stream_options": {"include_usage": true},
    "messages": [
      {"role": "system", "content": "S"},
      {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
      {"role": "assistant", "content": null},
      {"role": "user", "content": "Q", "name": "bob"}],
    "max_completion_tokens": 7, "temperature": 0.5, "top_p": 0.9, "seed": 42,
    "stop": ["x", "yz"], "presence_penalty": 0.25, "frequency_penalty": -1,
    "logprobs": true, "top_logprobs": 3, "n": 1, "logit_bias": {"17": -100},
    "user": "ignored", "unknown_field": [1, 2]})");
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->messages.size(), 4u);
  EXPECT_EQ(r->messages[1].content, "a\nb");
  EXPECT_EQ(r->messages[2].content, "");
  EXPECT_EQ(r->messages[3].role, "user");
  const GenerationParams& p = r->params;
  EXPECT_EQ(p.model, "m");
  EXPECT_TRUE(p.stream);
  EXPECT_TRUE(p.include_usage);
  EXPECT_EQ(p.max_tokens, 7);
  EXPECT_FLOAT_EQ(p.sampling.temperature, 0.5f);
  EXPECT_FLOAT_EQ(p.sampling.top_p, 0.9f);
  EXPECT_EQ(p.sampling.seed, 42u);
  EXPECT_TRUE(p.seed_given);
  EXPECT_EQ(p.stop, (std::vector<std::string>{"x", "yz"}));
  EXPECT_FLOAT_EQ(p.sampling.presence_penalty, 0.25f);
  EXPECT_FLOAT_EQ(p.sampling.frequency_penalty, -1.0f);
  EXPECT_EQ(p.top_logprobs, 3);
  ASSERT_EQ(p.logit_bias.size(), 1u);
  EXPECT_EQ(p.logit_bias[0].first, 17);
  EXPECT_EQ(p.logit_bias[0].second, -100.0f);
}

TEST(OpenAiApiTest, ChatDefaultsAreOpenAis) {
  auto r = ParseChatCompletionRequest(R"({"messages": [{"role": "user", "content": "hi"}]})");
  ASSERT_TRUE(r.ok()) << r.status();
  const GenerationParams& p = r->params;
  EXPECT_FALSE(p.stream);
  EXPECT_EQ(p.max_tokens, -1);
  EXPECT_EQ(p.sampling.temperature, 1.0f);
  EXPECT_EQ(p.sampling.top_p, 1.0f);
  EXPECT_EQ(p.sampling.top_k, 0);
  EXPECT_EQ(p.sampling.min_p, 0.0f);
  EXPECT_FALSE(p.seed_given);
  EXPECT_EQ(p.top_logprobs, -1);
  // max_tokens wins over max_completion_tokens; a single stop string is a list of one.
  r = ParseChatCompletionRequest(
      R"({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
          "max_completion_tokens": 9, "stop": "END", "logprobs": true})");
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->params.max_tokens, 3);
  EXPECT_EQ(r->params.stop, std::vector<std::string>{"END"});
  EXPECT_EQ(r->params.top_logprobs, 0);
}

struct BadCase {
  const char* body;
  const char* param;  // expected ApiParam ("" for none)
};

// Request fields that are each wrong in one way, and the parameter the error must name.
std::vector<BadCase> BadChatParams() {
  return {
      {R"("model": 3)", "model"},
      {R"("stream": "yes")", "stream"},
      {R"("stream_options": true)", "stream_options"},
      {R"("n": 2)", "n"},
      {R"("max_tokens": 0)", "max_tokens"},
      {R"("max_tokens": 1.5)", "max_tokens"},
      {R"("max_completion_tokens": "9")", "max_completion_tokens"},
      {R"("temperature": 2.5)", "temperature"},
      {R"("temperature": "hot")", "temperature"},
      {R"("top_p": 0)", "top_p"},
      {R"("presence_penalty": 3)", "presence_penalty"},
      {R"("frequency_penalty": -2.5)", "frequency_penalty"},
      {R"("seed": "1")", "seed"},
      {R"("stop": 5)", "stop"},
      {R"("stop": ["a", 1])", "stop"},
      {R"("stop": [""])", "stop"},
      {R"("logprobs": 1)", "logprobs"},
      {R"("top_logprobs": 2)", "top_logprobs"},
      {R"("logprobs": true, "top_logprobs": 21)", "top_logprobs"},
      {R"("logit_bias": {"x": 1})", "logit_bias"},
      {R"("logit_bias": {"5": 101})", "logit_bias"},
      {R"("tools": [{"type": "function"}])", "tools"},
      {R"("tools": [{"type": "function", "function": {"name": "a b"}}])", "tools"},
      {R"("tools": [{"type": "function", "function": {"name": "f", "parameters":
          {"type": "object", "properties": {"x": {"type": "string", "pattern": "a+"}}}}}])",
       "tools"},
      {R"("tools": [{"type": "function", "function": {"name": "f"}},
                    {"type": "function", "function": {"name": "f"}}])",
       "tools"},
      {R"("tools": [{"type": "function", "function": {"name": "f"}}],
          "tool_choice": {"type": "function", "function": {"name": "g"}})",
       "tool_choice"},
      {R"("tool_choice": "required")", "tool_choice"},
      {R"("tool_choice": "sometimes")", "tool_choice"},
      {R"("parallel_tool_calls": 1)", "parallel_tool_calls"},
      {R"("response_format": {"type": "xml"})", "response_format"},
      {R"("response_format": {"type": "json_schema"})", "response_format"},
      {R"("response_format": {"type": "json_schema", "json_schema": {"schema":
          {"type": "string", "format": "email"}}})",
       "response_format"},
      {R"("response_format": {"type": "json_object"},
          "tools": [{"type": "function", "function": {"name": "f"}}])",
       "response_format"},
  };
}

TEST(OpenAiApiTest, RejectsBadChatRequestsNamingTheParameter) {
  const std::string ok_messages = R"("messages": [{"role": "user", "content": "hi"}])";
  const std::vector<BadCase> cases = {
      {"{", ""},
      {"[1, 2]", ""},
      {"\"text\"", ""},
      {"{\"messages\": [{\"role\": \"user\", \"content\": \"\xff\xfe\"}]}", ""},
      {R"({})", "messages"},
      {R"({"messages": []})", "messages"},
      {R"({"messages": "hi"})", "messages"},
      {R"({"messages": [1]})", "messages[0]"},
      {R"({"messages": [{"content": "x"}]})", "messages[0].role"},
      {R"({"messages": [{"role": "robot", "content": "x"}]})", "messages[0].role"},
      {R"({"messages": [{"role": "tool", "content": "x"}]})", "messages[0].tool_call_id"},
      {R"({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls":
          [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]}]})",
       "messages[1].tool_calls"},
      {R"({"messages": [{"role": "user", "content": 5}]})", "messages[0].content"},
      {R"({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})",
       "messages[0].content"},
  };
  for (const BadCase& c : cases) {
    auto r = ParseChatCompletionRequest(c.body);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << c.body;
    EXPECT_EQ(ApiParam(r.status()), c.param) << c.body;
  }
  const std::vector<BadCase> params = BadChatParams();
  for (const BadCase& c : params) {
    const std::string body = "{" + ok_messages + ", " + c.body + "}";
    auto r = ParseChatCompletionRequest(body);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << body;
    EXPECT_EQ(ApiParam(r.status()), c.param) << body;
  }
}

TEST(OpenAiApiTest, ParsesResponseFormatAndTools) {
  auto plain = ParseChatCompletionRequest(
      R"({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "text"}})");
  ASSERT_TRUE(plain.ok()) << plain.status();
  EXPECT_EQ(plain->params.grammar, nullptr);
  auto object = ParseChatCompletionRequest(R"({"messages": [{"role": "user", "content": "hi"}],
      "response_format": {"type": "json_object"}})");
  ASSERT_TRUE(object.ok()) << object.status();
  EXPECT_NE(object->params.grammar, nullptr);

  // Tools: offered in the last user message; calls and results written as text.
  auto r = ParseChatCompletionRequest(R"({"messages": [
      {"role": "user", "content": "weather?"},
      {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function",
       "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}}]},
      {"role": "tool", "tool_call_id": "c1", "content": "cold"},
      {"role": "user", "content": "and now?"}],
      "tools": [{"type": "function", "function": {"name": "get_weather",
                 "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
      "tool_choice": "required"})");
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->messages.size(), 4u);
  EXPECT_EQ(r->messages[1].content,
            R"([TOOL_CALLS] [{"name":"get_weather","arguments":{"city":"Oslo"}}])");
  EXPECT_EQ(r->messages[2].content,
            R"([TOOL_RESULTS] {"call_id":"c1","content":"cold"}[/TOOL_RESULTS])");
  EXPECT_EQ(r->messages[3].content.rfind("[AVAILABLE_TOOLS] [{\"type\":\"function\"", 0), 0u)
      << r->messages[3].content;
  EXPECT_NE(r->messages[3].content.find("[/AVAILABLE_TOOLS]\n\nand now?"), std::string::npos);
  EXPECT_EQ(r->messages[0].content, "weather?");
  EXPECT_EQ(r->tools.choice, ToolChoice::kRequired);
  ASSERT_NE(r->params.grammar, nullptr);
  JsonMatcher m(r->params.grammar.get());
  EXPECT_TRUE(m.Advance(R"([TOOL_CALLS] [{"name":"get_weather","arguments":{"city":"x"}}])"));
  EXPECT_TRUE(m.CanEnd());

  // "none": tools neither offered nor constrained.
  auto none = ParseChatCompletionRequest(R"({"messages": [{"role": "user", "content": "hi"}],
      "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "none"})");
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_EQ(none->params.grammar, nullptr);
  EXPECT_EQ(none->messages[0].content, "hi");

  auto completion = ParseCompletionRequest(R"({"prompt": "x", "response_format":
      {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "integer"}}}})");
  ASSERT_TRUE(completion.ok()) << completion.status();
  EXPECT_NE(completion->params.grammar, nullptr);
  auto completion_tools = ParseCompletionRequest(
      R"({"prompt": "x", "tools": [{"type": "function", "function": {"name": "f"}}]})");
  EXPECT_EQ(ApiParam(completion_tools.status()), "tools");
}

TEST(OpenAiApiTest, ParsesCompletionPrompts) {
  auto r = ParseCompletionRequest(R"({"prompt": "Once", "logprobs": 2})");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->prompt, "Once");
  EXPECT_FALSE(r->has_prompt_tokens);
  EXPECT_EQ(r->params.max_tokens, 16);  // the legacy endpoint's default
  EXPECT_EQ(r->params.top_logprobs, 2);
  r = ParseCompletionRequest(R"({"prompt": ["Twice"], "max_tokens": 40})");
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->prompt, "Twice");
  EXPECT_EQ(r->params.max_tokens, 40);
  r = ParseCompletionRequest(R"({"prompt": [1, 415, 2936]})");
  ASSERT_TRUE(r.ok());
  EXPECT_TRUE(r->has_prompt_tokens);
  EXPECT_EQ(r->prompt_tokens, (std::vector<int32_t>{1, 415, 2936}));
  r = ParseCompletionRequest(R"({"prompt": [[1, 2]]})");
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->prompt_tokens, (std::vector<int32_t>{1, 2}));
  const std::vector<BadCase> bad = {
      {R"({})", "prompt"},
      {R"({"prompt": 5})", "prompt"},
      {R"({"prompt": ["a", "b"]})", "prompt"},
      {R"({"prompt": [1, -2]})", "prompt"},
      {R"({"prompt": "a", "echo": true})", "echo"},
      {R"({"prompt": "a", "suffix": "z"})", "suffix"},
      {R"({"prompt": "a", "best_of": 3})", "best_of"},
      {R"({"prompt": "a", "logprobs": 6})", "logprobs"},
      {R"({"prompt": "a", "logprobs": true})", "logprobs"},
      {R"({"prompt": "a", "n": 4})", "n"},
  };
  for (const BadCase& c : bad) {
    auto e = ParseCompletionRequest(c.body);
    EXPECT_EQ(e.status().code(), absl::StatusCode::kInvalidArgument) << c.body;
    EXPECT_EQ(ApiParam(e.status()), c.param) << c.body;
  }
}

TEST(OpenAiApiTest, ErrorsMapToOpenAiObjects) {
  ApiError e = ToApiError(InvalidRequestError("messages", "too long", "context_length_exceeded"));
  EXPECT_EQ(e.http_status, 400);
  const json j = ErrorJson(e);
  EXPECT_EQ(j["error"]["type"], "invalid_request_error");
  EXPECT_EQ(j["error"]["message"], "too long");
  EXPECT_EQ(j["error"]["param"], "messages");
  EXPECT_EQ(j["error"]["code"], "context_length_exceeded");
  const json plain = ErrorJson(ToApiError(absl::InvalidArgumentError("bad")));
  EXPECT_TRUE(plain["error"]["param"].is_null());
  EXPECT_TRUE(plain["error"]["code"].is_null());
  EXPECT_EQ(ToApiError(absl::UnauthenticatedError("no")).http_status, 401);
  EXPECT_EQ(ToApiError(absl::NotFoundError("no")).http_status, 404);
  EXPECT_EQ(ToApiError(absl::ResourceExhaustedError("busy")).http_status, 429);
  EXPECT_EQ(ToApiError(absl::UnavailableError("down")).http_status, 503);
  EXPECT_EQ(ToApiError(absl::InternalError("oops")).http_status, 500);
}

std::unique_ptr<Tokenizer> MistralTokenizer() {
  auto f = GgufFile::Open(std::string(MOEPOOL_SOURCE_DIR) + "/" + kDefaultSynthVocabPath);
  EXPECT_TRUE(f.ok()) << f.status();
  auto t = Tokenizer::FromGguf(**f);
  EXPECT_TRUE(t.ok()) << t.status();
  return std::move(*t);
}

TEST(OpenAiApiTest, BuildsResponsesWithLogprobsOfByteTokens) {
  auto tok = MistralTokenizer();
  const int32_t byte = tok->PieceToId("<0xE2>");
  const int32_t word = tok->PieceToId("\xe2\x96\x81Hello");
  ASSERT_GE(byte, 0);
  ASSERT_GE(word, 0);
  GenerationResult r;
  r.text = " Hello\xef\xbf\xbd";
  r.tokens = {{word, -0.5f, {{word, -0.5f}, {byte, -2.0f}}}, {byte, -2.0f, {}}};
  r.finish = FinishReason::kLength;
  r.prompt_tokens = 5;
  r.completion_tokens = 2;
  const ResponseMeta meta{NewResponseId("chatcmpl-"), 1700000000, "tiny"};
  const json j = ChatCompletionJson(meta, r, /*logprobs=*/true, *tok);
  // Serialisable (the byte token's piece is not valid UTF-8 on its own) and parseable.
  const json back = json::parse(DumpJson(j));
  EXPECT_EQ(back["object"], "chat.completion");
  EXPECT_EQ(back["id"].get<std::string>().rfind("chatcmpl-", 0), 0u);
  EXPECT_EQ(back["choices"][0]["message"]["role"], "assistant");
  EXPECT_EQ(back["choices"][0]["message"]["content"], r.text);
  EXPECT_EQ(back["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(back["usage"]["total_tokens"], 7);
  const json& content = back["choices"][0]["logprobs"]["content"];
  ASSERT_EQ(content.size(), 2u);
  EXPECT_EQ(content[0]["token"], " Hello");
  EXPECT_FLOAT_EQ(content[0]["logprob"].get<float>(), -0.5f);
  EXPECT_EQ(content[0]["top_logprobs"].size(), 2u);
  EXPECT_EQ(content[1]["bytes"], json::array({0xE2}));
  EXPECT_EQ(content[1]["token"], "\xef\xbf\xbd");

  const json legacy = json::parse(DumpJson(CompletionJson(meta, r, true, *tok)));
  EXPECT_EQ(legacy["object"], "text_completion");
  EXPECT_EQ(legacy["choices"][0]["text"], r.text);
  EXPECT_EQ(legacy["choices"][0]["logprobs"]["text_offset"], json::array({0, 6}));
  EXPECT_EQ(legacy["choices"][0]["logprobs"]["token_logprobs"].size(), 2u);
  EXPECT_TRUE(json::parse(DumpJson(CompletionJson(meta, r, false, *tok)))["choices"][0]["logprobs"]
                  .is_null());
}

TEST(OpenAiApiTest, BuildsStreamChunks) {
  const ResponseMeta meta{"chatcmpl-1", 5, "tiny"};
  json c = ChatCompletionChunkJson(meta, {{"content", "hi"}}, FinishReason::kNone, nullptr);
  EXPECT_EQ(c["object"], "chat.completion.chunk");
  EXPECT_EQ(c["choices"][0]["delta"]["content"], "hi");
  EXPECT_TRUE(c["choices"][0]["finish_reason"].is_null());
  c = ChatCompletionChunkJson(meta, json::object(), FinishReason::kStop, nullptr);
  EXPECT_EQ(c["choices"][0]["finish_reason"], "stop");
  EXPECT_TRUE(c["choices"][0]["delta"].empty());
  const json u = UsageChunkJson(meta, true, 3, 4, 2);
  EXPECT_TRUE(u["choices"].empty());
  EXPECT_EQ(u["usage"]["completion_tokens"], 4);
  EXPECT_EQ(u["usage"]["total_tokens"], 7);
  EXPECT_EQ(u["usage"]["prompt_tokens_details"]["cached_tokens"], 2);
  const json t = CompletionChunkJson(meta, "x", FinishReason::kLength, nullptr);
  EXPECT_EQ(t["choices"][0]["text"], "x");
  EXPECT_EQ(t["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(ModelJson("tiny", 9)["object"], "model");
}

}  // namespace
}  // namespace moepool
