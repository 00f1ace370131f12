#include "coordinator/tool_calls.h"

#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "coordinator/json_schema.h"
#include "coordinator/openai_api.h"
#include "engine/status_macros.h"

namespace moepool {
namespace {

using json = nlohmann::ordered_json;
using Kind = GrammarNode::Kind;

bool ValidName(const std::string& name) {
  if (name.empty() || name.size() > 64) return false;
  for (char c : name) {
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '-')) return false;
  }
  return true;
}

const json* Field(const json& obj, const char* name) {
  if (!obj.is_object()) return nullptr;
  auto it = obj.find(name);
  return it == obj.end() || it->is_null() ? nullptr : &*it;
}

absl::StatusOr<ToolFunction> ParseTool(const json& tool, size_t i) {
  const std::string param = absl::StrCat("tools[", i, "]");
  const json* type = Field(tool, "type");
  const json* fn = Field(tool, "function");
  if (type == nullptr || *type != "function" || fn == nullptr || !fn->is_object()) {
    return InvalidRequestError("tools", param +
                                            " must be {\"type\": \"function\", \"function\": "
                                            "{\"name\": ..., \"parameters\": ...}}");
  }
  const json* name = Field(*fn, "name");
  if (name == nullptr || !name->is_string() || !ValidName(name->get<std::string>())) {
    return InvalidRequestError(
        "tools", param + ".function.name must be 1 to 64 letters, digits, '_' or '-'");
  }
  ToolFunction f;
  f.name = name->get<std::string>();
  f.definition = tool;
  if (const json* p = Field(*fn, "parameters")) {
    if (!p->is_object()) {
      return InvalidRequestError("tools", param + ".function.parameters must be a JSON schema");
    }
    f.parameters = *p;
  } else {
    f.parameters = {
        {"type", "object"}, {"properties", json::object()}, {"additionalProperties", false}};
  }
  return f;
}

absl::Status ParseChoice(const json& request, ToolSpec* spec) {
  const json* choice = Field(request, "tool_choice");
  if (choice == nullptr) {
    spec->choice = ToolChoice::kAuto;
    return absl::OkStatus();
  }
  if (choice->is_string()) {
    const std::string c = choice->get<std::string>();
    if (c == "auto") {
      spec->choice = ToolChoice::kAuto;
    } else if (c == "none") {
      spec->choice = ToolChoice::kNone;
    } else if (c == "required") {
      spec->choice = ToolChoice::kRequired;
    } else {
      return InvalidRequestError("tool_choice", absl::StrCat("tool_choice '", c,
                                                             "' is not one "
                                                             "of auto, none, required"));
    }
  } else {
    const json* fn = Field(*choice, "function");
    const json* name = fn != nullptr ? Field(*fn, "name") : nullptr;
    if (name == nullptr || !name->is_string()) {
      return InvalidRequestError("tool_choice",
                                 "tool_choice must be auto, none, required or {\"type\": "
                                 "\"function\", \"function\": {\"name\": ...}}");
    }
    spec->choice = ToolChoice::kNamed;
    spec->named = name->get<std::string>();
    if (!spec->Has(spec->named)) {
      return InvalidRequestError("tool_choice",
                                 absl::StrCat("tool_choice names the function '", spec->named,
                                              "', which is not in tools"));
    }
  }
  if (spec->functions.empty() && spec->choice != ToolChoice::kNone && choice->is_string() &&
      choice->get<std::string>() != "auto") {
    return InvalidRequestError("tool_choice", "tool_choice requires tools");
  }
  return absl::OkStatus();
}

// {"name": <the function's name>, "arguments": <its parameters>}
absl::StatusOr<int32_t> AddCall(const ToolFunction& f, size_t i, JsonGrammar* g) {
  GrammarNode call{.kind = Kind::kObject};
  call.children.push_back(g->AddLiterals({{json(f.name).dump(), 0}}));
  absl::StatusOr<int32_t> args = AddJsonSchema(
      f.parameters, f.parameters, absl::StrCat("tools[", i, "].function.parameters"), g);
  if (!args.ok()) return InvalidRequestError("tools", std::string(args.status().message()));
  call.children.push_back(*args);
  call.key_nodes = {g->AddLiterals({{"\"name\"", 0}}), g->AddLiterals({{"\"arguments\"", 1}}), -1};
  call.closable = {false, false, true};
  return g->Add(std::move(call));
}

std::string NewCallId() { return NewResponseId("call_"); }

}  // namespace

bool ToolSpec::Has(std::string_view name) const {
  for (const ToolFunction& f : functions) {
    if (f.name == name) return true;
  }
  return false;
}

absl::StatusOr<ToolSpec> ParseTools(const json& request) {
  ToolSpec spec;
  if (const json* tools = Field(request, "tools")) {
    if (!tools->is_array()) return InvalidRequestError("tools", "tools must be an array");
    std::set<std::string> names;
    for (size_t i = 0; i < tools->size(); ++i) {
      ASSIGN_OR_RETURN(ToolFunction f, ParseTool((*tools)[i], i));
      if (!names.insert(f.name).second) {
        return InvalidRequestError("tools", absl::StrCat("tools: the function name '", f.name,
                                                         "' appears more than once"));
      }
      spec.functions.push_back(std::move(f));
    }
  }
  RETURN_IF_ERROR(ParseChoice(request, &spec));
  if (const json* p = Field(request, "parallel_tool_calls")) {
    if (!p->is_boolean()) {
      return InvalidRequestError("parallel_tool_calls", "parallel_tool_calls must be a boolean");
    }
    spec.parallel = p->get<bool>();
  }
  return spec;
}

