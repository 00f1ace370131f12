// tool_calls.h: the reply split into content or calls as it streams, and tool parsing.
#include "coordinator/tool_calls.h"

#include <string>
#include <vector>

#include "coordinator/openai_api.h"
#include "gtest/gtest.h"

namespace moepool {
namespace {

using ojson = nlohmann::ordered_json;

std::string PushAll(ToolCallReply& reply, const std::vector<std::string>& deltas) {
  std::string sent;
  for (const std::string& d : deltas) sent += reply.Push(d);
  return sent;
}

TEST(ToolCallReplyTest, TextIsHeldOnlyWhileItMayBecomeACall) {
  ToolCallReply text(true);
  EXPECT_EQ(text.Push(" [TO"), "");    // may still be the prefix
  EXPECT_EQ(text.Push("y"), " [TOy");  // is not: everything held is content
  EXPECT_EQ(text.Push(" box"), " box");
  ToolCallReply::Result r = text.Finish();
  EXPECT_FALSE(r.is_call);
  EXPECT_EQ(r.content, "");

  ToolCallReply call(true);
  EXPECT_EQ(PushAll(call, {"[TOOL", "_CALLS] [{\"name\":\"f\",", "\"arguments\":{\"x\":1}},",
                           "{\"name\":\"g\",\"arguments\":{}}]"}),
            "");
  r = call.Finish();
  ASSERT_TRUE(r.is_call);
  ASSERT_EQ(r.calls.size(), 2u);
  EXPECT_EQ(r.calls[0].name, "f");
  EXPECT_EQ(r.calls[0].arguments, R"({"x":1})");
  EXPECT_EQ(r.calls[1].arguments, "{}");
  EXPECT_NE(r.calls[0].id, r.calls[1].id);
  EXPECT_EQ(r.calls[0].id.rfind("call_", 0), 0u);

  ToolCallReply cut(true);  // cut by max_tokens: returned as content
  EXPECT_EQ(cut.Push("[TOOL_CALLS] [{\"name\":"), "");
  r = cut.Finish();
  EXPECT_TRUE(r.is_call);
  EXPECT_TRUE(r.calls.empty());
  EXPECT_EQ(r.content, "[TOOL_CALLS] [{\"name\":");

  ToolCallReply inactive(false);
  EXPECT_EQ(inactive.Push("[TOOL_CALLS]"), "[TOOL_CALLS]");
}

TEST(ToolCallsTest, GrammarFollowsTheChoice) {
  auto spec = ParseTools(ojson::parse(R"({"tools": [
      {"type": "function", "function": {"name": "a", "parameters": {"type": "object",
       "properties": {"n": {"type": "integer"}}, "required": ["n"]}}},
      {"type": "function", "function": {"name": "b"}}],
      "tool_choice": {"type": "function", "function": {"name": "b"}}})"));
  ASSERT_TRUE(spec.ok()) << spec.status();
  auto g = ToolCallGrammar(*spec);
  ASSERT_TRUE(g.ok()) << g.status();
  auto accepts = [&](const JsonGrammar& grammar, const std::string& text) {
    JsonMatcher m(&grammar);
    return m.Advance(text) && m.CanEnd();
  };
  EXPECT_TRUE(accepts(**g, R"([TOOL_CALLS] [{"name":"b","arguments":{}}])"));
  EXPECT_FALSE(accepts(**g, R"([TOOL_CALLS] [{"name":"a","arguments":{"n":1}}])"));  // named b
  EXPECT_FALSE(
      accepts(**g, R"([TOOL_CALLS] [{"name":"b","arguments":{}},{"name":"b","arguments":{}}])"));
  EXPECT_FALSE(accepts(**g, "hello"));

  spec->choice = ToolChoice::kAuto;
  g = ToolCallGrammar(*spec);
  ASSERT_TRUE(g.ok());
  EXPECT_TRUE(accepts(**g, "hello"));
  EXPECT_TRUE(accepts(
      **g, R"([TOOL_CALLS][{"name":"a","arguments":{"n":1}},{"name":"b","arguments":{}}])"));
  EXPECT_FALSE(accepts(**g, R"([TOOL_CALLS] [{"name":"a","arguments":{}}])"));  // n required
  EXPECT_FALSE(accepts(**g, R"([TOOL_CALLS] [{"name":"c","arguments":{}}])"));

  spec->choice = ToolChoice::kNone;
  g = ToolCallGrammar(*spec);
  ASSERT_TRUE(g.ok());
  EXPECT_EQ(*g, nullptr);
}

TEST(ToolCallsTest, ResultsAndCallsAreWrittenAsText) {
  EXPECT_EQ(ToolResultText("c1", "22 \"C\""),
            R"([TOOL_RESULTS] {"call_id":"c1","content":"22 \"C\""}[/TOOL_RESULTS])");
  ToolSpec spec;
  spec.functions.push_back({"f", {}, ojson::object()});
  auto text = ToolCallsText(ojson::parse(R"([{"id":"x","type":"function",
      "function":{"name":"f","arguments":"{\"a\": [1, 2]}"}}])"),
                            spec, "messages[1].tool_calls");
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_EQ(*text, R"([TOOL_CALLS] [{"name":"f","arguments":{"a":[1,2]}}])");
  auto bad = ToolCallsText(ojson::parse(R"([{"function":{"name":"f","arguments":"{"}}])"), spec,
                           "messages[1].tool_calls");
  EXPECT_EQ(ApiParam(bad.status()), "messages[1].tool_calls");
}

}  // namespace
}  // namespace moepool
