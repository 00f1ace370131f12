// Tool (function) calling for chat completions: the request's `tools` / `tool_choice`, how tools,
// calls and results are written into the prompt, the grammar that constrains a call, and the
// reply split back into content or calls.
//
// The text format (Mistral's published tool convention; the built-in chat templates have none):
//   tools offered     [AVAILABLE_TOOLS] [{"type":"function","function":{...}},
//   ...][/AVAILABLE_TOOLS]
//                     at the start of the last user message
//   the model calls   [TOOL_CALLS] [{"name": "f", "arguments": {...}}, ...]
//                     (a reply that starts with "[TOOL_CALLS]", after optional whitespace)
//   results           [TOOL_RESULTS] {"call_id": "...", "content": ...}[/TOOL_RESULTS]
//                     one role "tool" message each
// With tool_choice "required" or a named function the reply must be a call (the grammar starts
// with the prefix); with "auto" the reply is free text unless it starts with the prefix, after
// which the call is constrained; with "none" tools are not offered and nothing is constrained.
// Arguments follow each function's `parameters` schema (json_schema.h).
//
// Threading: stateless functions; a ToolCallReply is one response's, not thread-safe.
#ifndef MOEPOOL_COORDINATOR_TOOL_CALLS_H_
#define MOEPOOL_COORDINATOR_TOOL_CALLS_H_

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "coordinator/json_grammar.h"
#include "nlohmann/json.hpp"

namespace moepool {

inline constexpr char kToolCallsPrefix[] = "[TOOL_CALLS]";

struct ToolFunction {
  std::string name;
  nlohmann::ordered_json definition;  // {"type": "function", "function": {...}} as sent
  nlohmann::ordered_json parameters;  // the arguments' schema ({} when absent)
};

enum class ToolChoice { kAuto, kNone, kRequired, kNamed };

struct ToolSpec {
  std::vector<ToolFunction> functions;
  ToolChoice choice = ToolChoice::kAuto;
  std::string named;     // kNamed
  bool parallel = true;  // parallel_tool_calls: more than one call per reply
  // Tools are offered and the reply may be a call.
  bool active() const { return !functions.empty() && choice != ToolChoice::kNone; }
  bool Has(std::string_view name) const;
};

// Reads `tools`, `tool_choice` and `parallel_tool_calls` of a chat request. INVALID_ARGUMENT
// (with ApiParam "tools" / "tool_choice") for malformed tools, duplicate or invalid names, an
// unsupported `parameters` schema, a choice naming a missing tool or requiring one when there
// are none.
absl::StatusOr<ToolSpec> ParseTools(const nlohmann::ordered_json& request);

// The grammar of a reply under `spec` (null when nothing is constrained: no tools or "none").
// INVALID_ARGUMENT for a parameters schema the grammar cannot express.
absl::StatusOr<std::shared_ptr<const JsonGrammar>> ToolCallGrammar(const ToolSpec& spec);

// Prompt text: the tools offered, an assistant message's calls, a tool result.
std::string AvailableToolsText(const ToolSpec& spec);
// `calls`: an assistant message's tool_calls as sent. INVALID_ARGUMENT (naming `param`) for a
// malformed call or one to a function `spec` lacks.
absl::StatusOr<std::string> ToolCallsText(const nlohmann::ordered_json& calls, const ToolSpec& spec,
                                          const std::string& param);
std::string ToolResultText(const std::string& call_id, const std::string& content);

struct ToolCall {
  std::string id;  // "call_..."
  std::string name;
  std::string arguments;  // JSON text
};

// A chat reply split into content and tool calls while it streams.
class ToolCallReply {
 public:
  // Inactive: every delta is content.
  explicit ToolCallReply(bool active) : active_(active) {}

  // Content to send now; text that may still become "[TOOL_CALLS]" is held back, and once the
  // reply is a call nothing is sent until Finish.
  std::string Push(std::string_view delta);

  struct Result {
    std::string content;          // held-back content (the whole reply if not streaming)
    std::vector<ToolCall> calls;  // when the reply was a call
    bool is_call = false;         // the reply started with the prefix
  };
  // The rest of the reply. A call whose text does not parse (cut by max_tokens) is returned as
  // content, with is_call set.
  Result Finish();

 private:
  enum class Mode { kUndecided, kText, kCall };
  bool active_;
  Mode mode_ = Mode::kUndecided;
  std::string held_;
};

}  // namespace moepool

#endif  // MOEPOOL_COORDINATOR_TOOL_CALLS_H_
