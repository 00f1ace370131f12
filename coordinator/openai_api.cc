#include "coordinator/openai_api.h"

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <random>

#include "absl/strings/cord.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "coordinator/json_schema.h"
#include "engine/status_macros.h"

namespace moepool {
namespace {

using json = nlohmann::json;
using ojson = nlohmann::ordered_json;

constexpr char kParamPayload[] = "moepool.dev/api-param";
constexpr char kCodePayload[] = "moepool.dev/api-code";
constexpr int kMaxStopStrings = 16;
constexpr int kMaxTopLogprobs = 20;

std::string FormatNumber(double v) { return absl::StrFormat("%g", v); }

// The member `name` of object `obj`, or nullptr when absent or null (null means "default").
const json* Member(const json& obj, const char* name) {
  auto it = obj.find(name);
  if (it == obj.end() || it->is_null()) return nullptr;
  return &*it;
}

absl::Status ReadBool(const json& obj, const char* name, bool* out) {
  const json* v = Member(obj, name);
  if (v == nullptr) return absl::OkStatus();
  if (!v->is_boolean()) return InvalidRequestError(name, absl::StrCat(name, " must be a boolean"));
  *out = v->get<bool>();
  return absl::OkStatus();
}

absl::Status ReadInt(const json& obj, const char* name, int64_t lo, int64_t hi,
                     std::optional<int64_t>* out) {
  const json* v = Member(obj, name);
  if (v == nullptr) return absl::OkStatus();
  if (!v->is_number_integer()) {
    return InvalidRequestError(name, absl::StrCat(name, " must be an integer"));
  }
  const int64_t x =
      v->is_number_unsigned() && v->get<uint64_t>() > INT64_MAX ? INT64_MAX : v->get<int64_t>();
  if (x < lo || x > hi) {
    return InvalidRequestError(name,
                               absl::StrCat(name, " must be in [", lo, ", ", hi, "], got ", x));
  }
  *out = x;
  return absl::OkStatus();
}

absl::Status ReadNumber(const json& obj, const char* name, double lo, double hi,
                        std::optional<double>* out) {
  const json* v = Member(obj, name);
  if (v == nullptr) return absl::OkStatus();
  if (!v->is_number()) return InvalidRequestError(name, absl::StrCat(name, " must be a number"));
  const double x = v->get<double>();
  if (!(x >= lo && x <= hi)) {
    return InvalidRequestError(name, absl::StrCat(name, " must be in [", FormatNumber(lo), ", ",
                                                  FormatNumber(hi), "], got ", FormatNumber(x)));
  }
  *out = x;
  return absl::OkStatus();
}

absl::StatusOr<json> ParseObject(std::string_view body) {
  json j = json::parse(body.begin(), body.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) {
    return InvalidRequestError("", "the request body is not valid JSON (or not valid UTF-8)");
  }
  if (!j.is_object()) return InvalidRequestError("", "the request body must be a JSON object");
  return j;
}

// Fields both endpoints accept. `legacy_logprobs`: completions' integer logprobs.
absl::Status ParseCommon(const json& j, bool legacy_logprobs, GenerationParams* p) {
  if (const json* m = Member(j, "model")) {
    if (!m->is_string()) return InvalidRequestError("model", "model must be a string");
    p->model = m->get<std::string>();
  }
  RETURN_IF_ERROR(ReadBool(j, "stream", &p->stream));
  if (const json* so = Member(j, "stream_options")) {
    if (!so->is_object()) {
      return InvalidRequestError("stream_options", "stream_options must be an object");
    }
    RETURN_IF_ERROR(ReadBool(*so, "include_usage", &p->include_usage));
  }
  std::optional<int64_t> n, max_tokens, max_completion_tokens, seed, top_k, top_logprobs;
  RETURN_IF_ERROR(ReadInt(j, "n", 1, 128, &n));
  if (n.has_value() && *n != 1) return InvalidRequestError("n", "only n=1 is supported");
  RETURN_IF_ERROR(ReadInt(j, "max_tokens", 1, INT32_MAX, &max_tokens));
  RETURN_IF_ERROR(ReadInt(j, "max_completion_tokens", 1, INT32_MAX, &max_completion_tokens));
  if (max_completion_tokens.has_value()) p->max_tokens = *max_completion_tokens;
  if (max_tokens.has_value()) p->max_tokens = *max_tokens;

  SamplingParams& s = p->sampling;
  s.temperature = 1.0f;
  s.top_p = 1.0f;
  s.top_k = 0;
  s.min_p = 0.0f;
  std::optional<double> temperature, top_p, min_p, presence, frequency;
  RETURN_IF_ERROR(ReadNumber(j, "temperature", 0, 2, &temperature));
  RETURN_IF_ERROR(ReadNumber(j, "top_p", 0, 1, &top_p));
  RETURN_IF_ERROR(ReadNumber(j, "min_p", 0, 1, &min_p));
  RETURN_IF_ERROR(ReadNumber(j, "presence_penalty", -2, 2, &presence));
  RETURN_IF_ERROR(ReadNumber(j, "frequency_penalty", -2, 2, &frequency));
  RETURN_IF_ERROR(ReadInt(j, "top_k", 0, INT32_MAX, &top_k));
  RETURN_IF_ERROR(ReadInt(j, "seed", INT64_MIN, INT64_MAX, &seed));
  if (top_p.has_value() && *top_p <= 0) {
    return InvalidRequestError("top_p", "top_p must be greater than 0");
  }
  if (temperature) s.temperature = static_cast<float>(*temperature);
  if (top_p) s.top_p = static_cast<float>(*top_p);
  if (min_p) s.min_p = static_cast<float>(*min_p);
  if (presence) s.presence_penalty = static_cast<float>(*presence);
  if (frequency) s.frequency_penalty = static_cast<float>(*frequency);
  if (top_k) s.top_k = static_cast<int>(*top_k);
  if (seed) {
    s.seed = static_cast<uint64_t>(*seed);
    p->seed_given = true;
  }

  if (const json* stop = Member(j, "stop")) {
    if (stop->is_string()) {
      p->stop.push_back(stop->get<std::string>());
    } else if (stop->is_array()) {
      for (const json& e : *stop) {
        if (!e.is_string()) return InvalidRequestError("stop", "stop must be a list of strings");
        p->stop.push_back(e.get<std::string>());
      }
    } else {
      return InvalidRequestError("stop", "stop must be a string or a list of strings");
    }
    if (p->stop.size() > kMaxStopStrings) {
      return InvalidRequestError("stop",
                                 absl::StrCat("at most ", kMaxStopStrings, " stop strings"));
    }
    for (const std::string& st : p->stop) {
      if (st.empty()) return InvalidRequestError("stop", "stop strings must not be empty");
    }
  }

  if (const json* bias = Member(j, "logit_bias")) {
    if (!bias->is_object())
      return InvalidRequestError("logit_bias", "logit_bias must be an object");
    for (const auto& [key, value] : bias->items()) {
      char* end = nullptr;
      const long id = std::strtol(key.c_str(), &end, 10);
      if (key.empty() || *end != '\0' || id < 0 || id > INT32_MAX || !value.is_number() ||
          !(std::abs(value.get<double>()) <= 100)) {
        return InvalidRequestError("logit_bias",
                                   "logit_bias maps token ids (strings) to numbers in [-100, 100]");
      }
      p->logit_bias.emplace_back(static_cast<int32_t>(id), value.get<float>());
    }
  }

  if (legacy_logprobs) {
    std::optional<int64_t> lp;
    RETURN_IF_ERROR(ReadInt(j, "logprobs", 0, 5, &lp));
    if (lp) p->top_logprobs = static_cast<int>(*lp);
  } else {
    bool logprobs = false;
    RETURN_IF_ERROR(ReadBool(j, "logprobs", &logprobs));
    RETURN_IF_ERROR(ReadInt(j, "top_logprobs", 0, kMaxTopLogprobs, &top_logprobs));
    if (top_logprobs && !logprobs) {
      return InvalidRequestError("top_logprobs", "top_logprobs requires logprobs to be true");
    }
    if (logprobs) p->top_logprobs = top_logprobs ? static_cast<int>(*top_logprobs) : 0;
  }
  return absl::OkStatus();
}

// The body again with its objects in the order sent (schemas list properties in their order).
ojson OrderedBody(std::string_view body) {
  return ojson::parse(body.begin(), body.end(), nullptr, /*allow_exceptions=*/false);
}

// response_format: text (no grammar), json_object, or json_schema {name, schema, strict}.
absl::Status ParseResponseFormat(const json& j, std::string_view body, GenerationParams* p) {
  const json* rf = Member(j, "response_format");
  if (rf == nullptr) return absl::OkStatus();
  const json* type = rf->is_object() ? Member(*rf, "type") : nullptr;
  const std::string t = type != nullptr && type->is_string() ? type->get<std::string>() : "";
  if (t == "text") return absl::OkStatus();
  if (t == "json_object") {
    p->grammar = GrammarForJsonObject();
    return absl::OkStatus();
  }
  if (t != "json_schema") {
    return InvalidRequestError("response_format",
                               "response_format.type must be text, json_object or json_schema");
  }
  const ojson ordered = OrderedBody(body);
  const ojson& spec = ordered["response_format"];
  auto it = spec.find("json_schema");
  if (it == spec.end() || !it->is_object() || !it->contains("schema")) {
    return InvalidRequestError("response_format",
                               "response_format json_schema needs {\"json_schema\": {\"name\": "
                               "..., \"schema\": {...}}}");
  }
  absl::StatusOr<std::shared_ptr<const JsonGrammar>> g = GrammarForJsonSchema((*it)["schema"]);
  if (!g.ok()) return InvalidRequestError("response_format", std::string(g.status().message()));
  p->grammar = std::move(*g);
  return absl::OkStatus();
}

absl::StatusOr<std::string> MessageContent(const json& m, size_t i) {
  const std::string param = absl::StrCat("messages[", i, "].content");
  const json* c = Member(m, "content");
  if (c == nullptr) return std::string();
  if (c->is_string()) return c->get<std::string>();
  if (!c->is_array()) return InvalidRequestError(param, "content must be a string or an array");
  std::string text;
  for (const json& part : *c) {
    const json* type = part.is_object() ? Member(part, "type") : nullptr;
    const json* t = part.is_object() ? Member(part, "text") : nullptr;
    if (type == nullptr || !type->is_string() || type->get<std::string>() != "text" ||
        t == nullptr || !t->is_string()) {
      return InvalidRequestError(param, "only text content parts are supported");
    }
    if (!text.empty()) text += "\n";
    text += t->get<std::string>();
  }
  return text;
}

// One message, with tool calls and results written as text (tool_calls.h).
absl::StatusOr<ChatMessage> ParseMessage(const json& m, size_t i, const ToolSpec& tools) {
  const std::string param = absl::StrCat("messages[", i, "]");
  if (!m.is_object()) return InvalidRequestError(param, "each message must be an object");
  const json* role = Member(m, "role");
  if (role == nullptr || !role->is_string()) {
    return InvalidRequestError(param + ".role", "role must be a string");
  }
  ChatMessage msg;
  msg.role = role->get<std::string>();
  if (msg.role != "system" && msg.role != "developer" && msg.role != "user" &&
      msg.role != "assistant" && msg.role != "tool") {
    return InvalidRequestError(
        param + ".role", absl::StrCat("unsupported role '", msg.role,
                                      "' (expected system, developer, user, assistant or tool)"));
  }
  ASSIGN_OR_RETURN(msg.content, MessageContent(m, i));
  if (msg.role == "tool") {
    const json* id = Member(m, "tool_call_id");
    if (id == nullptr || !id->is_string()) {
      return InvalidRequestError(param + ".tool_call_id", "a tool message needs tool_call_id");
    }
    msg.content = ToolResultText(id->get<std::string>(), msg.content);
  }
  if (const json* calls = Member(m, "tool_calls"); calls != nullptr && msg.role == "assistant") {
    const ojson ordered = ojson::parse(calls->dump());
    ASSIGN_OR_RETURN(std::string text, ToolCallsText(ordered, tools, param + ".tool_calls"));
    msg.content = msg.content.empty() ? text : absl::StrCat(msg.content, "\n", text);
  }
  return msg;
}

json TokenBytes(const std::string& piece) {
  json bytes = json::array();
  for (unsigned char ch : piece) bytes.push_back(static_cast<int>(ch));
  return bytes;
}

}  // namespace

absl::Status InvalidRequestError(std::string_view param, std::string_view message,
                                 std::string_view code) {
  absl::Status s = absl::InvalidArgumentError(std::string(message));
  if (!param.empty()) s.SetPayload(kParamPayload, absl::Cord(std::string(param)));
  if (!code.empty()) s.SetPayload(kCodePayload, absl::Cord(std::string(code)));
  return s;
}

std::string ApiParam(const absl::Status& status) {
  auto p = status.GetPayload(kParamPayload);
  return p ? std::string(*p) : std::string();
}

std::string ApiCode(const absl::Status& status) {
  auto p = status.GetPayload(kCodePayload);
  return p ? std::string(*p) : std::string();
}

ApiError ToApiError(const absl::Status& status) {
  ApiError e;
  e.message = std::string(status.message());
  e.param = ApiParam(status);
  e.code = ApiCode(status);
  switch (status.code()) {
    case absl::StatusCode::kInvalidArgument:
      e.http_status = 400;
      e.type = "invalid_request_error";
      break;
    case absl::StatusCode::kUnauthenticated:
      e.http_status = 401;
      e.type = "authentication_error";
      if (e.code.empty()) e.code = "invalid_api_key";
      break;
    case absl::StatusCode::kNotFound:
      e.http_status = 404;
      e.type = "invalid_request_error";
      break;
    case absl::StatusCode::kResourceExhausted:
      e.http_status = 429;
      e.type = "rate_limit_error";
      break;
    case absl::StatusCode::kUnavailable:
      e.http_status = 503;
      e.type = "server_error";
      break;
    default:
      e.http_status = 500;
      e.type = "server_error";
      break;
  }
  return e;
}

json ErrorJson(const ApiError& e) {
  json err = {{"message", e.message}, {"type", e.type}};
  err["param"] = e.param.empty() ? json(nullptr) : json(e.param);
  err["code"] = e.code.empty() ? json(nullptr) : json(e.code);
  return {{"error", err}};
}

std::string DumpJson(const json& j) {
  return j.dump(-1, ' ', false, json::error_handler_t::replace);
}

absl::StatusOr<ChatCompletionRequest> ParseChatCompletionRequest(std::string_view body) {
  ASSIGN_OR_RETURN(json j, ParseObject(body));
  ChatCompletionRequest r;
  const json* messages = Member(j, "messages");
  if (messages == nullptr) return InvalidRequestError("messages", "messages is required");
  if (!messages->is_array() || messages->empty()) {
    return InvalidRequestError("messages", "messages must be a non-empty array");
  }
  const bool tools_used = Member(j, "tools") != nullptr || Member(j, "tool_choice") != nullptr ||
                          Member(j, "parallel_tool_calls") != nullptr;
  const ojson ordered = tools_used ? OrderedBody(body) : ojson();
  if (tools_used) {
    ASSIGN_OR_RETURN(r.tools, ParseTools(ordered));
  }
  for (size_t i = 0; i < messages->size(); ++i) {
    ASSIGN_OR_RETURN(ChatMessage msg, ParseMessage((*messages)[i], i, r.tools));
    r.messages.push_back(std::move(msg));
  }
  RETURN_IF_ERROR(ParseCommon(j, /*legacy_logprobs=*/false, &r.params));
  RETURN_IF_ERROR(ParseResponseFormat(j, body, &r.params));
  if (r.tools.active()) {
    if (r.params.grammar != nullptr) {
      return InvalidRequestError("response_format",
                                 "response_format json_object / json_schema together with tools "
                                 "needs tool_choice \"none\"");
    }
    ASSIGN_OR_RETURN(r.params.grammar, ToolCallGrammar(r.tools));
    // The tools are offered at the start of the last user message.
    for (auto m = r.messages.rbegin(); m != r.messages.rend(); ++m) {
      if (m->role != "user") continue;
      m->content = absl::StrCat(AvailableToolsText(r.tools), "\n\n", m->content);
      break;
    }
  }
  return r;
}

absl::StatusOr<CompletionRequest> ParseCompletionRequest(std::string_view body) {
  ASSIGN_OR_RETURN(json j, ParseObject(body));
  CompletionRequest r;
  const json* prompt = Member(j, "prompt");
  if (prompt == nullptr) return InvalidRequestError("prompt", "prompt is required");
  const json* p = prompt;
  // A list of one prompt is that prompt; more would mean several completions.
  if (p->is_array() && p->size() == 1 && ((*p)[0].is_string() || (*p)[0].is_array())) {
    p = &(*p)[0];
  }
  if (p->is_string()) {
    r.prompt = p->get<std::string>();
  } else if (p->is_array() && !p->empty() && (*p)[0].is_number_integer()) {
    for (const json& t : *p) {
      if (!t.is_number_integer() || t.get<int64_t>() < 0 || t.get<int64_t>() > INT32_MAX) {
        return InvalidRequestError("prompt", "a token prompt must be a list of token ids");
      }
      r.prompt_tokens.push_back(static_cast<int32_t>(t.get<int64_t>()));
    }
    r.has_prompt_tokens = true;
  } else if (p->is_array() && p->size() > 1) {
    return InvalidRequestError("prompt", "only one prompt per request is supported");
  } else {
    return InvalidRequestError("prompt", "prompt must be a string or a list of token ids");
  }
  r.params.max_tokens = 16;
  RETURN_IF_ERROR(ParseCommon(j, /*legacy_logprobs=*/true, &r.params));
  RETURN_IF_ERROR(ParseResponseFormat(j, body, &r.params));
  if (const json* tools = Member(j, "tools")) {
    if (!tools->is_array() || !tools->empty()) {
      return InvalidRequestError("tools", "tools are supported on /v1/chat/completions only");
    }
  }
  bool echo = false;
  RETURN_IF_ERROR(ReadBool(j, "echo", &echo));
  if (echo) return InvalidRequestError("echo", "echo is not supported");
  if (const json* suffix = Member(j, "suffix")) {
    if (!suffix->is_string() || !suffix->get<std::string>().empty()) {
      return InvalidRequestError("suffix", "suffix is not supported");
    }
  }
  std::optional<int64_t> best_of;
  RETURN_IF_ERROR(ReadInt(j, "best_of", 1, 1, &best_of));
  return r;
}

std::string NewResponseId(std::string_view prefix) {
  static std::mutex mu;
  static std::mt19937_64 rng(std::random_device{}());
  std::lock_guard<std::mutex> lock(mu);
  return absl::StrFormat("%s%016x%08x", std::string(prefix), rng(), rng() & 0xffffffffu);
}

json UsageJson(int64_t prompt_tokens, int64_t completion_tokens, int64_t cached_prompt_tokens) {
  return {{"prompt_tokens", prompt_tokens},
          {"completion_tokens", completion_tokens},
          {"total_tokens", prompt_tokens + completion_tokens},
          {"prompt_tokens_details", {{"cached_tokens", cached_prompt_tokens}}}};
}

json FinishReasonJson(FinishReason reason) {
  switch (reason) {
    case FinishReason::kStop:
      return "stop";
    case FinishReason::kLength:
      return "length";
    case FinishReason::kToolCalls:
      return "tool_calls";
    default:
      return nullptr;
  }
}

json ChatLogprobsJson(const std::vector<SampledToken>& tokens, const Tokenizer& tok) {
  json content = json::array();
  for (const SampledToken& t : tokens) {
    const std::string piece = tok.TokenToPiece(t.id);
    json top = json::array();
    for (const TokenLogprob& alt : t.top) {
      const std::string alt_piece = tok.TokenToPiece(alt.token);
      top.push_back(
          {{"token", alt_piece}, {"logprob", alt.logprob}, {"bytes", TokenBytes(alt_piece)}});
    }
    content.push_back({{"token", piece},
                       {"logprob", t.logprob},
                       {"bytes", TokenBytes(piece)},
                       {"top_logprobs", top}});
  }
  return {{"content", content}};
}

json CompletionLogprobsJson(const std::vector<SampledToken>& tokens, const Tokenizer& tok,
                            int64_t text_offset) {
  json toks = json::array(), lps = json::array(), tops = json::array(), offs = json::array();
  for (const SampledToken& t : tokens) {
    const std::string piece = tok.TokenToPiece(t.id);
    toks.push_back(piece);
    lps.push_back(t.logprob);
    json top = json::object();
    for (const TokenLogprob& alt : t.top) top[tok.TokenToPiece(alt.token)] = alt.logprob;
    tops.push_back(top);
    offs.push_back(text_offset);
    text_offset += static_cast<int64_t>(piece.size());
  }
  return {{"tokens", toks}, {"token_logprobs", lps}, {"top_logprobs", tops}, {"text_offset", offs}};
}

json ChatCompletionJson(const ResponseMeta& meta, const GenerationResult& result, bool logprobs,
                        const Tokenizer& tok) {
  json message = {{"role", "assistant"}, {"content", result.text}};
  if (!result.tool_calls.empty()) {
    message["content"] = nullptr;
    message["tool_calls"] = json::array();
    for (const ToolCall& c : result.tool_calls) {
      message["tool_calls"].push_back(
          {{"id", c.id},
           {"type", "function"},
           {"function", {{"name", c.name}, {"arguments", c.arguments}}}});
    }
  }
  json choice = {{"index", 0},
                 {"message", std::move(message)},
                 {"finish_reason", FinishReasonJson(result.finish)}};
  choice["logprobs"] = logprobs ? ChatLogprobsJson(result.tokens, tok) : json(nullptr);
  return {{"id", meta.id},
          {"object", "chat.completion"},
          {"created", meta.created},
          {"model", meta.model},
          {"choices", json::array({choice})},
          {"usage",
           UsageJson(result.prompt_tokens, result.completion_tokens, result.cached_prompt_tokens)}};
}

json ChatCompletionChunkJson(const ResponseMeta& meta, json delta, FinishReason finish,
                             json logprobs) {
  json choice = {{"index", 0}, {"delta", std::move(delta)}, {"logprobs", std::move(logprobs)}};
  choice["finish_reason"] = FinishReasonJson(finish);
  return {{"id", meta.id},
          {"object", "chat.completion.chunk"},
          {"created", meta.created},
          {"model", meta.model},
          {"choices", json::array({choice})}};
}

std::vector<json> ToolCallDeltas(const std::vector<ToolCall>& calls) {
  std::vector<json> deltas;
  for (size_t i = 0; i < calls.size(); ++i) {
    const ToolCall& c = calls[i];
    deltas.push_back(
        {{"tool_calls", json::array({{{"index", i},
                                      {"id", c.id},
                                      {"type", "function"},
                                      {"function", {{"name", c.name}, {"arguments", ""}}}}})}});
    deltas.push_back({{"tool_calls",
                       json::array({{{"index", i}, {"function", {{"arguments", c.arguments}}}}})}});
  }
  return deltas;
}

json CompletionJson(const ResponseMeta& meta, const GenerationResult& result, bool logprobs,
                    const Tokenizer& tok) {
  json choice = {{"index", 0}, {"text", result.text}};
  choice["logprobs"] = logprobs ? CompletionLogprobsJson(result.tokens, tok, 0) : json(nullptr);
  choice["finish_reason"] = FinishReasonJson(result.finish);
  return {{"id", meta.id},
          {"object", "text_completion"},
          {"created", meta.created},
          {"model", meta.model},
          {"choices", json::array({choice})},
          {"usage",
           UsageJson(result.prompt_tokens, result.completion_tokens, result.cached_prompt_tokens)}};
}

json CompletionChunkJson(const ResponseMeta& meta, const std::string& text, FinishReason finish,
                         json logprobs) {
  json choice = {{"index", 0}, {"text", text}, {"logprobs", std::move(logprobs)}};
  choice["finish_reason"] = FinishReasonJson(finish);
  return {{"id", meta.id},
          {"object", "text_completion"},
          {"created", meta.created},
          {"model", meta.model},
          {"choices", json::array({choice})}};
}

json UsageChunkJson(const ResponseMeta& meta, bool chat, int64_t prompt_tokens,
                    int64_t completion_tokens, int64_t cached_prompt_tokens) {
  return {{"id", meta.id},
          {"object", chat ? "chat.completion.chunk" : "text_completion"},
          {"created", meta.created},
          {"model", meta.model},
          {"choices", json::array()},
          {"usage", UsageJson(prompt_tokens, completion_tokens, cached_prompt_tokens)}};
}

json ModelJson(const std::string& id, int64_t created) {
  return {{"id", id}, {"object", "model"}, {"created", created}, {"owned_by", "moepool"}};
}

}  // namespace moepool
