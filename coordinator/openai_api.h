// The OpenAI API's JSON: request parsing with validation, response and stream-chunk building,
// and error objects. Pure functions over nlohmann::json, testable without sockets.
//
// Validation errors are INVALID_ARGUMENT statuses carrying the offending parameter (ApiParam)
// and, where OpenAI defines one, an error code (ApiCode); ToApiError turns any status into the
// HTTP status and {"error": {"message", "type", "param", "code"}} body OpenAI clients expect.
// Unknown request fields are ignored, as most OpenAI-compatible servers do.
//
// Threading: stateless; every function may be called from any thread.
#ifndef MOEPOOL_COORDINATOR_OPENAI_API_H_
#define MOEPOOL_COORDINATOR_OPENAI_API_H_

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "coordinator/chat_template.h"
#include "coordinator/json_grammar.h"
#include "coordinator/scheduler.h"
#include "coordinator/tool_calls.h"
#include "engine/sampler.h"
#include "engine/tokenizer.h"
#include "nlohmann/json.hpp"

namespace moepool {

// INVALID_ARGUMENT naming `param` (may be empty) and an optional OpenAI error `code`.
absl::Status InvalidRequestError(std::string_view param, std::string_view message,
                                 std::string_view code = "");
std::string ApiParam(const absl::Status& status);
std::string ApiCode(const absl::Status& status);

struct ApiError {
  int http_status = 500;
  std::string type;  // "invalid_request_error", "authentication_error", ...
  std::string message;
  std::string param;  // "" -> null
  std::string code;   // "" -> null
};

// INVALID_ARGUMENT -> 400, UNAUTHENTICATED -> 401, NOT_FOUND -> 404, RESOURCE_EXHAUSTED -> 429,
// UNAVAILABLE -> 503, anything else -> 500.
ApiError ToApiError(const absl::Status& status);
nlohmann::json ErrorJson(const ApiError& error);

// Serialises with invalid UTF-8 replaced by U+FFFD (never throws).
std::string DumpJson(const nlohmann::json& j);

// Parameters shared by both endpoints.
struct GenerationParams {
  std::string model;        // as sent ("" if absent)
  int64_t max_tokens = -1;  // -1: until the context is full
  SamplingParams sampling;  // OpenAI defaults: temperature 1, top_p 1, no top-k/min-p
  bool seed_given = false;  // otherwise the server picks a seed
  std::vector<std::string> stop;
  std::vector<std::pair<int32_t, float>> logit_bias;
  bool stream = false;
  bool include_usage = false;  // stream_options.include_usage
  int top_logprobs = -1;       // < 0: no logprobs
  // response_format json_object / json_schema: the reply's grammar (json_schema.h); null for
  // text.
  std::shared_ptr<const JsonGrammar> grammar;
};

// Chat messages are returned rendered for the template: tool calls, tool results and the tools
// offered are written into the messages' text (tool_calls.h).
struct ChatCompletionRequest {
  std::vector<ChatMessage> messages;
  GenerationParams params;
  ToolSpec tools;
};

struct CompletionRequest {
  std::string prompt;                  // text prompt, or
  std::vector<int32_t> prompt_tokens;  // token ids (then `prompt` is empty)
  bool has_prompt_tokens = false;
  GenerationParams params;  // max_tokens defaults to 16, as OpenAI's legacy endpoint
};

// Parse and validate a request body. INVALID_ARGUMENT (with ApiParam) for malformed JSON, wrong
// types, out-of-range values, unknown roles, n != 1 and unsupported features.
absl::StatusOr<ChatCompletionRequest> ParseChatCompletionRequest(std::string_view body);
absl::StatusOr<CompletionRequest> ParseCompletionRequest(std::string_view body);

// Everything a finished, non-streamed generation produced.
struct GenerationResult {
  std::string text;
  std::vector<SampledToken> tokens;
  FinishReason finish = FinishReason::kNone;
  int64_t prompt_tokens = 0;
  int64_t cached_prompt_tokens = 0;  // usage.prompt_tokens_details.cached_tokens
  int64_t completion_tokens = 0;
  std::vector<ToolCall> tool_calls;  // with finish kToolCalls: message.content is null
};

// Response identity shared by a response or all chunks of one stream.
struct ResponseMeta {
  std::string id;  // "chatcmpl-..." / "cmpl-..."
  int64_t created = 0;
  std::string model;
};

// A fresh response id with `prefix`, e.g. NewResponseId("chatcmpl-").
std::string NewResponseId(std::string_view prefix);

// OpenAI's usage object; cached_prompt_tokens (prompt tokens served from the prefix cache) goes
// to prompt_tokens_details.cached_tokens.
nlohmann::json UsageJson(int64_t prompt_tokens, int64_t completion_tokens,
                         int64_t cached_prompt_tokens);
// "stop" / "length"; null for an unfinished stream.
nlohmann::json FinishReasonJson(FinishReason reason);

// Chat `logprobs` object {"content": [{token, logprob, bytes, top_logprobs}]}.
nlohmann::json ChatLogprobsJson(const std::vector<SampledToken>& tokens, const Tokenizer& tok);
// Legacy completions `logprobs` object {tokens, token_logprobs, top_logprobs, text_offset}.
nlohmann::json CompletionLogprobsJson(const std::vector<SampledToken>& tokens, const Tokenizer& tok,
                                      int64_t text_offset);

nlohmann::json ChatCompletionJson(const ResponseMeta& meta, const GenerationResult& result,
                                  bool logprobs, const Tokenizer& tok);
// One stream chunk: `delta` is {"role": ...} / {"content": ...} / {}; `logprobs` null to omit.
// ToolCallDeltas: the deltas announcing `calls` (id, type, name; then the arguments).
nlohmann::json ChatCompletionChunkJson(const ResponseMeta& meta, nlohmann::json delta,
                                       FinishReason finish, nlohmann::json logprobs);
std::vector<nlohmann::json> ToolCallDeltas(const std::vector<ToolCall>& calls);
nlohmann::json CompletionJson(const ResponseMeta& meta, const GenerationResult& result,
                              bool logprobs, const Tokenizer& tok);
nlohmann::json CompletionChunkJson(const ResponseMeta& meta, const std::string& text,
                                   FinishReason finish, nlohmann::json logprobs);
// The final usage-only chunk of a stream with include_usage (choices empty).
nlohmann::json UsageChunkJson(const ResponseMeta& meta, bool chat, int64_t prompt_tokens,
                              int64_t completion_tokens, int64_t cached_prompt_tokens);
nlohmann::json ModelJson(const std::string& id, int64_t created);

}  // namespace moepool

#endif  // MOEPOOL_COORDINATOR_OPENAI_API_H_