absl::StatusOr<std::shared_ptr<const JsonGrammar>> ToolCallGrammar(const ToolSpec& spec) {
  if (!spec.active()) return std::shared_ptr<const JsonGrammar>();
  auto g = std::make_shared<JsonGrammar>();
  std::vector<int32_t> calls;
  for (size_t i = 0; i < spec.functions.size(); ++i) {
    const ToolFunction& f = spec.functions[i];
    if (spec.choice == ToolChoice::kNamed && f.name != spec.named) continue;
    ASSIGN_OR_RETURN(int32_t call, AddCall(f, i, g.get()));
    calls.push_back(call);
  }
  GrammarNode any{.kind = Kind::kAnyOf};
  any.children = calls;
  GrammarNode list{.kind = Kind::kArray};
  list.child = calls.size() == 1 ? calls[0] : g->Add(std::move(any));
  list.min_length = 1;
  list.max_length = spec.parallel && spec.choice != ToolChoice::kNamed ? -1 : 1;
  GrammarNode root{.kind = Kind::kPrefixed};
  root.prefix = kToolCallsPrefix;
  root.child = g->Add(std::move(list));
  root.free_text_escape = spec.choice == ToolChoice::kAuto;
  g->root = g->Add(std::move(root));
  return std::shared_ptr<const JsonGrammar>(std::move(g));
}

std::string AvailableToolsText(const ToolSpec& spec) {
  json defs = json::array();
  for (const ToolFunction& f : spec.functions) defs.push_back(f.definition);
  return absl::StrCat("[AVAILABLE_TOOLS] ", defs.dump(), "[/AVAILABLE_TOOLS]");
}

absl::StatusOr<std::string> ToolCallsText(const json& calls, const ToolSpec& spec,
                                          const std::string& param) {
  if (!calls.is_array()) return InvalidRequestError(param, param + " must be an array");
  json out = json::array();
  for (const json& call : calls) {
    const json* fn = Field(call, "function");
    const json* name = fn != nullptr ? Field(*fn, "name") : nullptr;
    if (name == nullptr || !name->is_string()) {
      return InvalidRequestError(param, param + ": each call needs function.name");
    }
    if (!spec.Has(name->get<std::string>())) {
      return InvalidRequestError(
          param, absl::StrCat(param, ": a call to the function '", name->get<std::string>(),
                              "', which is not in tools"));
    }
    json args = json::object();
    if (const json* a = Field(*fn, "arguments")) {
      args = a->is_string() ? json::parse(a->get<std::string>(), nullptr, false) : *a;
      if (args.is_discarded()) return InvalidRequestError(param, param + ": arguments is not JSON");
    }
    out.push_back({{"name", *name}, {"arguments", args}});
  }
  return absl::StrCat(kToolCallsPrefix, " ", out.dump());
}

std::string ToolResultText(const std::string& call_id, const std::string& content) {
  const json result = {{"call_id", call_id}, {"content", content}};
  return absl::StrCat("[TOOL_RESULTS] ",
                      result.dump(-1, ' ', false, json::error_handler_t::replace),
                      "[/TOOL_RESULTS]");
}

std::string ToolCallReply::Push(std::string_view delta) {
  if (!active_ || mode_ == Mode::kText) return std::string(delta);
  held_ += delta;
  if (mode_ == Mode::kCall) return "";
  const std::string_view prefix = kToolCallsPrefix;
  const size_t start = held_.find_first_not_of(" \n\t");
  const std::string_view rest =
      start == std::string::npos ? std::string_view() : std::string_view(held_).substr(start);
  if (rest.substr(0, prefix.size()) == prefix.substr(0, rest.size())) {
    if (rest.size() >= prefix.size()) mode_ = Mode::kCall;
    return "";
  }
  mode_ = Mode::kText;
  return std::exchange(held_, std::string());
}

ToolCallReply::Result ToolCallReply::Finish() {
  Result r;
  r.is_call = mode_ == Mode::kCall;
  if (!r.is_call) {
    r.content = std::exchange(held_, std::string());
    return r;
  }
  const size_t at = held_.find(kToolCallsPrefix) + std::string_view(kToolCallsPrefix).size();
  const json list = json::parse(held_.substr(at), nullptr, /*allow_exceptions=*/false);
  bool ok = list.is_array() && !list.empty();
  for (size_t i = 0; ok && i < list.size(); ++i) {
    const json* name = Field(list[i], "name");
    const json* args = Field(list[i], "arguments");
    ok = name != nullptr && name->is_string() && args != nullptr;
    if (ok) r.calls.push_back({NewCallId(), name->get<std::string>(), args->dump()});
  }
  if (!ok) {
    r.calls.clear();
    r.content = std::exchange(held_, std::string());
  }
  return r;
}

}  // namespace moepool
